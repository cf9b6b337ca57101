"""When a model may get its next request: once it has said all it had to say.

A model that answers twice does it with two print() calls, two write(2)s, and the second
line, read after the next request was sent, would answer that one. So after each
answer the worker lets the model finish printing (`Pacer.catch_up`): until it is back
to reading its stdin, where Linux shows that (procwatch.py), or else for a quiet period
(QUIET_PERIOD). What the model looks like while it waits for a request is learned once,
after its ready line and before its first request (`Pacer.learn`).
"""

from __future__ import annotations

import logging
import os
import select
from contextlib import AbstractContextManager
from typing import Protocol

import trio

from modelpool.process import procfs, procwatch
from modelpool.process.output import OutputBudget, StampedStream
from modelpool.settings.config import PoolConfig

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
is back there (see `Pacer.catch_up`).
"""
CATCH_UP_MAX = 0.02  # seconds a model that keeps printing after its answer holds its worker
POLL_MAX = 0.01  # longest pause between two looks at a model that is not back to reading
LEARN_SETTLE = 0.05
"""Seconds a model seen blocked elsewhere than in a read of its stdin must stay so to be
taken for one whose waiting cannot be seen (an event loop), before its first request."""
LEARN_MAX = 2.0  # seconds after the ready line that what the model looks like waiting is learned
CLOSED_STDIN_GRACE = 0.1  # seconds a model whose stdin is closed gets to show it is exiting
CATCH_UP_SPINS = 50  # scheduler rounds spent watching the model block before sleeping
TICK = 0.001  # trio's timer resolution: a shorter sleep lasts as long

log = logging.getLogger("modelpool.model")


class Paced(Protocol):
    """What a `Pacer` looks at of its model (a `ModelProcess`)."""

    @property
    def pid(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool:
        """Whether it printed its ready line."""

    @property
    def out_of_step(self) -> str | None:
        """Why, once it printed a result nobody awaited."""

    @property
    def exited(self) -> bool: ...

    @property
    def throttled(self) -> bool:
        """Whether its output is over budget, so the pumps hold off reading it."""

    @property
    def stdout_ended(self) -> trio.Event: ...

    @property
    def init_done(self) -> trio.Event:
        """Set once it printed its ready line, or its stdout ended first."""

    @property
    def stamped(self) -> StampedStream | None:
        """Its stdout as the pump reads it, once the pump runs."""

    @property
    def budget(self) -> OutputBudget: ...

    def pending_output(self) -> int:
        """Bytes (or a whole line) it printed that the pump has not routed yet."""

    def cancel_on_trouble(self) -> AbstractContextManager[trio.CancelScope]:
        """A scope cancelled once its output ends or goes out of step."""


class Pacer:
    """What a model looks like while it waits for a request, and whether it is back there.

    `waiting`: the system call and descriptor it was seen blocked in, reading the pipe
    its requests come through (`stdin`); None if it was not (its waiting cannot be
    seen, and QUIET_PERIOD's rule is kept).
    """

    def __init__(self, model: Paced, stdin: trio.lowlevel.FdStream, config: PoolConfig) -> None:
        self.waiting: procfs.Signature | None = None
        self._model = model
        self._stdin = stdin
        self._stdin_inode = os.fstat(stdin.fileno()).st_ino
        self._config = config
        self._learned = trio.Event()  # set once the first request need not wait to learn it
        self._learning = True  # until the first request is sent

    async def before_first_request(self) -> None:
        """The first request waits (LEARN_SETTLE, at most LEARN_MAX) for `learn`."""
        if self._learning:
            await self._learned.wait()
            self._learning = False

    async def catch_up(self) -> str | None:
        """Let the model finish printing before it gets its next request; why it is hung
        if it does not within the timeout, else None.

        Called after a result: what the model prints meanwhile is read, so a second
        result is seen as the stray it is (`out_of_step`) instead of answering the next
        request. A model seen waiting in a read of its stdin (`waiting`) is done
        once it is blocked there again with nothing left in its stdout: a model that
        sleeps, or is held up writing a flood, is not, however long it is blocked. For
        any other model, the rule of QUIET_PERIOD: nothing left in its stdout, no line
        half-written, and either blocked (in anything) or silent for QUIET_PERIOD; with
        an id field, only what is already in the pipe is read, since a stray result
        cannot pass for another's; one that keeps printing goes on after CATCH_UP_MAX
        unless it prints faster than its output budget allows.
        """
        model = self._model
        timeout = self._config.timeout
        start = trio.current_time()
        charged = model.budget.charged
        if model.stdout_ended.is_set() or model.out_of_step:
            return None  # the common case, at the cost of a look or two
        if self._caught_up(start, charged):
            return None
        polls = 0
        with model.cancel_on_trouble():  # a stray result, or the end of its output
            while not self._caught_up(start, charged):
                if trio.current_time() >= start + timeout:
                    what = "get back to reading its stdin" if self.waiting else "stop printing"
                    return f"did not {what} within {timeout:g} s of its answer"
                if polls < CATCH_UP_SPINS or (model.pending_output() and not model.throttled):
                    await trio.lowlevel.checkpoint()  # the pump reads what is there
                elif self.waiting is not None and await self._closed_stdin():
                    return "closed its stdin after its answer"
                else:
                    await trio.sleep(min(TICK * (polls - CATCH_UP_SPINS + 1), POLL_MAX))
                polls += 1
        return None

    def _caught_up(self, start: float, charged: tuple[int, int]) -> bool:
        """Whether the model, which answered at `start`, may get its next request."""
        stamped = self._model.stamped
        assert stamped is not None
        if self.waiting is not None:
            return self.back_to_reading()
        quiet = 0.0 if self._config.id_field is not None else QUIET_PERIOD
        if self._quiet(stamped, quiet) and not self._model.throttled:
            return True
        return self._released(start, trio.current_time(), charged)

    async def _closed_stdin(self) -> bool:
        """Whether the model, still alive, has closed its end of the pipe of its requests.

        It can never get back to reading then. Our end of the pipe tells (POLLERR: no
        reader is left); an exit closes it too, so a model gets CLOSED_STDIN_GRACE to
        show it is exiting (its stdout ends) before it is taken for alive.
        """
        model = self._model
        poller = select.poll()
        try:
            poller.register(self._stdin.fileno(), select.POLLOUT)
        except (OSError, ValueError, trio.ClosedResourceError):
            return False
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        with trio.move_on_after(CLOSED_STDIN_GRACE):
            await model.stdout_ended.wait()
        return not (model.stdout_ended.is_set() or model.exited)

    def _released(self, start: float, now: float, charged: tuple[int, int]) -> bool:
        """A model whose waiting cannot be seen goes on printing after CATCH_UP_MAX if
        it does so within its output budget (`charged`: the budget's count at `start`)."""
        if now - start < CATCH_UP_MAX or self._model.throttled:
            return False
        return not self._model.budget.over_rate(charged, now - start)

    def back_to_reading(self) -> bool:
        """Blocked where it waits for requests, with everything it wrote read and routed.

        The output is looked at again after the system call: what the model wrote
        before it blocked is in the pipe by then.
        """
        model = self._model
        stamped = model.stamped
        assert stamped is not None
        if stamped.mid_line or model.pending_output():
            return False
        if procfs.blocked_in(model.pid) != self.waiting:
            return False
        return not (stamped.mid_line or model.pending_output())

    def _quiet(self, stamped: StampedStream, quiet: float) -> bool:
        """QUIET_PERIOD's rule, for a model whose waiting cannot be seen."""
        model = self._model
        if model.pending_output():
            return False
        if not quiet:
            return True
        if stamped.mid_line:
            return False
        if trio.current_time() - stamped.last_data >= quiet:
            return True
        return not procfs.is_running(model.pid) and not model.pending_output()

    async def learn(self) -> None:
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
        model = self._model
        try:
            await model.init_done.wait()
            if model.ready:
                self.waiting = await self._seen_waiting()
        finally:
            self._learned.set()
        if self.waiting is not None:
            log.debug("%s waits for requests in system call %d on fd %d", model.name, *self.waiting)
        elif model.ready and not model.stdout_ended.is_set():
            log.info(
                "%s waits for requests in a way that cannot be seen (not in a read of its "
                "stdin): a result it prints after a pause may answer its next request "
                "unless --id-field is set",
                model.name,
            )

    async def _seen_waiting(self) -> procfs.Signature | None:
        """The model's signature blocked in a read of its stdin, if it is seen in one."""
        model = self._model
        reads = await trio.to_thread.run_sync(procwatch.read_syscalls)
        stamped = model.stamped
        if not reads or stamped is None:
            return None
        start = trio.current_time()
        elsewhere_since: float | None = None
        polls = 0
        while self._learning and not model.stdout_ended.is_set():
            now = trio.current_time()
            if now - start >= LEARN_MAX:
                return None
            seen = None
            if not (stamped.mid_line or model.pending_output()):
                seen = procfs.blocked_in(model.pid)
                if stamped.mid_line or model.pending_output():
                    seen = None  # it wrote before it blocked: not done yet
            if seen is None:
                elsewhere_since = None
            elif seen[0] in reads and procfs.pipe_inode(model.pid, seen[1]) == self._stdin_inode:
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
