"""One model process: start it, read what it prints, hand it requests, and make sure it dies.

The model runs in a session of its own, with a token in its environment; the reaper
(reaper.py) kills its process group, its tree and anything that carries the token when
it ends. A pump task reads its stdout for the whole of its life: lines before the ready
line and lines that are not results go to the log (at a bounded rate, see `OutputLog`),
and a result line goes to the worker only while the worker awaits one. A result nobody
awaits puts the model out of step: it will be replaced, since a stray result could
otherwise answer the next request. After each answer the worker lets the model finish
printing before it sends the next request (see QUIET_PERIOD), so a second result
printed right after the first is caught too. Another pump logs stderr and keeps its
last lines for error reports.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import signal
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from . import logs
from .config import PoolConfig
from .errors import ModelFailed
from .lines import LineReader, LineTooLong
from .reaper import TOKEN_VAR, Reaper
from .starter import ModelHandle, ModelStarter, Spawner

RESULT_PREFIX = b"result: "
MAX_STDERR_LINE = 64 * 1024
LOGGED_CHARS = 2000
EXIT_WAIT = 2.0  # how long a model whose output ended gets to exit before it is killed
PUMP_DRAIN = 1.0  # how long the pumps get to read what a dead model left in its pipes
QUIET_PERIOD = 0.005
"""Seconds a model still running after its answer gets to print more, before its next request.

A model that answers twice does it with two print() calls, two write(2)s: the second
line comes a moment after the first, often after the worker has already seen the first,
so a look at what is in the pipe alone missed it about one time in five, and the line
then answered the next request. So after each answer the worker watches the model (see
`catch_up`): as soon as it is blocked (back to reading its stdin, as a model between
requests is) with nothing left in its stdout, it has said all it had to say, and the
next request goes at once; a well-behaved model costs tens of microseconds. One that
keeps running gets this long of silence on stdout first: 5 ms covers a model the
kernel put aside between its two lines on a busy machine (1 ms did not, about one time
in 200 on 2 cores). It is no guarantee: a model that pauses (sleeps) before its second
line, or has a helper print it, escapes it; only --id-field makes a stray result
harmless (and with it nothing is waited for).
"""
CATCH_UP_MAX = 0.02  # seconds a model that keeps printing after its answer holds its worker
CATCH_UP_SPINS = 50  # scheduler rounds spent watching the model block before sleeping
TICK = 0.001  # trio's timer resolution: a shorter sleep lasts as long
HIDDEN_VARIABLES = ("MODELPOOL_",)  # the service's settings, its API key among them
LOG_BURST = 100  # lines a model may have logged at once (a start-up, a traceback)
DROPPED_REPORT_SECONDS = 10.0  # how often the count of lines left out is logged

log = logging.getLogger("modelpool.model")


class StartFailed(Exception):
    """The model exited, could not be run, or printed no ready line in time."""


class CommandNotRunnable(StartFailed):
    """The model command could not be executed at all (missing, not executable)."""


class ModelProcess:
    """A running model and what is known of it; built by `open_model`.

    `proc` is the process however it started (see starter.py). A child forked from a
    template is past its ready line from its first instant, so it is ready at once.
    """

    def __init__(
        self, proc: ModelHandle, config: PoolConfig, name: str, reaper: Reaper, token: str
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.name = f"{name} [pid {proc.pid}]"
        self.started_at = proc.started_at
        self.method = proc.method
        self.ready = proc.ready_at_start
        self.overflowed = False
        self.out_of_step: str | None = None  # why, once it printed a result nobody awaited
        self.request_id: str | None = None  # the request it computes, for its output's log
        self.stdout_ended = trio.Event()
        self.stderr_ended = trio.Event()
        self._config = config
        self._reaper = reaper
        self._token = token
        self._awaiting = False
        self._reader: LineReader | None = None
        self._stdout: _StampedStream | None = None
        self._init_done = trio.Event()
        self._trouble_scopes: set[trio.CancelScope] = set()
        self._results_send, self.results = trio.open_memory_channel[bytes](1)
        self._stderr_tail: deque[str] = deque(maxlen=config.stderr_tail)
        self._output_log = OutputLog(
            name=self.name, level=config.model_log_level, rate=config.model_log_rate
        )
        if self.ready:
            self._init_done.set()

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
        # No stderr in the message: it ends up in /healthz, which anyone may read. The
        # tail is in last_failure.stderr (/status) and, at --model-log-level, the log.
        failure = await self.describe_failure()
        raise StartFailed(f"{self.name} failed to start: {failure.detail}")

    def expect_result(self) -> None:
        """The next result line answers the request about to be sent; only that one."""
        self._awaiting = True

    async def send(self, line: bytes) -> None:
        """Write one request line; trio.BrokenResourceError if the model is gone."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            await stdin.send_all(line)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("model stdin is closed") from exc

    async def catch_up(self) -> None:
        """Let the model finish printing before it gets its next request.

        Called after a result: what the model prints meanwhile is read, so a second
        result is seen as the stray it is (`out_of_step`) instead of answering the next
        request. Without an id field, the model is done once nothing is left in its
        stdout, no line is half-written, and it is either blocked (not running: what
        it wrote before blocking is in the pipe by then, so it is checked once more) or
        silent for QUIET_PERIOD. With an id field, only what is already in the pipe is
        read, since a stray result cannot pass for another's. A model that keeps
        printing does not hold the worker up past CATCH_UP_MAX.
        """
        stamped = self._stdout
        assert stamped is not None
        quiet = 0.0 if self._config.id_field is not None else QUIET_PERIOD
        deadline = trio.current_time() + CATCH_UP_MAX
        spins = 0
        while not (self.stdout_ended.is_set() or self.out_of_step):
            now = trio.current_time()
            if now >= deadline:
                return
            if self._pending_output():
                await trio.lowlevel.checkpoint()  # the pump reads it
                continue
            if not quiet:
                return
            if not stamped.mid_line:
                if now - stamped.last_data >= quiet:
                    return
                if not _running(self.pid) and not self._pending_output():
                    return
            if spins < CATCH_UP_SPINS:
                spins += 1
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(TICK)

    def _pending_output(self) -> int:
        stdout = self.proc.stdout
        assert stdout is not None
        if self._reader is not None and self._reader.has_line():
            return 1
        pending = array.array("i", [0])
        try:
            fcntl.ioctl(stdout.fileno(), termios.FIONREAD, pending)
        except (OSError, trio.ClosedResourceError):
            return 0
        return pending[0]

    @contextmanager
    def cancel_on_trouble(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that is cancelled once the model's output ends or goes out of step."""
        with trio.CancelScope() as scope:
            if self.stdout_ended.is_set() or self.out_of_step:
                scope.cancel()
            self._trouble_scopes.add(scope)
            try:
                yield scope
            finally:
                self._trouble_scopes.discard(scope)

    async def describe_failure(self) -> ModelFailed:
        """Why the model stopped answering: one line, the exit code, the last stderr lines.

        A model whose output ended is usually exiting: it gets EXIT_WAIT to do so, and
        then its stderr is read to the end. One that overflowed a line is alive and
        will be killed, so nothing is waited for.
        """
        if not self.overflowed:
            with trio.move_on_after(EXIT_WAIT):
                await self.proc.wait()
        if self.proc.returncode is not None:
            with trio.move_on_after(PUMP_DRAIN):
                await self.stderr_ended.wait()
        code = self.proc.returncode
        if self.overflowed:
            detail = f"model printed a line longer than {self._config.max_line} bytes"
            kind = "protocol"
        elif code is None and not self.proc.running:
            detail = "model exited; its exit status is unknown (its template ended first)"
            kind = "crashed"
        elif code is None:
            detail = "model closed its output but did not exit"
            kind = "protocol"
        elif code < 0:
            detail = f"model was killed by signal {_signal_name(-code)}"
            kind = "crashed"
        else:
            detail = f"model exited with code {code}"
            kind = "crashed"
        return ModelFailed(detail, exit_code=code, stderr=list(self._stderr_tail), kind=kind)

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)

    def log_stderr_tail(self) -> str:
        """Log the model's last stderr lines at --model-log-level, like all it prints.

        They may carry users' data, so they are not part of the failure's ERROR line:
        that line gets the note returned here, which says where the tail is kept
        (last_failure.stderr in /status). "" if the model printed nothing to stderr.
        """
        tail = self.stderr_tail
        if not tail:
            return ""
        self._log_output("stderr", "its last lines:\n    " + "\n    ".join(tail))
        return "; its stderr is in /status"

    # -- ending it ------------------------------------------------------------------

    def kill_group(self) -> None:
        """SIGKILL the model, its process group and every process below it, at once.

        Once the model is reaped its pid may name another process, so only its group
        (which keeps the number reserved while it has members) is killed then.
        """
        self._reaper.kill_tree(self.pid, walk=self.proc.running)

    async def kill(self) -> None:
        """Kill the model and its tree, reap it, and kill whatever escaped it."""
        self.kill_group()
        await self.proc.wait()

    async def stop(self, grace: float) -> None:
        """Close stdin so the model can exit on its own; kill what is left after `grace`.

        A model that is not ready yet is not reading its stdin, so it is killed at once.
        """
        if self.proc.running and self.ready:
            stdin = self.proc.stdin
            assert stdin is not None
            await stdin.aclose()
            with trio.move_on_after(grace):
                await self.proc.wait()
            if self.proc.running:
                log.warning(
                    "%s did not exit within %g s of stdin closing; killing it", self.name, grace
                )
        await self.kill()

    # -- pumps ----------------------------------------------------------------------

    async def _pump_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        self._stdout = _StampedStream(stdout)
        self._reader = reader = LineReader(self._stdout, self._config.max_line)
        try:
            while (line := await reader.readline()) is not None:
                self._on_stdout_line(line)
        except LineTooLong:
            self.overflowed = True
            log.error("%s printed a line longer than %d bytes", self.name, self._config.max_line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stdout_ended.set()
            self._init_done.set()
            self._results_send.close()
            self._cancel_trouble_scopes()

    def _on_stdout_line(self, line: bytes) -> None:
        """Route one line; never awaits, so lines are handled in the order they came."""
        if self.ready and line.startswith(RESULT_PREFIX):
            if self._awaiting:
                self._awaiting = False
                self._results_send.send_nowait(line[len(RESULT_PREFIX) :])
            elif self.out_of_step is None:
                self.out_of_step = "printed a result when none was awaited"
                log.error("%s %s", self.name, self.out_of_step)
                self._log_output("stdout", _text(line))  # the line itself: the model's business
                self._cancel_trouble_scopes()
            return
        self._log_output("stdout", _text(line))
        if not self.ready and _text(line).strip().startswith(self._config.ready_line):
            self.ready = True
            self._init_done.set()

    def _log_output(self, stream: str, text: str) -> None:
        """A line the model printed: the model's business, logged at --model-log-level
        within the model's budget (see OutputLog)."""
        if self._output_log.admits():
            self._output_log.write(stream, text, self.request_id)

    def _cancel_trouble_scopes(self) -> None:
        for scope in self._trouble_scopes:
            scope.cancel()

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
                self._log_output("stderr", text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stderr_ended.set()

    async def _watch_exit(self) -> None:
        """When the model exits, kill what it left, and notice output that never ends.

        A helper may still hold the model's stdout, so its end would never come; the
        helpers die here, and what they and the model wrote is still read.
        """
        await self.proc.wait()
        self.kill_group()
        await self._reaper.kill_leftovers(self._token)
        with trio.move_on_after(EXIT_WAIT):
            await self.stdout_ended.wait()
        if not self.stdout_ended.is_set():
            log.warning("%s exited but its stdout is still open; closing it", self.name)
            stdout = self.proc.stdout
            assert stdout is not None
            await stdout.aclose()


class _StampedStream(trio.abc.ReceiveStream):
    """A model's stdout that notes when bytes last came and whether a line is unfinished.

    What came last ends with a newline exactly when the line reader holds no partial
    line: so `mid_line` tells that the model is half-way through printing one.
    """

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self.last_data = trio.current_time()
        self.mid_line = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        if data:
            self.last_data = trio.current_time()
            self.mid_line = not data.endswith(b"\n")
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


class OutputLog:
    """What a model prints is its business: logged at --model-log-level, at a bounded rate.

    Each line a model prints would otherwise cost a log record: under a flood of quick
    requests to a chatty model (model3.py prints three lines per request), logging
    them was the service's largest single cost. So each model may have LOG_BURST lines
    logged at once (its start-up, a traceback), and then `rate` a second on average
    (a token bucket). Lines past that are counted, not logged; the count is logged
    every DROPPED_REPORT_SECONDS while lines are being left out, and when the model
    ends. `rate` None logs every line. A model's last stderr lines are kept for failure
    reports whatever is logged.
    """

    def __init__(self, name: str, level: str, rate: int | None) -> None:
        self._name = name
        self._level = logging.getLevelNamesMapping()[level]
        self._rate = rate
        self._tokens = float(LOG_BURST)
        self._refilled_at = time.monotonic()
        self._dropped = 0  # lines left out since the last report
        self._dropped_since = 0.0  # when the first of them was

    def admits(self) -> bool:
        """Whether the next line is to be logged; a line that is not is counted."""
        if not log.isEnabledFor(self._level):
            return False
        if self._rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(LOG_BURST, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        if self._dropped and now - self._dropped_since >= DROPPED_REPORT_SECONDS:
            self.report_dropped()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if not self._dropped:
            self._dropped_since = now
        self._dropped += 1
        return False

    def write(self, stream: str, text: str, request_id: str | None) -> None:
        """Log one line that was admitted."""
        extra = {"stream": stream}
        if request_id is not None:
            extra["request_id"] = request_id
        log.log(self._level, "%s %s: %s", self._name, stream, text, extra=extra)

    def report_dropped(self) -> None:
        """Log how many lines were left out since the last report, if any were."""
        if self._dropped:
            log.log(
                self._level,
                "%s: %d lines it printed in %.0f s were not logged (over --model-log-rate %s)",
                self._name,
                self._dropped,
                time.monotonic() - self._dropped_since,
                self._rate,
            )
            self._dropped = 0


def model_environment(config: PoolConfig, token: str) -> dict[str, str]:
    """The service's environment minus its own settings, plus the model's token.

    MODELPOOL_* variables are the service's business (one may hold the API key); a
    model, which is untrusted, gets none of them. PYTHONUNBUFFERED makes a Python model
    that prints with plain print() heard at once.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_VARIABLES)}
    env.update(config.env or {})
    env["PYTHONUNBUFFERED"] = "1"
    env[TOKEN_VAR] = token
    return env


@asynccontextmanager
async def open_model(
    config: PoolConfig,
    name: str,
    reaper: Reaper,
    starter: ModelStarter | None = None,
    token: str | None = None,
) -> AsyncIterator[ModelProcess]:
    """Start a model (spawned, unless `starter` says otherwise); on the way out, close its
    stdin, give it `exit_grace`, then kill it. `token`: its containment token, if not a
    new one (a preload template's has room for its children's, see preload.py)."""
    token = token or reaper.new_token()
    starter = starter or Spawner(reaper)
    proc = await starter.start(config, name, token, model_environment(config, token))
    logs.set_field("pid", proc.pid)  # for this task's log lines and those of the pumps
    model = ModelProcess(proc, config, name, reaper, token)
    how = " (forked from its template)" if proc.method == "fork" else ""
    log.info("%s started%s: %s", model.name, how, " ".join(config.model_cmd))
    try:
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
                    model._output_log.report_dropped()
                    nursery.cancel_scope.cancel()
                    await proc.aclose()
    finally:
        with trio.CancelScope(shield=True):
            if proc.running:  # only if something above failed half-way
                reaper.kill_tree(proc.pid)
                await proc.wait()
            await reaper.model_reaped(proc.pid, token)


def _running(pid: int) -> bool:
    """True unless the process is known to be blocked (sleeping, stopped, or gone).

    Its state is the one after the name in /proc/PID/stat: R is running or about to
    run. Where that cannot be read, it is taken as running, so the caller waits.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"R"
    except (OSError, IndexError):
        return True


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
