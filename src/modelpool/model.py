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
import subprocess
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

RESULT_PREFIX = b"result: "
MAX_STDERR_LINE = 64 * 1024
LOGGED_CHARS = 2000
QUOTED_LINES = 5  # lines of its stdout a failure message quotes
QUOTED_CHARS = 200  # and characters of each
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
    """The model exited, could not be run, or printed no ready line in time.

    str() is the whole story, for the log and /status; it may quote what the model
    printed before it was ready (no request has reached it then, so no user's data).
    `summary` leaves that out: it is what /healthz, open to anyone, may show.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = message if summary is None else summary


class CommandNotRunnable(StartFailed):
    """The model command could not be executed at all (missing, not executable)."""


class ModelProcess:
    """A running model and what is known of it; built by `open_model`."""

    def __init__(
        self, proc: trio.Process, config: PoolConfig, name: str, reaper: Reaper, token: str
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.name = f"{name} [pid {proc.pid}]"
        self.started_at = trio.current_time()
        self.ready = False
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
        self._plain = PlainLines()  # stdout lines that were no result, for failure messages
        self._output_log = OutputLog(
            name=self.name, level=config.model_log_level, rate=config.model_log_rate
        )

    # -- talking to the model -------------------------------------------------------

    async def wait_ready(self) -> None:
        """Return once the model printed its ready line; raise StartFailed otherwise."""
        timeout = self._config.init_timeout
        with trio.move_on_after(timeout):
            await self._init_done.wait()
        if self.ready:
            return
        if not self._init_done.is_set():
            summary = f"{self.name} failed to start: no ready line within {timeout:g} s"
            raise StartFailed(f"{summary}; {self._ready_hint()}", summary=summary)
        # No stderr in the message: it ends up in /healthz, which anyone may read. The
        # tail is in last_failure.stderr (/status) and, at --model-log-level, the log.
        failure = await self.describe_failure()
        raise StartFailed(f"{self.name} failed to start: {failure.detail}")

    def _ready_hint(self) -> str:
        """What to check when no ready line came: the line waited for, and what came instead."""
        wanted = f"it must print a line that starts with {self._config.ready_line!r} (--ready-line)"
        if not self._plain.count:
            buffered = "a model that buffers its output must flush each line"
            return f"{wanted}, and printed nothing on stdout ({buffered})"
        return f"{wanted}, and printed {self._plain.describe()}"

    def expect_result(self) -> None:
        """The next result line answers the request about to be sent; only that one."""
        self._awaiting = True
        self._plain.restart()

    def missing_result(self, quote: bool) -> str:
        """For a request with no result: what the model printed on stdout instead, if anything.

        The usual mistake is a model that prints its answer as plain JSON. With `quote`,
        the last such line is quoted: for the answer to the client whose request it was,
        and /status. The log's ERROR line goes without it, since a model's output may
        hold users' data and is logged only at --model-log-level.
        """
        count = self._plain.count
        if not count:
            return ""
        prefix = RESULT_PREFIX.decode()
        lines = "1 line" if count == 1 else f"{count} lines"
        text = f"; the model printed {lines} but none started with {prefix!r}"
        if quote:
            return f"{text} (the last: {self._plain.last()[-1]!r})"
        return f"{text} (its lines are logged at --model-log-level)"

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

    def stderr_note(self) -> str:
        """For a failure's ERROR line: where the model's last stderr lines are.

        They may carry users' data, so they are not part of that line, and they are not
        logged again either: the stderr pump logged each of them once already, at
        --model-log-level (within the model's budget). /status keeps the last ones
        (last_failure.stderr). "" if the model printed nothing to stderr.
        """
        if not self._stderr_tail:
            return ""
        return "; its stderr is in /status"

    # -- ending it ------------------------------------------------------------------

    def kill_group(self) -> None:
        """SIGKILL the model, its process group and every process below it, at once.

        Once the model is reaped its pid may name another process, so only its group
        (which keeps the number reserved while it has members) is killed then.
        """
        self._reaper.kill_tree(self.pid, walk=self.proc.returncode is None)

    async def kill(self) -> None:
        """Kill the model and its tree, reap it, and kill whatever escaped it."""
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
        self._plain.add(line)
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


class PlainLines:
    """Lines a model printed on stdout that were no result: the hint for a protocol mistake.

    Before its ready line, they are what it printed instead of it; after, what it
    printed since the last request was sent (`restart`). The count is kept, and the
    last QUOTED_LINES lines, each cut to QUOTED_CHARS.
    """

    def __init__(self) -> None:
        self.count = 0
        self._last: deque[bytes] = deque(maxlen=QUOTED_LINES)

    def restart(self) -> None:
        self.count = 0
        self._last.clear()

    def add(self, line: bytes) -> None:
        """Note a line: it costs a slice, decoded only if a failure quotes it."""
        self.count += 1
        self._last.append(line[: QUOTED_CHARS * 4 + 1])  # 4 bytes the longest character

    def last(self) -> list[str]:
        """The last lines, each decoded and cut to QUOTED_CHARS characters."""
        texts = (raw.decode("utf-8", errors="replace") for raw in self._last)
        return [
            text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..." for text in texts
        ]

    def describe(self) -> str:
        """'3 lines on stdout, the last: 'a', 'b', 'c'' (the count, then the last lines)."""
        lines = "1 line" if self.count == 1 else f"{self.count} lines"
        return f"{lines} on stdout, the last: " + ", ".join(repr(text) for text in self.last())


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
async def open_model(config: PoolConfig, name: str, reaper: Reaper) -> AsyncIterator[ModelProcess]:
    """Start a model; on the way out, close its stdin, give it `exit_grace`, then kill it."""
    token = reaper.new_token()
    async with reaper.spawning():
        try:
            proc = await trio.lowlevel.open_process(
                config.model_cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=model_environment(config, token),
            )
        except OSError as exc:
            raise CommandNotRunnable(
                f"{name} failed to start: cannot run {config.model_cmd[0]!r}: {exc.strerror or exc}"
            ) from exc
        reaper.model_started(proc.pid, token)
    logs.set_field("pid", proc.pid)  # for this task's log lines and those of the pumps
    model = ModelProcess(proc, config, name, reaper, token)
    log.info("%s started: %s", model.name, " ".join(config.model_cmd))
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
                    for stream in (proc.stdin, proc.stdout, proc.stderr):
                        if stream is not None:
                            await stream.aclose()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:  # only if something above failed half-way
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
