#!/usr/bin/env python3
"""Ignores SIGTERM, SIGINT and SIGHUP, and keeps running after its stdin closes.

Per request it answers at once, or sleeps {"sleep": s} first. Only SIGKILL stops it.
"""

import json
import os
import signal
import sys
import time

for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    time.sleep(request.get("sleep", 0))
    print("result: " + json.dumps({"pid": os.getpid()}))
while True:
    time.sleep(1)
