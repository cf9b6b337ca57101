#!/usr/bin/env python3
"""Writes its ready line and every result in small pieces, with pauses in between.

A pipe delivers whatever has been written, so a reader that takes a partial line for
a whole one would see "res" or "result: {\"ec" as a line.
"""

import json
import os
import sys
import time


def trickle(text: str, size: int = 3, pause: float = 0.01) -> None:
    data = text.encode()
    for i in range(0, len(data), size):
        os.write(1, data[i : i + size])
        time.sleep(pause)


trickle("ready: Model-initialized\n")
for line in sys.stdin:
    request = json.loads(line)
    trickle("result: " + json.dumps({"echo": request}) + "\n")
