"""A --preload template that cannot be forked, lent to a worker as its plain model.

A template found unsafe to fork (a thread pool started in C while it loads; a thread or
a socket at its fork point) was once killed, and its generation's models started
plainly: its load was thrown away, so the pool was 4/4 ready later than plain starts
would have made it. Now the launcher makes it a plain model instead, with the thread
budget a plain start has (see _launcher.py), and the first worker to start takes it:
one load fewer, and the others load beside it.

The template's task keeps the process's context (its pumps run in that task's nursery,
see model.open_model), so the worker borrows the model: `Lending.take` hands it over,
and when the worker is done with it the template's task stops it, while the worker
waits for that, as it waits for a model of its own to stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from modelpool.process.modelprocess import ModelProcess

TAKE_WAIT = 5.0  # seconds a worker has to take a lent template before it is stopped


class Lending:
    """One template process, lent to the first worker that starts a model."""

    def __init__(self, model: ModelProcess) -> None:
        self.model = model
        self.borrower: str | None = None  # the worker that took it
        self._decided = trio.Event()  # taken, or withdrawn
        self._returned = trio.Event()  # its worker is done with it
        self._closed = trio.Event()  # its template's task has stopped it

    def take(self, name: str) -> AbstractAsyncContextManager[ModelProcess] | None:
        """The model, for the worker `name` while the context lasts; None if it is taken
        or withdrawn already."""
        if self._decided.is_set():
            return None
        self.borrower = name
        self._decided.set()
        return self._use(name)

    def withdraw(self) -> None:
        """No worker may take it from now on (its template stops)."""
        self._decided.set()

    async def lend(self, wait: float = TAKE_WAIT) -> None:
        """In the template's task, in its model's context: return once the worker that
        took the model is done with it, or after `wait` seconds if none took it.

        Shielded: a model taken is its worker's, which the template's stop (a reload
        that retires it) must not cut short; the worker ends it."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(wait):
                await self._decided.wait()
            self._decided.set()
            if self.borrower is not None:
                await self._returned.wait()

    def closed(self) -> None:
        """Its template's task has stopped the model: its worker may go on."""
        self._decided.set()
        self._closed.set()

    @asynccontextmanager
    async def _use(self, name: str) -> AsyncIterator[ModelProcess]:
        self.model.adopt(name)
        try:
            yield self.model
        finally:
            self._returned.set()
            with trio.CancelScope(shield=True):
                await self._closed.wait()
