#!/usr/bin/env python3
"""An id-echoing model (field "rid") whose every result is printed again, later, by a thread.

Per request {"gap": g, "sleep": s}: after s seconds the result, carrying the request's
id (also as "rid_seen", so a test can tell which id it was); g seconds later (default
0.05) a thread prints the same result again, while the main thread already reads
the next request. The copy carries an old id: it is stale, and must answer nothing.
"""

import json
import os
import sys
import threading
import time


def late_copy(line: str, gap: float) -> None:
    time.sleep(gap)
    os.write(1, line.encode())


print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    rid = request.pop("rid")
    time.sleep(request.get("sleep", 0))
    result = "result: " + json.dumps({"echo": request, "rid_seen": rid, "rid": rid}) + "\n"
    os.write(1, result.encode())
    threading.Thread(target=late_copy, args=(result, request.get("gap", 0.05))).start()
