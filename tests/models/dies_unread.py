#!/usr/bin/env python3
"""The first of its kind to start dies on its first request without reading it; the
others answer.

The first to create the file named by DIES_UNREAD_MARKER writes its pid there, waits
(select) until a request is in its stdin, waits DIES_UNREAD_DELAY seconds more (default
0), and exits with code 3, the request unread. Every other one waits
DIES_UNREAD_LOAD seconds (default 0) before its ready line, then answers each request
{"sleep": s, ...} after s seconds with {"echo": <request>, "pid": <its pid>, "count":
<requests it has answered, this one included>}.
"""

import json
import os
import select
import sys
import time

try:
    marker = os.open(os.environ["DIES_UNREAD_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    marker = None
if marker is not None:  # its pid is there before it is ready: a test reads it then
    os.write(marker, str(os.getpid()).encode())
    os.close(marker)
else:
    time.sleep(float(os.environ.get("DIES_UNREAD_LOAD", "0")))
print("ready: Model-initialized", flush=True)
if marker is not None:
    select.select([0], [], [])
    time.sleep(float(os.environ.get("DIES_UNREAD_DELAY", "0")))
    os._exit(3)
for count, line in enumerate(sys.stdin, 1):
    request = json.loads(line)
    time.sleep(request.get("sleep", 0))
    print("result: " + json.dumps({"echo": request, "pid": os.getpid(), "count": count}))
