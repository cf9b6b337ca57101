#!/usr/bin/env python3
"""A model that writes its results to a file it opened as /dev/stdout (on Linux: its
fd 1's pipe, opened again through /proc/self/fd/1). It answers with its pid."""

import json
import os
import sys

results = open("/dev/stdout", "w", buffering=1)  # noqa: SIM115 (its whole life)
print("ready: Model-initialized", file=results)
for line in sys.stdin:
    request = json.loads(line)
    results.write("result: " + json.dumps({"pid": os.getpid(), "n": request.get("n")}) + "\n")
