#!/usr/bin/env python3
"""A model that imports numpy and does some linear algebra while it loads, as real ones
do: numpy's OpenBLAS starts its threads at import, in C, unless OPENBLAS_NUM_THREADS=1
(or OMP_NUM_THREADS=1) says not to. It answers with its pid and a sum."""

import json
import os
import sys

import numpy

weights = numpy.ones((200, 200))
print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    total = float((weights @ weights).sum())
    print("result: " + json.dumps({"pid": os.getpid(), "sum": total}))
