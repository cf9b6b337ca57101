#!/usr/bin/env python3
"""A model that reports its thread budget: the thread variables of its environment (as
os.environ has them, which a forked child's changes reach), and, with NUMPY=1, how many
threads numpy's OpenBLAS may use (asked of the library itself, through ctypes)."""

import ctypes
import json
import os
import sys

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")
SPECIAL = ("TOKENIZERS_PARALLELISM",)

if os.environ.get("NUMPY") == "1":
    import numpy

    numpy.ones((50, 50)) @ numpy.ones((50, 50))  # loads as a real one does


def openblas_threads() -> int | None:
    """What the OpenBLAS this process loaded says of its thread count (None: none loaded)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line}
    for path in paths:
        library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        for symbol in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads"):
            call = getattr(library, symbol, None)
            if call is not None:
                return int(call())
    return None


print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    env = {name: os.environ.get(name) for name in VARIABLES + SPECIAL}
    answer = {"pid": os.getpid(), "ppid": os.getppid(), "env": env, "blas": openblas_threads()}
    print("result: " + json.dumps(answer))
