#!/usr/bin/env python3
"""Not a model: runs the immortal walk (_immortal.py, by the path in argv[1]) over
objects of many shapes in this interpreter (3.12+), then looks, by a walk of its own
(gc.get_referents, a dict's keys), for an object reachable from them that is still
mortal. Prints one JSON line: how many the walk marked, and the mortal ones found."""

import gc
import importlib.util
import json
import sys
import types

spec = importlib.util.spec_from_file_location("_immortal", sys.argv[1])
immortal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(immortal)


class Box:
    def __init__(self, value):
        self.value = value


shared = ["shared", 10**30]
data = {
    "pairs": [(f"k{i}", i * 1000, float(i)) for i in range(5000)],  # short tuples of atoms
    "long": [*range(1000, 1300), ["deep", (1.5, [b"bytes", {"x": 10**20}])]],
    "mixed": [(shared, shared, (shared,)), [Box(i) for i in range(100)]],
    "nested": ((((("bottom", 123456789),),),),),
    "sets": {frozenset({"a", 99999}), ("t", 77777)},
    "box": Box({"inner": [Box("leaf")]}),
}


def check():
    """Everything reachable from `data` (its classes, and so this module's globals, all
    made before the walk), by a walk of this function's own: its locals are in a frame,
    which the walk leaves alone, and reached from nothing it marked. No repr() until
    the end: it can make objects (a lazy attribute) that the walk never saw."""
    seen, stack, found = set(), [data], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in skip or isinstance(obj, types.FrameType):
            continue
        seen.add(id(obj))
        if sys.getrefcount(obj) < immortal.IMMORTAL_REFCNT - 10:
            found.append(obj)
        stack.extend(gc.get_referents(obj))
        if isinstance(obj, dict):
            stack.extend(obj.keys())
    return len(seen), found


gc.freeze()
assert immortal.problem() is None, immortal.problem()
skip = set()
walk = immortal.Walk([sys._getframe()], skip)
skip.add(id(walk))  # its own count changes as it goes: left mortal, as the launcher's
while not walk.step(0.001):  # many slices: each stops and resumes mid-container
    pass


looked_at, found = check()
mortal = [repr(obj)[:60] for obj in found[:5]]
print(json.dumps({"marked": walk.objects, "looked_at": looked_at, "mortal": mortal}))
