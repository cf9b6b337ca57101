"""The keep-alive timer of one client connection (listener.py runs one per connection).

An idle HTTP/1.1 connection is closed after --keep-alive-timeout, and at once when the
service stops while it is idle; one with a request in progress is not, until that
request has ended. A connection in its lingering close (listener.py) is closed at once
when the service stops, as an idle one is.

A request that has come but has not been read yet is in progress too. When the deadline
and a request come in the same turn of the loop (the request just in time, or both
while the loop was held up), the timer may run before the connection's reading task:
it closed the connection then, with the request unread, and its client, which had sent
it within the timeout, got a reset instead of an answer. So at its deadline the timer
first looks whether the socket holds something unread, and if so lets the reading task
take it (`_unread`).
"""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from math import inf
from typing import TYPE_CHECKING

import trio

from modelpool.core._trio import CLOSED

if TYPE_CHECKING:
    from modelpool.http._hypercorn import WorkerEvent

UNREAD_GRACE = 0.05  # seconds the reading task gets to take what came at the deadline


class KeepAliveTimer:
    """hypercorn's keep-alive timer for one connection, without a task per request.

    hypercorn times an idle connection with a task it starts (`nursery.start`) each time
    a request ends, and cancels when the next begins: the write that ends every answer
    waited a turn of the scheduler for that task to start. Here one task sleeps until the
    connection has been idle for `timeout`, or the worker is told to end while it is idle
    (`terminated`), and then runs `close`; a request moves its deadline (`busy`, `idle`).
    """

    def __init__(
        self, timeout: float, terminated: WorkerEvent, fileno: Callable[[], int] | None = None
    ) -> None:
        self._timeout = timeout
        self._terminated = terminated
        self._fileno = fileno  # the connection's socket (CLOSED once closed): see `_unread`
        self._idle = False
        self._deadline = inf
        self._waiting: trio.CancelScope | None = None
        self._now_idle: trio.Event | None = None
        self._task = trio.CancelScope()

    def idle(self) -> None:
        """A request has ended (or none has begun): close after `timeout` unless one begins."""
        self._idle = True
        self._deadline = trio.current_time() + self._timeout
        if self._waiting is not None:
            self._waiting.deadline = self._deadline
        if self._now_idle is not None:
            self._now_idle.set()

    def busy(self) -> None:
        """A request has begun: no deadline until it ends. (The deadline set may still
        pass during a long request: the task then sees it busy, and waits for its end.)"""
        self._idle = False
        self._deadline = inf

    def closing(self) -> None:
        """The connection is closing, and waits only on its client (a lingering close,
        which bounds itself): no timeout of ours, but it is closed at once if the worker
        is told to end, as an idle connection is."""
        self._idle = True
        self._deadline = inf
        if self._waiting is not None:
            self._waiting.deadline = inf
        if self._now_idle is not None:
            self._now_idle.set()

    def end(self) -> None:
        """The connection is ending anyway: the timer's task ends."""
        self._task.cancel()

    async def run(self, close: Callable[[], Awaitable[object]]) -> None:
        with self._task:
            while True:
                with trio.CancelScope(deadline=self._deadline) as self._waiting:
                    await self._terminated.wait()
                self._waiting = None
                if self._idle:  # idle for `timeout`, or the worker ends
                    if self._terminated.is_set() or not self._unread():
                        break
                    await trio.sleep(UNREAD_GRACE)  # a request came just now: read it first
                    continue
                self._now_idle = trio.Event()  # a request is under way: wait for its end
                await self._now_idle.wait()
                self._now_idle = None
        if not self._task.cancel_called:
            with trio.CancelScope(shield=True):
                await close()

    def _unread(self) -> bool:
        """Whether the client has sent what has not been read yet (a request, or its end)."""
        fileno = CLOSED if self._fileno is None else self._fileno()
        if fileno == CLOSED:
            return False
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
