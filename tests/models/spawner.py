#!/usr/bin/env python3
"""On a request, keeps starting helpers, each in a session of its own, every 20 ms.

The tree changes while it is being killed: killing must go on until none is left.
Each helper writes its pid to a line of the file the request names. At most 200.
"""

import json
import os
import sys
import time

print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    with open(request["pidfile"], "a") as pidfile:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                os.setsid()
                os.execvp("sleep", ["sleep", "600"])
            pidfile.write(f"{pid}\n")
            pidfile.flush()
            time.sleep(0.02)
