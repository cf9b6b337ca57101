#!/usr/bin/env python3
"""A model whose forked children are slow to get going: an at-fork hook sleeps
AFTER_FORK_SLEEP seconds (default 0.5) in each child, right after the fork, before the
launcher's own code runs in it again. It answers with its pid."""

import json
import os
import sys
import time

pause = float(os.environ.get("AFTER_FORK_SLEEP", "0.5"))
os.register_at_fork(after_in_child=lambda: time.sleep(pause))
print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    print("result: " + json.dumps({"pid": os.getpid()}))
