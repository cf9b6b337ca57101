"""Side-by-side benchmark: modelpool against baselines measured in the same run.

The machine is small and shared, so absolute figures move from run to run; every figure
here is therefore set against a baseline measured seconds apart in the same run, and the
issue's targets are checked on those ratios:

  overhead   zero-compute POSTs of {"data": 0} at 1, 4 and 32 keep-alive connections,
             driven by wrk (C, one thread, so the client is not the bottleneck) through
             (a) a raw ASGI app and (b) a trivial quart-trio route, both on hypercorn's
             trio worker, (c) modelpool with its default logging and 4 model3 models,
             (d) gunicorn with 4 sync workers each owning a warm model3
             (benchmarks/baselines/); with --before DIR, also (c0) the modelpool of
             another checkout (DIR/src), e.g. main, to compare before and after. Also
             the CPU time the server's processes (not
             the models) spend per request, steadier than req/s on a busy machine.
             Rounds alternate the servers, so drift in the machine's load hits them
             alike; figures are medians over rounds, and a ratio is the median of the
             ratios within each round.
  mission    a seeded batch of mixed-length requests (model3 sleeps |tan(data)| s, so
             data = atan(seconds)) sent at once, 5 ms apart so their order is known;
             efficiency = the first-come-first-served ideal makespan on 4 models (with
             those send times) / the measured one. Again while 8 slow clients trickle
             their bodies a byte at a time. For modelpool and the gunicorn baseline.
  start-up   seconds from launch to 4/4 models ready with model3's real 5 s start-up,
             for modelpool and gunicorn, against one model3 alone to its ready line.
  memory     modelpool's resident memory at rest, then after about 5,000 and 10,000
             zero-compute requests (flat: under 2 MiB of growth over the second half).

It prints Markdown tables with ratios and target marks (targets are figures to read,
not assertions: the exit code says only whether the bench itself ran), and writes every
figure, each round's raw results and the machine (cores, Python, load average) as JSON.
It only talks to 127.0.0.1 on ports it picks, stops every process it starts, also on
Ctrl-C, SIGTERM and errors, and every step is bounded in time.

Run: nox -s bench  (-- --quick: the short version CI runs; -- --help for the rest)
Needs wrk (Debian: apt-get install wrk) and gunicorn (the nox session installs it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import trio

from benchtools import cpu_of, free_port, rss_mib, stat_fields, stop_group, table

ROOT = Path(__file__).resolve().parents[1]
BASELINES = Path(__file__).resolve().parent / "baselines"
MODEL3 = ROOT / "model3.py"
MODELS = 4
CONNECTIONS = (1, 4, 32)
ZERO_BODY = '{"data": 0}'
SHORT_START = {"MODEL3_STEP_SECONDS": "0.05"}  # 0.25 s start-up; compute is unchanged
POLL = 0.005  # seconds between looks at a log while timing a start-up

# wrk's Lua: POST the zero-compute body; at the end print the figures as one JSON line.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"data": 0}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_s": %.6f, "errors": %d, "non_2xx": %d, ' ..
    '"p50_ms": %.4f, "p99_ms": %.4f, "mean_ms": %.4f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3))
end
"""


class BenchError(Exception):
    """The bench itself could not run a step (a server did not start, requests failed)."""


# -- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    """One server process under test, in a session of its own, its output in a log file.

    `ready_line` and `ready_count`: it is ready once its log holds that many lines
    containing the text (4 models ready, or the listener up).
    """

    name: str
    command: list[str]
    ready_line: str
    ready_count: int = 1
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    launched: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL3_", "MODELPOOL_"))}
        with open(self.log_path, "wb") as log:
            self.launched = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, **self.env},
                cwd=ROOT,
                start_new_session=True,  # one group: gunicorn's workers and their models
            )

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_problems(self, lines: int = 10) -> str:
        """The last warnings and errors in its log, to show why requests failed."""
        if self.log_path is None:
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if "WARNING" in line or "ERROR" in line][-lines:])

    def wait_ready(self, within: float) -> float:
        """Seconds from launch until the ready line(s) are in the log."""
        assert self.proc is not None and self.log_path is not None
        deadline = self.launched + within
        while True:
            text = self.log_path.read_text(errors="replace")
            if text.count(self.ready_line) >= self.ready_count:
                return time.perf_counter() - self.launched
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.name} not ready after {within} s:\n{self.log_tail()}")
            time.sleep(POLL)

    def stop(self) -> None:
        """SIGTERM to its group (a graceful stop), then SIGKILL to whatever is left in it."""
        if self.proc is None:
            return
        if not stop_group(self.proc, 30):
            print(f"  {self.name} did not stop within 30 s of SIGTERM: killed; its log:")
            print(self.log_tail())


def hypercorn_app(name: str, app: str) -> Server:
    """A baseline ASGI app on hypercorn's trio worker, its command line as documented."""
    port = free_port()
    command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
    command += ["--bind", f"127.0.0.1:{port}", str(BASELINES / app)]
    return Server(name, command, ready_line=f"Running on http://127.0.0.1:{port}", port=port)


def modelpool(env: dict[str, str], checkout: Path | None = None) -> Server:
    """`modelpool serve` on its defaults (4 x model3, INFO logging), on a free port; that
    of `checkout` (its src/ first on the path), as "modelpool-before", if given."""
    port = free_port()
    command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
    command += ["--workers", str(MODELS)]
    ready = f"{MODELS}/{MODELS} models ready after"
    if checkout is not None:
        env = {**env, "PYTHONPATH": str(checkout.resolve() / "src")}
        return Server("modelpool-before", command, ready_line=ready, env=env, port=port)
    return Server("modelpool", command, ready_line=ready, env=env, port=port)


def gunicorn(env: dict[str, str]) -> Server:
    """The gunicorn baseline: 4 sync workers, each starting its own model3 as it boots."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--workers", str(MODELS)]
    command += ["--bind", f"127.0.0.1:{port}", "--no-control-socket"]
    command += ["--pythonpath", str(BASELINES), "gunicorn_app:app"]
    env = {**env, "MODEL3": str(MODEL3)}
    ready = "gunicorn_app: model ready"
    return Server("gunicorn", command, ready_line=ready, ready_count=MODELS, env=env, port=port)


def model_alone() -> Server:
    """One model3 by itself: the start-up every pool is compared with."""
    command = [sys.executable, "-u", str(MODEL3)]
    return Server("model3-alone", command, ready_line="ready: Model-initialized")


@contextlib.contextmanager
def running(servers: list[Server], log_dir: Path, within: float = 60) -> Iterator[None]:
    """Start the servers together, wait until each is ready and answers; stop them all."""
    try:
        for server in servers:
            server.start(log_dir)
        for server in servers:
            server.wait_ready(within)
            check_answer(server)
        yield
    finally:
        for server in servers:
            server.stop()


def check_answer(server: Server) -> None:
    """One zero-compute POST must get 200 and model3's answer (or the baselines' copy)."""
    request = urllib.request.Request(
        server.url + "/predict", data=ZERO_BODY.encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    if answer != {"ice_found": True}:
        raise BenchError(f"{server.name} answered {answer!r}")


# -- overhead: wrk -------------------------------------------------------------------------


def run_wrk(script: Path, url: str, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run (one thread, keep-alive); its figures from the script's JSON line."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s"]
    command += ["--timeout", "10s", "-s", str(script), url + "/predict"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            figures = json.loads(line.removeprefix("WRK_JSON "))
            figures["req_per_s"] = figures["requests"] / figures["duration_s"]
            return figures
    raise BenchError(f"wrk gave no figures (exit {done.returncode}):\n{done.stdout}{done.stderr}")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of a process group, the
    model3 processes left out: what the HTTP side costs, on a machine too busy for
    req/s alone to tell. (A server under test is its own group; modelpool's models are
    in sessions of their own anyway.)"""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
            if int(fields[2]) != pgid or b"model3" in (entry / "cmdline").read_bytes():
                continue
            total += cpu_of(fields)
        except (OSError, ValueError):
            continue  # it exited meanwhile
    return total


def overhead(
    servers: list[Server], script: Path, rounds: int, seconds: float
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per server and connection count: medians over rounds, ratios, and every run.

    Within a round the servers take turns at each connection count, and the order of
    turns rotates from round to round. A ratio against a baseline (`vs`) is the median of
    the ratios within each round, so each pairs two runs seconds apart.
    """
    for server in servers:  # warm-up: connections, caches, the models' first answers
        run_wrk(script, server.url, 4, 1)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        s.name: {c: [] for c in CONNECTIONS} for s in servers
    }
    for index in range(rounds):
        order = servers[index % len(servers) :] + servers[: index % len(servers)]
        for connections in CONNECTIONS:
            for server in order:
                assert server.proc is not None
                cpu = group_cpu_seconds(server.proc.pid)
                figures = run_wrk(script, server.url, connections, seconds)
                cpu = group_cpu_seconds(server.proc.pid) - cpu
                figures["cpu_us_per_req"] = cpu / max(1, figures["requests"]) * 1e6
                runs[server.name][connections].append(figures)
                print(
                    f"  round {index + 1}/{rounds}  {server.name:<10} {connections:>2} conn "
                    f"{figures['req_per_s']:7.0f} req/s  p50 {figures['p50_ms']:6.2f} ms  "
                    f"CPU {figures['cpu_us_per_req']:5.0f} µs/req"
                    + (f"  errors {figures['errors']}" if figures["errors"] else "")
                    + (f"  non-2xx {figures['non_2xx']}" if figures["non_2xx"] else ""),
                    flush=True,
                )
    result: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_connections in runs.items():
        result[name] = {}
        for connections, figures in by_connections.items():
            result[name][connections] = {
                "req_per_s": statistics.median(f["req_per_s"] for f in figures),
                "p50_ms": statistics.median(f["p50_ms"] for f in figures),
                "p99_ms": statistics.median(f["p99_ms"] for f in figures),
                "cpu_us_per_req": statistics.median(f["cpu_us_per_req"] for f in figures),
                "errors": sum(f["errors"] + f["non_2xx"] for f in figures),
                "runs": figures,
            }
    for name, by_connections in result.items():
        for connections, figures in by_connections.items():
            figures["vs"] = {}
            for baseline in ("quart-trio", "gunicorn"):
                mine, theirs = runs[name][connections], runs[baseline][connections]
                figures["vs"][baseline] = {
                    "req_per_s": paired(mine, theirs, "req_per_s"),
                    "p50_ms_diff": paired(mine, theirs, "p50_ms", difference=True),
                    "cpu_us_per_req": paired(mine, theirs, "cpu_us_per_req"),
                }
    return result


def paired(
    mine: list[dict[str, float]], theirs: list[dict[str, float]], key: str, difference: bool = False
) -> float:
    """Median over rounds of mine / theirs (or mine - theirs), each pair from one round."""
    pairs = zip(mine, theirs, strict=True)
    return statistics.median(a[key] - b[key] if difference else a[key] / b[key] for a, b in pairs)


# -- the mission's work: a batch of mixed lengths ------------------------------------------


def fcfs_makespan(jobs: list[tuple[float, float]], models: int) -> float:
    """Ideal makespan of (release, duration) jobs, taken in the order given (the order they
    were sent in) by the first model free, none before the one ahead of it: what a perfect
    first-come-first-served pool with zero overhead does.

    Not in the order of the measured release times: on a busy client those can swap two
    requests sent a few ms apart, and an ideal for an order the server never saw can be
    shorter than any FIFO schedule of the order it did see.
    """
    free = [0.0] * models
    end = previous = 0.0
    for release, duration in jobs:
        start = previous = max(release, heapq.heappop(free), previous)
        heapq.heappush(free, start + duration)
        end = max(end, start + duration)
    return end


@dataclass
class Batch:
    """One batch run's figures; times in seconds from the first send."""

    server: str
    slow_clients: int
    requests: int
    ideal_s: float
    measured_s: float
    efficiency: float
    failed: int
    failures: dict[str, int]  # what the failed batch requests got: status or error
    slow_answered: int
    slow_failed: int


async def slow_client(port: int, interval: float, tally: dict[str, int]) -> None:
    """Over and over: a zero-compute POST whose body arrives one byte every `interval` s."""
    body = ZERO_BODY.encode()
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    while True:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head)
            for index in range(len(body)):
                await trio.sleep(interval)
                await stream.send_all(body[index : index + 1])
            answer = b""
            with trio.move_on_after(60):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        ok = answer.startswith(b"HTTP/1.1 200")
        tally["answered" if ok else "failed"] += 1


async def run_batch(
    server: Server, durations: list[float], slow_clients: int, trickle: float
) -> Batch:
    """Send the batch 5 ms apart (its order known), wait for every answer; the figures."""
    stagger = 0.005
    releases = [0.0] * len(durations)
    finishes = [0.0] * len(durations)
    failures: collections.Counter[str] = collections.Counter()
    tally = {"answered": 0, "failed": 0}
    limits = httpx.Limits(max_connections=len(durations), max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client,
        trio.open_nursery() as slow,
    ):
        for _ in range(slow_clients):
            slow.start_soon(slow_client, server.port, trickle, tally)
        if slow_clients:
            await trio.sleep(1)  # the slow clients are mid-body when the batch arrives
        started, base = time.perf_counter(), trio.current_time()

        async def one(index: int, seconds: float) -> None:
            await trio.sleep_until(base + index * stagger)
            releases[index] = time.perf_counter() - started
            try:
                response = await client.post("/predict", json={"data": math.atan(seconds)})
            except httpx.HTTPError as exc:
                failures[type(exc).__name__] += 1
            else:
                if response.status_code != 200 or response.json() != {"ice_found": True}:
                    failures[f"{response.status_code} {response.text[:80]}"] += 1
            finishes[index] = time.perf_counter() - started

        with trio.fail_after(sum(durations) + 60):
            async with trio.open_nursery() as batch:
                for index, seconds in enumerate(durations):
                    batch.start_soon(one, index, seconds)
        slow.cancel_scope.cancel()
    ideal = fcfs_makespan(list(zip(releases, durations, strict=True)), MODELS)
    measured = max(finishes)
    return Batch(
        server.name,
        slow_clients,
        len(durations),
        ideal,
        measured,
        ideal / measured,
        sum(failures.values()),
        dict(failures),
        tally["answered"],
        tally["failed"],
    )


def mission(
    servers: list[Server], durations: list[float], slow_clients: int, trickle: float
) -> list[Batch]:
    """The batch on each server, without then with slow clients."""
    batches = []
    for slow in (0, slow_clients):
        for server in servers:
            batch = in_trio(run_batch, server, durations, slow, trickle)
            print(
                f"  {server.name:<10} {slow} slow clients: {batch.measured_s:6.2f} s "
                f"(ideal {batch.ideal_s:.2f} s) = {batch.efficiency:.1%}"
                + (f", {batch.failed} failed: {batch.failures}" if batch.failed else ""),
                flush=True,
            )
            if batch.failed:
                print(textwrap.indent(server.log_problems(), "    | "), flush=True)
            batches.append(batch)
    return batches


# -- start-up and memory -------------------------------------------------------------------


def startup(log_dir: Path, rounds: int) -> dict[str, Any]:
    """Launch to ready, real 5 s start-up: one model alone, modelpool, gunicorn; medians."""
    times: dict[str, list[float]] = {"model3-alone": [], "modelpool": [], "gunicorn": []}
    for index in range(rounds):
        for make in (model_alone, lambda: modelpool({}), lambda: gunicorn({})):
            server = make()
            try:
                server.start(log_dir)
                seconds = server.wait_ready(within=60)
            finally:
                server.stop()
            times[server.name].append(seconds)
            print(f"  round {index + 1}/{rounds}  {server.name:<13} {seconds:6.3f} s", flush=True)
    return {name: {"median_s": statistics.median(t), "runs_s": t} for name, t in times.items()}


def memory(log_dir: Path, script: Path, requests: int) -> dict[str, Any]:
    """modelpool's RSS at rest (ready, idle), then after about half and all of `requests`.

    wrk has no request count, so it runs in 1 s bursts at 4 connections until enough
    requests are answered; the sample names say how many exactly.
    """
    server = modelpool(SHORT_START)
    with running([server], log_dir):
        assert server.proc is not None
        time.sleep(1)
        samples = {"at_rest": rss_mib(server.proc.pid)}
        sent = 0
        for goal in (requests // 2, requests):
            while sent < goal:
                figures = run_wrk(script, server.url, 4, seconds=1)
                if figures["errors"] or figures["non_2xx"] or not figures["requests"]:
                    raise BenchError(f"memory run: {figures}")
                sent += figures["requests"]
            samples[f"after_{sent}"] = rss_mib(server.proc.pid)
        samples["peak"] = rss_mib(server.proc.pid, "VmHWM")
    print("  " + ", ".join(f"{k} {v:.1f} MiB" for k, v in samples.items()), flush=True)
    return {"requests": sent, "rss_mib": samples}


# -- the report ----------------------------------------------------------------------------

LABELS = {
    "raw-asgi": "(a) raw ASGI app, hypercorn trio worker",
    "quart-trio": "(b) quart-trio route, hypercorn trio worker",
    "modelpool": f"(c) modelpool, default logging, {MODELS} x model3",
    "gunicorn": f"(d) gunicorn, {MODELS} sync workers each owning a model3",
}
FLAT_MIB = 2.0  # "flat": at most this much growth over the second half of the requests
THROUGHPUT_VS_QUART = 1.0  # targets: at 4 and 32 connections, at least the quart route's
P50_GAP_MS = 0.0  # ... and at 1 connection a p50 no higher than its


def paired_of(over: dict[str, Any], connections: int, key: str, difference: bool = False) -> float:
    """modelpool against the modelpool of --before, paired within rounds as `paired`."""
    mine = over["modelpool"][connections]["runs"]
    theirs = over["modelpool-before"][connections]["runs"]
    return paired(mine, theirs, key, difference)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    """The printed tables, and every target with whether it was met."""
    over = results["overhead"]
    pool = over["modelpool"]
    targets: dict[str, bool] = {}
    for c in (4, 32):
        ok = pool[c]["vs"]["quart-trio"]["req_per_s"] >= THROUGHPUT_VS_QUART
        targets[f"throughput_{c}_conn_ge_quart"] = ok
    targets["p50_1_conn_le_quart"] = pool[1]["vs"]["quart-trio"]["p50_ms_diff"] <= P50_GAP_MS

    head = ['POST `{"data": 0}`, wrk, keep-alive']
    head += [f"req/s, {c} conn{'s' if c > 1 else ''}" for c in CONNECTIONS]
    head += ["p50, 1 conn", "server CPU per req, 32 conns"]
    rows = [head]
    labels = dict(LABELS)
    if "modelpool-before" in over:
        labels = {"modelpool-before": f"(c0) modelpool before ({results['before']})", **labels}
    for name, label in labels.items():
        row = [label]
        for c in CONNECTIONS:
            share = over[name][c]["vs"]["quart-trio"]["req_per_s"]
            cell = f"{over[name][c]['req_per_s']:,.0f} ({share:.0%})"
            if name == "modelpool" and c in (4, 32):
                cell += " " + mark(share >= THROUGHPUT_VS_QUART)
            row.append(cell)
        gap = over[name][1]["vs"]["quart-trio"]["p50_ms_diff"]
        cell = f"{over[name][1]['p50_ms']:.2f} ms"
        if name != "quart-trio":
            cell += f" ({gap:+.2f})"
        if name == "modelpool":
            cell += " " + mark(gap <= P50_GAP_MS)
        cpu = over[name][32]
        cell_cpu = (
            f"{cpu['cpu_us_per_req']:,.0f} µs ({cpu['vs']['quart-trio']['cpu_us_per_req']:.0%})"
        )
        rows.append([*row, cell, cell_cpu])
    vs_gun = {c: pool[c]["vs"]["gunicorn"] for c in CONNECTIONS}
    ratio = ["modelpool vs gunicorn"]
    ratio += [f"{vs_gun[c]['req_per_s']:.0%}" for c in CONNECTIONS]
    ratio += [f"{vs_gun[1]['p50_ms_diff']:+.2f} ms", f"{vs_gun[32]['cpu_us_per_req']:.0%}"]
    rows.append(ratio)
    if "modelpool-before" in over:
        gain = ["modelpool vs (c0), same run"]
        gain += [f"{paired_of(over, c, 'req_per_s'):.0%}" for c in CONNECTIONS]
        gain += [f"{paired_of(over, 1, 'p50_ms', True):+.2f} ms"]
        gain += [f"{paired_of(over, 32, 'cpu_us_per_req'):.0%}"]
        rows.append(gain)
    first = table(rows)
    notes = []  # after a blank line, so Markdown does not read them as rows
    for name in LABELS:
        errors = {c: over[name][c]["errors"] for c in CONNECTIONS if over[name][c]["errors"]}
        if errors:
            notes.append(
                f"{name}: failed requests (socket error or not 2xx) by connections: {errors}"
            )
    if notes:
        first += "\n\n" + "\n".join(notes)

    batches = {(b["server"], b["slow_clients"]): b for b in results["mission"]["batches"]}
    slow = results["mission"]["slow_clients"]
    n = results["mission"]["requests"]
    span = results["mission"]["span_s"]
    rows = [["figure", "modelpool", "gunicorn baseline", "target"]]
    for clients, what in ((0, ""), (slow, f", {slow} slow clients trickling bodies")):
        pool_b, gun_b = batches[("modelpool", clients)], batches[("gunicorn", clients)]
        ok = pool_b["efficiency"] >= 0.99 and not pool_b["failed"]
        targets[f"batch_efficiency_{clients}_slow_ge_99pct"] = ok
        rows.append(
            [
                f"batch of {n} ({span[0]:g}-{span[1]:g} s) vs FCFS ideal on {MODELS}{what}",
                f"{pool_b['efficiency']:.1%} ({pool_b['measured_s']:.2f} / "
                f"{pool_b['ideal_s']:.2f} s)" + before_batch(batches, clients),
                f"{gun_b['efficiency']:.1%} ({gun_b['measured_s']:.2f} s)",
                f"≥ 99% {mark(ok)}",
            ]
        )
    start = results["startup"]
    alone = start["model3-alone"]["median_s"]
    pool_s, gun_s = start["modelpool"]["median_s"], start["gunicorn"]["median_s"]
    targets["startup_within_0.15s_of_one_model"] = pool_s - alone <= 0.15
    rows.append(
        [
            f"start-up to {MODELS}/{MODELS} ready, 5 s model (one model3 alone: {alone:.2f} s)",
            f"{pool_s:.2f} s ({pool_s - alone:+.2f})",
            f"{gun_s:.2f} s ({gun_s - alone:+.2f})",
            f"≤ +0.15 s {mark(pool_s - alone <= 0.15)}",
        ]
    )
    rss = results["memory"]["rss_mib"]
    values = [v for k, v in rss.items() if k != "peak"]
    flat = values[-1] - values[-2] <= FLAT_MIB
    under = max([*values, rss["peak"]]) < 80
    targets["rss_under_80mib_and_flat"] = flat and under
    steps = [k.removeprefix("after_") for k in rss if k.startswith("after_")]
    rows.append(
        [
            f"service RSS at rest / after {' / '.join(f'{int(s):,}' for s in steps)} requests",
            " / ".join(f"{v:.1f}" for v in values) + " MiB",
            "",
            f"< 80 MiB, flat {mark(flat and under)}",
        ]
    )
    return first + "\n\n" + table(rows), targets


def before_batch(batches: dict[tuple[str, int], dict[str, Any]], clients: int) -> str:
    """The same batch on the modelpool of --before, if it ran."""
    before = batches.get(("modelpool-before", clients))
    return "" if before is None else f"; (c0): {before['efficiency']:.1%}"


def header(results: dict[str, Any]) -> str:
    """Where and how the figures were taken, for the lines above the tables."""
    m = results["machine"]
    return (
        f"modelpool bench ({results['mode']}, {m['date']}, checkout at {m['commit']}): "
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, load average "
        f"{m['load_average_start'][0]:.2f} at start and {m['load_average_end'][0]:.2f} at end.\n"
        f"Load generator: {m['load_generator']}, 1 thread, keep-alive; client, servers and "
        f"models share the cores.\nIn parentheses: % of (b), or the difference from (b); "
        f"✓/✗: the issue's targets."
    )


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, Python, versions, load average."""
    versions = {}
    for package in ("modelpool", "hypercorn", "quart", "quart-trio", "trio", "gunicorn", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        "load_generator": " ".join((wrk.stdout or wrk.stderr).split()[:2]),  # wrk <version>
        "versions": versions,
        "commit": commit,  # of the checkout bench.py is in; the modelpool measured is:
        "modelpool_at": str(Path(importlib.util.find_spec("modelpool").origin).parent),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# -- the run -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run CI makes")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument("--rounds", type=int, help="overhead rounds (3; quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (5; quick 2)")
    parser.add_argument("--batch", type=int, help="requests in the batch (40; quick 16)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--slow-clients", type=int, default=8)
    parser.add_argument("--trickle", type=float, default=0.25, help="seconds between body bytes")
    parser.add_argument("--startup-rounds", type=int, help="start-up rounds (3; quick 1)")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of modelpool (e.g. a worktree of main) to measure beside this one",
    )
    args = parser.parse_args()
    full = {"rounds": 3, "seconds": 5.0, "batch": 40, "startup_rounds": 3}
    quick = {"rounds": 1, "seconds": 2.0, "batch": 16, "startup_rounds": 1}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM acts as Ctrl-C: a KeyboardInterrupt, which trio too delivers safely, so
    every `finally` stops its servers."""
    signal.raise_signal(signal.SIGINT)


def in_trio(fn: Any, *args: Any) -> Any:
    """`trio.run(fn, *args)`, a Ctrl-C inside its nurseries raised as KeyboardInterrupt."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        raise


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print("bench: needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, on_sigterm)
    results: dict[str, Any] = {"machine": machine(), "mode": "quick" if args.quick else "full"}
    rng = random.Random(args.seed)
    span = (0.05, 2.2)
    durations = [round(rng.uniform(*span), 3) for _ in range(args.batch)]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelpool-bench-") as scratch:
        log_dir = Path(scratch)
        script = log_dir / "post.lua"
        script.write_text(WRK_SCRIPT)
        try:
            print(f"start-up: launch to ready, model3's real 5 s start ({args.startup_rounds}x)")
            results["startup"] = startup(log_dir, args.startup_rounds)

            servers = [
                hypercorn_app("raw-asgi", "raw_asgi.py:app"),
                hypercorn_app("quart-trio", "quart_route.py:app"),
                modelpool(SHORT_START),
                gunicorn(SHORT_START),
            ]
            if args.before is not None:
                servers.append(modelpool(SHORT_START, args.before))
                results["before"] = str(args.before)
            with running(servers, log_dir):
                print(
                    f"overhead: wrk, 1 thread, {args.rounds} round(s) of {args.seconds:g} s "
                    f"per server and connection count"
                )
                results["overhead"] = overhead(servers, script, args.rounds, args.seconds)
                print(
                    f"mission: {args.batch} requests of {span[0]}-{span[1]} s at once, "
                    f"seed {args.seed}; then with {args.slow_clients} slow clients "
                    f"(a body byte every {args.trickle:g} s)"
                )
                batches = mission(servers[2:], durations, args.slow_clients, args.trickle)
            results["mission"] = {
                "requests": args.batch,
                "seed": args.seed,
                "span_s": span,
                "durations_s": durations,
                "slow_clients": args.slow_clients,
                "trickle_s": args.trickle,
                "batches": [asdict(b) for b in batches],
            }
            print(f"memory: modelpool RSS over {args.memory_requests:,} requests")
            results["memory"] = memory(log_dir, script, args.memory_requests)
        except KeyboardInterrupt:
            print("bench: interrupted; every process it started is stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - began
    text, targets = report(results)
    results["targets"] = targets
    print()
    print(header(results))
    print()
    print(text)
    print()
    met = sum(targets.values())
    print(f"targets met: {met}/{len(targets)}  ({results['seconds']:.0f} s; JSON: {args.json})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
