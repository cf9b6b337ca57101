"""What the kernel tells of a model between its requests, without asking the model:
whether a SIGKILL is pending for it, what it printed that we have not read, and what we
wrote to it that it has not read.

Each is a system call or two (a read of its /proc stat kept open, FIONREAD on one end of
a pipe), cheap enough for every request: the worker asks before it writes a request (a
model being killed must not be sent one), while it waits for the model to catch up
(pacing.py), and after a failure (did the model get the request?).
"""

from __future__ import annotations

import array
import fcntl
import os
import termios

import trio

from modelpool.process import procfs
from modelpool.process.lines import LineReader
from modelpool.process.starter import ModelHandle


class Probes:
    """The probes of one model process; `close()` once it is reaped."""

    def __init__(self, proc: ModelHandle) -> None:
        self._proc = proc
        self._stat = procfs.open_stat(proc.pid)  # read before each request

    def kill_pending(self) -> bool:
        """Whether it was sent a SIGKILL that it has not run yet.

        A model killed while it waits in a read of its stdin is woken to die, but until
        it runs, the read is not over: a request written then is read, by the kernel,
        into a process that will never see it, and only its pending SIGKILL tells.
        """
        return self._stat is not None and procfs.kill_pending(self._stat)

    def pending_output(self, reader: LineReader | None) -> int:
        """Whether what it printed is not all routed: a whole line buffered in `reader`
        (1), or the bytes in its stdout pipe (FIONREAD)."""
        if reader is not None and reader.has_line():
            return 1
        return _unread(self._proc.stdout)

    def unread_input(self) -> int:
        """Bytes written to its stdin that it has not read: FIONREAD on our end of the
        pipe, which Linux answers also once the model is dead (the pipe lives while we
        hold that end). What a model left unread, not when it died, tells whether it got
        a request: a big process takes milliseconds to die after SIGKILL (its memory is
        freed before its files are closed), so a request written meanwhile goes in, and
        only the read of its answer sees the model gone."""
        return _unread(self._proc.stdin)

    def close(self) -> None:
        """It is reaped: let go of what was kept open to look at it."""
        if self._stat is not None:
            os.close(self._stat)
            self._stat = None


def _unread(stream: trio.lowlevel.FdStream) -> int:
    pending = array.array("i", [0])
    try:
        fcntl.ioctl(stream.fileno(), termios.FIONREAD, pending)
    except (OSError, trio.ClosedResourceError):
        return 0
    return pending[0]
