#!/usr/bin/env python3
"""Prints lines that merely contain `result: `, or look like one, before the real result.

Only a line that starts with exactly `result: ` is a result.
"""

import json
import sys

print("the result: of loading is ready")
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    print('progress: result: {"fake": "not at the start of the line"}')
    print(' result: {"fake": "a leading space"}')
    print('RESULT: {"fake": "upper case"}')
    print('result:{"fake": "no space after the colon"}')
    print('the result: {"fake": 1}')
    print("result: " + json.dumps({"echo": request, "real": True}))
