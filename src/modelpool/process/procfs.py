"""Every read of /proc the service makes about its models: one place, each parsed once.

Linux shows each process as a directory /proc/PID (and each of its threads as
/proc/PID/task/TID). The service reads it for three reasons:

- containment (reaper.py): which processes are below a model in the tree, which are
  left to be reaped, and which carry a model's token in their environment;
- pacing (pacing.py, procwatch.py): whether a model is running, and which system call
  it is blocked in, so a model that has said all it had to say is told from one that
  merely paused;
- memory (--model-max-rss, /status): what a model's tree holds resident, and, for a
  child forked from a --preload template, which of those pages are its own.

A process may end between any two reads, so every reader here treats a file it cannot
read as a process that is gone, and says what that means for its caller. Files are
read as bytes: a process's name (in stat and status) is whatever bytes it set, not
necessarily UTF-8. `_launcher.py` makes its own few reads of /proc/self: it runs in a
model's interpreter, which may not have modelpool installed.
"""

from __future__ import annotations

import os
from pathlib import Path

Signature = tuple[int, int]
"""What a blocked task looks like: its system call number and first argument."""


# -- /proc/PID/stat: the process's state ---------------------------------------------


def _state(pid: int) -> bytes | None:
    """The state letter of /proc/PID/stat (R running, S sleeping, Z zombie, X dead...);
    None if it cannot be read.

    The line is "PID (NAME) STATE ...": the name may hold spaces and parentheses, so
    the state is the first field after the last ")".
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0] if fields else None


def is_running(pid: int) -> bool:
    """True unless the process is known to be blocked (sleeping, stopped, or gone).

    R is running or about to run. Where the state cannot be read, it is taken as
    running, so a caller that waits for a model to block keeps waiting.
    """
    state = _state(pid)
    return state is None or state == b"R"


def is_zombie(pid: int) -> bool:
    """True if `pid` has exited (or is gone) and only waits to be reaped: nothing to kill."""
    return _state(pid) in (None, b"Z", b"X")


def open_stat(pid: int) -> int | None:
    """The stat file of the process's main thread (/proc/PID/task/PID/stat: the
    process's own sums over every thread, which /proc/PID/stat adds, cost more), opened
    to be read again and again with `kill_pending`; None if the process is gone. The
    descriptor names that thread, not its number: once it is reaped, reads fail rather
    than show another process that got the number."""
    try:
        return os.open(f"/proc/{pid}/task/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None


_SIGKILL_BIT = 1 << 8  # SIGKILL is signal 9


def kill_pending(stat_fd: int) -> bool:
    """Whether the process of `stat_fd` (see open_stat) is dying: a SIGKILL waits for its
    main thread (a fatal signal sent to the process is one to each of its threads until
    the thread acts on it), or it is gone. A few microseconds: the file is read again
    in place (pread), not opened.

    Field 31 of stat, "signal", is the main thread's pending signals (the low 31).
    """
    try:
        fields = os.pread(stat_fd, 1024, 0).rsplit(b")", 1)[1].split(None, 29)
    except OSError:
        return True  # reaped, or its descriptor closed: it is no more
    except IndexError:
        return False
    try:
        return bool(int(fields[28]) & _SIGKILL_BIT)
    except (IndexError, ValueError):
        return False


# -- /proc/PID/syscall and /proc/PID/fd: what a blocked process waits for ------------


def blocked_in(pid: int) -> Signature | None:
    """The system call the process's main thread is blocked in; None if it runs or is unknown.

    /proc/PID/syscall holds the call's number and its arguments in hex for a blocked
    task, "running" for one that runs. It needs ptrace's access (the same user, or
    root). Read with os.open and os.read: it is looked at in a tight loop after each
    answer (see pacing.py), where a Python file object would cost more than the read.
    """
    try:
        fd = os.open(f"/proc/{pid}/syscall", os.O_RDONLY)
    except OSError:
        return None
    try:
        fields = os.read(fd, 256).split(maxsplit=2)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(fields) < 3:  # "running", or nothing
        return None
    try:
        return int(fields[0]), int(fields[1], 16)
    except ValueError:
        return None


def pipe_inode(pid: int, fd: int) -> int | None:
    """The inode of the pipe open as `fd` in process `pid`; None if that is no pipe.

    /proc/PID/fd/N is a symbolic link, to "pipe:[INODE]" for a pipe: the same inode as
    the end the service holds, so it tells that the model reads the pipe its requests
    are written to.
    """
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not (target.startswith("pipe:[") and target.endswith("]")):
        return None
    return int(target[6:-1])


# -- /proc/PID/task/TID/children: the process tree ------------------------------------


def children_of(pid: int | str) -> list[int]:
    """The children of `pid` ("self": this process), started from any of its threads.

    Each thread's /proc/PID/task/TID/children lists the children it started (trio
    starts processes from threads, so this process's own are spread over several).
    A process that is gone has none.
    """
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_bytes().split())
        except OSError:
            continue
    return found


def own_children() -> list[int]:
    """This process's children (the models, and orphans it adopted as a subreaper)."""
    return children_of("self")


def descendants(pid: int, spare: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Every process below `pid` in the tree, parents before their children; the ones in
    `spare` are left out, and so is everything below them."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [
            child for parent in frontier for child in children_of(parent) if child not in spare
        ]
        found.extend(children)
        frontier = children
    return found


def all_pids() -> list[int]:
    """Every process on the machine (that this process can see)."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


# -- /proc/PID/environ and /proc/PID/cmdline: who a process is -----------------------


def environ_value(pid: int, name: str) -> str | None:
    """The value of variable `name` in the environment the process started with.

    /proc/PID/environ is the environment as the process was exec'd with it
    ("NAME=value" entries, NUL-separated), which a change to os.environ does not reach:
    a helper cannot shed the token it inherited by deleting it in Python. (A
    --preload template rewrites its children's token in place there, see
    _launcher.py.) None if the process is gone, or does not carry the variable.
    """
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def command_of(pid: int) -> str:
    """The process's command line, for a log line (at most 200 characters); "?" if gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200] or "?"


# -- /proc/PID/status and /proc/PID/smaps_rollup: memory -----------------------------


def rss_kib(pid: int) -> int | None:
    """The process's resident memory (VmRSS of /proc/PID/status), in KiB; None if gone.

    A kernel thread, or a zombie, has no VmRSS line: 0.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a model and every process below it, in MiB."""
    return sum(rss_kib(member) or 0 for member in [pid, *descendants(pid)]) / 1024


def smaps_kib(pid: int) -> dict[str, int]:
    """A process's resident memory split into pages it shares and pages of its own, in KiB
    ({"shared": ..., "private": ...}); {} if it is gone.

    /proc/PID/smaps_rollup sums every mapping's pages: Shared_* are pages other
    processes map too (a forked child's, those it still shares with its template),
    Private_* those only it maps. It walks the page tables (about 1.4 ms for 300 MiB),
    so a caller that reads it often does so in a thread.
    """
    shared = private = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_bytes()
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        if key in (b"Shared_Clean", b"Shared_Dirty"):
            shared += int(rest.split()[0])
        elif key in (b"Private_Clean", b"Private_Dirty"):
            private += int(rest.split()[0])
    return {"shared": shared, "private": private}


def smaps_mib(pid: int) -> dict[str, float]:
    """smaps_kib in MiB, to a tenth: what /status shows."""
    return {key: round(kib / 1024, 1) for key, kib in smaps_kib(pid).items()}


def tree_smaps_kib(pid: int) -> dict[str, int]:
    """smaps_kib summed over a model and every process below it; {} if the model is gone.

    A page a model shares with its own helper counts once for each of them in "shared",
    as in the figures of each process."""
    own = smaps_kib(pid)
    if not own:
        return {}
    for member in descendants(pid):
        figures = smaps_kib(member)
        own["shared"] += figures.get("shared", 0)
        own["private"] += figures.get("private", 0)
    return own


def tree_private_mib(pid: int) -> float:
    """Private memory of a model and every process below it, in MiB: what it holds of its
    own, leaving out the pages it still shares with its template."""
    return tree_smaps_kib(pid).get("private", 0) / 1024


def minor_faults(pid: int) -> int | None:
    """How many minor page faults the process has taken since it started (field 10 of
    /proc/PID/stat, "minflt"); None if it is gone.

    A page a forked child writes that it still shared with its template becomes its own
    in a minor fault (copy-on-write), so the count bounds how many pages it can have
    made its own since it was last measured: a read of a few microseconds that tells
    when smaps_rollup's walk of its page tables is worth making. The bound is loose
    the other way (a fault may map a page that stays shared, or a fresh page that is
    freed again), and a transparent huge page is 512 pages in one fault: a caller uses
    it to look sooner, never to look less.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[7])  # fields[0] is field 3, the state
    except (IndexError, ValueError):
        return None
