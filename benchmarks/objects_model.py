#!/usr/bin/env python3
"""A model whose loaded data is Python objects, as vocabularies, lookup tables and parsed
configs are: a dict of OBJECTS_MODEL_KEYS (default 2,000,000) string keys to small
tuples. Each request {"lookups": n, "seed": s} looks up n random keys (chosen by a
generator seeded with s) and answers with a sum of what it found and its pid.

Reading an object writes its reference count: a child forked from a template that
holds this dict copies every page it reads (copy-on-write), unless the objects are
immortal (CPython 3.12+). The bench (preload.py) measures what that costs.
"""

import json
import os
import random
import sys

KEYS = int(os.environ.get("OBJECTS_MODEL_KEYS", "2000000"))
table = {f"w{i:08d}": (i, i * 3, float(i)) for i in range(KEYS)}
print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    chooser = random.Random(request.get("seed", 0))
    total = 0.0
    for _ in range(request.get("lookups", 5000)):
        entry = table[f"w{chooser.randrange(KEYS):08d}"]
        total += entry[0] + entry[2]
    print("result: " + json.dumps({"sum": total, "pid": os.getpid()}), flush=True)
