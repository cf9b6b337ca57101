"""Several models on one slot budget: how slots follow demand, side by side in one run.

Each service here runs benchmarks/sleep_model.py (sleeps what a request asks; with
--start, sleeps that long before its ready line, as a model loading would) on
--workers 4, from a config file, started as `modelpool serve --config FILE`:

  moves      two models a and b, min-workers 0 each (2 + 2 slots at start): N requests
             of 0.5 s to a, all at once; when every one is answered, N to b. Wall time
             against the ideal 2N x 0.5 s / 4 slots (a fixed 2 + 2 split needs twice
             that). With --preload (a move forks from the model's template) and with
             plain starts (a move loads a model: a 1 s start), one after the other.
             Target, with --preload: within ideal / 0.85.
  mix        two models, --preload, closed-loop clients for D s: 6 looping on a, 2 on
             b, requests of 0.05-0.1 s (seeded). Slot busy fraction = compute served
             (answers x the sleep each asked) / (4 slots x wall time); beside it the
             same with the service's own timing of each model's work
             (modelpool_compute_seconds_sum: the sleep plus the round trip through the
             model's pipes), so what is lost splits into that round trip and slots
             left idle; slot moves (modelpool_slot_moves_total) in the first S s
             against the rest.
             Targets: busy (the service's timing) >= 0.95; once steady, few moves
             (at most 1 per 10 s).
  one model  the old way (no [models] tables: --workers 4 --preload, the same model),
             the same 8 clients and requests all to POST /predict: req/s and busy
             fraction beside the mix's two-model run (its busy fraction is what this
             machine and client reach with no slot ever moving). Target: the old way
             loses nothing: req/s at least 0.97 of the two-model run's (and of
             --before's, if given).
             With --before DIR, also the old way on the modelpool of another checkout
             (DIR/src, e.g. `git archive HEAD~1 src | tar -x -C DIR`).

Targets are figures to read, not assertions: the exit code says only whether the bench
itself ran. It talks only to 127.0.0.1 on ports it picks, stops every process it starts
(also on Ctrl-C and errors), checks that none of the services' model processes is left,
and every step is bounded in time.

Run: nox -s bench-models (-- --quick: shorter runs), or
`python benchmarks/bench_models.py [--quick] [--json FILE] [--before DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from bench import BenchError, in_trio, on_sigterm

from benchtools import alive, descendants, free_port, stop_group, table

ROOT = Path(__file__).resolve().parents[1]
SLEEP_MODEL = Path(__file__).resolve().parent / "sleep_model.py"
BUDGET = 4  # --workers: the slots every service here has
MOVE_SLEEP = 0.5  # seconds each request of the moves section asks
MIX_SPAN = (0.05, 0.1)  # seconds each request of the mix asks, drawn uniformly
MIX_CLIENTS = {"a": 6, "b": 2}  # closed-loop clients per model: a 3:1 mix
LOAD_SECONDS = 1.0  # a plain start's load in the moves section (--preload pays it once)
MOVES_TARGET = 0.85  # ideal / measured, with --preload
BUSY_TARGET = 0.95
STEADY_MOVES_PER_10S = 1.0  # at most this many moves per 10 s once steady
OLD_WAY_RATIO = 0.97  # the old way's req/s at least this much of the two-model run's


# -- services ------------------------------------------------------------------------------


def model_cmd(start: float) -> str:
    """The sleep model's command line, in this interpreter (so --preload can fork it)."""
    return f"{sys.executable} -u {SLEEP_MODEL} --start {start:g}"


def toml(config: dict[str, Any]) -> str:
    """The little TOML these configs need: top-level keys, then a table per model."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)  # an int, or a string (JSON's escapes are TOML's)

    lines = [f"{k} = {value(v)}" for k, v in config.items() if k != "models"]
    for name, options in config.get("models", {}).items():
        lines += ["", f"[models.{name}]", *(f"{k} = {value(v)}" for k, v in options.items())]
    return "\n".join(lines) + "\n"


@dataclass
class Service:
    """One `modelpool serve --config FILE` in a session of its own, its log in a file."""

    name: str
    config: dict[str, Any]
    checkout: Path | None = None  # another checkout's modelpool (its src/ on the path)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        config_path = log_dir / f"{self.name}.toml"
        config_path.write_text(toml(self.config))
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        command = [sys.executable, "-m", "modelpool", "serve", "--config", str(config_path)]
        command += ["--port", str(self.port), "--host", "127.0.0.1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPOOL_")}
        if self.checkout is not None:
            env["PYTHONPATH"] = str(self.checkout.resolve() / "src")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def log_lines(self, *needles: str, last: int = 12) -> str:
        """The last lines of its log holding any of `needles` (all lines if none given)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        chosen = [line for line in text if not needles or any(n in line for n in needles)]
        return "\n".join(chosen[-last:])

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def wait_ready(self, within: float) -> float:
        """Seconds until /readyz says 200 and every model has all its workers ready."""
        assert self.proc is not None
        began = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with code {self.proc.returncode}:\n{self.log_lines()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if self.get("/readyz").status_code == 200:
                    listed = self.get("/models")  # a checkout before many models: /status
                    models = listed.json()["models"] if listed.status_code == 200 else []
                    if listed.status_code == 404:
                        status = self.get("/status").json()
                        models = [{"workers": status["size"], "ready": status["ready"]}]
                    workers = sum(m["workers"] for m in models)
                    if workers == BUDGET and all(m["ready"] == m["workers"] for m in models):
                        return time.perf_counter() - began
            if time.perf_counter() - began > within:
                raise BenchError(f"{self.name} not ready after {within} s:\n{self.log_lines()}")
            time.sleep(0.05)

    def stop(self) -> list[int]:
        """SIGTERM to its group, a wait, SIGKILL on timeout; the model processes left."""
        if self.proc is None:
            return []
        below = descendants(self.proc.pid)  # the templates and models (their own sessions)
        if not stop_group(self.proc, 30):
            print(f"  {self.name} did not stop within 30 s of SIGTERM: killed", flush=True)
        time.sleep(0.2)
        return [pid for pid in below if alive(pid)]


@contextlib.contextmanager
def running(service: Service, log_dir: Path, settle: float = 1.5) -> Iterator[Service]:
    """The service started, ready, then left `settle` s (the start's slot holds lapse);
    stopped, whatever happens, with a check that no model process is left."""
    try:
        service.start(log_dir)
        seconds = service.wait_ready(within=60)
        print(f"  {service.name}: ready in {seconds:.1f} s", flush=True)
        time.sleep(settle)
        yield service
    finally:
        left = service.stop()
        if left:
            print(f"  {service.name}: model processes left after its stop: {left}", flush=True)
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def two_models(preload: bool, start: float) -> dict[str, Any]:
    table = {"model-cmd": model_cmd(start), "min-workers": 0}
    return {"workers": BUDGET, "preload": preload, "models": {"a": table, "b": dict(table)}}


def one_model(start: float) -> dict[str, Any]:
    return {"workers": BUDGET, "preload": True, "model-cmd": model_cmd(start)}


MOVES_LINE = re.compile(r'^modelpool_slot_moves_total\{from="([^"]+)",to="([^"]+)"\} (\S+)$', re.M)


async def slot_moves(client: httpx.AsyncClient) -> dict[str, float]:
    """modelpool_slot_moves_total from /metrics, by "from>to" (empty with one model)."""
    text = (await client.get("/metrics")).text
    return {f"{a}>{b}": float(n) for a, b, n in MOVES_LINE.findall(text)}


COMPUTE_LINE = re.compile(
    r'^modelpool_compute_seconds_sum(?:\{(?:model="([^"]*)")?\})? (\S+)$', re.M
)


async def compute_seconds(client: httpx.AsyncClient) -> dict[str, float]:
    """modelpool_compute_seconds_sum by model ("" with one model): the service's own
    timing of its models' work (request line written to result read)."""
    text = (await client.get("/metrics")).text
    return {model: float(n) for model, n in COMPUTE_LINE.findall(text)}


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


# -- moves: a burst to a, then a burst to b -------------------------------------------------


async def burst(client: httpx.AsyncClient, path: str, count: int) -> list[str]:
    """`count` requests of MOVE_SLEEP s at once; what went wrong, if anything."""
    failures: list[str] = []

    async def one() -> None:
        try:
            response = await client.post(path, json={"sleep": MOVE_SLEEP})
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
            return
        if response.status_code != 200 or response.json().get("slept") != MOVE_SLEEP:
            failures.append(f"{response.status_code} {response.text[:80]}")

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return failures


async def moves_run(service: Service, count: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as client:
        before = await slot_moves(client)
        with trio.fail_after(count * 2 * MOVE_SLEEP + 120):
            began = time.perf_counter()
            failures = await burst(client, "/models/a/predict", count)
            half = time.perf_counter()
            failures += await burst(client, "/models/b/predict", count)
            ended = time.perf_counter()
        after = await slot_moves(client)
        slots = (await client.get("/status")).json()["slots"]
    ideal = 2 * count * MOVE_SLEEP / BUDGET
    return {
        "requests_per_model": count,
        "ideal_s": ideal,
        "fixed_split_s": 2 * count * MOVE_SLEEP / (BUDGET // 2),
        "wall_s": ended - began,
        "a_s": half - began,
        "b_s": ended - half,
        "efficiency": ideal / (ended - began),
        "moves": moved(before, after),
        "shares_after": slots["shares"],
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
    }


# -- the mix: closed-loop clients ----------------------------------------------------------


async def mix_run(
    service: Service, paths: dict[str, str], seconds: float, settle: float, seed: int
) -> dict[str, Any]:
    """MIX_CLIENTS closed-loop clients (model name -> path to post to) for `seconds`."""
    served = {name: [0, 0.0] for name in MIX_CLIENTS}  # answers, compute seconds
    failures: list[str] = []
    shares: dict[str, int] = {}  # each model's slots at the deadline
    clients = sum(MIX_CLIENTS.values())
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as client:
        moves_at = [await slot_moves(client)]
        computed = await compute_seconds(client)
        began = time.perf_counter()
        last = [began]
        deadline = trio.current_time() + seconds

        async def loop(name: str, rng: random.Random) -> None:
            while trio.current_time() < deadline:
                sleep = round(rng.uniform(*MIX_SPAN), 4)
                try:
                    response = await client.post(paths[name], json={"sleep": sleep})
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    continue
                last[0] = max(last[0], time.perf_counter())
                if response.status_code == 200 and response.json().get("slept") == sleep:
                    served[name][0] += 1
                    served[name][1] += sleep
                else:
                    failures.append(f"{response.status_code} {response.text[:80]}")

        async def scrape() -> None:  # at `settle` and at the deadline, before the drain
            await trio.sleep(settle)
            moves_at.append(await slot_moves(client))
            await trio.sleep_until(deadline)
            moves_at.append(await slot_moves(client))
            status = (await client.get("/status")).json()
            shares.update(status.get("slots", {}).get("shares", {}))

        with trio.fail_after(seconds + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrape)
                index = 0
                for name, count in MIX_CLIENTS.items():
                    for _ in range(count):
                        nursery.start_soon(loop, name, random.Random(seed + index))
                        index += 1
        computed = {m: n - computed.get(m, 0.0) for m, n in (await compute_seconds(client)).items()}
    wall = last[0] - began
    answers = sum(n for n, _ in served.values())
    compute = sum(c for _, c in served.values())
    first = moved(moves_at[0], moves_at[1])
    rest = moved(moves_at[1], moves_at[2])
    return {
        "seconds": seconds,
        "wall_s": wall,
        "answers": answers,
        "by_model": {name: {"answers": n, "compute_s": c} for name, (n, c) in served.items()},
        "req_per_s": answers / wall,
        "busy": compute / (BUDGET * wall),
        "busy_service": sum(computed.values()) / (BUDGET * wall),  # the service's timing
        "busy_service_by_model": {
            model: n / (shares[model] * wall)
            for model, n in computed.items()
            if shares.get(model)  # over the slots it had at the deadline
        },
        "settle_s": settle,
        "moves_first": first,
        "moves_rest": rest,
        "moves_rest_per_10s": sum(rest.values()) / max(1e-9, seconds - settle) * 10,
        "shares_after": shares,
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
    }


# -- the report ----------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "✓ met" if ok else "✗ missed"


def moves_text(moves: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(moves.items())) or "none"


def report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    targets: dict[str, bool] = {}
    pre, plain = results["moves"]["preload"], results["moves"]["plain"]
    ideal = pre["ideal_s"]
    fast = pre["efficiency"] >= MOVES_TARGET and not pre["failed"]
    targets["moves_preload_within_ideal/0.85"] = fast
    n = pre["requests_per_model"]
    rows = [
        ["moves", "--preload (fork)", f"plain ({LOAD_SECONDS:g} s load)", "target"],
        [
            f"wall, {n} x {MOVE_SLEEP} s to a then {n} to b",
            f"{pre['wall_s']:.2f} s",
            f"{plain['wall_s']:.2f} s",
            f"≤ {ideal / MOVES_TARGET:.1f} s (preload) {mark(fast)}",
        ],
        [
            f"ideal {ideal:g} s / measured (a fixed 2+2 split: {pre['fixed_split_s']:g} s)",
            f"{pre['efficiency']:.1%}",
            f"{plain['efficiency']:.1%}",
            f"≥ {MOVES_TARGET:.0%} (preload)",
        ],
        [
            "phase a / phase b",
            f"{pre['a_s']:.2f} / {pre['b_s']:.2f} s",
            f"{plain['a_s']:.2f} / {plain['b_s']:.2f} s",
            f"{ideal / 2:g} / {ideal / 2:g} s ideal",
        ],
        ["slot moves", moves_text(pre["moves"]), moves_text(plain["moves"]), ""],
        ["failed requests", str(pre["failed"]), str(plain["failed"]), "0"],
    ]
    mix, old = results["mix"], results["one_model"]
    # A slot is busy while its model computes a request: the service's own timing. The
    # clients' measure (the sleep each asked) also loses the round trip through the
    # model's pipes, which no placement of slots can win back: it is shown beside.
    targets["mix_busy>=0.95"] = mix["busy_service"] >= BUSY_TARGET and not mix["failed"]
    targets["mix_few_moves_once_steady"] = mix["moves_rest_per_10s"] <= STEADY_MOVES_PER_10S
    ratio = old["req_per_s"] / mix["req_per_s"]
    before = results.get("before")
    targets["one_model_costs_nothing"] = (
        ratio >= OLD_WAY_RATIO
        and not old["failed"]
        and (before is None or old["req_per_s"] >= OLD_WAY_RATIO * before["req_per_s"])
    )
    shares = mix["shares_after"] or {}
    columns = ["mix 6:2 clients, 0.05-0.1 s", "two models (a, b)", "one model, the old way"]
    if before is not None:
        columns.append("one model, --before")
    columns.append("target")

    def row(label: str, *cells: str) -> list[str]:
        values = list(cells[:2]) + ([cells[2]] if before is not None else []) + [cells[-1]]
        return [label, *values]

    b = before or old
    second = [
        columns,
        row(
            f"wall (clients for {mix['seconds']:g} s)",
            f"{mix['wall_s']:.2f} s",
            f"{old['wall_s']:.2f} s",
            f"{b['wall_s']:.2f} s",
            "",
        ),
        row(
            "answers (a / b)",
            f"{mix['answers']} ({mix['by_model']['a']['answers']} / "
            f"{mix['by_model']['b']['answers']})",
            str(old["answers"]),
            str(b["answers"]),
            "",
        ),
        row(
            "req/s (ratio to two models)",
            f"{mix['req_per_s']:.1f}",
            f"{old['req_per_s']:.1f} ({ratio:.3f})",
            f"{b['req_per_s']:.1f} ({b['req_per_s'] / mix['req_per_s']:.3f})",
            f"old way ≥ {OLD_WAY_RATIO}x two models"
            + (" and --before" if before is not None else "")
            + f" {mark(targets['one_model_costs_nothing'])}",
        ),
        row(
            "slots busy computing (the service's timing)",
            f"{mix['busy_service']:.3f} ("
            + ", ".join(
                f"{m} {v:.3f} on {shares.get(m)}"
                for m, v in sorted(mix["busy_service_by_model"].items())
            )
            + f") {mark(targets['mix_busy>=0.95'])}",
            f"{old['busy_service']:.3f}",
            f"{b['busy_service']:.3f}",
            f"≥ {BUSY_TARGET} (the rest: slots idle)",
        ),
        row(
            "the clients' useful work (sleep asked)",
            f"{mix['busy']:.3f}",
            f"{old['busy']:.3f}",
            f"{b['busy']:.3f}",
            "(less the pipes' round trip)",
        ),
        row(
            f"slot moves, first {mix['settle_s']:g} s",
            moves_text(mix["moves_first"]),
            "-",
            "-",
            "",
        ),
        row(
            f"slot moves, the other {mix['seconds'] - mix['settle_s']:g} s",
            f"{moves_text(mix['moves_rest'])} ({mix['moves_rest_per_10s']:.1f} per 10 s) "
            f"{mark(targets['mix_few_moves_once_steady'])}",
            "-",
            "-",
            f"≤ {STEADY_MOVES_PER_10S:g} per 10 s",
        ),
        row(
            "slots at the deadline",
            ", ".join(f"{k} {v}" for k, v in shares.items()) or "-",
            str(BUDGET),
            str(BUDGET),
            "3:1",
        ),
        row("failed requests", str(mix["failed"]), str(old["failed"]), str(b["failed"]), "0"),
    ]
    return table(rows) + "\n\n" + table(second), targets


def checkout() -> str:
    """The commit this checkout is at, short."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def machine_line(name: str, results: dict[str, Any], commit: str) -> str:
    """A bench's first line: which, when, at what commit, on how busy a machine."""
    start, end = results["load_average_start"][0], results["load_average_end"][0]
    busy = "" if max(start, end) < (os.cpu_count() or 1) else " (a busy machine: figures suffer)"
    return (
        f"modelpool {name} ({results['mode']}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, checkout at {commit}): "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, load average {start:.2f} "
        f"at start and {end:.2f} at end{busy}."
    )


def header(results: dict[str, Any]) -> str:
    return (
        machine_line("bench_models", results, checkout())
        + f"\n--workers {BUDGET}, benchmarks/sleep_model.py; client, service and models share "
        "the cores; ✓/✗: the targets."
    )


# -- the run -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench_models.json")
    parser.add_argument("--burst", type=int, help="requests per model in moves (40; quick 16)")
    parser.add_argument("--seconds", type=float, help="seconds of the mix (20; quick 8)")
    parser.add_argument("--settle", type=float, help="the mix's first window (5; quick 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--before", type=Path, help="a checkout whose src/ to run the old way")
    args = parser.parse_args()
    full = {"burst": 40, "seconds": 20.0, "settle": 5.0}
    quick = {"burst": 16, "seconds": 8.0, "settle": 3.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "moves": {}}
    print(f"moves: {args.burst} x {MOVE_SLEEP} s to a, then {args.burst} to b", flush=True)
    for label, preload in (("preload", True), ("plain", False)):
        service = Service(f"moves-{label}", two_models(preload, LOAD_SECONDS))
        with running(service, log_dir):
            figures = in_trio(moves_run, service, args.burst)
        results["moves"][label] = figures
        print(
            f"  {label}: {figures['wall_s']:.2f} s (a {figures['a_s']:.2f} + b "
            f"{figures['b_s']:.2f}), moves {moves_text(figures['moves'])}, "
            f"failed {figures['failed']}",
            flush=True,
        )
        if figures["efficiency"] < MOVES_TARGET or figures["failed"]:
            print("  its moves and starts, from its log:", flush=True)
            for line in service.log_lines("slot moved", "ready after", "WARNING", last=30).split(
                "\n"
            ):
                print(f"    | {line}", flush=True)

    print(
        f"mix: {MIX_CLIENTS} closed-loop clients, {MIX_SPAN[0]}-{MIX_SPAN[1]} s requests, "
        f"{args.seconds:g} s",
        flush=True,
    )
    runs: list[tuple[str, Service, dict[str, str]]] = [
        ("mix", Service("mix", two_models(True, 0)), {m: f"/models/{m}/predict" for m in "ab"}),
        ("one_model", Service("one-model", one_model(0)), {m: "/predict" for m in "ab"}),
    ]
    if args.before is not None:
        old = Service("one-model-before", one_model(0), checkout=args.before)
        runs.append(("before", old, {m: "/predict" for m in "ab"}))
    for key, service, paths in runs:
        with running(service, log_dir):
            figures = in_trio(mix_run, service, paths, args.seconds, args.settle, args.seed)
        results[key] = figures
        print(
            f"  {service.name}: {figures['req_per_s']:.1f} req/s, busy {figures['busy']:.3f}, "
            f"moves first {moves_text(figures['moves_first'])}, rest "
            f"{moves_text(figures['moves_rest'])}, failed {figures['failed']}",
            flush=True,
        )
        if key == "mix" and figures["moves_rest_per_10s"] > STEADY_MOVES_PER_10S:
            print("  its last moves, from its log:", flush=True)
            for line in service.log_lines("slot moved", last=12).split("\n"):
                print(f"    | {line}", flush=True)
    return results


Run = Callable[[argparse.Namespace, Path], dict[str, Any]]
Report = Callable[[dict[str, Any]], tuple[str, dict[str, bool]]]


def bench_main(
    args: argparse.Namespace, name: str, run: Run, report: Report, header: Callable[..., str]
) -> int:
    """Run a bench in a scratch directory, print its report and targets, write its JSON;
    every process it started is stopped on SIGINT or SIGTERM (exit 130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    began = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"modelpool-{name}-") as scratch:
        try:
            results = run(args, Path(scratch))
        except KeyboardInterrupt:
            print("bench: interrupted; every process it started is stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    results["seconds"] = time.perf_counter() - began
    results["load_average_start"], results["load_average_end"] = load_start, os.getloadavg()
    text, targets = report(results)
    results["targets"] = targets
    print()
    print(header(results))
    print()
    print(text)
    print()
    for target, ok in targets.items():
        print(f"  {mark(ok):<9} {target}")
    met = sum(targets.values())
    print(f"targets met: {met}/{len(targets)}  ({results['seconds']:.0f} s; JSON: {args.json})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def main() -> int:
    return bench_main(parse_args(), "bench-models", run, report, header)


if __name__ == "__main__":
    sys.exit(main())
