#!/usr/bin/env python3
"""A model whose stdout is block-buffered whatever PYTHONUNBUFFERED says: what it prints
stays in its buffer until it flushes. It prints a line after its ready line and does not
flush it before it reads its first request; each answer is flushed."""

import io
import json
import os
import sys

sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16))
print("ready: Model-initialized", flush=True)
print("loaded: printed once, before any request")  # in the buffer at the first read
for line in sys.stdin:
    json.loads(line)
    print("result: " + json.dumps({"pid": os.getpid()}), flush=True)
