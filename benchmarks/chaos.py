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

Exit code 0 when every check holds. Traffic goes to 127.0.0.1 only, and it stops by
itself: --duration bounds the load and every request has a deadline.

Run: nox -s chaos [-- --duration 300] [-- --preload]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import random
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

from benchtools import free_port, rss_mib

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "models" / "chaos_model.py"
PR_SET_CHILD_SUBREAPER = 36
CLIENT_DEADLINE = 30.0  # far past timeout + queue timeout: no answer by then is "missing"
KEEP_ALIVE = CLIENT_DEADLINE  # the service's --keep-alive-timeout: see the module docstring
CLIENT_KEEP_ALIVE = KEEP_ALIVE / 2  # how long the clients keep an idle connection
QUIET = 2.5  # seconds after the clients closed their connections, before measuring


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

    def new_id(self, kind: str) -> str:
        self._ids += 1
        return f"{kind}-{self._ids}-{self.random.getrandbits(32):08x}"

    # -- the service ----------------------------------------------------------------

    def start(self) -> None:
        command = [sys.executable, "-m", "modelpool", "serve", "--port", str(self.port)]
        command += ["--workers", str(self.args.workers), "--timeout", "1"]
        command += ["--max-queue", str(self.args.max_queue), "--queue-timeout", "10"]
        command += ["--keep-alive-timeout", str(KEEP_ALIVE), "--backoff-initial", "0.05"]
        command += ["--backoff-max", "0.5", "--log-level", "WARNING"]
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

    async def model_pids(self, client: httpx.AsyncClient) -> list[int]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = (await client.get("/status")).json()["workers"]
            return [w["pid"] for w in workers if w["pid"]]
        return []

    # -- requests -------------------------------------------------------------------

    async def ask(self, client: httpx.AsyncClient, kind: str, **extra: object) -> None:
        """One request with a fresh id; its answer is checked and counted."""
        request_id = self.new_id(kind)
        self.tally.sent += 1
        try:
            with trio.fail_after(CLIENT_DEADLINE):
                response = await client.post("/predict", json={"id": request_id, **extra})
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
            else:
                self.tally.wrong += 1
                self.tally.wrong_examples.append(f"{request_id} got {answer}")
        else:
            error = response.json().get("error", "?")
            self.tally.errors[f"{response.status_code} {error}"] += 1

    async def client_loop(self, client: httpx.AsyncClient, until: float) -> None:
        while trio.current_time() < until:
            noise = self.random.choice([0, 0, 0, 3])
            await self.ask(client, "load", sleep=self.random.uniform(0, 0.04), noise=noise)

    async def hang_up(self, after: float, partial_body: bool) -> None:
        """A client that sends a request (or part of one) and goes away."""
        self.tally.sent += 1
        self.tally.hung_up += 1
        body = json.dumps({"id": self.new_id("hangup"), "sleep": 0.2}).encode()
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(
            body
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
                if action == "kill":
                    pids = await self.model_pids(client)
                    if pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.random.choice(pids), signal.SIGKILL)
                elif action == "template":
                    pid = (await self.template(client)).get("pid")
                    if pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                elif action == "timeout":
                    nursery.start_soon(partial_ask(self, client, "timeout", sleep=5.0))
                elif action == "crash":
                    nursery.start_soon(partial_ask(self, client, "crash", crash=True))
                elif action == "escape":
                    crash = self.random.random() < 0.5
                    extra = {"escape": str(self.escapes), "crash": crash}
                    nursery.start_soon(partial_ask(self, client, "escape", **extra))
                elif action == "hangup":
                    nursery.start_soon(self.hang_up, self.random.uniform(0, 0.3), False)
                elif action == "trickle":
                    nursery.start_soon(self.hang_up, self.random.uniform(0, 0.3), True)
                elif action == "burst":
                    for _ in range(self.args.max_queue + 40):
                        nursery.start_soon(partial_ask(self, client, "burst"))

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


def partial_ask(session: Session, client: httpx.AsyncClient, kind: str, **extra: object):
    async def run() -> None:
        await session.ask(client, kind, **extra)

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
                for _ in range(args.concurrency):
                    nursery.start_soon(partial_ask(session, client, "warmup"))
    await trio.sleep(QUIET)  # the clients' connections have closed: a quiet point to measure
    rss_warm, fds_warm = session.resources()
    started = trio.current_time()
    until = started + args.duration
    async with httpx.AsyncClient(
        base_url=session.url, timeout=CLIENT_DEADLINE, limits=limits
    ) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(session.client_loop, client, until)
            nursery.start_soon(session.chaos_loop, client, until)
            nursery.start_soon(report_progress, session, until)
        await session.wait_ready(client)  # every model back before the last measurement
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
        "--service-log", type=Path, default=Path(os.devnull), help="where the service logs go"
    )
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    become_subreaper()
    session = Session(args)
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
    summary["checks"] = checks
    print_table(summary)
    examples = t.wrong_examples[:5] + t.lost_examples[:5] + t.missing_examples[:5] + left[:10]
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
    width = max(len(str(label)) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print()
    for check, held in s["checks"].items():
        print(f"{'PASS' if held else 'FAIL'}  {check}")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def own_children() -> list[int]:
    found = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
