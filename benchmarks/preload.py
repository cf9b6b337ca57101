"""--preload's bench: start-up and memory over traffic, plain starts and --preload side by
side in one run.

Start-up (`--sections startup`): `modelpool serve` with 4 workers of a model that holds
--model-mib MiB once loaded (every page written, tests/models/big_memory.py), after
--load-seconds more of loading, run once with plain starts and once with --preload, one
after the other in this run. For each:

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

Memory over traffic (`--sections traffic`): 4 workers of two kinds of model, each on the
service's Python and on the newest CPython 3.12+ that pyenv installed here (the model's
interpreter is the one its --model-cmd names), plain and with --preload (and on the
service's Python, --preload with --preload-max-private 0: no refresh):

  bytes        benchmarks/bytes_model.py: 512 MiB in a bytearray; each request reads
               5,000 random 64-byte slices
  objects      benchmarks/objects_model.py: a dict of 2,000,000 keys to small tuples
               (about 500 MiB); each request looks up 5,000 random keys

For each: seconds to 4/4 ready, total PSS of every process below the service (the
template and any model being replaced included) at rest and after 1,000, 2,000 and
10,000 requests (8 closed-loop clients), throughput against plain's, failed requests,
and the refreshes (modelpool_model_restarts_total{reason="refresh"}).

Targets (read, not asserted: the exit code says only whether the bench ran). Start-up,
with --preload: total PSS at most 1.3x one model's; ready within 0.2 s of one model's
own load; replacement under 50 ms; capacity kept under kills at least 0.95. Traffic,
after 2,000 requests, against one plain model's PSS (plain's total over 4): the objects
model on 3.12+ at most 1.3x with throughput at least 0.9 of plain's, on the service's
Python (with the refresh) at most 2.25x; the bytes model at most 1.3x; no failed request.

--quick (what CI runs) keeps the models small (100 MiB; a 200,000-key dict, 64 MiB of
bytes) and the traffic short (300 and 1,000 requests, the service's Python only): it
shows that every step runs, not the targets' figures (one request of 5,000 lookups
copies most of so small a dict).

It talks only to 127.0.0.1 on ports it picks, stops every process it starts, and every
step is bounded in time. Run: nox -s bench (this is its --preload section), or
`python benchmarks/preload.py [--quick] [--sections startup,traffic] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchtools import (
    alive,
    descendants,
    free_port,
    model_pids,
    newer_pythons,
    pss_mib,
    rss_mib,
    stop_group,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "models" / "big_memory.py"
TRAFFIC_MODELS = {
    "bytes": ROOT / "benchmarks" / "bytes_model.py",
    "objects": ROOT / "benchmarks" / "objects_model.py",
}
MODELS = 4
CLIENTS = 2 * MODELS  # full load: every model busy, as many requests waiting
COMPUTE = 0.2  # seconds each request of the capacity runs computes
KILL_EVERY = 2.0
LOOKUPS = 5000  # random reads of each request of the traffic runs
POLL = 0.005
PHASE_TIMEOUT = 900  # seconds the requests between two checkpoints may take, at most
REFRESHES = re.compile(rb'^modelpool_model_restarts_total\{reason="refresh"\} (\S+)$', re.M)


class BenchError(Exception):
    """A step of the bench could not run (a server did not start, requests failed)."""


def model_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPOOL_")}
    env["BIG_MODEL_MIB"] = str(args.model_mib)
    env["BIG_MODEL_LOAD_SECONDS"] = str(args.load_seconds)
    env["OBJECTS_MODEL_KEYS"] = str(args.objects_keys)
    env["BYTES_MODEL_MIB"] = str(args.bytes_mib)
    return env


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
    """`modelpool serve` with 4 models, plain or preloaded, in a session of its own."""

    def __init__(
        self,
        args: argparse.Namespace,
        name: str,
        model_cmd: str,
        flags: list[str],
        timeout: float = 120,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "modelpool", "serve", "--port", str(self.port)]
        command += ["--workers", str(MODELS), "--model-cmd", model_cmd]
        command += ["--timeout", str(timeout), "--log-level", "WARNING", "--max-queue", "1024"]
        command += ["--drain-timeout", "2"]  # the busy requests of the last step are cut short
        command += flags
        self.log = open(args.log_dir / f"{name}.log", "wb")  # noqa: SIM115
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
        if not stop_group(self.proc, 60):
            print("  the service did not stop within 60 s of SIGTERM: killed")
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
        return model_pids(self.status())

    def total_pss(self) -> float:
        """PSS of every process below the service: its models, the template, and any
        model being replaced or stopped right now.

        A page shared by several processes counts a share in each, so a fork or an exit
        between two reads (a refresh, say) would miss a share: the sum is taken again
        until the same processes were there before and after it."""
        for _ in range(20):
            before = descendants(self.proc.pid)
            total = sum(pss_mib(pid) for pid in before)
            if descendants(self.proc.pid) == before:
                return total
        return total

    def refreshes(self) -> int:
        body = httpx.get(f"{self.url}/metrics", timeout=10).content
        found = REFRESHES.search(body)
        return 0 if found is None else int(float(found.group(1)))


# -- start-up -----------------------------------------------------------------------------


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
            while alive(victim):
                await trio.sleep(0.0005)  # dead: the next request cannot go to it
            response = await client.post("/predict", json={})
            took = time.perf_counter() - killed_at
            if response.status_code != 200 or response.json()["pid"] == victim:
                raise BenchError(f"the replacement did not answer: {response.text}")
            times.append(took)
        nursery.cancel_scope.cancel()
    return times


def measure(args: argparse.Namespace, preload: bool) -> dict[str, Any]:
    name = "preload" if preload else "plain"
    print(f"  {name}: start-up", flush=True)
    model_cmd = f"{sys.executable} -u {MODEL}"
    service = Service(args, name, model_cmd, ["--preload"] if preload else [])
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


def startup_report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
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
    marks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in targets.items()]
    return _table(rows) + "\n\nTargets (--preload):\n" + "\n".join(marks), targets


def _both(results: dict[str, Any], key: str, unit: str) -> tuple[str, str]:
    return (f"{results['plain'][key]:.2f} {unit}", f"{results['preload'][key]:.2f} {unit}")


def _table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def startup_section(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, bool]]:
    print(
        f"start-up: {MODELS} models of {args.model_mib} MiB, "
        f"{args.load_seconds:g} s of loading each",
        flush=True,
    )
    results: dict[str, Any] = {"model_mib": args.model_mib, "load_seconds": args.load_seconds}
    results["one_model"] = one_model(args)
    results["plain"] = measure(args, preload=False)
    results["preload"] = measure(args, preload=True)
    text, targets = startup_report(results)
    return results, text, targets


# -- memory over traffic --------------------------------------------------------------------


async def traffic(service: Service, first: int, last: int) -> dict[str, Any]:
    """Requests number `first` to `last` - 1 from CLIENTS closed-loop clients."""
    answered = failed = 0
    numbers = iter(range(first, last))
    started = trio.current_time()
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:

        async def load() -> None:
            nonlocal answered, failed
            for number in numbers:
                try:
                    response = await client.post(
                        "/predict", json={"lookups": LOOKUPS, "seed": number}
                    )
                except httpx.HTTPError:
                    failed += 1
                    continue
                if response.status_code == 200:
                    answered += 1
                else:
                    failed += 1

        with trio.move_on_after(PHASE_TIMEOUT) as deadline:
            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(load)
    if deadline.cancelled_caught:
        raise BenchError(f"requests {first} to {last} not answered within {PHASE_TIMEOUT} s")
    return {"answered": answered, "failed": failed, "wall_s": trio.current_time() - started}


def over_traffic(
    args: argparse.Namespace, name: str, model_cmd: str, flags: list[str]
) -> dict[str, Any]:
    """One service: its start-up, then its memory at rest and after each checkpoint."""
    print(f"  {name}", flush=True)
    service = Service(args, name.replace(" ", "_").replace("/", "_"), model_cmd, flags)
    try:
        ready = service.wait_ready(within=300)
        time.sleep(1.0)  # the shared pages settle (nothing is still being written)
        pss = {"0": round(service.total_pss(), 1)}
        rates: dict[str, float] = {}  # requests a second between the last checkpoint and this
        done = answered = failed = 0
        wall = 0.0
        for checkpoint in args.checkpoints:
            run = trio.run(traffic, service, done, checkpoint)
            rates[str(checkpoint)] = round(run["answered"] / run["wall_s"], 1)
            done = checkpoint
            answered += run["answered"]
            failed += run["failed"]
            wall += run["wall_s"]
            pss[str(checkpoint)] = round(service.total_pss(), 1)  # at once: under traffic
        status = service.status()
        return {
            "ready_s": round(ready, 3),
            "pss_mib": pss,
            "answered": answered,
            "failed": failed,
            "per_second": round(answered / wall, 1),
            "per_second_by_checkpoint": rates,
            "refreshes": service.refreshes(),
            "template": status.get("template"),
            "workers_memory": [w.get("memory") for w in status["workers"]],
        }
    finally:
        service.stop()


def traffic_section(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, bool]]:
    pythons = args.pythons or [sys.executable] + ([] if args.quick else newer_pythons()[-1:])
    print(
        f"memory over traffic: {MODELS} models, {LOOKUPS:,} lookups a request, "
        f"checkpoints {', '.join(f'{c:,}' for c in args.checkpoints)}",
        flush=True,
    )
    results: dict[str, Any] = {"checkpoints": args.checkpoints, "runs": []}
    targets: dict[str, bool] = {}
    tables = []
    for kind in args.models:
        script = TRAFFIC_MODELS[kind]
        for python in pythons:
            version = _version_of(python)
            label = f"{kind}, Python {version}"
            immortal = tuple(int(part) for part in version.split(".")) >= (3, 12)
            model_cmd = f"{python} -u {script}"
            variants = [("plain", []), ("--preload", ["--preload"])]
            if kind == "objects" and not immortal and not args.quick:
                variants.append(
                    ("--preload, no refresh", ["--preload", "--preload-max-private", "0"])
                )
            runs = {
                variant: over_traffic(args, f"{label}: {variant}", model_cmd, flags)
                for variant, flags in variants
            }
            results["runs"].append({"model": kind, "python": python, "label": label, "runs": runs})
            one = runs["plain"]["pss_mib"]["0"] / MODELS
            tables.append(_traffic_table(label, runs, one, args.checkpoints))
            judged = "2000" if "2000" in runs["--preload"]["pss_mib"] else str(args.checkpoints[-1])
            ratio = runs["--preload"]["pss_mib"][judged] / one
            speed = runs["--preload"]["per_second"] / runs["plain"]["per_second"]
            ok = all(run["failed"] == 0 for run in runs.values())
            if kind == "objects" and immortal:
                targets[f"{label}: PSS after {judged} at most 1.3x one model's"] = ratio <= 1.3
                targets[f"{label}: throughput at least 0.9 of plain's"] = speed >= 0.9
            elif kind == "objects":
                targets[f"{label}: PSS after {judged} at most 2.25x one model's"] = ratio <= 2.25
            else:
                targets[f"{label}: PSS after {judged} at most 1.3x one model's"] = ratio <= 1.3
            targets[f"{label}: no failed request"] = ok
    marks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in targets.items()]
    return results, "\n\n".join(tables) + "\n\nTargets:\n" + "\n".join(marks), targets


def _traffic_table(
    label: str, runs: dict[str, dict[str, Any]], one: float, checkpoints: list[int]
) -> str:
    plain_speed = runs["plain"]["per_second"]
    last = f"{checkpoints[-2]:,}-{checkpoints[-1]:,}" if len(checkpoints) > 1 else "all"
    header = ("", "4/4 ready", "at rest", *(f"after {c:,}" for c in checkpoints))
    rows = [(*header, "requests/s", f"requests/s, {last}", "failed", "refreshes")]
    for variant, run in runs.items():
        pss = [run["pss_mib"][key] for key in ["0", *map(str, checkpoints)]]
        rows.append(
            (
                variant,
                f"{run['ready_s']:.1f} s",
                *(f"{mib:,.0f} MiB ({mib / one:.1f}x)" for mib in pss),
                f"{run['per_second']:.0f} ({run['per_second'] / plain_speed:.2f}x)",
                _last_rate(run, runs["plain"], checkpoints),
                str(run["failed"]),
                str(run["refreshes"]),
            )
        )
    return f"{label} (one plain model: {one:,.0f} MiB PSS)\n\n" + _table(rows)


def _last_rate(run: dict[str, Any], plain: dict[str, Any], checkpoints: list[int]) -> str:
    """Requests a second over the last stretch of traffic (once a start-up's work is done,
    such as a template's objects made immortal), against plain's over the same."""
    key = str(checkpoints[-1])
    rate, plain_rate = run["per_second_by_checkpoint"][key], plain["per_second_by_checkpoint"][key]
    return f"{rate:.0f} ({rate / plain_rate:.2f}x)"


def _version_of(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run CI does")
    parser.add_argument("--sections", default="startup,traffic", help="startup, traffic or both")
    parser.add_argument("--model-mib", type=int, help="MiB each model holds (300; quick 100)")
    parser.add_argument("--load-seconds", type=float, help="extra load time (1.0; quick 0.5)")
    parser.add_argument("--trials", type=int, help="replacements timed (7; quick 3)")
    parser.add_argument("--capacity-seconds", type=float, help="each capacity run (20; quick 8)")
    parser.add_argument("--objects-keys", type=int, help="the objects model's (2e6; quick 2e5)")
    parser.add_argument("--bytes-mib", type=int, help="the bytes model's MiB (512; quick 64)")
    parser.add_argument(
        "--checkpoints", help="traffic's checkpoints (1000,2000,10000; quick 300,1000)"
    )
    parser.add_argument("--models", default="bytes,objects", help="traffic's models")
    parser.add_argument(
        "--pythons",
        help="traffic's model interpreters, by path (this one, and the newest 3.12+ of pyenv)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    full = {
        "model_mib": 300,
        "load_seconds": 1.0,
        "trials": 7,
        "capacity_seconds": 20.0,
        "objects_keys": 2_000_000,
        "bytes_mib": 512,
        "checkpoints": "1000,2000,10000",
    }
    quick = {
        "model_mib": 100,
        "load_seconds": 0.5,
        "trials": 3,
        "capacity_seconds": 8.0,
        "objects_keys": 200_000,
        "bytes_mib": 64,
        "checkpoints": "300,1000",
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.checkpoints = [int(c) for c in args.checkpoints.split(",")]
    args.pythons = [p.strip() for p in (args.pythons or "").split(",") if p.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip() in TRAFFIC_MODELS]
    sections = {s.strip() for s in args.sections.split(",")}
    args.log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelpool-preload-{os.getpid()}"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"--preload bench; logs in {args.log_dir}", flush=True)
    results: dict[str, Any] = {}
    texts = []
    try:
        if "startup" in sections:
            results["startup"], text, targets = startup_section(args)
            results["startup"]["targets"] = targets
            texts.append(text)
        if "traffic" in sections:
            results["traffic"], text, targets = traffic_section(args)
            results["traffic"]["targets"] = targets
            texts.append(text)
    except BenchError as exc:
        print(f"bench failed: {exc}")
        return 1
    print()
    print("\n\n".join(texts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
