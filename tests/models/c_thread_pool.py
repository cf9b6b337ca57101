#!/usr/bin/env python3
"""A model that starts a thread pool as C libraries do (a thread Python's threading does
not know of, here started with _thread) early in its load, then loads for LOAD_SECONDS
more: never safe to fork. It answers with its pid; with STARTS_FILE, it writes its pid
there as it starts."""

import _thread
import json
import os
import sys
import time

if os.environ.get("STARTS_FILE"):
    with open(os.environ["STARTS_FILE"], "a") as starts:
        starts.write(f"{os.getpid()}\n")
_thread.start_new_thread(time.sleep, (3600,))
time.sleep(float(os.environ.get("LOAD_SECONDS", "3")))
print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    print("result: " + json.dumps({"pid": os.getpid()}))
