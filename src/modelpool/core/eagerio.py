"""Reads and writes that try the system call first, and wait only if it would block.

trio makes every read and write a checkpoint: a pipe's `receive_some` yields to the
scheduler before it reads, and a socket's `send_all` after it writes. That is a turn
of the whole run loop (an epoll_wait and every other runnable task) per call, and a
prediction makes several: its request read from the client, its line written to the
model, the model's output read back (a few writes of its own), its answer written to
the client. At a thousand requests a second those turns were a good part of each
request's time.

These do the call at once when it cannot block, and fall back to trio's waiting only
when it would. Fairness is kept where it matters: a reader reads at most twice between
two turns of the scheduler (after a wait, once without; then it yields first, as trio
does), so a stream that always has data cannot keep the loop to itself; a writer that
wrote everything at once returns, since its caller waits for something next anyway.

The descriptor is looked up at each call (`fileno()`), as trio's streams do: a stream
closed meanwhile gives `CLOSED` (core/_trio.py), and ClosedResourceError, never a read of
a reused number.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import trio

from modelpool.core._trio import CLOSED


def _error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("file was already closed")
    return trio.BrokenResourceError(str(exc))


def write_now(fileno: int, data: bytes | memoryview) -> int:
    """Write what the descriptor takes at once, without waiting: how many bytes it took.

    ClosedResourceError if it is closed, BrokenResourceError if its reader is gone.
    """
    if fileno == CLOSED:
        raise trio.ClosedResourceError("file was already closed")
    try:
        return os.write(fileno, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _error(exc) from exc


class EagerReader:
    """`receive_some` on a non-blocking descriptor (a pipe, a socket), trying the read
    before it waits; `fileno` gives the descriptor, `CLOSED` once it is closed."""

    def __init__(self, fileno: Callable[[], int], max_bytes: int) -> None:
        self._fileno = fileno
        self._max_bytes = max_bytes
        self._waited = False  # whether the last read waited (and so let others run)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """What came, b"" at its end; ClosedResourceError, BrokenResourceError."""
        if not self._waited:
            await trio.lowlevel.checkpoint()
        self._waited = False
        size = self._max_bytes if max_bytes is None else max_bytes
        while True:
            fileno = self._fileno()
            if fileno == CLOSED:
                raise trio.ClosedResourceError("file was already closed")
            try:
                return os.read(fileno, size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fileno)
                self._waited = True
            except OSError as exc:
                raise _error(exc) from exc
