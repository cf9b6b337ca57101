#!/usr/bin/env python3
"""A model that loads as transformers does: a tqdm progress bar on stderr ("Loading
weights", carriage-return updates on one line), then a disabled bar (as TQDM_DISABLE=1
makes every bar), which leaves tqdm's monitor thread running. It answers with its pid,
its parent's, and the names of its threads."""

import json
import os
import sys
import threading
import time

from tqdm import tqdm

for _ in tqdm(range(40), desc="Loading weights", mininterval=0, file=sys.stderr):
    time.sleep(0.002)
for _ in tqdm(range(3), disable=True):
    pass
print("ready: Model-initialized")
for line in sys.stdin:
    json.loads(line)
    names = [thread.name for thread in threading.enumerate()]
    print("result: " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "threads": names}))
