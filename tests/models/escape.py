#!/usr/bin/env python3
"""Starts helper processes that try every way out of the model's process group and tree.

Per request {"how": H, "pidfile": PATH}, it starts a `sleep 600` that escapes as H says,
writes the helper's pid to PATH, and answers:
  stay         stays in the model's process group (the easy case)
  setsid       a child that calls setsid(): a new session and group, still our child
  setpgid      a child that moves to a process group of its own
  double_fork  a grandchild whose parent exits at once: re-parented, out of our tree
  daemon       the classic daemon: double fork, setsid, chdir /, stdio to /dev/null
  scrub_env    a double-forked setsid grandchild with an empty environment
{"sleep": s} makes it sleep after that, {"exit": code} exit instead of answering.
"""

import json
import os
import sys
import time


def helper(how: str) -> int:
    """Start the helper; return its pid."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # child
        os.close(read_end)
        if how == "setsid":
            os.setsid()
        elif how == "setpgid":
            os.setpgid(0, 0)
        if how in ("double_fork", "daemon", "scrub_env"):
            if how in ("daemon", "scrub_env"):
                os.setsid()
            if os.fork() != 0:
                os._exit(0)  # the intermediate exits: the grandchild is an orphan
            if how == "daemon":
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
        os.write(write_end, str(os.getpid()).encode())
        os.close(write_end)
        env = {} if how == "scrub_env" else os.environ
        os.execvpe("sleep", ["sleep", "600"], env)
    os.close(write_end)
    pid = int(os.read(read_end, 32))
    os.close(read_end)
    if how in ("double_fork", "daemon", "scrub_env"):
        os.waitpid(first, 0)  # reap the intermediate
    return pid


print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    pids = []
    if "how" in request:
        pids.append(helper(request["how"]))
        with open(request["pidfile"], "w") as pidfile:
            pidfile.write(str(pids[-1]))
    time.sleep(request.get("sleep", 0))
    if "exit" in request:
        sys.exit(request["exit"])
    print("result: " + json.dumps({"helper": pids, "pid": os.getpid()}))
