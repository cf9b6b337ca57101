#!/usr/bin/env python3
"""Prints bytes that are not text around a good result: invalid UTF-8, NUL, escapes, CR."""

import json
import os
import sys

os.write(1, b"\xff\xfe loading \x00\x1b[31m red \x1b[0m\r\n")
print("ready: Model-initialized")
for line in sys.stdin:
    os.write(1, b"\x80\x81\x82 progress\rrewritten\n")
    os.write(2, b"\xc3\x28 invalid utf-8 on stderr\n")
    os.write(1, ("result: " + json.dumps({"echo": json.loads(line)}) + "\r\n").encode())
