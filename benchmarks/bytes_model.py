#!/usr/bin/env python3
"""A model whose loaded data is bytes, as numpy buffers, weights and mmaps are: a
bytearray of BYTES_MODEL_MIB MiB (default 512), every page written while it loads. Each
request {"lookups": n, "seed": s} reads n random 64-byte slices of it (chosen by a
generator seeded with s) and answers with a checksum of them and its pid.

Reading bytes writes nothing: a child forked from a template that holds them shares
every page of them for good. The bench (preload.py) measures that it does.
"""

import json
import os
import random
import sys
import zlib

SLICE = 64
data = bytearray(int(os.environ.get("BYTES_MODEL_MIB", "512")) << 20)
for offset in range(0, len(data), 4096):
    data[offset : offset + 8] = offset.to_bytes(8, "little")
print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    chooser = random.Random(request.get("seed", 0))
    check = 0
    for _ in range(request.get("lookups", 5000)):
        start = chooser.randrange(len(data) - SLICE)
        check = zlib.crc32(data[start : start + SLICE], check)
    print("result: " + json.dumps({"sum": check, "pid": os.getpid()}), flush=True)
