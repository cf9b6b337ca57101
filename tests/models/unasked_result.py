#!/usr/bin/env python3
"""Answers its first request, then prints a result while nobody asked for one.

UNASKED_AFTER: seconds after answering before the stray result (default 0.3).
"""

import json
import os
import sys
import time

print("ready: Model-initialized")
line = sys.stdin.readline()
print("result: " + json.dumps({"echo": json.loads(line), "pid": os.getpid()}))
time.sleep(float(os.environ.get("UNASKED_AFTER", "0.3")))
print('result: {"stray": true}')
for _line in sys.stdin:
    print('result: {"stray": true}')
