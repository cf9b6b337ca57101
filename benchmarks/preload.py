"""Start-up bench: plain starts and --preload side by side in one run.

`modelpool serve` with 4 workers of a model that holds --model-mib MiB once loaded (every
page written, tests/models/big_memory.py), after --load-seconds more of loading, run
once with plain starts and once with --preload, one after the other in this run. For each:

  ready        seconds from launch to 4/4 models ready (/readyz), and from the pool's
               start (the slowest worker's start as /status times it: the service's
               own start-up left out), against one model alone from launch to its
               ready line
  memory       total PSS of the model processes (the template included), against the
               resident memory of one model alone
  replacement  median seconds from SIGKILLing an idle model (the others busy) to a
               request answered by its replacement
  capacity     model-seconds served (answers x their compute) over model-seconds
               possible (4 x the wall time), under full load (8 closed-loop clients of
               0.2 s requests), at rest and while a model is SIGKILLed every 2 s

Targets (read, not asserted: the exit code says only whether the bench ran): with
--preload, total PSS at most 1.3x one model's; ready within 0.2 s of one model's own
load; replacement under 50 ms; capacity kept under kills at least 0.95.

It talks only to 127.0.0.1 on ports it picks, stops every process it starts, and every
step is bounded in time. Run: nox -s bench (this is its start-up section), or
`python benchmarks/preload.py [--quick] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchtools import free_port, rss_mib

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "models" / "big_memory.py"
MODELS = 4
CLIENTS = 2 * MODELS  # full load: every model busy, as many requests waiting
COMPUTE = 0.2  # seconds each request of the capacity runs computes
KILL_EVERY = 2.0
POLL = 0.005


class BenchError(Exception):
    """A step of the bench could not run (a server did not start, requests failed)."""


def model_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPOOL_")}
    env["BIG_MODEL_MIB"] = str(args.model_mib)
    env["BIG_MODEL_LOAD_SECONDS"] = str(args.load_seconds)
    return env


def pss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_model(args: argparse.Namespace) -> dict[str, float]:
    """One model alone: seconds from launch to its ready line, and its memory then."""
    launched = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-u", str(MODEL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=model_env(args),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        seconds = time.perf_counter() - launched
        if not line.startswith(b"ready"):
            raise BenchError(f"the model alone printed {line!r}, not its ready line")
        return {"ready_s": seconds, "rss_mib": rss_mib(proc.pid), "pss_mib": pss_mib(proc.pid)}
    finally:
        proc.kill()
        proc.wait()


class Service:
    """`modelpool serve` with 4 big models, plain or preloaded, in a session of its own."""

    def __init__(self, args: argparse.Namespace, preload: bool) -> None:
        self.preload = preload
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "modelpool", "serve", "--port", str(self.port)]
        command += ["--workers", str(MODELS), "--model-cmd", f"{sys.executable} -u {MODEL}"]
        command += ["--timeout", "120", "--log-level", "WARNING", "--max-queue", "1024"]
        command += ["--drain-timeout", "2"]  # the busy requests of the last step are cut short
        command += ["--preload"] if preload else []
        self.log = open(args.log_dir / f"{'preload' if preload else 'plain'}.log", "wb")  # noqa: SIM115
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=model_env(args),
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print("  the service did not stop within 60 s of SIGTERM: killed")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def wait_ready(self, within: float) -> float:
        """Seconds from launch to every model ready (waiting `within` seconds from now)."""
        deadline = time.perf_counter() + within
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"the service exited with code {self.proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").json()["ready"] == MODELS:
                        return time.perf_counter() - self.launched
                time.sleep(POLL)
        raise BenchError(f"not ready after {within} s")

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def model_pids(self) -> list[int]:
        status = self.status()
        pids = [w["pid"] for w in status["workers"] if w["pid"]]
        if status.get("template") and status["template"].get("pid"):
            pids.append(status["template"]["pid"])
        return pids


async def capacity(service: Service, seconds: float, kill: bool) -> dict[str, Any]:
    """Model-seconds served over model-seconds possible, under full load (and kills)."""
    answered = failed = killed = 0
    started = trio.current_time()
    until = started + seconds
    chooser = random.Random(7)
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:

        async def load() -> None:
            nonlocal answered, failed
            while trio.current_time() < until:
                response = await client.post("/predict", json={"sleep": COMPUTE})
                if response.status_code == 200:
                    answered += 1
                else:
                    failed += 1

        async def killer() -> None:
            nonlocal killed
            while trio.current_time() + KILL_EVERY < until:
                await trio.sleep(KILL_EVERY)
                workers = (await client.get("/status")).json()["workers"]
                pids = [w["pid"] for w in workers if w["pid"] and w["state"] == "busy"]
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(chooser.choice(pids), signal.SIGKILL)
                        killed += 1

        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(load)
            if kill:
                nursery.start_soon(killer)
    wall = trio.current_time() - started
    return {
        "kept": round(answered * COMPUTE / (MODELS * wall), 4),
        "answered": answered,
        "failed": failed,
        "killed": killed,
        "wall_s": round(wall, 2),
    }


async def replacements(service: Service, trials: int, per_trial: float) -> list[float]:
    """Seconds from SIGKILLing the one idle model to an answer from its replacement."""
    hold = trials * per_trial + 5
    times: list[float] = []
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=hold + 30) as client,
        trio.open_nursery() as nursery,
    ):

        async def busy() -> None:
            await client.post("/predict", json={"sleep": hold})

        for _ in range(MODELS - 1):  # the others are busy: only the replacement answers
            nursery.start_soon(busy)
        with trio.fail_after(10):
            while sum(w["state"] == "busy" for w in service.status()["workers"]) < 3:
                await trio.sleep(POLL)
        for _ in range(trials):
            with trio.fail_after(per_trial * 3):
                while True:
                    idle = [w for w in service.status()["workers"] if w["state"] == "idle"]
                    if idle:
                        break
                    await trio.sleep(POLL)
            victim = idle[0]["pid"]
            killed_at = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            while _alive(victim):
                await trio.sleep(0.0005)  # dead: the next request cannot go to it
            response = await client.post("/predict", json={})
            took = time.perf_counter() - killed_at
            if response.status_code != 200 or response.json()["pid"] == victim:
                raise BenchError(f"the replacement did not answer: {response.text}")
            times.append(took)
        nursery.cancel_scope.cancel()
    return times


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def measure(args: argparse.Namespace, preload: bool) -> dict[str, Any]:
    name = "preload" if preload else "plain"
    print(f"  {name}: start-up", flush=True)
    service = Service(args, preload)
    try:
        ready = service.wait_ready(within=120)
        time.sleep(0.5)  # the shared pages settle (nothing is still being written)
        # each worker's start, timed by the pool from the moment it asked for its model
        pool_ready = max(w["start"]["seconds"] for w in service.status()["workers"])
        pids = service.model_pids()
        total_pss = sum(pss_mib(pid) for pid in pids)
        print(f"  {name}: capacity at rest, then with a kill every {KILL_EVERY:g} s", flush=True)
        at_rest = trio.run(capacity, service, args.capacity_seconds, False)
        with_kills = trio.run(capacity, service, args.capacity_seconds, True)
        service.wait_ready(within=120)
        print(f"  {name}: replacements of a killed model", flush=True)
        per_trial = 1.0 + 4 * args.load_seconds
        times = trio.run(replacements, service, args.trials, per_trial)
        return {
            "ready_s": round(ready, 3),
            "pool_ready_s": round(pool_ready, 3),
            "total_pss_mib": round(total_pss, 1),
            "processes": len(pids),
            "replacement_s": [round(t, 4) for t in times],
            "replacement_median_s": round(statistics.median(times), 4),
            "capacity_at_rest": at_rest,
            "capacity_with_kills": with_kills,
        }
    finally:
        service.stop()


def report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    alone, plain, pre = results["one_model"], results["plain"], results["preload"]
    one = alone["rss_mib"]
    targets = {
        "total PSS at most 1.3x one model's": pre["total_pss_mib"] <= 1.3 * one,
        "ready within 0.2 s of one model's own load (from the pool's start)": (
            pre["pool_ready_s"] - alone["ready_s"] <= 0.2
        ),
        "replacement under 50 ms": pre["replacement_median_s"] < 0.05,
        "capacity kept at least 0.95": pre["capacity_with_kills"]["kept"] >= 0.95,
    }
    rows = [
        ("", "one model alone", "plain", "--preload"),
        ("launch to 4/4 ready", f"{alone['ready_s']:.2f} s", *_both(results, "ready_s", "s")),
        ("pool start to 4/4 ready", "", *_both(results, "pool_ready_s", "s")),
        (
            "total PSS of the models",
            f"{one:.0f} MiB (RSS)",
            *_both(results, "total_pss_mib", "MiB"),
        ),
        (
            "killed -> replacement answers (median)",
            "",
            f"{plain['replacement_median_s'] * 1000:.1f} ms",
            f"{pre['replacement_median_s'] * 1000:.1f} ms",
        ),
        (
            "capacity at rest",
            "",
            f"{plain['capacity_at_rest']['kept']:.3f}",
            f"{pre['capacity_at_rest']['kept']:.3f}",
        ),
        (
            f"capacity kept, a kill every {KILL_EVERY:g} s",
            "",
            f"{plain['capacity_with_kills']['kept']:.3f}",
            f"{pre['capacity_with_kills']['kept']:.3f}",
        ),
    ]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    marks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in targets.items()]
    return "\n".join(lines) + "\n\nTargets (--preload):\n" + "\n".join(marks), targets


def _both(results: dict[str, Any], key: str, unit: str) -> tuple[str, str]:
    return (f"{results['plain'][key]:.2f} {unit}", f"{results['preload'][key]:.2f} {unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run CI does")
    parser.add_argument("--model-mib", type=int, help="MiB each model holds (300; quick 100)")
    parser.add_argument("--load-seconds", type=float, help="extra load time (1.0; quick 0.5)")
    parser.add_argument("--trials", type=int, help="replacements timed (7; quick 3)")
    parser.add_argument("--capacity-seconds", type=float, help="each capacity run (20; quick 8)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    full = {"model_mib": 300, "load_seconds": 1.0, "trials": 7, "capacity_seconds": 20.0}
    quick = {"model_mib": 100, "load_seconds": 0.5, "trials": 3, "capacity_seconds": 8.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelpool-preload-{os.getpid()}"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"start-up bench: {MODELS} models of {args.model_mib} MiB, "
        f"{args.load_seconds:g} s of loading each; logs in {args.log_dir}",
        flush=True,
    )
    results: dict[str, Any] = {"model_mib": args.model_mib, "load_seconds": args.load_seconds}
    try:
        results["one_model"] = one_model(args)
        results["plain"] = measure(args, preload=False)
        results["preload"] = measure(args, preload=True)
    except BenchError as exc:
        print(f"bench failed: {exc}")
        return 1
    text, targets = report(results)
    results["targets"] = targets
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
