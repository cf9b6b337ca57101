#!/usr/bin/env python3
"""Prints two results for every request: the second must never answer another request.

By default the two lines come from two plain print() calls, as in a real model that
answers twice (the reproducer of issue 6): each print is its own write(2), so the
second line may arrive a moment after the first was read, not with it.
TWO_RESULTS_ONE_WRITE: if set, both lines go out in one write(2), so they arrive together.
TWO_RESULTS_GAP: seconds between the two lines; a gap lets the next request be sent in
between, which only --id-field can tell apart.
With ECHO_ID_FIELD set, both results carry the request's id, as an id-echoing model's would.
A request {"sleep": s} is answered after s seconds.
"""

import json
import os
import sys
import time

gap = float(os.environ.get("TWO_RESULTS_GAP", "0"))
one_write = bool(os.environ.get("TWO_RESULTS_ONE_WRITE"))
id_field = os.environ.get("ECHO_ID_FIELD")
print("ready: Model-initialized")
for count, line in enumerate(sys.stdin, start=1):
    request = json.loads(line)
    rid = request.pop(id_field, None) if id_field else None
    time.sleep(request.get("sleep", 0))
    first = {"echo": request, "which": "first", "pid": os.getpid(), "count": count}
    second = {**first, "which": "second"}
    if id_field:
        first[id_field] = second[id_field] = rid
    if one_write:
        os.write(1, f"result: {json.dumps(first)}\nresult: {json.dumps(second)}\n".encode())
        continue
    print("result: " + json.dumps(first))
    if gap:
        time.sleep(gap)
    print("result: " + json.dumps(second))
