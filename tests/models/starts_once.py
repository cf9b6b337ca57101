#!/usr/bin/env python3
"""Starts once, then never again: a new version that works on one worker and fails on the next.

argv[1] is a marker file: the first start creates it and serves (echoing requests); every
later start finds it, prints why to stderr and exits with code 3 before its ready line.
"""

import json
import os
import sys

marker = sys.argv[1]
if os.path.exists(marker):
    print("started once already; failing on purpose", file=sys.stderr)
    sys.exit(3)
open(marker, "w").close()
print("ready: Model-initialized")
for line in sys.stdin:
    print("result: " + json.dumps({"echo": json.loads(line), "pid": os.getpid()}))
