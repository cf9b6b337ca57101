#!/usr/bin/env python3
"""A model that keeps library prints out of its results, as many do: it writes its
results through a duplicate of its stdout (os.dup(1)) and makes fd 1 its stderr
(os.dup2(2, 1)), so that whatever else prints to stdout lands on stderr. It prints such
a line for every request, and answers with its pid."""

import json
import os
import sys

results = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
print("ready: Model-initialized", file=results)
for line in sys.stdin:
    request = json.loads(line)
    print(f"a library's print for request {request.get('n')}", flush=True)  # to fd 1: stderr
    results.write("result: " + json.dumps({"pid": os.getpid(), "n": request.get("n")}) + "\n")
