"""The real command, `python -m modelpool serve`, as a process of its own, for tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from conftest import FAST_PREDICT_VARIABLE, children_of, group_members, process_alive

LISTENING = re.compile(r"listening on (http://[^\s\"]+)")
STARTED = re.compile(r"\[pid (\d+)\] started")


@dataclass
class ServerProcess:
    proc: trio.Process
    log: list[str] = field(default_factory=list)
    url: str = ""
    listening: trio.Event = field(default_factory=trio.Event)

    def model_pids(self) -> set[int]:
        """Every model the server started, read from its log."""
        return {int(m.group(1)) for line in self.log if (m := STARTED.search(line))}

    async def read_log(self) -> None:
        assert self.proc.stderr is not None
        pending = b""
        async for chunk in self.proc.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.log.append(text)
                if match := LISTENING.search(text):
                    self.url = match.group(1)
                    self.listening.set()

    async def exit_code(self, within: float) -> int:
        with trio.move_on_after(within):
            return await self.proc.wait()
        log = "\n".join(self.log[-30:])
        raise AssertionError(f"server still running after {within} s; its log ends:\n{log}")


@asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None, command: tuple[str, ...] = ("serve",)
) -> AsyncIterator[ServerProcess]:
    """`python -m modelpool serve --port 0 ARGS`, made sure to be gone (with its models) on exit.

    `command=("worker",)` runs a worker node instead, which listens nowhere.
    """
    listen = () if command == ("worker",) else ("--port", "0")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "modelpool", *command, *listen, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(env),
    )
    server = ServerProcess(proc)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read_log)
        try:
            yield server
        finally:
            if proc.returncode is None:  # the test failed half-way: clean up hard
                for child in children_of(proc.pid):
                    for kill in (os.killpg, os.kill):
                        with contextlib.suppress(ProcessLookupError):
                            kill(child, signal.SIGKILL)
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


async def wait_listening(server: ServerProcess, within: float = 20) -> httpx.AsyncClient:
    """A client of the server once it listens; fails at once if it exits first."""

    async def exited() -> None:
        await server.proc.wait()
        await trio.sleep(0.2)  # what it printed last reaches its log

    async with trio.open_nursery() as nursery:

        async def first(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(first, server.listening.wait)
        nursery.start_soon(first, exited)
        nursery.cancel_scope.deadline = trio.current_time() + within
    if not server.listening.is_set():
        log = "\n".join(server.log[-30:])
        why = (
            f"exited with {server.proc.returncode}"
            if server.proc.returncode is not None
            else (f"not listening after {within} s")
        )
        raise AssertionError(f"{why}; its log ends:\n{log}")
    return httpx.AsyncClient(base_url=server.url, timeout=60)


async def wait_ready(client: httpx.AsyncClient, count: int, within: float) -> None:
    with trio.fail_after(within):
        while (await client.get("/readyz")).json()["ready"] < count:
            await trio.sleep(0.05)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without settings of ours or of the models, plus `extra`; the switch
    of the fast path is kept, so that the suite runs against the path it was started with.
    pytest's PYTEST_CURRENT_TEST goes too: it names the test that happens to run, and a
    parametrized test's name can pass the kernel's limit for one variable (128 KiB),
    which would fail the start of any process it is passed to."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MODELPOOL_", "MODEL3_")) and k != "PYTEST_CURRENT_TEST"
    }
    if FAST_PREDICT_VARIABLE in os.environ:
        env[FAST_PREDICT_VARIABLE] = os.environ[FAST_PREDICT_VARIABLE]
    return {**env, **(extra or {})}


def assert_all_gone(pids: set[int]) -> None:
    assert not [pid for pid in pids if process_alive(pid)], "a model outlived the server"
    assert not [pid for pid in pids if group_members(pid)], "a model's child outlived it"
