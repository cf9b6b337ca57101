#!/usr/bin/env python3
"""Starts a child that holds stdout open and hangs, then crashes on a request.

The model's exit does not end its stdout: the child still has it. The pool must not
wait for an end of output that never comes. {"pidfile": PATH} names where the
child's pid goes.
"""

import json
import os
import subprocess
import sys

print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    child = subprocess.Popen(["sleep", "600"])  # inherits stdout
    with open(request["pidfile"], "w") as pidfile:
        pidfile.write(str(child.pid))
    print("about to crash", file=sys.stderr)
    os._exit(4)
