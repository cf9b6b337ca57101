#!/usr/bin/env python3
"""A model that is not safe to fork once loaded: UNSAFE=thread starts a thread while it
loads (the thread keeps running), UNSAFE=socket keeps a socket open. It answers with its
pid, its parent's and its thread variable; with STARTS_FILE, it writes its pid there as
it starts."""

import json
import os
import socket
import sys
import threading
import time

if os.environ.get("STARTS_FILE"):
    with open(os.environ["STARTS_FILE"], "a") as starts:
        starts.write(f"{os.getpid()}\n")
kept = []
if os.environ.get("UNSAFE", "thread") == "thread":
    threading.Thread(target=time.sleep, args=(3600,), name="loader", daemon=True).start()
else:
    kept.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    omp = os.environ.get("OMP_NUM_THREADS")
    print("result: " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "omp": omp}))
