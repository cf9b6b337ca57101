#!/usr/bin/env python3
"""A model whose loaded data is Python objects: a dict of PY_OBJECTS_KEYS (default
400,000) string keys to small tuples, and a few objects of other kinds. Forked from a
--preload template, a child copies every page of them it reads, unless they are immortal.

Requests:
  {"lookups": n, "seed": s}  look up n random keys; answer their sum and the pid
  {"check": true}            use the loaded objects in the ways whose outcome an
                             immortal object could change (in-place string concatenation,
                             an iterator's reused result tuple, mutation, a suspended
                             generator, a class's instances, interning, the collector):
                             answer what each gave, and sys.getrefcount of the table
  {"exit": code}             sys.exit(code): the interpreter's own finalization runs
"""

import gc
import json
import os
import random
import sys

KEYS = int(os.environ.get("PY_OBJECTS_KEYS", "400000"))
table = {f"w{i:08d}": (i, i * 3, float(i)) for i in range(KEYS)}
NAME = "".join(["imm", "ortal"])  # made, not interned
small = {"a": 1, "b": 2, "c": 3}
pairs = iter(small.items())  # its result tuple is reused while nobody else holds it
listed = [1, 2, 3]


class Thing:
    def __init__(self, value):
        self.value = value


thing = Thing(1)


def counter():
    yield from range(3)


counting = counter()
next(counting)  # suspended, with its frame


def check():
    concatenated = NAME
    concatenated += "!"  # in place only if nobody else holds NAME
    first = next(pairs)
    second = next(pairs)
    listed.append(4)
    table["new"] = (0, 0, 0.0)
    del table["new"]
    thing.value += 1
    made = [Thing(n) for n in range(100)]
    interned = sys.intern(NAME)
    gc.collect()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return {
        "name": NAME,
        "concatenated": concatenated,
        "pairs": [list(first), list(second)],
        "listed": listed,
        "thing": thing.value,
        "made": sum(t.value for t in made),
        "interned": interned == NAME,
        "counted": list(counting),
        "keys": len(table),
        "refcount": sys.getrefcount(table),
    }


print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "exit" in request:
        sys.exit(request["exit"])
    if request.get("check"):
        answer = check()
    else:
        chooser = random.Random(request.get("seed", 0))
        total = 0.0
        for _ in range(request.get("lookups", 5000)):
            entry = table[f"w{chooser.randrange(KEYS):08d}"]
            total += entry[0] + entry[2]
        answer = {"sum": total}
    answer["pid"] = os.getpid()
    print("result: " + json.dumps(answer), flush=True)
