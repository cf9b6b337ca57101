"""Deadlines, priorities and cancellation: what they promise, measured side by side in one run.

Each service here runs on --workers 4, started as `modelpool serve --config FILE` (as
bench_models.py starts them). Sections 1-3 run benchmarks/deadline_model.py (sleeps what
a request asks and appends `recv ID PID T` / `done ID PID T` to a log file, T being
time.monotonic(), the clock this bench reads too), so the bench knows whether and when a
request reached a model; section 4 runs benchmarks/sleep_model.py.

  deadlines     4 models busy on 3 s requests, then requests with X-Request-Timeout
                queued behind them, in three rounds: (a) 1 s deadlines before any
                compute time is known, (b) the same once the mean compute time (3 s) is
                known, so the service may refuse them at once (503 deadline cannot be
                met), (c) 3.5 s deadlines on 2 s requests: a model takes them with about
                0.5 s left, and is killed at the deadline (504 model timeout), then two
                with room to spare (200). Targets: no request reaches a model after its
                deadline (the model's log against the client's send time + deadline:
                the strict reading); every 504 within 0.1 s of the deadline (max, p99).
  priority      (a) 4 models busy on 3 s requests, 20 normal requests waiting, then one
                high: it is the first to start when a model frees. (b) a flood of low
                requests (closed-loop clients in a process of their own, about 10 x
                capacity, the queue held full at --max-queue) while a high request is
                sent every 0.2 s; the high stream's p99 latency beside the same stream
                without the flood. Target: p99 with flood <= 1.2 x p99 without + one
                request's compute time (0.1 s).
  cancellation  a client that hangs up 0.5 s into a 30 s computation, with --preload
                (--cancel-computing auto kills the model: its replacement is a fork):
                time until its worker is idle again (/status every 10 ms), target
                < 0.5 s; and without --preload (auto lets it finish, a 3 s computation):
                the model computes to the end and serves on under the same pid.
  no cost       closed-loop tiny requests (sleep 0) without the new headers, by wrk
                (httpx without it), against this checkout and the commit before these
                features (--before DIR, or --before-rev REV: by default the parent of
                the commit that added src/modelpool/core/asks.py, extracted with `git
                archive`), both services up, runs interleaved (A B A B ...); req/s and
                the service process's CPU per request. Target: ratio >= 0.97. Also
                req/s with both headers present.

Targets are figures to read, not assertions: the exit code says only whether the bench
itself ran. It talks only to 127.0.0.1 on ports it picks, stops every process it starts
(also on Ctrl-C and errors), checks that none of the services' model processes is left,
and every step is bounded in time.

Run: nox -s bench-deadlines (-- --quick: shorter runs), or
`python benchmarks/bench_deadlines.py [--quick] [--json FILE] [--before DIR | --before-rev REV]`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from bench import WRK_SCRIPT, run_wrk
from bench_models import (
    BenchError,
    Service,
    alive,
    bench_main,
    checkout,
    in_trio,
    machine_line,
    mark,
    running,
    table,
)

from benchtools import cpu_of, stat_fields

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEADLINE_MODEL = HERE / "deadline_model.py"
SLEEP_MODEL = HERE / "sleep_model.py"
WORKERS = 4  # --workers of every service here (bench_models' readiness check expects it)
BLOCK = 3.0  # seconds of the requests that keep every model busy
LATENESS_TARGET = 0.1  # a 504 at most this long after its deadline
FIRST_FREE_SLACK = 0.05  # the high request starts within this of the first model freed
ORDER_STAGGER = 0.3  # seconds between the ends of the blockers in the order test
FLOOD_SLEEP = 0.1  # seconds of each request in the flood and of the high stream
HIGH_EVERY = 0.2  # seconds between high requests
FLOOD_FACTOR = 10  # offered load / capacity
FLOOD_QUEUE = 32  # --max-queue of the priority service
CANCEL_TARGET = 0.5  # seconds from the hang-up until the worker is idle again
NO_COST_RATIO = 0.97
WRK_CONNECTIONS = 8

TIMEOUT = "X-Request-Timeout"
PRIORITY = "X-Request-Priority"


# -- plumbing ------------------------------------------------------------------------------


def model_cmd(script: Path, log: Path | None = None) -> str:
    return f"{sys.executable} -u {script}" + (f" --log {log}" if log else "")


def config(script: Path, log: Path | None = None, **options: Any) -> dict[str, Any]:
    return {"workers": WORKERS, "model-cmd": model_cmd(script, log), **options}


@dataclass
class Answer:
    """One request as the client saw it, on time.monotonic()."""

    rid: str
    sent: float
    ended: float
    status: int  # 0: no HTTP answer (the exception's name is the error)
    body: dict[str, Any]
    timeout: float | None = None
    priority: str | None = None

    @property
    def error(self) -> str | None:
        return self.body.get("error")

    @property
    def deadline(self) -> float | None:
        """The client's deadline: its send time + X-Request-Timeout (the strict one: the
        service counts from when it read the request, a little later)."""
        return None if self.timeout is None else self.sent + self.timeout

    @property
    def kind(self) -> str:
        return str(self.status) + (f" {self.error}" if self.error else "")


async def ask(
    client: httpx.AsyncClient,
    rid: str,
    sleep: float,
    within: float | None = None,
    priority: str | None = None,
) -> Answer:
    """POST {"sleep": sleep, "id": rid}, with X-Request-Timeout `within` and
    X-Request-Priority `priority` if given."""
    headers = {}
    if within is not None:
        headers[TIMEOUT] = f"{within:g}"
    if priority is not None:
        headers[PRIORITY] = priority
    sent = time.monotonic()
    try:
        response = await client.post("/predict", json={"sleep": sleep, "id": rid}, headers=headers)
    except httpx.HTTPError as exc:
        return Answer(rid, sent, time.monotonic(), 0, {"error": type(exc).__name__}, within)
    ended = time.monotonic()
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:80]}
    return Answer(rid, sent, ended, response.status_code, body, within, priority)


def a_client(service: Service, connections: int = 64) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits)


async def wait_busy(client: httpx.AsyncClient, count: int, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while True:
            workers = (await client.get("/status")).json()["workers"]
            if sum(w["state"] == "busy" for w in workers) >= count:
                return
            await trio.sleep(0.01)


async def wait_idle(client: httpx.AsyncClient, within: float = 30.0) -> None:
    """Every model ready and idle, the queue empty."""
    with trio.fail_after(within):
        while True:
            status = (await client.get("/status")).json()
            states = [w["state"] for w in status["workers"]]
            if status["queue"] == 0 and states == ["idle"] * WORKERS:
                return
            await trio.sleep(0.05)


SAMPLE = re.compile(r"^(modelpool_[a-z_]+)\{([^}]*)\} (\S+)$", re.M)


async def counters(client: httpx.AsyncClient) -> dict[str, float]:
    """Requests by outcome, by class and outcome, and restarts by reason, from /metrics."""
    text = (await client.get("/metrics")).text
    found: dict[str, float] = {}
    for name, labels, value in SAMPLE.findall(text):
        if name in (
            "modelpool_requests_total",
            "modelpool_requests_by_priority_total",
            "modelpool_model_restarts_total",
        ):
            key = name.removeprefix("modelpool_").removesuffix("_total") + "{" + labels + "}"
            found[key] = float(value)
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


def read_model_log(path: Path) -> dict[str, dict[str, tuple[int, float]]]:
    """{"recv": {id: (pid, t)}, "done": {...}} from deadline_model.py's log."""
    events: dict[str, dict[str, tuple[int, float]]] = {"recv": {}, "done": {}}
    if path.exists():
        for line in path.read_text().splitlines():
            event, rid, pid, when = line.split()
            events[event][rid] = (int(pid), float(when))
    return events


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


# -- 1. deadlines --------------------------------------------------------------------------


async def deadline_round(
    client: httpx.AsyncClient, tag: str, asks: list[tuple[float, float]]
) -> tuple[list[Answer], list[Answer]]:
    """WORKERS blockers of BLOCK s, then once all are busy `asks` ((X-Request-Timeout,
    sleep) each), 50 ms apart; (blockers' answers, the others')."""
    blockers: list[Answer] = []
    answers: list[Answer] = []

    async def keep(into: list[Answer], *args: Any, **kwargs: Any) -> None:
        into.append(await ask(client, *args, **kwargs))

    with trio.fail_after(BLOCK + max(t for t, _ in asks) + 30):
        async with trio.open_nursery() as nursery:
            for i in range(WORKERS):
                nursery.start_soon(keep, blockers, f"{tag}-block{i}", BLOCK)
            await wait_busy(client, WORKERS)
            for i, (timeout, sleep) in enumerate(asks):
                nursery.start_soon(keep, answers, f"{tag}-{i}", sleep, timeout)
                await trio.sleep(0.05)
        await wait_idle(client)
    return blockers, sorted(answers, key=lambda a: a.sent)


async def deadlines_run(service: Service, log: Path, count: int) -> dict[str, Any]:
    rounds = {
        "a": [(1.0, 0.1)] * count,  # no compute time known yet: all queued, all 504
        "b": [(1.0, 0.1)] * count,  # mean compute 3 s known: most refused at once
        "c": [(3.5, 2.0)] * WORKERS + [(8.0, 0.5)] * 2,  # taken with ~0.5 s left; room
    }
    results: dict[str, Any] = {"rounds": {}}
    async with a_client(service) as client:
        before = await counters(client)
        for tag, asks in rounds.items():
            blockers, answers = await deadline_round(client, tag, asks)
            results["rounds"][tag] = {"blockers": blockers, "answers": answers}
            kinds = collections.Counter(a.kind for a in answers)
            print(f"  round {tag}: {dict(kinds)}", flush=True)
        results["metrics"] = delta(before, await counters(client))
        results["ready_after"] = (await client.get("/status")).json()["ready"]
    events = read_model_log(log)
    every = [a for r in results["rounds"].values() for a in r["answers"]]
    late_dispatch, reached_504, margins = [], [], []
    for a in every:
        got = events["recv"].get(a.rid)
        if got is None:
            continue
        assert a.deadline is not None
        margins.append(a.deadline - got[1])
        if got[1] > a.deadline:
            late_dispatch.append((a.rid, got[1] - a.deadline))
        if a.error == "deadline exceeded":
            reached_504.append(a.rid)
    lateness: dict[str, list[float]] = collections.defaultdict(list)
    for a in every:
        if a.status == 504:
            assert a.deadline is not None
            lateness[a.error or "?"].append(a.ended - a.deadline)
    refused = [a for a in every if a.error == "deadline cannot be met"]
    all_late = [x for v in lateness.values() for x in v]
    results.update(
        {
            "requests": len(every),
            "by_round": {
                tag: dict(collections.Counter(a.kind for a in r["answers"]))
                for tag, r in results["rounds"].items()
            },
            "reached_model": len(margins),
            "dispatched_late": late_dispatch,
            "closest_margin_s": min(margins) if margins else math.nan,
            "reached_model_yet_504_deadline": reached_504,
            "lateness": {k: sorted(v) for k, v in lateness.items()},
            "lateness_max_s": max(all_late) if all_late else math.nan,
            "lateness_p99_s": percentile(all_late, 99),
            "lateness_p50_s": percentile(all_late, 50),
            "earliest_504_s": min(all_late) if all_late else math.nan,
            "refused": len(refused),
            "refused_max_s": max((a.ended - a.sent for a in refused), default=math.nan),
            "retry_after": sorted({a.body.get("retry_after") for a in refused}),
            "refused_in_round": {
                tag: sum(a.error == "deadline cannot be met" for a in r["answers"])
                for tag, r in results["rounds"].items()
            },
        }
    )
    for r in results["rounds"].values():  # plain data for the JSON
        r["answers"] = [vars(a) for a in r["answers"]]
        r["blockers"] = [vars(a) for a in r["blockers"]]
    return results


# -- 2. priority ---------------------------------------------------------------------------


async def order_run(service: Service, log: Path, normals: int) -> dict[str, Any]:
    """Models busy, `normals` normal requests waiting, then one high. The blockers end
    ORDER_STAGGER s apart, so which model freed first, and what it took, is plain."""
    answers: list[Answer] = []

    async def keep(*args: Any, **kwargs: Any) -> None:
        answers.append(await ask(client, *args, **kwargs))

    async with a_client(service) as client:
        with trio.fail_after(BLOCK + normals * 0.5 + 30):
            async with trio.open_nursery() as nursery:
                for i in range(WORKERS):
                    nursery.start_soon(keep, f"order-block{i}", BLOCK + i * ORDER_STAGGER)
                await wait_busy(client, WORKERS)
                for i in range(normals):
                    nursery.start_soon(keep, f"order-normal{i}", 0.5)
                    await trio.sleep(0.005)
                await trio.sleep(0.1)
                nursery.start_soon(keep, "order-high", 0.5, None, "high")
                await trio.sleep(0.05)
                queued = (await client.get("/status")).json().get("queue_by_priority")
            await wait_idle(client)
    events = read_model_log(log)
    first_pid, first_free = min(
        (events["done"][f"order-block{i}"] for i in range(WORKERS)), key=lambda e: e[1]
    )
    later = sorted(
        (t, rid)
        for rid, (_, t) in events["recv"].items()
        if rid.startswith("order-") and t > first_free
    )
    high = next(a for a in answers if a.rid == "order-high")
    high_pid, high_start = events["recv"]["order-high"]
    rank = [rid for _, rid in later].index("order-high") + 1
    return {
        "queue_by_priority": queued,
        "high_rank": rank,
        "started_after_first_free": [rid for _, rid in later[:3]],
        "high_on_first_freed_model": high_pid == first_pid,
        "high_start_after_first_free_s": high_start - first_free,
        "high_wait_s": high_start - high.sent,
        "first_free_after_high_sent_s": first_free - high.sent,
        "failed": sum(a.status != 200 for a in answers),
    }


async def high_stream(client: httpx.AsyncClient, seconds: float) -> list[Answer]:
    """A high request of FLOOD_SLEEP s every HIGH_EVERY s (open loop) for `seconds`."""
    answers: list[Answer] = []

    async def one(i: int) -> None:
        answers.append(await ask(client, f"high{i}", FLOOD_SLEEP, priority="high"))

    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:
            began, i = trio.current_time(), 0
            while trio.current_time() < began + seconds:
                nursery.start_soon(one, i)
                i += 1
                await trio.sleep_until(began + i * HIGH_EVERY)
    return answers


def latency_figures(answers: list[Answer]) -> dict[str, Any]:
    took = [a.ended - a.sent for a in answers if a.status == 200]
    return {
        "sent": len(answers),
        "ok": len(took),
        "other": dict(collections.Counter(a.kind for a in answers if a.status != 200)),
        "p50_s": percentile(took, 50),
        "p99_s": percentile(took, 99),
        "max_s": max(took, default=math.nan),
    }


def flood_clients() -> tuple[int, float]:
    """Closed-loop low clients and their pause after a 503, for ~FLOOD_FACTOR x capacity:
    enough to keep the queue full and every model busy, the rest bouncing off the full
    queue (each about once per pause + a round trip of ~8 ms)."""
    capacity = WORKERS / FLOOD_SLEEP
    bouncing = 16
    pause = bouncing / ((FLOOD_FACTOR - 1) * capacity) - 0.008
    return FLOOD_QUEUE + WORKERS + bouncing, max(0.005, pause)


async def flood_run(service: Service, seconds: float) -> dict[str, Any]:
    clients, pause = flood_clients()
    async with a_client(service) as client:
        await wait_idle(client)
        before = await counters(client)
        clean = await high_stream(client, seconds)
        middle = await counters(client)
        result: dict[str, Any] = {}
        command = [sys.executable, __file__, "--flood-client", service.url]
        command += [str(clients), f"{seconds + 3:g}", f"{pause:g}"]

        async def flood() -> None:
            done = await trio.run_process(command, capture_stdout=True, check=False)
            result.update(json.loads(done.stdout.decode().strip().splitlines()[-1]))

        with trio.fail_after(seconds + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                filled = time.monotonic()
                with trio.move_on_after(5):
                    while (await client.get("/status")).json()["queue"] < FLOOD_QUEUE - 2:
                        await trio.sleep(0.02)
                filled = time.monotonic() - filled
                queued: list[Any] = []

                async def look() -> None:
                    await trio.sleep(seconds / 2)
                    status = (await client.get("/status")).json()
                    queued.append(status.get("queue_by_priority"))

                nursery.start_soon(look)
                flooded = await high_stream(client, seconds)
        after = await counters(client)
        await wait_idle(client)
    return {
        "seconds": seconds,
        "clean": latency_figures(clean),
        "flood": latency_figures(flooded),
        "fill_s": filled,
        "low": result,
        "low_clients": clients,
        "pause_after_503_s": pause,
        "queue_by_priority_mid": queued[0] if queued else None,
        "metrics_clean": delta(before, middle),
        "metrics_flood": delta(middle, after),
    }


async def flood_client(url: str, clients: int, seconds: float, pause: float) -> dict[str, Any]:
    """Closed-loop low clients for `seconds`; after a 503 each waits `pause`."""
    outcomes: collections.Counter[str] = collections.Counter()
    ok_times: list[float] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        end = trio.current_time() + seconds
        began = time.monotonic()

        async def loop(i: int) -> None:
            while trio.current_time() < end:
                answer = await ask(client, f"low{i}", FLOOD_SLEEP, priority="low")
                outcomes[answer.kind] += 1
                if answer.status == 200:
                    ok_times.append(answer.ended - answer.sent)
                else:
                    await trio.sleep(pause)

        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(loop, i)
        wall = time.monotonic() - began
    sent = sum(outcomes.values())
    return {
        "wall_s": wall,
        "sent": sent,
        "offered_per_s": sent / wall,
        "ok_per_s": outcomes["200"] / wall,
        "outcomes": dict(outcomes),
        "ok_p50_s": percentile(ok_times, 50),
    }


# -- 3. cancellation -----------------------------------------------------------------------


async def hang_up_after(port: int, rid: str, sleep: float, after: float) -> tuple[float, float]:
    """POST a request on a raw connection, close it `after` s later: (sent, hung up)."""
    body = json.dumps({"sleep": sleep, "id": rid}).encode()
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    sent = time.monotonic()
    await stream.send_all(head + body)
    await trio.sleep(after)
    await stream.aclose()
    return sent, time.monotonic()


async def cancel_run(service: Service, log: Path, sleep: float, within: float) -> dict[str, Any]:
    """A client that hangs up 0.5 s into a `sleep` s computation: its worker, every 10 ms."""
    rid = f"cancel-{service.name}"
    async with a_client(service) as client:
        await wait_idle(client)
        before = await counters(client)
        with trio.fail_after(within + 30):
            sent, hung = await hang_up_after(service.port, rid, sleep, 0.5)
            pid = read_model_log(log)["recv"][rid][0]
            worker = next(
                w["id"] for w in (await client.get("/status")).json()["workers"] if w["pid"] == pid
            )
            released = free = math.nan
            states: list[tuple[float, str, int]] = []  # each change: (s after hang-up, state, pid)
            new_pid = pid
            while time.monotonic() < hung + within:
                status = (await client.get("/status")).json()
                now = time.monotonic() - hung
                w = next(w for w in status["workers"] if w["id"] == worker)
                if not states or states[-1][1:] != (w["state"], w["pid"]):
                    states.append((round(now, 3), w["state"], w["pid"]))
                if math.isnan(released) and (w["state"] != "busy" or w["pid"] != pid):
                    released = now
                if w["state"] == "idle":
                    free, new_pid = now, w["pid"]
                    break
                await trio.sleep(0.01)
            # does it serve on? one short request per worker, all at once
            async with trio.open_nursery() as nursery:
                served: list[Answer] = []

                async def one(i: int) -> None:
                    served.append(await ask(client, f"{rid}-after{i}", 0.3))

                for i in range(WORKERS):
                    nursery.start_soon(one, i)
        await trio.sleep(0.2)
        after = await counters(client)
    events = read_model_log(log)
    return {
        "sleep_s": sleep,
        "hung_up_after_s": hung - sent,
        "pid": pid,
        "worker": worker,
        "released_s": released,
        "idle_again_s": free,
        "pid_after": new_pid,
        "states": states,
        "model_finished": rid in events["done"],
        "finished_after_hang_up_s": (events["done"][rid][1] - hung)
        if rid in events["done"]
        else None,
        "old_pid_alive": alive(pid),
        "pids_serving_after": sorted(a.body.get("pid", 0) for a in served),
        "old_pid_served_after": any(a.body.get("pid") == pid for a in served),
        "failed_after": sum(a.status != 200 for a in served),
        "metrics": delta(before, after),
    }


# -- 4. no cost ----------------------------------------------------------------------------

HEADERS = {TIMEOUT: "30", PRIORITY: "high"}
JSON_TYPE = 'wrk.headers["Content-Type"] = "application/json"\n'


def load_wrk(url: str, seconds: float, headers: bool, scratch: Path) -> dict[str, Any]:
    """bench.py's wrk run, with a sleep-0 body, and the headers if asked."""
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items()) if headers else ""
    script = scratch / ("wrk-headers.lua" if headers else "wrk-plain.lua")
    text = WRK_SCRIPT.replace('{"data": 0}', '{"sleep": 0}').replace(JSON_TYPE, JSON_TYPE + extra)
    script.write_text(text)
    return run_wrk(script, url, WRK_CONNECTIONS, seconds)


async def load_httpx(url: str, seconds: float, headers: bool) -> dict[str, Any]:
    """The same load without wrk: WRK_CONNECTIONS closed-loop httpx clients."""
    count = errors = 0
    sent = HEADERS if headers else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        end = trio.current_time() + seconds
        began = time.monotonic()

        async def loop() -> None:
            nonlocal count, errors
            while trio.current_time() < end:
                response = await client.post("/predict", json={"sleep": 0}, headers=sent)
                count += 1
                errors += response.status_code != 200

        async with trio.open_nursery() as nursery:
            for _ in range(WRK_CONNECTIONS):
                nursery.start_soon(loop)
        wall = time.monotonic() - began
    return {
        "requests": count,
        "duration_s": wall,
        "errors": 0,
        "non_2xx": errors,
        "req_per_s": count / wall,
    }


def no_cost_run(
    services: dict[str, Service], rounds: int, seconds: float, scratch: Path
) -> dict[str, Any]:
    use_wrk = shutil.which("wrk") is not None
    turns = [("now", False), ("before", False), ("now+headers", True)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in turns}

    def one(name: str, headers: bool, length: float) -> dict[str, Any]:
        service = services["now" if name == "now+headers" else name]
        assert service.proc is not None
        cpu = cpu_of(stat_fields(service.proc.pid))
        if use_wrk:
            figures = load_wrk(service.url, length, headers, scratch)
        else:
            figures = in_trio(load_httpx, service.url, length, headers)
        figures["cpu_us_per_req"] = (
            (cpu_of(stat_fields(service.proc.pid)) - cpu) / max(1, figures["requests"]) * 1e6
        )
        return figures

    for name, headers in turns:  # warm-up
        one(name, headers, 1)
    for index in range(rounds):
        order = turns[index % 3 :] + turns[: index % 3]
        for name, headers in order:
            figures = one(name, headers, seconds)
            runs[name].append(figures)
            print(
                f"  round {index + 1}/{rounds} {name:<12} {figures['req_per_s']:7.0f} req/s  "
                f"CPU {figures['cpu_us_per_req']:5.0f} µs/req"
                + (f"  errors {figures['errors']}" if figures["errors"] else "")
                + (f"  non-2xx {figures['non_2xx']}" if figures["non_2xx"] else ""),
                flush=True,
            )

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)]

    return {
        "load": f"wrk -t1 -c{WRK_CONNECTIONS}" if use_wrk else f"httpx x {WRK_CONNECTIONS}",
        "rounds": rounds,
        "seconds": seconds,
        "runs": runs,
        "req_per_s": {n: statistics.median(r["req_per_s"] for r in v) for n, v in runs.items()},
        "cpu_us": {n: statistics.median(r["cpu_us_per_req"] for r in v) for n, v in runs.items()},
        "ratio": statistics.median(ratios("now", "before", "req_per_s")),
        "ratio_headers": statistics.median(ratios("now+headers", "now", "req_per_s")),
        "cpu_ratio": statistics.median(ratios("now", "before", "cpu_us_per_req")),
        "errors": sum(r["errors"] + r["non_2xx"] for v in runs.values() for r in v),
    }


def before_checkout(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The checkout to compare with: --before DIR, or REV extracted (git archive)."""
    if args.before is not None:
        return args.before, str(args.before)
    rev = args.before_rev
    if rev is None:  # the parent of the commit that brought the headers in
        added = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "log",
                "--diff-filter=A",
                "--format=%H",
                "--",
                "src/modelpool/core/asks.py",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not added:
            raise BenchError("no commit adds src/modelpool/core/asks.py: give --before-rev")
        rev = added[-1] + "~1"
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = scratch / f"before-{short}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", short, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, short


# -- the report ----------------------------------------------------------------------------


def report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    targets: dict[str, bool] = {}
    rows = [["", "measured", "target", ""]]

    def add(label: str, measured: str, target: str, key: str | None, ok: bool | None) -> None:
        if key is not None and ok is not None:
            targets[key] = ok
        rows.append([label, measured, target, "" if ok is None else mark(ok)])

    d = results["deadlines"]
    add(
        f"1 deadlines: requests reaching a model after client send + deadline "
        f"({d['reached_model']} of {d['requests']} reached one)",
        f"{len(d['dispatched_late'])} (closest: {ms(d['closest_margin_s'])} before)",
        "0",
        "no_dispatch_after_deadline",
        not d["dispatched_late"] and not d["reached_model_yet_504_deadline"],
    )
    n504 = sum(len(v) for v in d["lateness"].values())
    add(
        f"1 deadlines: 504s' lateness after the deadline ({n504}: "
        + ", ".join(f"{len(v)} {k}" for k, v in d["lateness"].items())
        + ")",
        f"max {ms(d['lateness_max_s'])}, p99 {ms(d['lateness_p99_s'])}, "
        f"p50 {ms(d['lateness_p50_s'])}, earliest {ms(d['earliest_504_s'])}",
        f"≤ {LATENESS_TARGET * 1000:.0f} ms each",
        "504_within_0.1s",
        n504 > 0 and d["lateness_max_s"] <= LATENESS_TARGET and d["earliest_504_s"] >= -0.01,
    )
    add(
        "1 deadlines: refused at once, 503 deadline cannot be met (by round a/b/c)",
        f"{d['refused']} ("
        + "/".join(str(v) for v in d["refused_in_round"].values())
        + f"), slowest answer {ms(d['refused_max_s'])}, retry_after {d['retry_after']}",
        "(round b, once the mean is known)",
        None,
        None,
    )
    o = results["order"]
    first = (
        o["high_rank"] == 1
        and o["high_on_first_freed_model"]
        and o["high_start_after_first_free_s"] <= FIRST_FREE_SLACK
    )
    add(
        f"2 priority: 1 high behind 20 normal, 4 models busy (ending {ORDER_STAGGER:g} s "
        "apart); its place among starts after the first model freed",
        f"#{o['high_rank']} (on that model: {o['high_on_first_freed_model']}), "
        f"{ms(o['high_start_after_first_free_s'])} after it "
        f"(waited {o['high_wait_s']:.2f} s; first free {o['first_free_after_high_sent_s']:.2f} s "
        f"after it was sent); queue {o['queue_by_priority']}",
        f"#1, ≤ {FIRST_FREE_SLACK * 1000:.0f} ms",
        "high_first_when_a_model_frees",
        first and not o["failed"],
    )
    f = results["flood"]
    bound = 1.2 * f["clean"]["p99_s"] + FLOOD_SLEEP
    low = f["low"]
    add(
        f"2 priority: high every {HIGH_EVERY:g} s, p99 latency without / with low flood "
        f"(p50 {ms(f['clean']['p50_s'])} / {ms(f['flood']['p50_s'])}, "
        f"max {ms(f['clean']['max_s'])} / {ms(f['flood']['max_s'])})",
        f"{ms(f['clean']['p99_s'])} / {ms(f['flood']['p99_s'])} "
        f"({f['flood']['ok']}/{f['flood']['sent']} ok with flood)",
        f"≤ 1.2 x {ms(f['clean']['p99_s'])} + {FLOOD_SLEEP * 1000:.0f} ms = {ms(bound)}",
        "high_p99_under_flood",
        f["flood"]["p99_s"] <= bound
        and f["flood"]["ok"] == f["flood"]["sent"]
        and f["clean"]["ok"] == f["clean"]["sent"],
    )
    add(
        f"2 priority: the low flood ({f['low_clients']} closed-loop clients, "
        f"{f['pause_after_503_s'] * 1000:.0f} ms pause after a 503; queue at "
        f"--max-queue {FLOOD_QUEUE} after {f['fill_s']:.2f} s)",
        f"offered {low.get('offered_per_s', 0):.0f} req/s "
        f"({low.get('offered_per_s', 0) / (WORKERS / FLOOD_SLEEP):.1f} x capacity), "
        f"served {low.get('ok_per_s', 0):.1f} req/s; outcomes {low.get('outcomes')}; "
        f"queue mid-flood {f['queue_by_priority_mid']}",
        f"~{FLOOD_FACTOR} x {WORKERS / FLOOD_SLEEP:.0f} req/s",
        None,
        None,
    )
    cp, cn = results["cancel_preload"], results["cancel_plain"]
    add(
        f"3 cancellation, --preload: hang-up {cp['hung_up_after_s']:.2f} s into "
        f"{cp['sleep_s']:g} s; worker no longer busy / idle again (pid {cp['pid']} -> "
        f"{cp['pid_after']})",
        f"{ms(cp['released_s'])} / {ms(cp['idle_again_s'])}; model finished: "
        f"{cp['model_finished']}; old pid alive: {cp['old_pid_alive']}",
        f"idle < {CANCEL_TARGET * 1000:.0f} ms",
        "preload_cancel_frees_model",
        cp["idle_again_s"] < CANCEL_TARGET and not cp["model_finished"] and not cp["failed_after"],
    )
    plain_ok = (
        cn["model_finished"]
        and cn["pid_after"] == cn["pid"]
        and cn["old_pid_served_after"]
        and not cn["failed_after"]
    )
    add(
        f"3 cancellation, plain (auto): hang-up {cn['hung_up_after_s']:.2f} s into "
        f"{cn['sleep_s']:g} s",
        f"model finished {cn['finished_after_hang_up_s'] or math.nan:.2f} s after the hang-up, "
        f"idle again at {cn['idle_again_s']:.2f} s, pid {cn['pid']} -> {cn['pid_after']}, "
        f"served on: {cn['old_pid_served_after']}",
        "finishes, same pid serves on",
        "plain_auto_lets_model_finish",
        plain_ok,
    )
    nc = results["no_cost"]
    r = nc["req_per_s"]
    add(
        f"4 no cost: sleep-0 req/s, no headers, this checkout / before ({results['before']}), "
        f"{nc['load']}, {nc['rounds']} interleaved rounds of {nc['seconds']:g} s, medians",
        f"{r['now']:.0f} / {r['before']:.0f} = {nc['ratio']:.3f} (CPU "
        f"{nc['cpu_us']['now']:.0f} / {nc['cpu_us']['before']:.0f} µs/req = {nc['cpu_ratio']:.3f})",
        f"≥ {NO_COST_RATIO}",
        "no_cost_without_headers",
        nc["ratio"] >= NO_COST_RATIO and not nc["errors"],
    )
    add(
        f"4 no cost: with both headers ({TIMEOUT}: 30, {PRIORITY}: high)",
        f"{r['now+headers']:.0f} req/s ({nc['ratio_headers']:.3f} of without; CPU "
        f"{nc['cpu_us']['now+headers']:.0f} µs/req)",
        "",
        None,
        None,
    )
    details = [
        "deadlines, by round: "
        + "; ".join(f"{k}: {v}" for k, v in d["by_round"].items())
        + f"; /metrics: {d['metrics']}",
        f"flood, /metrics without: {f['metrics_clean']}",
        f"flood, /metrics with: {f['metrics_flood']}",
        f"cancel --preload: worker {cp['worker']} states {cp['states']}; /metrics {cp['metrics']}",
        f"cancel plain: worker {cn['worker']} states {cn['states']}; /metrics {cn['metrics']}",
    ]
    return table(rows) + "\n\n" + "\n".join(details), targets


def header(results: dict[str, Any]) -> str:
    commit = checkout()
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    if changed:
        commit += f" with {len(changed)} file(s) under src/ changed"
    return (
        machine_line("bench_deadlines", results, commit)
        + f"\n--workers {WORKERS}; client, service and models share the cores; ✓/✗: the targets."
    )


# -- the run -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench-results" / "bench_deadlines.json"
    )
    parser.add_argument("--before", type=Path, help="a checkout whose src/ is the before")
    parser.add_argument("--before-rev", help="a commit to extract as the before (git archive)")
    parser.add_argument("--flood-client", nargs=4, help=argparse.SUPPRESS)  # the flood's process
    args = parser.parse_args()
    args.queued = 8 if args.quick else 16  # deadline requests per round
    args.flood_seconds = 6.0 if args.quick else 15.0
    args.rounds, args.load_seconds = (2, 2.0) if args.quick else (4, 3.0)
    return args


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}

    print(f"1 deadlines: {WORKERS} x {BLOCK:g} s requests, then deadlines behind them", flush=True)
    log = scratch / "deadlines-model.log"
    with running(Service("deadlines", config(DEADLINE_MODEL, log)), scratch) as service:
        results["deadlines"] = in_trio(deadlines_run, service, log, args.queued)

    print("2 priority: one high behind 20 normal, then a low flood", flush=True)
    log = scratch / "priority-model.log"
    options = {"max-queue": FLOOD_QUEUE}
    with running(Service("priority", config(DEADLINE_MODEL, log, **options)), scratch) as service:
        results["order"] = in_trio(order_run, service, log, 20)
        print(f"  order: {results['order']}", flush=True)
        results["flood"] = in_trio(flood_run, service, args.flood_seconds)
        f = results["flood"]
        print(
            f"  high p99 {ms(f['clean']['p99_s'])} without flood, {ms(f['flood']['p99_s'])} "
            f"with; low {f['low'].get('outcomes')}",
            flush=True,
        )

    print("3 cancellation: a client hangs up 0.5 s in", flush=True)
    for key, preload, sleep, within in (
        ("cancel_preload", True, 30.0, 5.0),
        ("cancel_plain", False, 3.0, 8.0),
    ):
        log = scratch / f"{key}-model.log"
        options = {"preload": preload, "timeout": 60}
        name = key.replace("_", "-")
        with running(Service(name, config(DEADLINE_MODEL, log, **options)), scratch) as service:
            results[key] = in_trio(cancel_run, service, log, sleep, within)
        c = results[key]
        print(
            f"  {name}: idle again {ms(c['idle_again_s'])} after the hang-up, pid "
            f"{c['pid']} -> {c['pid_after']}, model finished {c['model_finished']}",
            flush=True,
        )

    before, results["before"] = before_checkout(args, scratch)
    print(f"4 no cost: this checkout against {results['before']}, sleep-0 requests", flush=True)
    now = Service("now", config(SLEEP_MODEL))
    old = Service("before", config(SLEEP_MODEL), checkout=before)
    with running(now, scratch), running(old, scratch):
        queue_kinds = httpx.get(old.url + "/status", timeout=10).json().get("queue_by_priority")
        if queue_kinds is not None:
            print(f"  note: the before service has queue_by_priority: {queue_kinds}", flush=True)
        results["no_cost"] = no_cost_run(
            {"now": now, "before": old}, args.rounds, args.load_seconds, scratch
        )
    return results


def main() -> int:
    args = parse_args()
    if args.flood_client:
        url, clients, seconds, pause = args.flood_client
        figures = trio.run(flood_client, url, int(clients), float(seconds), float(pause))
        print(json.dumps(figures))
        return 0
    return bench_main(args, "bench-deadlines", run, report, header)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
