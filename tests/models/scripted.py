#!/usr/bin/env python3
"""A protocol-speaking model whose every misbehaviour a test can ask for.

Start-up, from the environment:
  SCRIPTED_INIT_SECONDS   sleep this long before the ready line (default 0)
  SCRIPTED_FAIL_STARTS    "PATH:N": count starts in PATH; the first N exit with code 3
  SCRIPTED_NO_READY       if set, never print the ready line
  SCRIPTED_IGNORE_EOF     if set, keep running after stdin closes

Per request (a JSON object), keys act in this order:
  "stderr": text        print text to stderr
  "noise": n            print n lines that are not results
  "spawn": path         start a grandchild `sleep 600` and write its pid to path
  "sleep": s            sleep s seconds
  "exit": code          exit with that code, printing no result
  "close_stdout": true  close stdout and keep running
  "raw": text           print text as the answer line instead of a result
  "big": n              print a result line of n bytes
  "close_stdin": true   after answering, close stdin but keep running
otherwise it answers: result: {"echo": <request>, "pid": <pid>, "count": <requests so far>}
"""

import fcntl
import json
import os
import subprocess
import sys
import time


def start() -> None:
    fail_starts = os.environ.get("SCRIPTED_FAIL_STARTS")
    if fail_starts:
        path, limit = fail_starts.rsplit(":", 1)
        with open(path, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)  # models of one pool start at the same time
            counter.seek(0)
            count = int(counter.read() or 0) + 1
            counter.truncate(0)
            counter.write(str(count))
        if count <= int(limit):
            print(f"start {count} fails on purpose", file=sys.stderr)
            sys.exit(3)
    time.sleep(float(os.environ.get("SCRIPTED_INIT_SECONDS", "0")))
    print("loading...")
    if os.environ.get("SCRIPTED_NO_READY"):
        time.sleep(600)
    print("ready: Model-initialized")


def answer(request: dict, count: int) -> None:
    if "stderr" in request:
        print(request["stderr"], file=sys.stderr)
    for i in range(request.get("noise", 0)):
        print(f"progress {i}")
    if "spawn" in request:
        child = subprocess.Popen(["sleep", "600"])
        with open(request["spawn"], "w") as pidfile:
            pidfile.write(str(child.pid))
    time.sleep(request.get("sleep", 0))
    if "exit" in request:
        sys.exit(request["exit"])
    if request.get("close_stdout"):
        sys.stdout.close()
        os.close(1)
        time.sleep(600)
    if "raw" in request:
        print(request["raw"])
    elif "big" in request:
        print("result: " + "x" * request["big"])
    else:
        print("result: " + json.dumps({"echo": request, "pid": os.getpid(), "count": count}))
    if request.get("close_stdin"):
        os.close(0)  # sys.stdin.close() would leave the descriptor open
        time.sleep(600)


def main() -> None:
    start()
    count = 0
    for line in sys.stdin:
        if line.strip():
            count += 1
            answer(json.loads(line), count)
    if os.environ.get("SCRIPTED_IGNORE_EOF"):
        time.sleep(600)


if __name__ == "__main__":
    main()
