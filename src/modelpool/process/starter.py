"""How a model process comes to be: the one seam between a worker and the way its model starts.

A `ModelStarter` makes a model process and hands back a `ModelHandle`: its pid, its
pipes, its exit status. Two starters exist: `Spawner` runs the model command as a new
program (the default), and `preload.Forker` forks it from a warm template (--preload).
The worker and `ModelProcess` use only the handle, so they own one model process
(its pid, pipes and exit status) the same way whichever way it started.

Both register the model with the reaper under its token while the reaper holds its
sweeps (see `Reaper.spawning`), so containment is the same for both.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

import trio

from modelpool.core.kinds import StartMethod
from modelpool.process.failures import CommandNotRunnable
from modelpool.process.procfs import tree_rss_mib

if TYPE_CHECKING:
    from modelpool.process.reaper import Reaper
    from modelpool.settings.config import PoolConfig


class ModelHandle(Protocol):
    """One model process, as its worker sees it."""

    pid: int
    method: StartMethod  # for /status and the start-time metric
    ready_at_start: bool  # a forked child is past its ready line before it exists
    started_at: float  # trio time at which the start was asked for

    # Its pipes: file descriptors, which the model's pacing looks at (see pacing.py).
    @property
    def stdin(self) -> trio.lowlevel.FdStream: ...

    @property
    def stdout(self) -> trio.lowlevel.FdStream: ...

    @property
    def stderr(self) -> trio.lowlevel.FdStream: ...

    @property
    def returncode(self) -> int | None:
        """Its exit status once known (as subprocess's: -N for signal N); None before."""

    @property
    def running(self) -> bool:
        """False once it has exited, even if its exit status could not be learned."""

    async def wait(self) -> int | None:
        """Return once it has exited, with its exit status if known."""

    async def aclose(self) -> None:
        """Close this side of its pipes."""

    def memory_mib(self) -> float:
        """Memory it holds, with the processes below it, for --model-max-rss."""


class ModelStarter(Protocol):
    async def adopt(
        self, config: PoolConfig, name: str
    ) -> AbstractAsyncContextManager[object] | None:
        """A model already running (a `ModelProcess`; not named here, which it imports)
        that the worker `name` may take as its own instead of starting one: a --preload
        template that cannot be forked (see lending.py), for as long as the context
        lasts. None: start one."""

    async def start(
        self, config: PoolConfig, name: str, token: str, env: dict[str, str]
    ) -> ModelHandle:
        """Start one model; StartFailed (CommandNotRunnable if it cannot be run) if not."""

    def backoff(self, config: PoolConfig, failures: int) -> float:
        """Seconds to wait before the next start after `failures` failures in a row."""


class SpawnedProcess:
    """A model run as a program of its own: trio's process, as a `ModelHandle`."""

    method = StartMethod.SPAWN
    ready_at_start = False

    def __init__(self, proc: trio.Process, started_at: float) -> None:
        # trio makes a process's pipes FdStreams on Unix (typed as plain streams)
        assert isinstance(proc.stdin, trio.lowlevel.FdStream)
        assert isinstance(proc.stdout, trio.lowlevel.FdStream)
        assert isinstance(proc.stderr, trio.lowlevel.FdStream)
        self.proc = proc
        self.pid = proc.pid
        self.started_at = started_at
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait(self) -> int | None:
        return await self.proc.wait()

    async def aclose(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            await stream.aclose()

    def memory_mib(self) -> float:
        return tree_rss_mib(self.pid)


class Spawner:
    """Start each model as a new program, in a session of its own (today's way)."""

    def __init__(self, reaper: Reaper, pass_fds: Sequence[int] = ()) -> None:
        self._reaper = reaper
        self._pass_fds = tuple(pass_fds)

    async def adopt(
        self, config: PoolConfig, name: str
    ) -> AbstractAsyncContextManager[object] | None:
        return None

    async def start(
        self, config: PoolConfig, name: str, token: str, env: dict[str, str]
    ) -> SpawnedProcess:
        started_at = trio.current_time()
        async with self._reaper.spawning():
            try:
                proc = await trio.lowlevel.open_process(
                    config.model_cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    env=env,
                    pass_fds=self._pass_fds,
                )
            except OSError as exc:
                program = config.model_cmd[0]
                raise CommandNotRunnable(
                    f"{name} failed to start: cannot run {program!r}: {exc.strerror or exc}"
                ) from exc
            self._reaper.model_started(proc.pid, token)
        return SpawnedProcess(proc, started_at)

    def backoff(self, config: PoolConfig, failures: int) -> float:
        return config.backoff(failures)
