"""Cost of the protections: idle connections, and containment of escaping model helpers.

  connections  opens many idle TCP connections to `modelpool serve` (more than its
               --max-connections) and reports the service's memory per connection, and
               how long a newcomer then waits for an answer (the longest-idle connection
               is closed to make room for it)
  containment  kills a model tree whose helpers left its process group (half of them
               in sessions of their own): time until the model and every helper are
               dead and reaped; the cost of one adoption sweep
               with nothing to do, and of one scan of /proc for a model's token

Only talks to 127.0.0.1, and stops every process it starts.
Run: nox -s bench  (runs bench.py and cluster.py, then this; `-- --quick` for a short run)
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import trio

from benchtools import free_port
from modelpool.process.reaper import Reaper, all_pids, descendants, own_children, token_of

# A model whose `n` helpers stay behind; every odd one moves to a session of its own.
TREE_MODEL = """
import os, sys, time
for i in range(int(sys.argv[1])):
    if os.fork() == 0:
        if i % 2:
            os.setsid()
        os.execvp("sleep", ["sleep", "600"])
print("ready", flush=True)
time.sleep(600)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(url: str, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def wait_listening(url: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            get(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connections(idle: int, limit: int) -> None:
    """Memory per idle connection, and a newcomer's wait at the connection limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and idle + 100 > hard:
        idle = hard - 100  # this process's own open-files limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, idle + 100), hard))
    port = free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
    command += ["--workers", "1", "--max-connections", str(limit), "--log-level", "WARNING"]
    service = subprocess.Popen(command, env={**os.environ, "MODEL3_STEP_SECONDS": "0.01"})
    sockets: list[socket.socket] = []
    try:
        wait_listening(url)
        rss_before, fds_before = rss_kib(service.pid), open_fds(service.pid)
        for _ in range(idle):
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(2)  # let the service accept what it will
        held = open_fds(service.pid) - fds_before
        grown = rss_kib(service.pid) - rss_before
        started = time.perf_counter()
        status = get(url, timeout=30)
        waited = time.perf_counter() - started
        print(f"connections: {idle} idle connections opened, --max-connections {limit}")
        print(f"  connections the service holds  {held:8d}")
        print(f"  service memory per connection  {grown / max(1, held):8.1f} KiB")
        print(f"  a newcomer's answer            {waited * 1000:8.1f} ms (status {status})")
    finally:
        for sock in sockets:
            sock.close()
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


async def containment(helper_counts: list[int], repeats: int) -> None:
    """Kill-and-reap time of an escaping tree; one empty sweep; one token scan."""
    reaper = Reaper(adopt_orphans=True)  # this process adopts the helpers, as `serve` does
    print("containment: a model tree with helpers outside its process group")
    for count in helper_counts:
        times = []
        for _ in range(repeats):
            model = await trio.lowlevel.open_process(
                [sys.executable, "-c", TREE_MODEL, str(count)],
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            await model.stdout.receive_some(100)
            with trio.fail_after(30):
                while len(descendants(model.pid)) < count:
                    await trio.sleep(0.01)
            started = time.perf_counter()
            reaper.kill_tree(model.pid)
            await model.wait()
            with trio.fail_after(10):  # the killed helpers are adopted; reap them all
                while [pid for pid in own_children() if pid != model.pid]:
                    reaper.sweep()
                    await trio.sleep(0.001)
            times.append(time.perf_counter() - started)
        print(
            f"  all gone, {count:3d} helpers        {statistics.median(times) * 1000:8.1f} ms"
            f" (median of {repeats})"
        )
    rounds = 1000
    started = time.perf_counter()
    for _ in range(rounds):
        reaper.sweep()
    print(
        f"  one sweep, nothing to adopt    {(time.perf_counter() - started) / rounds * 1e6:8.0f} µs"
        " (once a second)"
    )
    rounds = 20
    processes = len(all_pids())
    started = time.perf_counter()
    for _ in range(rounds):
        [pid for pid in all_pids() if token_of(pid) == "absent"]
    scan_ms = (time.perf_counter() - started) / rounds * 1000
    print(f"  one token scan of /proc        {scan_ms:8.1f} ms ({processes} processes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=3000, help="idle connections to open")
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    if args.quick:
        args.idle, args.repeats = 1500, 2
    connections(args.idle, args.max_connections)
    logging.getLogger("modelpool.reaper").setLevel(logging.ERROR)  # one line per kill
    trio.run(containment, [10, 100], args.repeats)


if __name__ == "__main__":
    main()
