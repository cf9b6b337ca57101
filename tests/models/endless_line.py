#!/usr/bin/env python3
"""On a request, prints one line that never ends: bytes without a newline, forever.

A reader that waits for the newline without a limit would buffer until memory runs out.
"""

import os
import sys

print("ready: Model-initialized")
for _line in sys.stdin:
    chunk = b"x" * 65536
    while True:
        os.write(1, chunk)
