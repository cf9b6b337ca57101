#!/usr/bin/env python3
"""On its first request, closes stdout and keeps running (reading stdin, answering nothing)."""

import os
import sys

print("ready: Model-initialized")
sys.stdin.readline()
sys.stdout.close()
os.close(1)
for _ in sys.stdin:
    pass
