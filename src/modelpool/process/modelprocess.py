"""`ModelProcess`: one running model, its pumps, and what is known of it (see model.py).

Its parts are modules of their own: the wait for its ready line and the notices of a
slow load (loading.py); what it prints, read within a budget and logged at a bounded
rate (output.py); its stderr, read by a pump that keeps its last lines (stderr.py); its
result lines, routed or dropped as stale (results.py); what the kernel tells of it
between requests (probes.py); and when it may get its next request (pacing.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from modelpool.core.eagerio import write_now
from modelpool.core.errors import ModelFailed
from modelpool.process.failures import failure_of
from modelpool.process.lines import LineReader, LineTooLong
from modelpool.process.loading import Loading
from modelpool.process.output import (
    RESULT_PREFIX,
    OutputBudget,
    OutputLog,
    PlainLines,
    StampedStream,
    text,
)
from modelpool.process.pacing import Pacer
from modelpool.process.probes import Probes
from modelpool.process.reaper import Reaper
from modelpool.process.results import Results
from modelpool.process.starter import ModelHandle
from modelpool.process.stderr import StderrPump
from modelpool.settings.config import PoolConfig

EXIT_WAIT = 2.0  # how long a model whose output ended gets to exit before it is killed
PUMP_DRAIN = 1.0  # how long the pumps get to read what a dead model left in its pipes

log = logging.getLogger("modelpool.model")


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
        self.request_id: str | None = None  # the request it computes, for its output's log
        self.stdout_ended = trio.Event()
        self.init_done = trio.Event()  # its ready line came, or its stdout ended first
        self.exited = False
        self.env: dict[str, str] = {}  # the environment it was started with
        self.budget = OutputBudget()
        self.stamped: StampedStream | None = None  # its stdout, once the pump reads it
        self._config = config
        self._reaper = reaper
        self._token = token
        self._results = Results(self.name, config.id_field)
        self._pacer = Pacer(self, proc.stdin, config)
        self._budget_waiters = trio.lowlevel.ParkingLot()
        self._reader: LineReader | None = None
        self._probes = Probes(proc)  # asked before each request (see send)
        self._trouble_scopes: set[trio.CancelScope] = set()
        self._nursery: trio.Nursery | None = None  # where its tasks run (start_tasks)
        self._plain = PlainLines()  # stdout lines that were no result, for failure messages
        self._loading = Loading(config, self._plain)
        self._output_log = OutputLog(
            name=self.name,
            levels={"stdout": config.model_stdout_level, "stderr": config.model_log_level},
            rate=config.model_log_rate,
        )
        self._stderr = StderrPump(self.name, config.stderr_tail, self._log_output)
        self.stderr_ended = self._stderr.ended
        if self.ready:
            self.init_done.set()

    def start_tasks(self, nursery: trio.Nursery, takes_requests: bool) -> None:
        """Start its pumps and the watch for its exit; with `takes_requests`, learn how
        it waits between requests (see pacing.py)."""
        self._nursery = nursery
        nursery.start_soon(self._pump_stdout)
        nursery.start_soon(self._pump_stderr)
        nursery.start_soon(self._watch_exit)
        if takes_requests:
            nursery.start_soon(self._pacer.learn)

    def adopt(self, name: str) -> None:
        """A --preload template that cannot be forked becomes a worker's model (see
        template.py): it goes by the worker's `name` from now on, and takes requests."""
        self.name = f"{name} [pid {self.pid}]"
        for part in (self._results, self._output_log, self._stderr):
            part.rename(self.name)
        if self._nursery is not None:
            self._nursery.start_soon(self._pacer.learn)

    async def drain(self) -> None:
        """Once it is dead: give the pumps PUMP_DRAIN to read what it left in its pipes,
        and log how many of its lines were left out of the log."""
        with trio.move_on_after(PUMP_DRAIN):
            await self.stdout_ended.wait()
            await self.stderr_ended.wait()
        self._output_log.report_dropped()

    # -- talking to the model -------------------------------------------------------

    async def wait_ready(self) -> None:
        """Return once the model printed its ready line; raise StartFailed otherwise
        (see loading.py, which also tells the log of a slow load)."""
        await self._loading.wait_ready(self)

    def missing_result(self, quote: bool) -> str:
        """For a request with no result: what the model printed on stdout instead, if
        anything; with `quote`, the last such line (see `PlainLines.instead_of_result`)."""
        return self._plain.instead_of_result(quote)

    @property
    def waits_visibly(self) -> bool:
        """Whether the model was seen waiting for requests in a read of its stdin."""
        return self._pacer.waiting is not None

    @property
    def idle_output(self) -> tuple[int, int]:
        """Lines and bytes read from it while none of its results was awaited."""
        return self.budget.charged

    @property
    def throttled(self) -> bool:
        """Whether its output is over budget: the pumps hold off reading it for now."""
        return not (self._results.awaiting or self.exited) and self.budget.pause() > 0

    @property
    def stale_results(self) -> int:
        """Results with an earlier request's id, dropped."""
        return self._results.stale_results

    @property
    def on_stale(self) -> Callable[[], None] | None:
        """Called for each stale result."""
        return self._results.on_stale

    @on_stale.setter
    def on_stale(self, callback: Callable[[], None] | None) -> None:
        self._results.on_stale = callback

    def expect_result(self, wire_id: str | None = None) -> None:
        """The next result line answers the request about to be sent; only that one.

        `wire_id` is the id it is sent with (--id-field): a result that carries the id
        of one of the model's earlier requests is stale, and dropped.
        """
        self._results.expect(wire_id)
        self._plain.restart()
        self._budget_waiters.unpark_all()  # an awaited result is never held back

    async def send(self, line: bytes) -> None:
        """Write one request line; trio.BrokenResourceError if the model is gone, or dying.

        The first waits (LEARN_SETTLE, at most LEARN_MAX) to learn what the model looks
        like between requests, see `Pacer.learn`.

        A model being killed must not get it: a SIGKILL it has not run yet is looked
        for first (a few microseconds, see probes.py); once the model runs its exit,
        what it left unread tells (`unread_input`).
        """
        await self._pacer.before_first_request()
        if self._probes.kill_pending():
            raise trio.BrokenResourceError("model is being killed")
        stdin = self.proc.stdin
        try:
            # at once, when the pipe has room (core/eagerio.py); else the rest, waiting
            sent = write_now(stdin.fileno(), line)
            if sent < len(line):
                await stdin.send_all(line[sent:])  # a copy, when the model is behind
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("model stdin is closed") from exc

    async def receive_result(self) -> bytes:
        """The awaited result; trio.EndOfChannel once the model's output ended.

        A model seen waiting (`waits_visibly`) that printed a stale result instead of
        one for this request, and then went back to reading with nothing else printed,
        will print no other: that stale result is taken for its answer, which
        parse_result refuses for its id (502) instead of the request timing out.
        """
        return await self._results.receive(self._pacer.back_to_reading)

    async def catch_up(self) -> None:
        """Let the model finish printing before it gets its next request (see
        `Pacer.catch_up`). A model that is not done within --timeout is `hung`."""
        hung = await self._pacer.catch_up()
        if hung is not None:
            self.hung = hung

    def pending_output(self) -> int:
        """Whether what it printed is not all routed (see `Probes.pending_output`)."""
        return self._probes.pending_output(self._reader)

    def unread_input(self) -> int:
        """Bytes written to its stdin that it has not read (see `Probes.unread_input`)."""
        return self._probes.unread_input()

    def close(self) -> None:
        """It is reaped: let go of what was kept open to look at it."""
        self._probes.close()

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
        proc, tail = self.proc, self._stderr.tail()
        return failure_of(
            proc.returncode, proc.running, self.overflowed, self._config.max_line, tail
        )

    @property
    def stderr_tail(self) -> list[str]:
        """Its last stderr lines (--stderr-tail), oldest first."""
        return self._stderr.tail()

    def stderr_note(self) -> str:
        """For a failure's ERROR line: where its last stderr lines are (see stderr.py)."""
        return self._stderr.note()

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
            await self.proc.stdin.aclose()
            with trio.move_on_after(grace):
                await self.proc.wait()
            if self.proc.running:
                log.warning(
                    "%s did not exit within %g s of stdin closing; killing it", self.name, grace
                )
        await self.kill()

    async def _watch_exit(self) -> None:
        """When the model exits, kill what it left, and notice output that never ends.

        A helper may still hold the model's stdout, so its end would never come; the
        helpers die here, and what they and the model wrote is still read.
        """
        await self.proc.wait()
        self.exited = True  # what is left in its pipes is read at once
        self._budget_waiters.unpark_all()
        self.kill_group()
        await self._reaper.kill_leftovers(self._token)
        with trio.move_on_after(EXIT_WAIT):
            await self.stdout_ended.wait()
        if not self.stdout_ended.is_set():
            log.warning("%s exited but its stdout is still open; closing it", self.name)
            await self.proc.stdout.aclose()

    # -- pumps ----------------------------------------------------------------------

    async def _pump_stdout(self) -> None:
        self.stamped = StampedStream(self.proc.stdout, self._within_budget, self._charge)
        self._reader = reader = LineReader(self.stamped, self._config.max_line)
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
            self.init_done.set()
            self._results.close()
            self._cancel_trouble_scopes()

    def _on_stdout_line(self, line: bytes) -> None:
        """Route one line; never awaits, so lines are handled in the order they came."""
        if self.ready and line.startswith(RESULT_PREFIX):
            payload = line[len(RESULT_PREFIX) :]
            taken = self._results.route(payload, self.waits_visibly, self.request_id)
            if not taken and self.out_of_step is None:
                self.out_of_step = "printed a result when none was awaited"
                log.error("%s %s", self.name, self.out_of_step)
                self._log_output("stdout", text(line))  # the line itself: the model's business
                self._cancel_trouble_scopes()
            return
        self._plain.add(line)
        if not self.ready:
            said = text(line)
            self._log_output("stdout", said)
            if said.strip().startswith(self._config.ready_line):
                self.ready = True
                self.init_done.set()
        elif self._output_log.admits("stdout"):  # decoded only if logged: a flood costs less
            self._output_log.write("stdout", text(line), self.request_id)

    def _log_output(self, stream: str, line: str) -> None:
        """A line the model printed: the model's business, logged at its stream's level
        (--model-stdout-level, --model-log-level) within the model's budget (see OutputLog)."""
        self._loading.saw(stream, line)  # for the notices of a slow start (loading.py)
        if self._output_log.admits(stream):
            self._output_log.write(stream, line, self.request_id)

    def _cancel_trouble_scopes(self) -> None:
        for scope in self._trouble_scopes:
            scope.cancel()

    async def _pump_stderr(self) -> None:
        await self._stderr.run(StampedStream(self.proc.stderr, self._within_budget, self._charge))

    async def _within_budget(self) -> None:
        """Before a pump reads more: hold off while the model is over its output budget.

        Not reading lets the pipe fill, so the model blocks on its own writes: a flood
        costs the service no more than the budget. A result awaited, or the model's
        exit, ends the wait at once.
        """
        while not (self._results.awaiting or self.exited):
            pause = self.budget.pause()
            if pause <= 0:
                return
            with trio.move_on_after(pause):
                await self._budget_waiters.park()

    def _charge(self, data: bytes | bytearray) -> None:
        """Count what a pump read against the budget, unless a result was awaited."""
        if not self._results.awaiting:
            self.budget.charge(len(data), data.count(b"\n"))
