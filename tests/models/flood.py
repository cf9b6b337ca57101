#!/usr/bin/env python3
"""Floods stdout and stderr with lines that are not results, then answers.

Per request {"lines": n} (default 20000): n noise lines on stdout and n on stderr,
written as fast as Python can, then the result. The pipes must be drained at that
rate, the log must cope, and the answer must still be found among the noise.
FLOOD_AT_START: that many noise lines on stdout right after the ready line, before the
model reads its first request.
"""

import json
import os
import sys

print("ready: Model-initialized")
sys.stdout.write(
    "".join(f"noise {i} after ready\n" for i in range(int(os.environ.get("FLOOD_AT_START", 0))))
)
for line in sys.stdin:
    request = json.loads(line)
    n = request.get("lines", 20000)
    out = "".join(f"progress {i} of {n}: result is not ready\n" for i in range(n))
    sys.stdout.write(out)
    sys.stderr.write(out.replace("progress", "warning"))
    sys.stdout.write("result: " + json.dumps({"echo": request, "flooded": n}) + "\n")
