#!/usr/bin/env python3
"""Answers, then floods stdout with lines that are not results, for ever, as asked.

Per request {"flood": "stdout"} (or "stderr"): the result, then short noise lines on
that stream in 60 KB writes, as fast as the pipe takes them, without ever reading stdin
again. Any other request is echoed as {"echo": <request>, "pid": <pid>}.
"""

import json
import os
import sys

NOISE = b"noise that is not a result\n" * 2200
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    print("result: " + json.dumps({"echo": request, "pid": os.getpid()}))
    if "flood" in request:
        fd = 2 if request["flood"] == "stderr" else 1
        while True:
            os.write(fd, NOISE)
