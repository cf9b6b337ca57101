"""Shared helpers: real model commands, a real server on a free loopback port, and a
check after every test that it left no child process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from modelpool import Fleet, PoolConfig, PoolError, ServerConfig
from modelpool.pool.pool import Pool
from modelpool.service.server import Service
from modelpool.settings.options import option
from modelpool.settings.sources import from_environ

ROOT = Path(__file__).resolve().parents[1]
MODEL3 = [sys.executable, "-u", str(ROOT / "model3.py")]
SCRIPTED = [sys.executable, "-u", str(Path(__file__).parent / "models" / "scripted.py")]
FAST_MODEL3 = {"MODEL3_STEP_SECONDS": "0.05"}  # model3 ready in about 0.25 s
MODELS = Path(__file__).parent / "models"
# Which /predict path the HTTP tests run against (--fast-predict): the service's own
# variable, so that `MODELPOOL_FAST_PREDICT=0 pytest ...` runs them against quart's.
FAST_PREDICT_VARIABLE = option("fast_predict").env


def fast_predict() -> bool:
    """ServerConfig.fast_predict as MODELPOOL_FAST_PREDICT sets it, read as the service
    reads it (a test may set the variable, then start a service)."""
    switch, raw = option("fast_predict"), os.environ.get(FAST_PREDICT_VARIABLE)
    return bool(switch.default if raw is None else from_environ(switch, raw)[0])


def hostile(name: str) -> list[str]:
    """The command of a model in tests/models/ (Python ones run by this interpreter)."""
    path = MODELS / name
    return [sys.executable, "-u", str(path)] if path.suffix == ".py" else [str(path)]


def read_pids(path: Path) -> list[int]:
    """Pids a model wrote to a file, one per line (none if it has not written yet)."""
    try:
        return [int(word) for word in path.read_text().split()]
    except FileNotFoundError:
        return []


def kill_if_alive(pids: list[int]) -> None:
    """Clean-up for tests about escapes: whatever got away is killed here."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def hostile_config(name: str, **overrides: object) -> PoolConfig:
    """One worker running the hostile model `name` from tests/models/."""
    options: dict = {"model_cmd": hostile(name), "workers": 1}
    options.update(overrides)
    return PoolConfig(**options)


def model3_config(**overrides: object) -> PoolConfig:
    options: dict = {"model_cmd": MODEL3, "env": FAST_MODEL3, "workers": 2}
    options.update(overrides)
    return PoolConfig(**options)


def scripted_config(**overrides: object) -> PoolConfig:
    options: dict = {"model_cmd": SCRIPTED, "workers": 1}
    options.update(overrides)
    return PoolConfig(**options)


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            found.append(int(entry.name))
    return found


def process_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and process_alive(int(entry.name)):
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


@pytest.fixture(autouse=True)
def no_leftover_processes() -> object:
    """Every test must stop every process it started."""
    before = set(children_of(os.getpid()))
    yield
    deadline = time.monotonic() + 5
    while (left := set(children_of(os.getpid())) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"test left child processes behind: {sorted(left)}"


def error_body(response: httpx.Response, status: int, error: str) -> dict:
    """Check an error answer: its status, its `error`, and the request id in body and header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll `predicate` until it holds; fail the test after `within` seconds."""
    with trio.move_on_after(within):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def wait_busy(pool: Pool) -> None:
    """Wait until the first worker is computing (the tests' "blocker" request)."""
    await wait_until(lambda: pool.workers[0].state == "busy", 5, "worker 0 to be busy")


async def predict_into(pool: Pool, request: object, outcomes: list) -> None:
    """Run one prediction as a task, keeping its answer or its PoolError."""
    try:
        outcomes.append(await pool.predict(request))
    except PoolError as exc:
        outcomes.append(exc)


@dataclass
class RunningServer:
    url: str
    service: Service
    client: httpx.AsyncClient

    @property
    def pool(self) -> Pool:
        assert self.service.pool is not None
        return self.service.pool

    @property
    def fleet(self) -> Fleet:
        assert self.service.fleet is not None
        return self.service.fleet


async def shut_down_mid_requests(
    server: RunningServer, running: dict, late: bytes = b'{"n": 2}'
) -> tuple[httpx.Response, httpx.Response]:
    """Shut the service down while `running` computes and another request is still
    sending its body (`late`, whose last bytes come after the shutdown); both answers."""
    shutting_down = trio.Event()
    answers: dict[str, httpx.Response] = {}

    async def body_finished_after_shutdown() -> AsyncIterator[bytes]:
        yield late[:5]
        await shutting_down.wait()
        yield late[5:]

    async def post(name: str, content: object) -> None:
        answers[name] = await server.client.post("/predict", content=content)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, "running", json.dumps(running).encode())
        await wait_busy(server.pool)
        nursery.start_soon(post, "late", body_finished_after_shutdown())
        await trio.sleep(0.2)
        server.service.shutdown()
        shutting_down.set()
    return answers["running"], answers["late"]


@asynccontextmanager
async def running_server(pool: PoolConfig, **server: object) -> AsyncIterator[RunningServer]:
    """The real service (pool + hypercorn) on a free loopback port, stopped on exit."""
    options = {"host": "127.0.0.1", "port": 0, "fast_predict": fast_predict(), **server}
    config = ServerConfig(pool=pool, **options)  # type: ignore[arg-type]
    service = Service(config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            try:
                yield RunningServer(url, service, client)
            finally:
                service.shutdown()
