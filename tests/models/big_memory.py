#!/usr/bin/env python3
"""A model that holds BIG_MODEL_MIB MiB (default 300) once loaded, every page written, as
a real model holds its weights, after BIG_MODEL_LOAD_SECONDS (default 0) more of loading
(reading them, say); then answers one request at a time:
  {}                 its pid, its parent's pid, and how much it holds of its own
  {"grow_mib": n}    keeps n more MiB of its own, every page written
  {"touch_mib": n}   writes to the first n MiB of its weights (a fork's copy-on-write
                     makes them its own)
  {"sleep": s}       computes for s seconds first
  {"exit": code}     exits instead of answering
"""

import json
import os
import sys
import time

PAGE = 4096
time.sleep(float(os.environ.get("BIG_MODEL_LOAD_SECONDS", "0")))
weights = bytearray(int(os.environ.get("BIG_MODEL_MIB", "300")) << 20)
for offset in range(0, len(weights), PAGE):
    weights[offset] = 1
held = []
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    if "exit" in request:
        sys.exit(request["exit"])
    if request.get("grow_mib"):
        block = bytearray(request["grow_mib"] << 20)
        for offset in range(0, len(block), PAGE):
            block[offset] = 1
        held.append(block)
    for offset in range(0, min(request.get("touch_mib", 0) << 20, len(weights)), PAGE):
        weights[offset] = 2
    time.sleep(request.get("sleep", 0))
    answer = {"pid": os.getpid(), "ppid": os.getppid(), "held_mib": sum(map(len, held)) >> 20}
    print("result: " + json.dumps(answer))
