#!/usr/bin/env python3
"""Answers, then takes its time before it reads its next request.

Per request {"sleep": t, "then_sleep": s}: the result after t seconds, then s seconds
of sleep before the model goes back to reading its stdin.
A model that does not get back to reading within --timeout is taken for hung.
"""

import json
import os
import sys
import time

print("ready: Model-initialized")
for count, line in enumerate(sys.stdin, start=1):
    request = json.loads(line)
    time.sleep(request.get("sleep", 0))
    print("result: " + json.dumps({"echo": request, "pid": os.getpid(), "count": count}))
    time.sleep(request.get("then_sleep", 0))
