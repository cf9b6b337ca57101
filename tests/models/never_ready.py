#!/usr/bin/env python3
"""Loads forever: prints progress but never the ready line."""

import time

print("loading...", flush=True)
while True:
    time.sleep(0.2)
    print("still loading", flush=True)
