#!/usr/bin/env python3
"""Loads forever, never printing its ready line: a line of progress every 0.2 s, on
the stream LOADER_STREAM names (stderr by default, as most libraries report)."""

import os
import sys
import time

stream = sys.stdout if os.environ.get("LOADER_STREAM") == "stdout" else sys.stderr
shard = 0
while True:
    shard += 1
    print(f"loading shard {shard}", file=stream, flush=True)
    time.sleep(0.2)
