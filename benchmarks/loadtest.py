"""Load test: drive any modelpool with a request mix, watch it live, then report and plot.

    nox -s load -- --url http://127.0.0.1:8080 --mode closed --concurrency 32 \\
        --duration 60 --mix '0:0.7,2:0.2,bad:0.1'
    nox -s load -- --mode open --rate 200 --duration 30     # starts a local service

Modes: `closed` keeps `--concurrency` clients each sending its next request as soon
as the last one is answered; `open` starts `--rate` requests a second on a fixed
schedule whatever the answers (at most `--max-in-flight` at once; arrivals past it
are counted as `client cap`), and measures each latency from its scheduled start, so
a stalled service cannot hide its stall (no coordinated omission).

The mix: `NUMBER:weight` sends {"data": NUMBER} (model3 computes about |tan(NUMBER)|
seconds, so 2 takes 2.2 s and 1.5 takes 14 s, past the timeout), `bad:weight` a body
that is not JSON (400), `crash:weight` valid JSON without "data" (model3 crashes: 502).

Every run is bounded by `--duration` and `--requests`; when either is reached no new
request starts, and answers are awaited for `--grace` seconds more. While it runs, a
live view (rich) shows requests sent and answered, errors by status, p50 and p99 over
the last 5 s, and the queue length and busy models from `/metrics` and `/status`,
sampled every `--sample-interval` s. At the end it prints a report and writes, under
`--out`: load.png (latency, each worker's busy share over time, queue length, stacked
so they share a time axis), latency.png, workers.png and queue.png, and report.json.

Without `--url` it starts `python -m modelpool serve` on a free loopback port (with
`--workers` models, and `--serve-arg` passed through) and stops it at the end.
It only ever talks to the URL given or to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from benchtools import free_port

LIVE_WINDOW = 5.0  # seconds of answers behind the live p50/p99
BAD_BODY = b'{"data": '  # not JSON: the service answers 400 without a model
CRASH_BODY = b"{}"  # JSON without "data": model3 raises, the service answers 502


@dataclass(frozen=True)
class Kind:
    name: str
    body: bytes


def parse_mix(text: str) -> tuple[list[Kind], list[float]]:
    """'0:0.7,2:0.2,bad:0.1' -> kinds and their weights."""
    kinds, weights = [], []
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            share = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected NAME:WEIGHT") from None
        if not math.isfinite(share) or share < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: weight must be a number >= 0")
        if name == "bad":
            body = BAD_BODY
        elif name == "crash":
            body = CRASH_BODY
        else:
            try:
                number = float(name)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name!r}: expected a number, 'bad' or 'crash'"
                ) from None
            body = json.dumps({"data": int(number) if number.is_integer() else number}).encode()
        kinds.append(Kind(name, body))
        weights.append(share)
    if not kinds or sum(weights) <= 0:
        raise argparse.ArgumentTypeError("the mix needs at least one weight above 0")
    return kinds, weights


@dataclass
class Answer:
    started: float  # seconds since the run began (the scheduled start, in open mode)
    latency: float
    status: int  # HTTP status; 0 for a transport error, -1 unanswered at the end
    kind: str


@dataclass
class Sample:
    at: float
    queue: float | None  # modelpool_queue_length
    states: dict[int, str]  # each worker's state, by worker id
    busy_seconds: dict[int, float]  # each worker's busy seconds so far, by worker id
    busy_total: float | None  # modelpool_model_busy_seconds_total


@dataclass
class Run:
    args: argparse.Namespace
    kinds: list[Kind]
    weights: list[float]
    started: float = 0.0
    sent: int = 0
    in_flight: int = 0
    capped: int = 0
    stopping: bool = False
    size: int = 0  # models in the pool
    busy_delta: float | None = None  # model-seconds spent computing during the run
    answers: list[Answer] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    random: random.Random = field(default_factory=random.Random)

    def now(self) -> float:
        return time.monotonic() - self.started

    def may_send(self) -> bool:
        return not self.stopping and self.sent < self.args.requests

    def begin(self) -> None:
        """Count a request sent and in flight as it is decided on, not when its task first
        runs: behind schedule, the open loop starts several in one turn of trio's loop,
        and each would pass `may_send` (--requests) and the --max-in-flight cap."""
        self.sent += 1
        self.in_flight += 1


# -- the service, when we start one -----------------------------------------------------


@contextlib.contextmanager
def local_service(args: argparse.Namespace, console: Console):
    """`python -m modelpool serve` on a free loopback port, SIGTERMed (then killed) at the end."""
    port = free_port()
    command = [sys.executable, "-m", "modelpool", "serve", "--port", str(port)]
    command += ["--workers", str(args.workers), *args.serve_arg]
    log_path = Path(args.out) / "service.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"starting: {' '.join(command)}  (log: {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(client: httpx.AsyncClient, within: float) -> int:
    """Wait until every model is ready; the pool's size."""
    with trio.fail_after(within):
        while True:
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                ready = (await client.get("/readyz")).json()
                if ready["ready"] >= ready["size"]:
                    return ready["size"]
            await trio.sleep(0.1)


# -- sending ------------------------------------------------------------------------------


async def send_one(run: Run, client: httpx.AsyncClient, started: float) -> None:
    """One request, counted by its caller (`Run.begin`)."""
    kind = run.random.choices(run.kinds, run.weights)[0]
    status = -1
    try:
        response = await client.post(
            "/predict", content=kind.body, headers={"Content-Type": "application/json"}
        )
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    finally:
        run.in_flight -= 1
        run.answers.append(Answer(started, run.now() - started, status, kind.name))


async def closed_loop(run: Run, client: httpx.AsyncClient) -> None:
    async def user() -> None:
        while run.may_send():
            run.begin()
            await send_one(run, client, run.now())

    async with trio.open_nursery() as nursery:
        for _ in range(run.args.concurrency):
            nursery.start_soon(user)


async def open_loop(run: Run, client: httpx.AsyncClient) -> None:
    interval = 1 / run.args.rate
    async with trio.open_nursery() as nursery:
        number = 0
        while run.may_send():
            scheduled = number * interval
            number += 1
            await trio.sleep(max(0.0, scheduled - run.now()))
            if not run.may_send():
                break
            if run.in_flight >= run.args.max_in_flight:
                run.capped += 1
                continue
            run.begin()
            nursery.start_soon(send_one, run, client, scheduled)


# -- watching -----------------------------------------------------------------------------


def metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


async def take_sample(run: Run, client: httpx.AsyncClient) -> None:
    """Queue length from /metrics, worker states and busy time from /status."""
    at = run.now()
    queue = busy_total = None
    states: dict[int, str] = {}
    busy: dict[int, float] = {}
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        text = (await client.get("/metrics")).text
        queue = metric(text, "modelpool_queue_length")
        busy_total = metric(text, "modelpool_model_busy_seconds_total")
        workers = (await client.get("/status")).json()["workers"]
        states = {w["id"]: w["state"] for w in workers}
        busy = {w["id"]: w.get("busy_seconds", 0.0) for w in workers}
    run.samples.append(Sample(at, queue, states, busy, busy_total))


async def sample_loop(run: Run, client: httpx.AsyncClient) -> None:
    while True:
        await take_sample(run, client)
        await trio.sleep(run.args.sample_interval)


def percentile(ordered: list[float], pct: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def live_view(run: Run) -> Table:
    """What the live view shows: one row per figure, so it fits any terminal."""
    answers = list(run.answers)  # a copy: rich renders from its own thread
    now = run.now() if run.started else 0.0
    by_status = collections.Counter(a.status for a in answers)
    recent = sorted(a.latency for a in answers if a.started + a.latency >= now - LIVE_WINDOW)
    last = run.samples[-1] if run.samples else None
    errors = ", ".join(f"{status_name(s)}: {n}" for s, n in sorted(by_status.items()) if s != 200)
    busy = "-"
    if last and last.states:
        busy = f"{list(last.states.values()).count('busy')} of {len(last.states)}"
    table = Table(title=f"modelpool load: {run.args.mode} mode, {run.args.url}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    waiting = ", sending stopped: waiting for answers" if run.stopping else ""
    table.add_row("elapsed", f"{now:.0f} of {run.args.duration:g} s{waiting}")
    table.add_row("sent", f"{run.sent} ({run.in_flight} in flight)")
    table.add_row("answered 200", str(by_status[200]))
    table.add_row("errors", errors or "none")
    p50, p99 = percentile(recent, 50), percentile(recent, 99)
    table.add_row(f"p50 / p99, last {LIVE_WINDOW:g} s", f"{ms(p50)} / {ms(p99)}")
    table.add_row("queue", "-" if last is None or last.queue is None else f"{last.queue:.0f}")
    table.add_row("models busy", busy)
    return table


def status_name(status: int) -> str:
    return {0: "transport", -1: "unanswered"}.get(status, str(status))


# -- the run ------------------------------------------------------------------------------


async def drive(run: Run, console: Console) -> None:
    args = run.args
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connections = args.concurrency if args.mode == "closed" else args.max_in_flight
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(args.request_timeout)
    async with (
        httpx.AsyncClient(base_url=args.url, timeout=timeout, limits=limits, headers=headers) as c,
        httpx.AsyncClient(base_url=args.url, timeout=10, headers=headers) as watcher,
    ):
        run.size = await wait_ready(watcher, args.ready_timeout)
        console.print(f"{run.size} model(s) ready at {args.url}")
        before = metric((await watcher.get("/metrics")).text, "modelpool_model_busy_seconds_total")
        run.started = time.monotonic()
        with Live(get_renderable=lambda: live_view(run), console=console, refresh_per_second=4):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_loop, run, watcher)
                nursery.start_soon(stop_on_signal, run)
                # past the grace, requests still out are cancelled: counted as unanswered
                with trio.move_on_after(args.duration + args.grace):
                    async with trio.open_nursery() as senders:
                        senders.start_soon(stop_after, run, args.duration)
                        await (closed_loop if args.mode == "closed" else open_loop)(run, c)
                        senders.cancel_scope.cancel()
                await take_sample(run, watcher)
                nursery.cancel_scope.cancel()
        after = metric((await watcher.get("/metrics")).text, "modelpool_model_busy_seconds_total")
        if before is not None and after is not None:
            run.busy_delta = after - before


async def stop_after(run: Run, seconds: float) -> None:
    await trio.sleep(seconds)
    run.stopping = True


async def stop_on_signal(run: Run) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            run.stopping = True  # stop sending; answers are still awaited for --grace


def report(run: Run) -> dict[str, Any]:
    answers = run.answers
    answered = sum(a.status != -1 for a in answers)
    elapsed = max((a.started + a.latency for a in answers), default=0.0)
    ok = sorted(a.latency for a in answers if a.status == 200)
    by_status = collections.Counter(status_name(a.status) for a in answers)
    kinds: dict[str, Any] = {}
    for kind in run.kinds:
        latencies = sorted(a.latency for a in answers if a.kind == kind.name)
        statuses = collections.Counter(
            status_name(a.status) for a in answers if a.kind == kind.name
        )
        kinds[kind.name] = {
            "sent": len(latencies),
            "statuses": dict(statuses),
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
        }
    queues = [s.queue for s in run.samples if s.queue is not None]
    size, busy = run.size, run.busy_delta
    utilisation = busy / (size * elapsed) if busy is not None and size and elapsed else None
    return {
        "url": run.args.url,
        "mode": run.args.mode,
        "concurrency": run.args.concurrency if run.args.mode == "closed" else None,
        "rate": run.args.rate if run.args.mode == "open" else None,
        "mix": run.args.mix,
        "duration_s": round(elapsed, 3),
        "sent": run.sent,
        "client_cap": run.capped,
        "answered": answered,
        "statuses": dict(by_status),
        "throughput_per_s": round(answered / elapsed, 1) if elapsed else None,
        "ok_latency_s": {
            "p50": percentile(ok, 50),
            "p90": percentile(ok, 90),
            "p99": percentile(ok, 99),
            "max": ok[-1] if ok else None,
        },
        "kinds": kinds,
        "models": size,
        "model_utilisation": None if utilisation is None else round(utilisation, 4),
        "queue_length": {
            "max": max(queues, default=None),
            "mean": round(sum(queues) / len(queues), 2) if queues else None,
        },
        "samples": len(run.samples),
    }


def print_report(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="load test report", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rate = summary["rate"]
    how = f"{summary['concurrency']} clients" if rate is None else f"{rate}/s"
    table.add_row("run", f"{summary['mode']} ({how}), mix {summary['mix']}")
    table.add_row("duration", f"{summary['duration_s']:.1f} s")
    table.add_row("sent / answered", f"{summary['sent']} / {summary['answered']}")
    table.add_row(
        "by status", ", ".join(f"{k}: {v}" for k, v in sorted(summary["statuses"].items()))
    )
    if summary["client_cap"]:
        table.add_row("client cap", f"{summary['client_cap']} arrivals not sent (--max-in-flight)")
    table.add_row("throughput", f"{summary['throughput_per_s']} answers/s")
    lat = summary["ok_latency_s"]
    table.add_row(
        "200 latency", " ".join(f"{k} {ms(lat[k])}" for k in ("p50", "p90", "p99", "max"))
    )
    for name, kind in summary["kinds"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(kind["statuses"].items()))
        table.add_row(
            f"  mix {name}",
            f"{kind['sent']} sent ({statuses}); p50 {ms(kind['p50_s'])}, p99 {ms(kind['p99_s'])}",
        )
    util = summary["model_utilisation"]
    table.add_row(
        "model utilisation",
        "-" if util is None else f"{util * 100:.1f} % of {summary['models']} model(s)",
    )
    queue = summary["queue_length"]
    table.add_row("queue length", f"max {queue['max']}, mean {queue['mean']}")
    console.print(table)


# -- plots ----------------------------------------------------------------------------------

STATUS_COLOURS = {200: "tab:blue", 400: "tab:gray", 502: "tab:red", 503: "tab:orange"}


def plot_latency(ax: Any, run: Run) -> None:
    groups: dict[int, list[Answer]] = collections.defaultdict(list)
    for answer in run.answers:
        groups[answer.status].append(answer)
    for status, answers in sorted(groups.items()):
        ax.scatter(
            [a.started + a.latency for a in answers],
            [a.latency * 1000 for a in answers],
            s=4,
            alpha=0.4,
            color=STATUS_COLOURS.get(status, "tab:purple"),
            label=f"{status_name(status)} ({len(answers)})",
        )
    per_second: dict[int, list[float]] = collections.defaultdict(list)
    for answer in run.answers:
        if answer.status == 200:
            per_second[int(answer.started + answer.latency)].append(answer.latency)
    seconds = sorted(per_second)
    for pct, style in ((50, "-"), (99, "--")):
        values = [percentile(sorted(per_second[s]), pct) * 1000 for s in seconds]
        ax.plot(
            [s + 0.5 for s in seconds], values, style, color="black", lw=1, label=f"p{pct} of 200s"
        )
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency of each answer, by status; p50 and p99 per second")
    ax.legend(loc="best", fontsize="small", markerscale=3, ncols=3)


def plot_workers(ax: Any, run: Run) -> None:
    """One row per worker: the share of each sample interval it spent computing."""
    from matplotlib import colormaps

    cmap = colormaps["Blues"]
    samples = [s for s in run.samples if s.busy_seconds]
    ids = sorted({w for s in samples for w in s.busy_seconds})  # reloads bring new workers
    row = {w: i for i, w in enumerate(ids)}
    for before, after in itertools.pairwise(samples):
        span = after.at - before.at
        if span <= 0:
            continue
        for w in before.busy_seconds.keys() & after.busy_seconds.keys():
            share = min(1.0, max(0.0, (after.busy_seconds[w] - before.busy_seconds[w]) / span))
            state = after.states.get(w, "stopped")
            colour = "tab:orange" if state in ("starting", "restarting") else cmap(share)
            ax.broken_barh([(before.at, span)], (row[w] - 0.4, 0.8), color=colour)
    ax.set_yticks(range(len(ids)), [f"worker {w}" for w in ids])
    ax.set_ylim(-0.6, len(ids) - 0.4)
    ax.invert_yaxis()
    ax.set_title(
        "each worker: share of time computing (white idle, dark blue busy, orange starting)"
    )


def plot_queue(ax: Any, run: Run) -> None:
    points = [(s.at, s.queue) for s in run.samples if s.queue is not None]
    ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="tab:green")
    ax.set_ylabel("requests")
    ax.set_xlabel("seconds since the start")
    ax.set_title("queue length (modelpool_queue_length)")


def write_plots(run: Run, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True, height_ratios=(3, 2, 1.5))
    plot_latency(axes[0], run)
    plot_workers(axes[1], run)
    plot_queue(axes[2], run)
    fig.suptitle(f"modelpool load test: {run.args.mode} mode, mix {run.args.mix}")
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=100)
    plt.close(fig)
    written.append(out / "load.png")
    for name, draw, size in (
        ("latency.png", plot_latency, (11, 5)),
        ("workers.png", plot_workers, (11, 4)),
        ("queue.png", plot_queue, (11, 3)),
    ):
        fig, ax = plt.subplots(figsize=size)
        draw(ax, run)
        ax.set_xlabel("seconds since the start")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


# -- command line ---------------------------------------------------------------------------


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (isinstance(value, int) or math.isfinite(value)) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running service; without it, one is started locally")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--concurrency", type=positive(int), default=32, help="closed mode")
    parser.add_argument("--rate", type=positive(float), default=50.0, help="open mode: req/s")
    parser.add_argument("--max-in-flight", type=positive(int), default=512, help="open mode")
    parser.add_argument("--duration", type=positive(float), default=60.0, help="seconds")
    parser.add_argument("--requests", type=positive(int), default=1_000_000, help="at most")
    parser.add_argument("--mix", default="0:0.7,2:0.2,bad:0.1", help="NAME:WEIGHT,...")
    parser.add_argument("--grace", type=positive(float), default=15.0, help="wait for answers")
    parser.add_argument("--request-timeout", type=positive(float), default=60.0)
    parser.add_argument("--ready-timeout", type=positive(float), default=120.0)
    parser.add_argument("--sample-interval", type=positive(float), default=0.5)
    parser.add_argument("--api-key", default=os.environ.get("MODELPOOL_API_KEY"))
    parser.add_argument("--out", default="load-results", help="directory for plots and report")
    parser.add_argument("--seed", type=int, default=None, help="for a repeatable mix")
    parser.add_argument("--workers", type=positive(int), default=4, help="local service only")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="local service only; repeatable"
    )
    args = parser.parse_args(argv)
    try:
        args.kinds, args.weights = parse_mix(args.mix)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--mix: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args, args.kinds, args.weights, random=random.Random(args.seed))
    with contextlib.ExitStack() as stack:
        if args.url is None:
            args.url = stack.enter_context(local_service(args, console))
        trio.run(drive, run, console)
    summary = report(run)
    console.line()
    print_report(summary, console)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in write_plots(run, out):
        console.print(f"wrote {path}")
    console.print(f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
