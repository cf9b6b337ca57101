"""Load benchmark: starts `modelpool serve` on a free loopback port and prints figures.

  overhead     model3 with {"data": 0} (no compute): requests/s and latency of the
               service itself, HTTP + queue + pipe round trip
  utilisation  model3 with {"data": 2} (2.19 s each), twice as many requests as models
               in flight: busy model-seconds over available model-seconds
  memory       resident memory of the service process, idle and at its peak

Every loop is bounded in requests and seconds, and only talks to 127.0.0.1.
Run: nox -s bench  (or: nox -s bench -- --quick)
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time

import httpx
import trio

from benchtools import free_port, rss_mib

DATA_2_SECONDS = abs(math.tan(2))


class Server:
    """`modelpool serve` on a free loopback port, its log discarded."""

    def __init__(self, workers: int, log_level: str) -> None:
        env = {**os.environ, "MODEL3_STEP_SECONDS": "0.05"}  # fast start-up; compute unchanged
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
        command += ["--workers", str(workers), "--log-level", log_level]
        self.proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


async def wait_ready(client: httpx.AsyncClient, workers: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                if (await client.get("/readyz")).json()["ready"] >= workers:
                    return
            except httpx.ConnectError:
                pass  # not listening yet
            await trio.sleep(0.05)


async def run_load(
    client: httpx.AsyncClient, body: dict, requests: int, concurrency: int, limit: float
) -> tuple[list[float], float, int]:
    """Send `requests` POSTs, `concurrency` at a time; latencies, wall time, failures."""
    latencies: list[float] = []
    failures = 0
    remaining = iter(range(requests))

    async def user() -> None:
        nonlocal failures
        for _ in remaining:
            started = time.perf_counter()
            response = await client.post("/predict", json=body)
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    started = time.perf_counter()
    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(user)
    return latencies, time.perf_counter() - started, failures


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def bench(args: argparse.Namespace) -> None:
    server = Server(args.workers, args.log_level)
    limits = httpx.Limits(max_connections=args.concurrency)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            await wait_ready(client, args.workers)
            idle_rss = rss_mib(server.proc.pid)
            print(
                f"modelpool benchmark: {args.workers} workers, model3, log level {args.log_level}"
            )
            print(f"  service RSS at rest            {idle_rss:8.1f} MiB")

            lat, wall, failed = await run_load(
                client, {"data": 0}, args.requests, args.concurrency, limit=120
            )
            print(f'overhead: {len(lat)} requests of {{"data": 0}}, {args.concurrency} at a time')
            print(f"  throughput                     {len(lat) / wall:8.0f} req/s")
            print(
                f"  latency p50 / p95 / p99        {percentile(lat, 50) * 1000:8.2f} / "
                f"{percentile(lat, 95) * 1000:.2f} / {percentile(lat, 99) * 1000:.2f} ms"
            )
            print(f"  failed                         {failed:8d}")

            jobs = args.workers * args.rounds
            lat, wall, failed = await run_load(
                client, {"data": 2}, jobs, args.workers * 2, limit=120
            )
            ideal = jobs * DATA_2_SECONDS / args.workers
            print(f'utilisation: {jobs} requests of {{"data": 2}} ({DATA_2_SECONDS:.3f} s each)')
            print(f"  wall time / ideal              {wall:8.2f} / {ideal:.2f} s")
            print(f"  model utilisation              {100 * ideal / wall:8.1f} %")
            print(f"  failed                         {failed:8d}")
            print(
                f"  service RSS now / peak         {rss_mib(server.proc.pid):8.1f} / "
                f"{rss_mib(server.proc.pid, 'VmHWM'):.1f} MiB"
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="utilisation: requests per model")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 500, 2
    trio.run(bench, args)


if __name__ == "__main__":
    main()
