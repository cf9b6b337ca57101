#!/usr/bin/env python3
"""The chaos session's model: echoes each request's own id, and misbehaves on request.

Per request (a JSON object with an "id"):
  "sleep": s     compute for s seconds (a long one is a timeout)
  "noise": n     print n lines that are not results first
  "escape": dir  start a daemon (double fork + setsid, environment kept or scrubbed at
                 random) and write its pid into a file in dir
  "crash": true  exit with code 1 instead of answering
It answers result: {"id": <the request's id>, "pid": <its pid>}.
"""

import json
import os
import random
import sys
import time


def escape(directory: str) -> None:
    intermediate = os.fork()
    if intermediate != 0:
        os.waitpid(intermediate, 0)
        return
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    with open(os.path.join(directory, str(os.getpid())), "w") as mark:
        mark.write(str(os.getpid()))
    env = {} if random.random() < 0.5 else os.environ
    os.execvpe("sleep", ["sleep", "600"], env)


print("loading chaos model")
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    for i in range(request.get("noise", 0)):
        print(f"working {i}")
    if "escape" in request:
        escape(request["escape"])
    time.sleep(request.get("sleep", 0))
    if request.get("crash"):
        print("crashing on purpose", file=sys.stderr)
        sys.exit(1)
    print("result: " + json.dumps({"id": request["id"], "pid": os.getpid()}))
