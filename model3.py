#!/usr/bin/env python3
"""Reference model for modelpool: slow to load, then answers one JSON line at a time.

Protocol (JSON lines over stdin/stdout):
  start-up   prints "initializing model...", counts " 0".." 4" (one step a second),
             then "ready: Model-initialized" and "Loading data from the stdin";
  per line   prints "input: <line>", "Start calculations", sleeps abs(tan(data)) s,
             "Done in X.XXsec", then "result: {"ice_found": true}";
  bad input  a line that is not JSON, or has no "data" field, raises: the traceback
             goes to stderr and the process exits non-zero;
  shutdown   exits when stdin closes.

It uses plain print(), so like a real model its stdout is block-buffered on a pipe:
run it with `python -u` (or PYTHONUNBUFFERED=1) to see lines as they are printed.

Two environment variables shorten the start-up for tests:
  MODEL3_INIT_STEPS     number of counting steps (default 5)
  MODEL3_STEP_SECONDS   delay of each step in seconds (default 1.0)
"""

import json
import math
import os
import sys
import time


def initialize() -> None:
    steps = int(os.environ.get("MODEL3_INIT_STEPS", "5"))
    delay = float(os.environ.get("MODEL3_STEP_SECONDS", "1.0"))
    print("initializing model...")
    for i in range(steps):
        time.sleep(delay)
        print(f" {i}")
    print("ready: Model-initialized")
    print("Loading data from the stdin")


def compute(line: str) -> dict:
    print(f"input: {line}")
    request = json.loads(line)
    if not isinstance(request, dict) or "data" not in request:
        raise ValueError(f"request has no 'data' field: {line}")
    print("Start calculations")
    started = time.monotonic()
    time.sleep(abs(math.tan(request["data"])))
    print(f"Done in {time.monotonic() - started:.2f}sec")
    return {"ice_found": True}


def main() -> None:
    initialize()
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        result = compute(line)
        print(f"result: {json.dumps(result)}")


if __name__ == "__main__":
    main()
