"""Chaos session: load past capacity while models are killed, time out, crash and escape.

Starts `modelpool serve` on a free loopback port with tests/models/chaos_model.py, a
model that echoes each request's own unique id. For --duration seconds, closed-loop
clients keep several times as many requests in flight as there are models, while a
chaos task, at random:

  kill      SIGKILLs a model from outside
  timeout   sends a request that computes past --timeout (504)
  crash     sends a request that makes its model exit (502)
  escape    makes a model start a daemon that double-forks out of its tree (half of
            them scrub their environment), then crashes or goes on serving
  hangup    a client that hangs up while its request waits or computes
  trickle   a client that hangs up half-way through its body
  burst     sends --max-queue + 40 requests at once (some get 503 queue full)
  template  with --preload (every model forked from one warm template): SIGKILLs the
            template itself, whose children must serve on while a new one loads

At the end it stops the service with SIGTERM and prints, and checks: requests sent,
answered ok, errors by kind, answers that carry another request's id (must be 0),
requests cut off without an answer (must be 0: the connection closed or reset before
a status line came, "Server disconnected without sending a response" and the like,
counted by kind), requests with no answer by their deadline (must be 0), processes left
behind, escaped daemons included (must be 0), and the service's RSS and open file
descriptors after warm-up and at the end (must stay flat). This process is a child
subreaper, so anything the service failed to kill would end up as its child and be
counted.

The clients' own delays must not pass for the service's failures. Under coverage, on a
busy machine, with a burst's hundred tasks in flight, these clients took from one to
seven seconds between connecting (or taking an idle connection from their pool) and
sending their request. So:

- The service closes a connection that has sent nothing for its --keep-alive-timeout
  (an idle one, or a new one that has not sent its first request yet), and a request
  sent on it after that can get no answer from any server: with a timeout of 1 s, such
  requests were cut off ("Server disconnected without sending a response"). It is
  CLIENT_DEADLINE here (`KEEP_ALIVE`): a client slower than that has missed its
  request's deadline anyway.
- httpx's pool (httpcore 1.0.9, encode/httpcore#1110) may close an idle connection it
  has just handed to a request whose task has not run yet, when the connection's
  keep-alive expires meanwhile, and the request then fails on its own closed socket
  ("ReadError: this socket was already closed"). The clients keep idle connections
  for half the service's timeout (`CLIENT_KEEP_ALIVE`), far longer than such a delay,
  and still well short of the service's timeout.

With --models N (N > 1) the service runs N models, m0 .. m{N-1}, each the chaos model
(declared `--model mI=COMMAND`, the command ending in the model's name: chaos_model.py
ignores that argument, so the process of every answer, by the pid it echoes, tells which
model computed it), on the same --workers slots. Each request goes to the route of a model
picked at random, /models/mI/predict, with a skew that turns every PHASE seconds (one
model 3 times as likely as each other), so that slots move between models by demand.
Every chaos action works across models: kill picks any model's process, template kills a
random model's template, and the requests of the others go to a random model's route.
Beyond the checks above: every answer came from a process of the model whose route was
asked (the ids name the model too, and each answer's id must be its own), and slots moved
between models at least once (modelpool_slot_moves_total in /metrics at the end). The
summary prints the figures per model.

Exit code 0 when every check holds. Traffic goes to 127.0.0.1 only, and it stops by
itself: --duration bounds the load and every request has a deadline.

Run: nox -s chaos [-- --duration 300] [-- --preload] [-- --models 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from benchtools import alive, free_port, rss_mib

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "models" / "chaos_model.py"
PR_SET_CHILD_SUBREAPER = 36
CLIENT_DEADLINE = 30.0  # far past timeout + queue timeout: no answer by then is "missing"
KEEP_ALIVE = CLIENT_DEADLINE  # the service's --keep-alive-timeout: see the module docstring
CLIENT_KEEP_ALIVE = KEEP_ALIVE / 2  # how long the clients keep an idle connection
QUIET = 2.5  # seconds after the clients closed their connections, before measuring
PHASE = 6.0  # with --models: seconds between two turns of the skew (which model is hot)
SKEW = 3  # ... the hot model is this many times as likely as each other one
SLOT_MOVE = re.compile(r"^modelpool_slot_moves_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    missing: int = 0
    lost: int = 0  # cut off: the connection closed or reset without an answer
    hung_up: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost_kinds: collections.Counter = field(default_factory=collections.Counter)
    chaos: collections.Counter = field(default_factory=collections.Counter)
    wrong_examples: list = field(default_factory=list)
    missing_examples: list = field(default_factory=list)
    lost_examples: list = field(default_factory=list)
    wrong_model_examples: list = field(default_factory=list)


@dataclass
class ModelTally:
    """With --models: one model's share of the requests, and who answered them."""

    sent: int = 0
    ok: int = 0
    wrong_model: int = 0  # answered by a process of another model
    unverified: int = 0  # its process gone before it could be told which model it ran
    errors: collections.Counter = field(default_factory=collections.Counter)
    chaos: collections.Counter = field(default_factory=collections.Counter)


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tally = Tally()
        self.random = random.Random(args.seed)
        self.escapes = Path(tempfile.mkdtemp(prefix="modelpool-chaos-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ids = 0
        self.proc: subprocess.Popen | None = None
        self.names = [f"m{i}" for i in range(args.models)] if args.models > 1 else []
        self.per_model = {name: ModelTally() for name in self.names}
        self.pid_models: dict[int, str] = {}  # model processes seen in /status
        self.started_at = 0.0  # trio time the chaos began: the skew's phases count from it

    @property
    def several(self) -> bool:
        return bool(self.names)

    def new_id(self, kind: str, model: str | None = None) -> str:
        self._ids += 1
        prefix = f"{model}-" if model else ""
        return f"{prefix}{kind}-{self._ids}-{self.random.getrandbits(32):08x}"

    def pick_model(self, skewed: bool = True) -> str | None:
        """A model for the next request (None with one model: the plain /predict). The
        load is skewed: the hot model turns every PHASE seconds; chaos picks uniformly."""
        if not self.several:
            return None
        if not skewed:
            return self.random.choice(self.names)
        phase = int(max(0.0, trio.current_time() - self.started_at) // PHASE)
        hot = phase % len(self.names)
        weights = [SKEW if i == hot else 1 for i in range(len(self.names))]
        return self.random.choices(self.names, weights)[0]

    @staticmethod
    def route(model: str | None) -> str:
        return f"/models/{model}/predict" if model else "/predict"

    def model_of(self, pid: object) -> str | None:
        """Which model a process runs: its command ends with the model's name (the
        argument chaos_model.py ignores); else as /status last showed it; else None."""
        if not isinstance(pid, int):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = []
        argv = [a.decode(errors="replace") for a in argv if a]
        if len(argv) >= 2 and Path(argv[-2]).name == MODEL.name and argv[-1] in self.per_model:
            return argv[-1]
        return self.pid_models.get(pid)

    # -- the service ----------------------------------------------------------------

    def start(self) -> None:
        command = [sys.executable, "-m", "modelpool", "serve", "--port", str(self.port)]
        command += ["--workers", str(self.args.workers), "--timeout", "1"]
        command += ["--max-queue", str(self.args.max_queue), "--queue-timeout", "10"]
        command += ["--keep-alive-timeout", str(KEEP_ALIVE), "--backoff-initial", "0.05"]
        command += ["--backoff-max", "0.5", "--log-level", "WARNING"]
        if self.several:
            for name in self.names:  # the name last: the chaos model ignores it, /proc shows it
                command += ["--model", f"{name}={sys.executable} -u {MODEL} {name}"]
        else:
            command += ["--model-cmd", f"{sys.executable} -u {MODEL}"]
        if self.args.preload:
            command += ["--preload"]
        log = open(self.args.service_log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def resources(self) -> tuple[float, int]:
        assert self.proc is not None
        return rss_mib(self.proc.pid), len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        with trio.fail_after(30):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    ready = (await client.get("/readyz")).json()
                    if ready["ready"] == self.args.workers:
                        return
                await trio.sleep(0.05)

    async def template(self, client: httpx.AsyncClient) -> dict:
        """The --preload template as /status shows it ({} if none, or no answer)."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return (await client.get("/status")).json()["template"] or {}
        return {}

    async def templates(self, client: httpx.AsyncClient) -> dict[str, dict]:
        """With --models: each model's --preload template, from its own status in /status
        (models[name]["status"]["template"]; {} if none, nothing if no answer)."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            models = (await client.get("/status")).json()["models"]
            return {name: models[name]["status"]["template"] or {} for name in self.names}
        return {}

    async def model_pids(self, client: httpx.AsyncClient) -> list[int]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = (await client.get("/status")).json()["workers"]
            for w in workers:
                if w["pid"] and w.get("model"):
                    self.pid_models[w["pid"]] = w["model"]
            return [w["pid"] for w in workers if w["pid"]]
        return []

    async def watch_workers(self, client: httpx.AsyncClient, until: float) -> None:
        """With --models: which model each process runs, as /status shows it, for the
        answers whose process is gone before /proc could tell."""
        while trio.current_time() < until:
            await self.model_pids(client)
            await trio.sleep(0.5)

    async def slot_moves(self, client: httpx.AsyncClient) -> dict[str, int]:
        """modelpool_slot_moves_total from /metrics, by "from -> to"."""
        moves: dict[str, int] = {}
        with contextlib.suppress(httpx.HTTPError):
            text = (await client.get("/metrics")).text
            for labels, value in SLOT_MOVE.findall(text):
                found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                key = f"{found.get('from', '?')} -> {found.get('to', '?')}"
                moves[key] = moves.get(key, 0) + int(float(value))
        return moves

    # -- requests -------------------------------------------------------------------

    async def ask(
        self, client: httpx.AsyncClient, kind: str, model: str | None = None, **extra: object
    ) -> None:
        """One request with a fresh id, to `model`'s route (with one model, /predict); its
        answer is checked and counted."""
        request_id = self.new_id(kind, model)
        self.tally.sent += 1
        mine = self.per_model[model] if model else None
        if mine:
            mine.sent += 1
        try:
            with trio.fail_after(CLIENT_DEADLINE):
                response = await client.post(
                    self.route(model),
                    json={"id": request_id, **extra},
                    headers={"X-Request-ID": request_id},  # the service's log names it so
                )
        except (httpx.TimeoutException, trio.TooSlowError) as exc:
            self.tally.missing += 1
            self.tally.missing_examples.append(f"{request_id}: {type(exc).__name__} {exc}")
            return
        except httpx.HTTPError as exc:  # closed, reset, or garbled: no answer, no clear error
            self.tally.lost += 1
            self.tally.lost_kinds[f"{type(exc).__name__}: {exc}"] += 1
            self.tally.lost_examples.append(f"{request_id}: {type(exc).__name__} {exc}")
            return
        if response.status_code == 200:
            answer = response.json()
            if answer.get("id") == request_id:
                self.tally.ok += 1
                if mine:
                    mine.ok += 1
                    self.check_model(model, request_id, answer)
            else:
                self.tally.wrong += 1
                self.tally.wrong_examples.append(f"{request_id} got {answer}")
        else:
            error = response.json().get("error", "?")
            self.tally.errors[f"{response.status_code} {error}"] += 1
            if mine:
                mine.errors[f"{response.status_code} {error}"] += 1

    def check_model(self, model: str, request_id: str, answer: dict) -> None:
        """The answer to `model`'s route came from a process of `model`."""
        mine = self.per_model[model]
        ran = self.model_of(answer.get("pid"))
        if ran is None:
            mine.unverified += 1
        elif ran != model:
            mine.wrong_model += 1
            self.tally.wrong_model_examples.append(
                f"{request_id} (to {model}) answered by {ran}'s process: {answer}"
            )

    async def client_loop(self, client: httpx.AsyncClient, until: float) -> None:
        while trio.current_time() < until:
            noise = self.random.choice([0, 0, 0, 3])
            sleep = self.random.uniform(0, 0.04)
            await self.ask(client, "load", self.pick_model(), sleep=sleep, noise=noise)

    async def hang_up(self, after: float, partial_body: bool, model: str | None = None) -> None:
        """A client that sends a request (or part of one) and goes away."""
        self.tally.sent += 1
        self.tally.hung_up += 1
        if model:
            self.per_model[model].sent += 1
        body = json.dumps({"id": self.new_id("hangup", model), "sleep": 0.2}).encode()
        head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (
            self.route(model).encode(),
            len(body),
        )
        with contextlib.suppress(OSError):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            async with stream:
                await stream.send_all(head + (body[:5] if partial_body else body))
                await trio.sleep(after)

    # -- chaos ----------------------------------------------------------------------

    async def chaos_loop(self, client: httpx.AsyncClient, until: float) -> None:
        actions = ["kill", "timeout", "crash", "escape", "hangup", "trickle", "burst"]
        weights = [3, 2, 2, 2, 3, 2, 1]
        if self.args.preload:
            actions.append("template")
            weights.append(1)
        async with trio.open_nursery() as nursery:
            while trio.current_time() < until:
                await trio.sleep(self.random.uniform(0.1, 0.5))
                action = self.random.choices(actions, weights)[0]
                self.tally.chaos[action] += 1
                model = self.pick_model(skewed=False)  # the model it aims at, if several
                if action == "kill":  # any model's process
                    pids = await self.model_pids(client)
                    if pids:
                        pid = self.random.choice(pids)
                        model = self.pid_models.get(pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                elif action == "template":
                    if model:
                        pid = (await self.templates(client)).get(model, {}).get("pid")
                    else:
                        pid = (await self.template(client)).get("pid")
                    if pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                elif action == "timeout":
                    nursery.start_soon(partial_ask(self, client, "timeout", model, sleep=5.0))
                elif action == "crash":
                    nursery.start_soon(partial_ask(self, client, "crash", model, crash=True))
                elif action == "escape":
                    crash = self.random.random() < 0.5
                    extra = {"escape": str(self.escapes), "crash": crash}
                    nursery.start_soon(partial_ask(self, client, "escape", model, **extra))
                elif action == "hangup":
                    nursery.start_soon(self.hang_up, self.random.uniform(0, 0.3), False, model)
                elif action == "trickle":
                    nursery.start_soon(self.hang_up, self.random.uniform(0, 0.3), True, model)
                elif action == "burst":
                    for _ in range(self.args.max_queue + 40):
                        nursery.start_soon(partial_ask(self, client, "burst", model))
                if model:
                    self.per_model[model].chaos[action] += 1

    # -- leftovers ------------------------------------------------------------------

    def left_behind(self) -> list[str]:
        """Every process the service should have killed and did not, by pid and command."""
        found = {}
        for pid in own_children():
            found[pid] = command_of(pid)
        for mark in self.escapes.iterdir():
            if mark.name.isdigit() and alive(int(mark.name)):
                found[int(mark.name)] = command_of(int(mark.name))
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in own_children():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return [f"{pid} {command}" for pid, command in found.items()]


def partial_ask(
    session: Session,
    client: httpx.AsyncClient,
    kind: str,
    model: str | None = None,
    **extra: object,
):
    async def run() -> None:
        await session.ask(client, kind, model, **extra)

    return run


async def drive(session: Session) -> dict:
    args = session.args
    limits = httpx.Limits(
        max_connections=args.concurrency + args.max_queue + 60, keepalive_expiry=CLIENT_KEEP_ALIVE
    )
    async with httpx.AsyncClient(
        base_url=session.url, timeout=CLIENT_DEADLINE, limits=limits
    ) as client:
        await session.wait_ready(client)
        for _ in range(3):  # warm-up: every model answers, every code path is loaded
            async with trio.open_nursery() as nursery:
                for i in range(args.concurrency):
                    model = session.names[i % len(session.names)] if session.several else None
                    nursery.start_soon(partial_ask(session, client, "warmup", model))
    await trio.sleep(QUIET)  # the clients' connections have closed: a quiet point to measure
    rss_warm, fds_warm = session.resources()
    started = trio.current_time()
    session.started_at = started
    until = started + args.duration
    async with httpx.AsyncClient(
        base_url=session.url, timeout=CLIENT_DEADLINE, limits=limits
    ) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(session.client_loop, client, until)
            nursery.start_soon(session.chaos_loop, client, until)
            nursery.start_soon(report_progress, session, until)
            if session.several:
                nursery.start_soon(session.watch_workers, client, until)
        await session.wait_ready(client)  # every model back before the last measurement
        several: dict = {}
        if session.several:
            templates = await session.templates(client)
            with trio.move_on_after(10):  # one killed at the very end loads again
                while any(t and t.get("state") != "ready" for t in templates.values()):
                    await trio.sleep(0.1)
                    templates = await session.templates(client)
            template = combined(templates)
            several["templates"] = templates
            several["slot_moves_by"] = await session.slot_moves(client)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                listed = (await client.get("/models")).json()["models"]
                several["workers_at_end"] = {m["name"]: m["workers"] for m in listed}
        else:
            template = await session.template(client)
            with trio.move_on_after(10):  # one killed at the very end loads again
                while template and template.get("state") != "ready":
                    await trio.sleep(0.1)
                    template = await session.template(client)
    await trio.sleep(QUIET)
    rss_end, fds_end = session.resources()
    return {
        "duration": round(trio.current_time() - started, 1),
        "rss_warm_mib": round(rss_warm, 1),
        "rss_end_mib": round(rss_end, 1),
        "fds_warm": fds_warm,
        "fds_end": fds_end,
        "template": template,
        **several,
    }


def combined(templates: dict[str, dict]) -> dict:
    """The models' --preload templates as one ({} if none): ready if every one is, the
    forks of all of them."""
    if not any(templates.values()):
        return {}
    ready = all(t.get("state") == "ready" for t in templates.values())
    return {
        "state": "ready" if ready else "not ready",
        "forks": sum(t.get("forks", 0) for t in templates.values()),
        "loads": sum(t.get("loads", 0) for t in templates.values()),
    }


async def report_progress(session: Session, until: float) -> None:
    while trio.current_time() < until:
        await trio.sleep(10)
        t = session.tally
        print(
            f"  ... sent {t.sent}, ok {t.ok}, errors {sum(t.errors.values())}, "
            f"wrong {t.wrong}, cut off {t.lost}, missing {t.missing}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of chaos")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=24, help="closed-loop clients")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--preload",
        action="store_true",
        help="run the service with --preload, and kill its template too now and then",
    )
    parser.add_argument(
        "--models",
        type=int,
        default=1,
        help="models the service runs on the --workers slots (m0, m1, ...; default 1)",
    )
    parser.add_argument(
        "--service-log", type=Path, default=Path(os.devnull), help="where the service logs go"
    )
    args = parser.parse_args()
    if args.models < 1:
        parser.error("--models: must be at least 1")
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    become_subreaper()
    session = Session(args)
    if session.several:
        print(
            f"chaos: {args.duration:g} s, {args.workers} slots shared by {args.models} models "
            f"({', '.join(session.names)}), {args.concurrency} clients, seed {args.seed}, "
            f"service on {session.url}",
            flush=True,
        )
    else:
        print(
            f"chaos: {args.duration:g} s, {args.workers} models, {args.concurrency} clients, "
            f"seed {args.seed}, service on {session.url}",
            flush=True,
        )
    session.start()
    try:
        figures = trio.run(drive, session)
    finally:
        exit_code = session.stop()
        time.sleep(0.5)  # orphans of a service that failed re-parent to us: give it a moment
        left = session.left_behind()
    t = session.tally
    summary = {
        **figures,
        "seed": args.seed,
        "sent": t.sent,
        "ok": t.ok,
        "errors": dict(sorted(t.errors.items())),
        "hung_up_on_purpose": t.hung_up,
        "wrong_id": t.wrong,
        "lost": t.lost,
        "lost_kinds": dict(sorted(t.lost_kinds.items())),
        "missing": t.missing,
        "unanswered": t.lost_examples[:5] + t.missing_examples[:5],  # "<request id>: why"
        "left_behind": len(left),
        "service_exit_code": exit_code,
        "chaos": dict(sorted(t.chaos.items())),
        "escaped_daemons_started": len([m for m in session.escapes.iterdir() if m.name.isdigit()]),
    }
    checks = {
        "no answer carried another request's id": t.wrong == 0,
        "no request was cut off without an answer": t.lost == 0,
        "every request got an answer in time": t.missing == 0,
        "no process left behind": not left,
        "the service exited with 0": exit_code == 0,
        "open fds flat": figures["fds_end"] <= figures["fds_warm"] + 4,
        "RSS flat": figures["rss_end_mib"] <= figures["rss_warm_mib"] * 1.25 + 5,
        "most requests answered ok": t.ok > t.sent / 2,
    }
    if args.preload:
        template = figures["template"]
        checks["models were forked from the template"] = template.get("forks", 0) > args.workers
        checks["a template was ready at the end"] = template.get("state") == "ready"
    if session.several:
        per_model = session.per_model
        moves = sum(figures.get("slot_moves_by", {}).values())
        summary["wrong_model"] = sum(m.wrong_model for m in per_model.values())
        summary["unverified_model"] = sum(m.unverified for m in per_model.values())
        summary["slot_moves"] = moves
        summary["models"] = {
            name: {
                "sent": m.sent,
                "ok": m.ok,
                "errors": dict(sorted(m.errors.items())),
                "wrong_model": m.wrong_model,
                "unverified_model": m.unverified,
                "chaos": dict(sorted(m.chaos.items())),
                "workers_at_end": figures.get("workers_at_end", {}).get(name),
                "template": figures.get("templates", {}).get(name, {}),
            }
            for name, m in per_model.items()
        }
        checks["every answer came from the model asked"] = summary["wrong_model"] == 0
        checks["most answers' model was verified"] = summary["unverified_model"] <= t.ok / 20
        checks["every model answered"] = all(m.ok > 0 for m in per_model.values())
        checks["slots moved between models"] = moves >= 1
    summary["checks"] = checks
    print_table(summary)
    examples = t.wrong_examples[:5] + t.wrong_model_examples[:5]
    examples += t.lost_examples[:5] + t.missing_examples[:5] + left[:10]
    for example in examples:
        print(f"  ! {example}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(session.escapes, ignore_errors=True)
    return 0 if all(checks.values()) else 1


def print_table(s: dict) -> None:
    rows = [
        ("duration", f"{s['duration']} s"),
        ("requests sent", s["sent"]),
        ("answered ok (own id)", s["ok"]),
        *[(f"  {kind}", count) for kind, count in s["errors"].items()],
        ("clients that hung up on purpose", s["hung_up_on_purpose"]),
        ("answers with another request's id", s["wrong_id"]),
        ("requests cut off without an answer", s["lost"]),
        *[(f"  {kind}", count) for kind, count in s["lost_kinds"].items()],
        ("requests with no answer within their deadline", s["missing"]),
        ("processes left behind (escaped daemons included)", s["left_behind"]),
        ("escaped daemons started", s["escaped_daemons_started"]),
        ("chaos actions", ", ".join(f"{k} {v}" for k, v in s["chaos"].items())),
        ("service RSS after warm-up / at the end", f"{s['rss_warm_mib']} / {s['rss_end_mib']} MiB"),
        ("service open fds after warm-up / at the end", f"{s['fds_warm']} / {s['fds_end']}"),
        ("service exit code", s["service_exit_code"]),
    ]
    if "models" in s:
        rows += [
            ("answers computed by another model", s["wrong_model"]),
            ("answers whose model could not be told (gone)", s["unverified_model"]),
            ("slot moves", s["slot_moves"]),
            *[(f"  {move}", count) for move, count in sorted(s["slot_moves_by"].items())],
        ]
    width = max(len(str(label)) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if "models" in s:
        print_models(s["models"])
    print()
    for check, held in s["checks"].items():
        print(f"{'PASS' if held else 'FAIL'}  {check}")


def print_models(models: dict[str, dict]) -> None:
    """With --models: one row per model."""
    head = ("model", "sent", "ok", "errors", "other model", "unverified", "workers", "forks")
    rows = [
        (
            name,
            m["sent"],
            m["ok"],
            sum(m["errors"].values()),
            m["wrong_model"],
            m["unverified_model"],
            "?" if m["workers_at_end"] is None else m["workers_at_end"],
            m["template"].get("forks", "-"),
        )
        for name, m in models.items()
    ]
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    print()
    for row in [head, *rows]:
        print("  ".join(f"{v!s:>{w}}" for v, w in zip(row, widths, strict=True)))
    for name, m in models.items():
        errors = ", ".join(f"{kind} {count}" for kind, count in m["errors"].items()) or "none"
        chaos = ", ".join(f"{kind} {count}" for kind, count in m["chaos"].items()) or "none"
        print(f"{name}: errors: {errors}; chaos aimed at it: {chaos}")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def own_children() -> list[int]:
    found = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
