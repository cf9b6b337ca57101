"""One model process: start it, read what it prints, hand it requests, and make sure it dies.

The model runs in a session of its own, so killing its process group also kills any
helper processes it started. A pump task reads its stdout for the whole of its life:
lines before the ready line and lines that are not results go to the log, and a result
line goes to the worker only while the worker is waiting for one. Another pump logs
stderr and keeps its last lines for error reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from .config import PoolConfig
from .errors import ModelFailed
from .lines import LineReader, LineTooLong

RESULT_PREFIX = b"result: "
MAX_STDERR_LINE = 64 * 1024
LOGGED_CHARS = 2000
EXIT_WAIT = 2.0  # how long a model whose output ended gets to exit before it is killed
PUMP_DRAIN = 1.0  # how long the pumps get to read what a dead model left in its pipes

log = logging.getLogger("modelpool.model")


class StartFailed(Exception):
    """The model exited, could not be run, or printed no ready line in time."""


class ModelProcess:
    """A running model and what is known of it; built by `open_model`."""

    def __init__(self, proc: trio.Process, config: PoolConfig, name: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.name = f"{name} [pid {proc.pid}]"
        self.started_at = trio.current_time()
        self.ready = False
        self.busy = False
        self.overflowed = False
        self.stdout_ended = trio.Event()
        self.stderr_ended = trio.Event()
        self._config = config
        self._init_done = trio.Event()
        self._death_scopes: set[trio.CancelScope] = set()
        self._results_send, self.results = trio.open_memory_channel[bytes](1)
        self._stderr_tail: deque[str] = deque(maxlen=config.stderr_tail)

    # -- talking to the model -------------------------------------------------------

    async def wait_ready(self) -> None:
        """Return once the model printed its ready line; raise StartFailed otherwise."""
        timeout = self._config.init_timeout
        with trio.move_on_after(timeout):
            await self._init_done.wait()
        if self.ready:
            return
        if not self._init_done.is_set():
            raise StartFailed(f"{self.name} failed to start: no ready line within {timeout:g} s")
        failure = await self.describe_failure()
        raise StartFailed(f"{self.name} failed to start: {failure.detail}")

    async def send(self, line: bytes) -> None:
        """Write one request line; trio.BrokenResourceError if the model is gone."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            await stdin.send_all(line)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("model stdin is closed") from exc

    @contextmanager
    def cancel_on_death(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that is cancelled as soon as the model's output ends."""
        with trio.CancelScope() as scope:
            if self.stdout_ended.is_set():
                scope.cancel()
            self._death_scopes.add(scope)
            try:
                yield scope
            finally:
                self._death_scopes.discard(scope)

    async def describe_failure(self) -> ModelFailed:
        """Why the model stopped answering, with its exit code and last stderr lines."""
        with trio.move_on_after(EXIT_WAIT):
            await self.proc.wait()
        with trio.move_on_after(PUMP_DRAIN):
            await self.stderr_ended.wait()
        code = self.proc.returncode
        if self.overflowed:
            detail = f"model printed a line longer than {self._config.max_line} bytes"
        elif code is None:
            detail = "model closed its output but did not exit"
        elif code < 0:
            detail = f"model was killed by signal {_signal_name(-code)}"
        else:
            detail = f"model exited with code {code}"
        if self._stderr_tail:
            detail = f"{detail}: {self._stderr_tail[-1]}"
        return ModelFailed(detail, exit_code=code, stderr=list(self._stderr_tail))

    # -- ending it ------------------------------------------------------------------

    def kill_group(self) -> None:
        """SIGKILL the model and everything in its process group, at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def kill(self) -> None:
        """Kill the process group and reap the model."""
        self.kill_group()
        await self.proc.wait()

    async def stop(self, grace: float) -> None:
        """Close stdin so the model can exit on its own; kill what is left after `grace`.

        A model that is not ready yet is not reading its stdin, so it is killed at once.
        """
        if self.proc.returncode is None and self.ready:
            stdin = self.proc.stdin
            assert stdin is not None
            await stdin.aclose()
            with trio.move_on_after(grace):
                await self.proc.wait()
            if self.proc.returncode is None:
                log.warning(
                    "%s did not exit within %g s of stdin closing; killing it", self.name, grace
                )
        await self.kill()

    # -- pumps ----------------------------------------------------------------------

    async def _pump_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        reader = LineReader(stdout, self._config.max_line)
        try:
            while (line := await reader.readline()) is not None:
                await self._on_stdout_line(line)
        except LineTooLong:
            self.overflowed = True
            log.error("%s printed a line longer than %d bytes", self.name, self._config.max_line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stdout_ended.set()
            self._init_done.set()
            self._results_send.close()
            for scope in self._death_scopes:
                scope.cancel()

    async def _on_stdout_line(self, line: bytes) -> None:
        if self.ready and line.startswith(RESULT_PREFIX):
            if self.busy:
                await self._results_send.send(line[len(RESULT_PREFIX) :])
            else:
                log.warning(
                    "%s printed a result nobody asked for; dropped: %s", self.name, _text(line)
                )
            return
        log.info("%s stdout: %s", self.name, _text(line))
        if not self.ready and _text(line).strip().startswith(self._config.ready_line):
            self.ready = True
            self._init_done.set()

    async def _pump_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        reader = LineReader(stderr, MAX_STDERR_LINE)
        try:
            while True:
                try:
                    line = await reader.readline()
                except LineTooLong:
                    text = f"<a stderr line over {MAX_STDERR_LINE} bytes was dropped>"
                    self._stderr_tail.append(text)
                    log.warning("%s stderr: %s", self.name, text)
                    if not await reader.skip_line():
                        return
                    continue
                if line is None:
                    return
                text = _text(line)
                self._stderr_tail.append(text)
                log.info("%s stderr: %s", self.name, text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stderr_ended.set()

    async def _watch_exit(self) -> None:
        """Notice a model that exited while a child of its own still holds its stdout."""
        await self.proc.wait()
        with trio.move_on_after(EXIT_WAIT):
            await self.stdout_ended.wait()
        if not self.stdout_ended.is_set():
            log.warning(
                "%s exited but its stdout is still open; killing its process group", self.name
            )
            self.kill_group()
            with trio.move_on_after(PUMP_DRAIN):
                await self.stdout_ended.wait()
            if not self.stdout_ended.is_set():
                stdout = self.proc.stdout
                assert stdout is not None
                await stdout.aclose()


@asynccontextmanager
async def open_model(config: PoolConfig, name: str) -> AsyncIterator[ModelProcess]:
    """Start a model; on the way out, close its stdin, give it `exit_grace`, then kill it."""
    env = {**os.environ, **(config.env or {}), "PYTHONUNBUFFERED": "1"}
    try:
        proc = await trio.lowlevel.open_process(
            config.model_cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        raise StartFailed(
            f"{name} failed to start: cannot run {config.model_cmd[0]!r}: {exc}"
        ) from exc
    model = ModelProcess(proc, config, name)
    log.info("%s started: %s", model.name, " ".join(config.model_cmd))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(model._pump_stdout)
        nursery.start_soon(model._pump_stderr)
        nursery.start_soon(model._watch_exit)
        try:
            yield model
        finally:
            with trio.CancelScope(shield=True):
                await model.stop(config.exit_grace)
                with trio.move_on_after(PUMP_DRAIN):
                    await model.stdout_ended.wait()
                    await model.stderr_ended.wait()
                nursery.cancel_scope.cancel()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()


def _text(line: bytes) -> str:
    text = line.decode("utf-8", errors="replace")
    if len(text) > LOGGED_CHARS:
        return f"{text[:LOGGED_CHARS]}... ({len(line)} bytes)"
    return text


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
