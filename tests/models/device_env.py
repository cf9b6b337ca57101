#!/usr/bin/env python3
"""A model that answers with the device it was given: MODELPOOL_DEVICE and the device
variables as os.environ and the C library (what CUDA reads) see them now, what they were
while it loaded (under --preload: in the template), and its pid.

{"sleep": S} holds the answer S seconds, so concurrent requests reach every worker;
with "sleep_on": [D, ...], only a model on one of those devices sleeps.
DEVICE_UNSAFE=1 keeps a character device open from its load on, as a CUDA model does
(/dev/ptmx here: /dev/nvidia* does not exist on a machine with no GPU).
"""

import ctypes
import json
import os
import sys
import time

NAMES = ("MODELPOOL_DEVICE", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "MODELPOOL_ENV_ROOM")
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p


def c_getenv(name: str) -> str | None:
    value = libc.getenv(name.encode())
    return None if value is None else value.decode()


loaded_with = {name: os.environ.get(name) for name in NAMES}
kept = []
if os.environ.get("DEVICE_UNSAFE"):
    kept.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    device = os.environ.get("MODELPOOL_DEVICE")
    if device in request.get("sleep_on", [device]):
        time.sleep(request.get("sleep", 0))
    answer = {
        "pid": os.getpid(),
        "env": {name: os.environ.get(name) for name in NAMES},
        "c_env": {name: c_getenv(name) for name in NAMES},
        "loaded_with": loaded_with,
    }
    print("result: " + json.dumps(answer))
