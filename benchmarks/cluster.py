"""The cluster path beside the local pool, in one run: `nox -s bench` runs it after bench.py.

1. Added latency: zero-compute requests on one keep-alive connection through
   `modelpool serve --workers 2` (the in-process queue) and through a front
   (`serve --queue URL --workers 0`) with one worker node of 2 models, both on one Valkey.
2. Throughput with 1, 2 and 3 worker processes (`modelpool worker`, 2 models each) behind
   one front: zero-compute requests at 32 connections, and model-bound ones (model3
   computes 0.1 s each) at 32 connections, against the ideal of models / 0.1 s.

Load comes from wrk (one thread, keep-alive), as in bench.py. Everything runs on this
machine: the client, Valkey, the front, the worker nodes and their models share its
cores, so the zero-compute figures say what one machine's CPUs allow, not what a cluster
of machines would do; the model-bound ones show that every model of every node is kept
busy. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import (
    ROOT,
    SHORT_START,
    WRK_SCRIPT,
    BenchError,
    Server,
    machine,
    on_sigterm,
    run_wrk,
    running,
    table,
)

from benchtools import free_port

sys.path.insert(0, str(ROOT / "tests"))
from redisserver import server_binary

MODELS_PER_NODE = 2
COMPUTE_S = 0.1
COMPUTE_BODY = json.dumps({"data": round(math.atan(COMPUTE_S), 6)})  # model3: |tan(x)| s


def valkey() -> Server:
    port = free_port()
    command = [server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no"]
    return Server("valkey", command, ready_line="Ready to accept connections", port=port)


def local_pool(models: int) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
    command += ["--workers", str(models)]
    ready = f"{models}/{models} models ready after"
    return Server("local", command, ready_line=ready, env=SHORT_START, port=port)


def front(queue: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
    command += ["--queue", queue, "--workers", "0", "--node-name", "front"]
    return Server("front", command, ready_line="listening on", env=SHORT_START, port=port)


def worker_node(queue: str, index: int) -> Server:
    command = [sys.executable, "-m", "modelpool", "worker", "--queue", queue]
    command += ["--workers", str(MODELS_PER_NODE), "--node-name", f"worker{index}"]
    ready = f"{MODELS_PER_NODE}/{MODELS_PER_NODE} models ready after"
    return Server(f"worker{index}", command, ready_line=ready, env=SHORT_START)


def measure(url: str, zero: Path, compute: Path, seconds: float) -> dict[str, Any]:
    run_wrk(zero, url, 4, 1)  # warm-up
    return {
        "p50_ms_1": run_wrk(zero, url, 1, seconds)["p50_ms"],
        "zero_req_per_s_32": run_wrk(zero, url, 32, seconds)["req_per_s"],
        "compute_req_per_s_32": run_wrk(compute, url, 32, seconds)["req_per_s"],
    }


def wait_models(url: str, models: int, within: float = 30) -> None:
    """Until the front counts every worker node's models as ready (they tell it by heartbeat)."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(url + "/readyz", timeout=5) as response,
        ):
            if json.loads(response.read())["ready"] >= models:
                return
        time.sleep(0.1)
    raise BenchError(f"the front did not see {models} models within {within} s")


def run_all(log_dir: Path, queue: str, seconds: float, zero: Path, compute: Path) -> dict:
    runs: dict[str, dict[str, Any]] = {}
    local = local_pool(MODELS_PER_NODE)
    print(f"local pool: {MODELS_PER_NODE} models, the in-process queue")
    with running([local], log_dir):
        runs["local"] = {"models": MODELS_PER_NODE, **measure(local.url, zero, compute, seconds)}
    for nodes in (1, 2, 3):
        print(f"cluster: 1 front, {nodes} worker node(s) of {MODELS_PER_NODE} models")
        workers = [worker_node(queue, i) for i in range(nodes)]
        entry = front(queue)
        try:
            for worker in workers:
                worker.start(log_dir)
            for worker in workers:
                worker.wait_ready(60)
            with running([entry], log_dir):
                wait_models(entry.url, nodes * MODELS_PER_NODE)
                figures = measure(entry.url, zero, compute, seconds)
                runs[f"cluster_{nodes}"] = {"models": nodes * MODELS_PER_NODE, **figures}
        finally:
            for worker in workers:
                worker.stop()
    return runs


def report(runs: dict[str, dict[str, Any]]) -> str:
    local = runs["local"]
    rows = [
        [
            "path",
            "models",
            "p50, 1 conn",
            "vs local",
            "zero-compute req/s, 32",
            f"{COMPUTE_S:g} s-compute req/s, 32",
            "of ideal",
        ]
    ]
    for name, run in runs.items():
        ideal = run["models"] / COMPUTE_S
        label = "local pool" if name == "local" else f"front + {name[-1]} worker node(s)"
        rows.append(
            [
                label,
                str(run["models"]),
                f"{run['p50_ms_1']:.2f} ms",
                f"+{run['p50_ms_1'] - local['p50_ms_1']:.2f} ms" if name != "local" else "",
                f"{run['zero_req_per_s_32']:,.0f}",
                f"{run['compute_req_per_s_32']:,.1f}",
                f"{run['compute_req_per_s_32'] / ideal:.1%}",
            ]
        )
    return table(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for CI")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per wrk run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "cluster.json")
    args, _ = parser.parse_known_args()  # bench.py's options pass through nox to both
    if shutil.which("wrk") is None:
        print("cluster bench: needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    results: dict[str, Any] = {"machine": machine(), "seconds_per_run": seconds}
    with tempfile.TemporaryDirectory(prefix="modelpool-cluster-") as scratch:
        log_dir = Path(scratch)
        zero, compute = log_dir / "zero.lua", log_dir / "compute.lua"
        zero.write_text(WRK_SCRIPT)
        compute.write_text(WRK_SCRIPT.replace('{"data": 0}', COMPUTE_BODY))
        store = valkey()
        try:
            store.start(log_dir)
            store.wait_ready(10)
            queue = f"redis://127.0.0.1:{store.port}/0"
            results["runs"] = run_all(log_dir, queue, seconds, zero, compute)
        except KeyboardInterrupt:
            print("cluster bench: interrupted; every process it started is stopped")
            return 130
        except BenchError as exc:
            print(f"cluster bench: {exc}", file=sys.stderr)
            return 1
        finally:
            store.stop()
    print()
    print(f"cluster path, wrk 1 thread, {seconds:g} s per run; all on this machine")
    print(report(results["runs"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
