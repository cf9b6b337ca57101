#!/usr/bin/env python3
"""A model that sleeps and says what it received: for bench_deadlines.py, which must know
whether a request ever reached a model, and when.

  start-up   sleeps `--start` seconds (default 0), then prints the ready line;
  per line   a JSON object {"sleep": S, "id": ID} (both optional): appends
             `recv ID PID T` to the file `--log` names (T: time.monotonic(), the
             clock the bench reads too), sleeps S seconds, appends `done ID PID T`,
             and answers `result: {"slept": S, "id": ID, "pid": PID}`, flushed;
  shutdown   exits when stdin closes.

Each line is one write to a file opened for appending, so the lines of several models
do not mix. It reads requests with `for line in sys.stdin`, so it forks under --preload
(the log is opened at each request, not in the template).
"""

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--start", type=float, default=0.0, help="seconds to load")
parser.add_argument("--log", required=True, help="file to append what it receives to")
args = parser.parse_args()


def note(event: str, request_id: object) -> None:
    line = f"{event} {request_id} {os.getpid()} {time.monotonic():.6f}\n".encode()
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


time.sleep(args.start)
print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    if not line.strip():
        continue
    request = json.loads(line)
    request_id = request.get("id", "-")
    note("recv", request_id)
    seconds = float(request.get("sleep", 0))
    time.sleep(seconds)
    note("done", request_id)
    answer = {"slept": seconds, "id": request_id, "pid": os.getpid()}
    print("result: " + json.dumps(answer), flush=True)
