"""One model process: start it, read what it prints, hand it requests, and make sure it dies.

The model runs in a session of its own, with a token in its environment; the reaper
(reaper.py) kills its process group, its tree and anything that carries the token when
it ends. A pump task reads its stdout for the whole of its life: lines before the ready
line and lines that are not results go to the log (at a bounded rate, see `OutputLog`),
and a result line goes to the worker only while the worker awaits one. A result nobody
awaits puts the model out of step: it will be replaced, since a stray result could
otherwise answer the next request; with --id-field, one that carries the id of an
earlier request is stale, and only dropped. After each answer the worker lets the
model finish printing before it sends the next request (see `catch_up`): until it is
back to reading its stdin, where Linux shows that (procwatch.py), or else for a quiet
period (QUIET_PERIOD). What a model prints while none of its results is awaited is
read within a budget (see OutputBudget), so a flood costs the service little. Another
pump logs stderr and keeps its last lines for error reports.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import select
import signal
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from modelpool.core import logs
from modelpool.core.codec import result_id
from modelpool.core.errors import ModelFailed
from modelpool.process import devices, procwatch
from modelpool.process.lines import LineReader, LineTooLong
from modelpool.process.reaper import TOKEN_VAR, Reaper
from modelpool.process.starter import ModelHandle, ModelStarter, Spawner
from modelpool.settings.config import PoolConfig

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
harmless (and with it nothing is waited for). This is the rule for models whose
waiting cannot be seen; one seen waiting in a read of its stdin is waited for until it
is back there (see `ModelProcess.catch_up`).
"""
CATCH_UP_MAX = 0.02  # seconds a model that keeps printing after its answer holds its worker
POLL_MAX = 0.01  # longest pause between two looks at a model that is not back to reading
LEARN_SETTLE = 0.05
"""Seconds a model seen blocked elsewhere than in a read of its stdin must stay so to be
taken for one whose waiting cannot be seen (an event loop), before its first request."""
LEARN_MAX = 2.0  # seconds after the ready line that what the model looks like waiting is learned
CLOSED_STDIN_GRACE = 0.1  # seconds a model whose stdin is closed gets to show it is exiting
STALE_IDS = 64  # ids of its earlier requests a model's results are checked against
OUTPUT_BURST_LINES = 20_000  # lines a model may print at once while no result is awaited
OUTPUT_RATE_LINES = 20_000  # and then lines a second
OUTPUT_BURST_BYTES = 4 * 1024 * 1024  # bytes, likewise
OUTPUT_RATE_BYTES = 4 * 1024 * 1024
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
    `stderr`: the last stderr lines of the process that failed, when that process is
    not the worker's own model (a --preload template), for the same reports.
    """

    def __init__(
        self, message: str, summary: str | None = None, stderr: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.summary = message if summary is None else summary
        self.stderr = stderr or []


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
        self.hung: str | None = None  # why, once it did not get back to reading after an answer
        self.stale_results = 0  # results with an earlier request's id, dropped
        self.on_stale: Callable[[], None] | None = None  # called for each of them
        self.request_id: str | None = None  # the request it computes, for its output's log
        self.stdout_ended = trio.Event()
        self.stderr_ended = trio.Event()
        self.env: dict[str, str] = {}  # the environment it was started with
        self._config = config
        self._reaper = reaper
        self._token = token
        self._awaiting = False
        self._wire_id: str | None = None  # the id of the request whose result is awaited
        self._sent_ids: deque[str] = deque(maxlen=STALE_IDS)
        self._waiting: procwatch.Signature | None = None  # what it looks like between requests
        self._learned = trio.Event()  # set once the first request need not wait to learn it
        self._learning = True  # until the first request is sent
        self._exited = False
        assert proc.stdin is not None
        self._stdin_inode = os.fstat(proc.stdin.fileno()).st_ino  # type: ignore[attr-defined]
        self._budget = OutputBudget()
        self._budget_waiters = trio.lowlevel.ParkingLot()
        self._reader: LineReader | None = None
        self._stdout: _StampedStream | None = None
        self._init_done = trio.Event()
        self._trouble_scopes: set[trio.CancelScope] = set()
        # The result, after a None if a stale result came first (see receive_result).
        self._results_send, self._results = trio.open_memory_channel[bytes | None](2)
        self._stale_payload = b""  # the last stale result dropped while one was awaited
        self._stderr_tail: deque[str] = deque(maxlen=config.stderr_tail)
        self._plain = PlainLines()  # stdout lines that were no result, for failure messages
        self._output_log = OutputLog(
            name=self.name,
            levels={"stdout": config.model_stdout_level, "stderr": config.model_log_level},
            rate=config.model_log_rate,
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
            summary = f"{self.name} failed to start: no ready line within {timeout:g} s"
            raise StartFailed(f"{summary}; {self._ready_hint()}", summary=summary)
        # No stderr in the message: it ends up in /healthz, which anyone may read. The
        # tail is in last_failure.stderr (/status) and, at --model-log-level, the log.
        failure = await self.describe_failure()
        summary = f"{self.name} failed to start: {failure.detail}"
        if not self._plain.count:
            raise StartFailed(summary)
        # What it printed on stdout is often why (a model that reports its errors there),
        # and is logged only at --model-stdout-level, DEBUG by default. No request was
        # sent to it yet, so it holds no user's data: the log's line quotes it (the
        # summary, for /healthz, does not).
        raise StartFailed(f"{summary}; it printed {self._plain.describe()}", summary=summary)

    def _ready_hint(self) -> str:
        """What to check when no ready line came: the line waited for, and what came instead."""
        wanted = f"it must print a line that starts with {self._config.ready_line!r} (--ready-line)"
        if not self._plain.count:
            buffered = "a model that buffers its output must flush each line"
            return f"{wanted}, and printed nothing on stdout ({buffered})"
        return f"{wanted}, and printed {self._plain.describe()}"

    def missing_result(self, quote: bool) -> str:
        """For a request with no result: what the model printed on stdout instead, if anything.

        The usual mistake is a model that prints its answer as plain JSON. With `quote`,
        the last such line is quoted: for the answer to the client whose request it was,
        and /status. The log's ERROR line goes without it, since a model's output may
        hold users' data and is logged only at --model-stdout-level.
        """
        count = self._plain.count
        if not count:
            return ""
        prefix = RESULT_PREFIX.decode()
        lines = "1 line" if count == 1 else f"{count} lines"
        text = f"; the model printed {lines} but none started with {prefix!r}"
        if quote:
            return f"{text} (the last: {self._plain.last()[-1]!r})"
        return f"{text} (its lines are logged at --model-stdout-level)"

    @property
    def waits_visibly(self) -> bool:
        """Whether the model was seen waiting for requests in a read of its stdin."""
        return self._waiting is not None

    @property
    def idle_output(self) -> tuple[int, int]:
        """Lines and bytes read from it while none of its results was awaited."""
        return self._budget.charged

    @property
    def throttled(self) -> bool:
        """Whether its output is over budget: the pumps hold off reading it for now."""
        return not (self._awaiting or self._exited) and self._budget.pause() > 0

    def expect_result(self, wire_id: str | None = None) -> None:
        """The next result line answers the request about to be sent; only that one.

        `wire_id` is the id it is sent with (--id-field): a result that carries the id
        of one of the model's earlier requests is stale, and dropped.
        """
        self._awaiting = True
        self._wire_id = wire_id
        self._stale_payload = b""
        self._plain.restart()
        if wire_id is not None:
            self._sent_ids.append(wire_id)
        self._budget_waiters.unpark_all()  # an awaited result is never held back

    async def send(self, line: bytes) -> None:
        """Write one request line; trio.BrokenResourceError if the model is gone.

        The first waits (LEARN_SETTLE, at most LEARN_MAX) to learn what the model looks
        like between requests, see `_learn_waiting`.
        """
        stdin = self.proc.stdin
        assert stdin is not None
        if self._learning:
            await self._learned.wait()
            self._learning = False
        try:
            await stdin.send_all(line)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("model stdin is closed") from exc

    async def receive_result(self) -> bytes:
        """The awaited result; trio.EndOfChannel once the model's output ended.

        A model seen waiting (`waits_visibly`) that printed a stale result instead of
        one for this request, and then went back to reading with nothing else printed,
        will print no other: that stale result is taken for its answer, which
        parse_result refuses for its id (502) instead of the request timing out.
        """
        payload = await self._results.receive()
        while payload is None:  # a stale result came: watch for the model to be done
            with trio.move_on_after(POLL_MAX):
                payload = await self._results.receive()
            if payload is None and self._gave_up_on_result():
                return self._stale_payload
        return payload

    def _gave_up_on_result(self) -> bool:
        stamped = self._stdout
        assert stamped is not None
        nothing_routed = self._results.statistics().current_buffer_used == 0
        return nothing_routed and self._back_to_reading(stamped)

    async def catch_up(self) -> None:
        """Let the model finish printing before it gets its next request.

        Called after a result: what the model prints meanwhile is read, so a second
        result is seen as the stray it is (`out_of_step`) instead of answering the next
        request. A model seen waiting in a read of its stdin (`waits_visibly`) is done
        once it is blocked there again with nothing left in its stdout: a model that
        sleeps, or is held up writing a flood, is not, however long it is blocked. For
        any other model, the rule of QUIET_PERIOD: nothing left in its stdout, no line
        half-written, and either blocked (in anything) or silent for QUIET_PERIOD; with
        an id field, only what is already in the pipe is read, since a stray result
        cannot pass for another's; one that keeps printing goes on after CATCH_UP_MAX
        unless it prints faster than its output budget allows. A model that is not done
        within --timeout is `hung`.
        """
        timeout = self._config.timeout
        start = trio.current_time()
        charged = self._budget.charged
        if self.stdout_ended.is_set() or self.out_of_step or self._caught_up(start, charged):
            return  # the common case, at the cost of a look or two
        polls = 0
        with self.cancel_on_trouble():  # a stray result, or the end of its output
            while not self._caught_up(start, charged):
                if trio.current_time() >= start + timeout:
                    what = "get back to reading its stdin" if self._waiting else "stop printing"
                    self.hung = f"did not {what} within {timeout:g} s of its answer"
                    return
                if polls < CATCH_UP_SPINS or (self._pending_output() and not self.throttled):
                    await trio.lowlevel.checkpoint()  # the pump reads what is there
                elif self._waiting is not None and await self._closed_stdin():
                    self.hung = "closed its stdin after its answer"
                    return
                else:
                    await trio.sleep(min(TICK * (polls - CATCH_UP_SPINS + 1), POLL_MAX))
                polls += 1

    def _caught_up(self, start: float, charged: tuple[int, int]) -> bool:
        """Whether the model, which answered at `start`, may get its next request."""
        stamped = self._stdout
        assert stamped is not None
        if self._waiting is not None:
            return self._back_to_reading(stamped)
        quiet = 0.0 if self._config.id_field is not None else QUIET_PERIOD
        if self._quiet(stamped, quiet) and not self.throttled:
            return True
        return self._released(start, trio.current_time(), charged)

    async def _closed_stdin(self) -> bool:
        """Whether the model, still alive, has closed its end of the pipe of its requests.

        It can never get back to reading then. Our end of the pipe tells (POLLERR: no
        reader is left); an exit closes it too, so a model gets CLOSED_STDIN_GRACE to
        show it is exiting (its stdout ends) before it is taken for alive.
        """
        stdin = self.proc.stdin
        assert stdin is not None
        poller = select.poll()
        try:
            poller.register(stdin.fileno(), select.POLLOUT)  # type: ignore[attr-defined]
        except (OSError, ValueError, trio.ClosedResourceError):
            return False
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        with trio.move_on_after(CLOSED_STDIN_GRACE):
            await self.stdout_ended.wait()
        return not (self.stdout_ended.is_set() or self._exited)

    def _released(self, start: float, now: float, charged: tuple[int, int]) -> bool:
        """A model whose waiting cannot be seen goes on printing after CATCH_UP_MAX if
        it does so within its output budget (`charged`: the budget's count at `start`)."""
        if now - start < CATCH_UP_MAX or self.throttled:
            return False
        return not self._budget.over_rate(charged, now - start)

    def _back_to_reading(self, stamped: _StampedStream) -> bool:
        """Blocked where it waits for requests, with everything it wrote read and routed.

        The output is looked at again after the system call: what the model wrote
        before it blocked is in the pipe by then.
        """
        if stamped.mid_line or self._pending_output():
            return False
        if procwatch.blocked_in(self.pid) != self._waiting:
            return False
        return not (stamped.mid_line or self._pending_output())

    def _quiet(self, stamped: _StampedStream, quiet: float) -> bool:
        """QUIET_PERIOD's rule, for a model whose waiting cannot be seen."""
        if self._pending_output():
            return False
        if not quiet:
            return True
        if stamped.mid_line:
            return False
        if trio.current_time() - stamped.last_data >= quiet:
            return True
        return not _running(self.pid) and not self._pending_output()

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
        self._stdout = _StampedStream(stdout, self._within_budget, self._charge)
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
            payload = line[len(RESULT_PREFIX) :]
            if self._sent_ids and (stale := self._stale_id(payload)) is not None:
                self._drop_stale(stale, payload)
            elif self._awaiting:
                self._awaiting = False
                self._results_send.send_nowait(payload)
            elif self.out_of_step is None:
                self.out_of_step = "printed a result when none was awaited"
                log.error("%s %s", self.name, self.out_of_step)
                self._log_output("stdout", _text(line))  # the line itself: the model's business
                self._cancel_trouble_scopes()
            return
        self._plain.add(line)
        if not self.ready:
            text = _text(line)
            self._log_output("stdout", text)
            if text.strip().startswith(self._config.ready_line):
                self.ready = True
                self._init_done.set()
        elif self._output_log.admits("stdout"):  # decoded only if logged: a flood costs less
            self._output_log.write("stdout", _text(line), self.request_id)

    def _stale_id(self, payload: bytes) -> str | None:
        """The id of an earlier request of this model's that a result carries, if it does.

        Only with --id-field. A result that holds the awaited id's text is taken for the
        answer without parsing it twice (parse_result checks it); any other is parsed
        for its id here.
        """
        if self._awaiting and self._wire_id is not None and self._wire_id.encode() in payload:
            return None
        assert self._config.id_field is not None
        got = result_id(payload, self._config.id_field)
        if not isinstance(got, str) or got not in self._sent_ids:
            return None
        if self._awaiting and got == self._wire_id:
            return None
        return got

    def _drop_stale(self, stale: str, payload: bytes) -> None:
        """A result for a request already answered (or failed): it answers nothing.

        While a result is awaited from a model seen waiting, the worker is told (a
        None, once), so it can tell when the model has given up on answering.
        """
        self.stale_results += 1
        if self.on_stale is not None:
            self.on_stale()
        if self._awaiting and self._waiting is not None:
            if not self._stale_payload:
                self._results_send.send_nowait(None)
            self._stale_payload = payload
        if self._awaiting:
            log.warning(
                "%s printed a stale result (id %s, of an earlier request) while awaiting "
                "the result of request %s (id %s); dropped",
                self.name,
                stale,
                self.request_id,
                self._wire_id,
            )
        else:
            log.warning(
                "%s printed a stale result (id %s, of an earlier request) while no result "
                "was awaited; dropped",
                self.name,
                stale,
            )

    def _log_output(self, stream: str, text: str) -> None:
        """A line the model printed: the model's business, logged at its stream's level
        (--model-stdout-level, --model-log-level) within the model's budget (see OutputLog)."""
        if self._output_log.admits(stream):
            self._output_log.write(stream, text, self.request_id)

    def _cancel_trouble_scopes(self) -> None:
        for scope in self._trouble_scopes:
            scope.cancel()

    async def _pump_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        reader = LineReader(
            _StampedStream(stderr, self._within_budget, self._charge), MAX_STDERR_LINE
        )
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

    async def _within_budget(self) -> None:
        """Before a pump reads more: hold off while the model is over its output budget.

        Not reading lets the pipe fill, so the model blocks on its own writes: a flood
        costs the service no more than the budget. A result awaited, or the model's
        exit, ends the wait at once.
        """
        while not (self._awaiting or self._exited):
            pause = self._budget.pause()
            if pause <= 0:
                return
            with trio.move_on_after(pause):
                await self._budget_waiters.park()

    def _charge(self, data: bytes | bytearray) -> None:
        """Count what a pump read against the budget, unless a result was awaited."""
        if not self._awaiting:
            self._budget.charge(len(data), data.count(b"\n"))

    async def _learn_waiting(self) -> None:
        """Learn what the model looks like while it waits for a request, once it is ready.

        That is the first time it is seen blocked with all it wrote read: if it is then
        in a read (procwatch.read_syscalls) of the very pipe its requests are written
        to, that system call and descriptor are what it looks like waiting, and
        `catch_up` waits for it to be back there after each answer. Blocked in anything
        else for LEARN_SETTLE (poll, epoll, select: an event loop; a main thread that
        waits for others), its waiting cannot be seen, and QUIET_PERIOD's rule is kept;
        it is still looked at until its first request or LEARN_MAX, since a model may
        sleep a while after its ready line before it reads.
        """
        try:
            await self._init_done.wait()
            if self.ready:
                self._waiting = await self._seen_waiting()
        finally:
            self._learned.set()
        if self._waiting is not None:
            log.debug("%s waits for requests in system call %d on fd %d", self.name, *self._waiting)
        elif self.ready and not self.stdout_ended.is_set():
            log.info(
                "%s waits for requests in a way that cannot be seen (not in a read of its "
                "stdin): a result it prints after a pause may answer its next request "
                "unless --id-field is set",
                self.name,
            )

    async def _seen_waiting(self) -> procwatch.Signature | None:
        """The model's signature blocked in a read of its stdin, if it is seen in one."""
        reads = await trio.to_thread.run_sync(procwatch.read_syscalls)
        stamped = self._stdout
        if not reads or stamped is None:
            return None
        start = trio.current_time()
        elsewhere_since: float | None = None
        polls = 0
        while self._learning and not self.stdout_ended.is_set():
            now = trio.current_time()
            if now - start >= LEARN_MAX:
                return None
            seen = None
            if not (stamped.mid_line or self._pending_output()):
                seen = procwatch.blocked_in(self.pid)
                if stamped.mid_line or self._pending_output():
                    seen = None  # it wrote before it blocked: not done yet
            if seen is None:
                elsewhere_since = None
            elif seen[0] in reads and procwatch.pipe_inode(self.pid, seen[1]) == self._stdin_inode:
                return seen
            elif elsewhere_since is None:
                elsewhere_since = now
            elif now - elsewhere_since >= LEARN_SETTLE:
                self._learned.set()  # its first request need not wait any longer
            if polls < CATCH_UP_SPINS:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(min(TICK * (polls - CATCH_UP_SPINS + 1), POLL_MAX))
            polls += 1
        return None

    async def _watch_exit(self) -> None:
        """When the model exits, kill what it left, and notice output that never ends.

        A helper may still hold the model's stdout, so its end would never come; the
        helpers die here, and what they and the model wrote is still read.
        """
        await self.proc.wait()
        self._exited = True  # what is left in its pipes is read at once
        self._budget_waiters.unpark_all()
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
    """A model's output that notes when bytes last came and whether a line is unfinished,
    and is read within the model's budget.

    What came last ends with a newline exactly when the line reader holds no partial
    line: so `mid_line` tells that the model is half-way through printing one.
    `within_budget` is awaited before each read, and `charge` given what was read.
    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        within_budget: Callable[[], Awaitable[None]],
        charge: Callable[[bytes | bytearray], None],
    ) -> None:
        self._stream = stream
        self._within_budget = within_budget
        self._charge = charge
        self.last_data = trio.current_time()
        self.mid_line = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._within_budget()
        data = await self._stream.receive_some(max_bytes)
        if data:
            self.last_data = trio.current_time()
            self.mid_line = not data.endswith(b"\n")
            self._charge(data)
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


class OutputBudget:
    """What a model may print while none of its results is awaited: two token buckets.

    Lines (each costs the pump some Python) and bytes (a long line costs copying), a
    burst of each and then a rate. Reading that costs well under a tenth of a core; past
    it, the pumps pause (`pause`) until the buckets refill. A debt is bounded by one
    burst, so even a chunk of one-byte lines holds the pumps back for a bounded time.
    """

    def __init__(self) -> None:
        self._lines = float(OUTPUT_BURST_LINES)
        self._bytes = float(OUTPUT_BURST_BYTES)
        self._refilled_at = time.monotonic()
        self.charged = (0, 0)  # lines and bytes charged so far

    def charge(self, size: int, lines: int) -> None:
        self.charged = (self.charged[0] + lines, self.charged[1] + size)
        self._refill()
        self._lines = max(self._lines - lines, -OUTPUT_BURST_LINES)
        self._bytes = max(self._bytes - size, -OUTPUT_BURST_BYTES)

    def over_rate(self, since: tuple[int, int], seconds: float) -> bool:
        """Whether what was charged after `since` (a `charged`) is more than the rates
        allow in `seconds`: the model prints faster than it may for long."""
        lines, size = self.charged[0] - since[0], self.charged[1] - since[1]
        return lines > OUTPUT_RATE_LINES * seconds or size > OUTPUT_RATE_BYTES * seconds

    def pause(self) -> float:
        """Seconds until both buckets are out of debt; 0 if they are."""
        self._refill()
        return max(-self._lines / OUTPUT_RATE_LINES, -self._bytes / OUTPUT_RATE_BYTES, 0.0)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self._refilled_at = now - self._refilled_at, now
        self._lines = min(self._lines + elapsed * OUTPUT_RATE_LINES, OUTPUT_BURST_LINES)
        self._bytes = min(self._bytes + elapsed * OUTPUT_RATE_BYTES, OUTPUT_BURST_BYTES)


class OutputLog:
    """What a model prints is its business: logged at its stream's level, at a bounded rate.

    Its stdout (start-up lines, the lines around its results) often echoes what it was
    asked, users' data, so it is logged at --model-stdout-level, DEBUG by default; its
    stderr (warnings, tracebacks: why it failed) at --model-log-level, INFO by default.

    Each line a model prints would otherwise cost a log record: under a flood of quick
    requests to a chatty model (model3.py prints three lines per request), logging
    them was the service's largest single cost. So each model may have LOG_BURST lines
    logged at once (its start-up, a traceback), and then `rate` a second on average
    (a token bucket). Lines past that are counted, not logged; the count is logged
    every DROPPED_REPORT_SECONDS while lines are being left out, and when the model
    ends. `rate` None logs every line. A model's last stderr lines are kept for failure
    reports whatever is logged.
    """

    def __init__(self, name: str, levels: dict[str, str], rate: int | None) -> None:
        self._name = name
        names = logging.getLevelNamesMapping()
        self._levels = {stream: names[level] for stream, level in levels.items()}
        self._rate = rate
        self._tokens = float(LOG_BURST)
        self._refilled_at = time.monotonic()
        self._dropped = 0  # lines left out since the last report
        self._dropped_since = 0.0  # when the first of them was
        self._dropped_level = logging.DEBUG  # the highest level of a line left out

    def admits(self, stream: str) -> bool:
        """Whether the next line on `stream` is to be logged; one that is not is counted.

        A line its stream's level keeps out of the log costs nothing, and is not counted.
        """
        level = self._levels[stream]
        if not log.isEnabledFor(level):
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
            self._dropped_level = level
        self._dropped += 1
        self._dropped_level = max(self._dropped_level, level)
        return False

    def write(self, stream: str, text: str, request_id: str | None) -> None:
        """Log one line that was admitted."""
        extra = {"stream": stream}
        if request_id is not None:
            extra["request_id"] = request_id
        log.log(self._levels[stream], "%s %s: %s", self._name, stream, text, extra=extra)

    def report_dropped(self) -> None:
        """Log how many lines were left out since the last report, if any were: at the
        highest level of those lines, so the count is seen wherever one of them would be."""
        if self._dropped:
            log.log(
                self._dropped_level,
                "%s: %d lines it printed in %.0f s were not logged (over --model-log-rate %s)",
                self._name,
                self._dropped,
                time.monotonic() - self._dropped_since,
                self._rate,
            )
            self._dropped = 0


def model_environment(config: PoolConfig, token: str, device: str | None = None) -> dict[str, str]:
    """The service's environment minus its own settings, plus the model's token and device.

    MODELPOOL_* variables are the service's business (one may hold the API key); a
    model, which is untrusted, gets none of them but its own: its token and, with
    --devices, MODELPOOL_DEVICE (see devices.py; `device` None is a template's, which
    gets none). PYTHONUNBUFFERED makes a Python model that prints with plain print()
    heard at once.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_VARIABLES)}
    env.update(config.env or {})
    env["PYTHONUNBUFFERED"] = "1"
    env[TOKEN_VAR] = token
    for key, value in devices.variables(config, device).items():
        env.pop(key, None)  # last, in order: a forked child rewrites them (_launcher.py)
        env[key] = value
    return env


@asynccontextmanager
async def open_model(
    config: PoolConfig,
    name: str,
    reaper: Reaper,
    starter: ModelStarter | None = None,
    token: str | None = None,
    takes_requests: bool = True,
    device: str | None = None,
) -> AsyncIterator[ModelProcess]:
    """Start a model (spawned, unless `starter` says otherwise); on the way out, close its
    stdin, give it `exit_grace`, then kill it. `token`: its containment token, if not a
    new one (a preload template's has room for its children's, see preload.py).
    `takes_requests` False (a preload template): how it waits between requests is not
    learned, since it gets none.
    `device`: its worker's, with --devices."""
    token = token or reaper.new_token()
    starter = starter or Spawner(reaper)
    env = model_environment(config, token, device)
    proc = await starter.start(config, name, token, env)
    logs.set_field("pid", proc.pid)  # for this task's log lines and those of the pumps
    model = ModelProcess(proc, config, name, reaper, token)
    model.env = env
    how = " (forked from its template)" if proc.method == "fork" else ""
    log.info("%s started%s: %s", model.name, how, " ".join(config.model_cmd))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model._pump_stdout)
            nursery.start_soon(model._pump_stderr)
            nursery.start_soon(model._watch_exit)
            if takes_requests:
                nursery.start_soon(model._learn_waiting)
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
