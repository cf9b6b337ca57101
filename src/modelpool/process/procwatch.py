"""Whether a model is blocked reading its stdin, as Linux shows it in /proc.

A model that has said all it had to say is blocked reading the pipe its requests come
through; one that merely sleeps, or waits for a helper, is blocked too, but elsewhere.
/proc/PID/syscall tells them apart: for a blocked task it shows the system call and
its arguments (the first being the file descriptor of a read), and "running" for a
task that runs. It needs the access ptrace needs (the same user, or root); where it
cannot be read, nothing is seen, and the caller keeps its older rule. The reads
themselves are procfs.py's (`blocked_in`, `pipe_inode`); this module knows what they mean.

System call numbers differ between architectures, so none is written here: the
numbers of read(2) and readv(2) are taken from a thread of this process blocked in
each (`read_syscalls`). That is how a read of stdin is told from, say, a C sleep(),
whose clock_nanosleep(CLOCK_REALTIME, ...) also has 0 for its first argument.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

from modelpool.process.procfs import blocked_in

CALIBRATE_MAX = 1.0  # seconds a thread of ours gets to block in a read


@functools.cache
def read_syscalls() -> frozenset[int]:
    """The numbers this kernel shows for read(2) and readv(2); empty if /proc tells nothing.

    Each is seen on a thread of this process blocked reading a pipe of its own, which
    is then written to so the thread ends. Blocking (a millisecond or so): run it in
    a thread, once; the answer is kept.
    """
    found = set()
    for read in (os.read, _readv):
        number = _observe(read)
        if number is not None:
            found.add(number)
    return frozenset(found)


def _readv(fd: int, size: int) -> int:
    return os.readv(fd, [bytearray(size)])


def _observe(read: Callable[[int, int], object]) -> int | None:
    """The system call number a thread blocked in `read(fd, 1)` on a pipe shows."""
    ours, theirs = os.pipe()
    tids: list[int] = []

    def reader() -> None:
        tids.append(threading.get_native_id())
        read(ours, 1)

    thread = threading.Thread(target=reader, name="modelpool-calibrate", daemon=True)
    thread.start()
    number = None
    try:
        deadline = time.monotonic() + CALIBRATE_MAX
        while time.monotonic() < deadline:
            if tids:
                seen = blocked_in(tids[0])  # a thread is a task: /proc/TID works
                if seen is not None and seen[1] == ours:
                    number = seen[0]
                    break
            time.sleep(0.0005)
    finally:
        os.write(theirs, b"x")
        thread.join(CALIBRATE_MAX)
        os.close(ours)
        os.close(theirs)
    return number
