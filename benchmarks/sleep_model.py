#!/usr/bin/env python3
"""A model that sleeps: for bench_models.py, where what matters is how slots move, not
what a model computes.

  start-up   sleeps `--start` seconds (default 0), as a model loading its weights
             would, then prints the ready line;
  per line   a JSON object {"sleep": S} (S seconds, default 0): sleeps S seconds and
             answers `result: {"slept": S, "pid": PID}`, flushed;
  shutdown   exits when stdin closes.

It reads requests with `for line in sys.stdin`, so it forks under --preload.
"""

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--start", type=float, default=0.0, help="seconds to load")
args = parser.parse_args()
time.sleep(args.start)
print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    if not line.strip():
        continue
    seconds = float(json.loads(line).get("sleep", 0))
    time.sleep(seconds)
    print("result: " + json.dumps({"slept": seconds, "pid": os.getpid()}), flush=True)
