#!/usr/bin/env python3
"""Pauses after its ready line, in select(0, ...), before it reads its first request.

select(2) with no descriptors is an old way to sleep; its first argument is 0, like a
read of fd 0: what the model looks like waiting must not be learned from that pause.
PAUSE_SECONDS: how long (default 0.5). It then echoes {"echo": <request>, "pid": <pid>}.
"""

import json
import os
import select
import sys

print("ready: Model-initialized")
select.select([], [], [], float(os.environ.get("PAUSE_SECONDS", "0.5")))
for line in sys.stdin:
    print("result: " + json.dumps({"echo": json.loads(line), "pid": os.getpid()}))
