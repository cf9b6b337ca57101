#!/usr/bin/env python3
"""A model whose memory grows on request: {"grow_mib": n} keeps n more MiB for good,
{"grow_mib": n, "then_sleep": s} grows, then computes for s seconds. It answers with
its pid and how much it holds."""

import json
import os
import sys
import time

held = []
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    grow = request.get("grow_mib", 0)
    if grow:
        block = bytearray(grow * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1  # touch every page, so it is resident
        held.append(block)
    time.sleep(request.get("then_sleep", 0))
    print("result: " + json.dumps({"pid": os.getpid(), "held_mib": sum(map(len, held)) >> 20}))
