#!/usr/bin/env python3
"""Prints two results for every request: the second must never answer another request.

TWO_RESULTS_GAP: seconds between the two lines. 0 (the default) writes both in one
write(2), so they arrive together; a gap lets the next request be sent in between.
With ECHO_ID_FIELD set, both results carry the request's id, as an id-echoing model's would.
A request {"sleep": s} is answered after s seconds.
"""

import json
import os
import sys
import time

gap = float(os.environ.get("TWO_RESULTS_GAP", "0"))
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
    lines = [f"result: {json.dumps(first)}\n", f"result: {json.dumps(second)}\n"]
    if gap:
        os.write(1, lines[0].encode())
        time.sleep(gap)
        os.write(1, lines[1].encode())
    else:
        os.write(1, "".join(lines).encode())
