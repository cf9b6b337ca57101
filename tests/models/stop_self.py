#!/usr/bin/env python3
"""On a request, stops itself with SIGSTOP: it neither answers nor dies."""

import os
import signal
import sys

print("ready: Model-initialized")
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGSTOP)
