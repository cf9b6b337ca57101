"""modelpool's launcher for --preload: runs a Python model unmodified, and turns it into a
template at its first read of stdin, from which the pool forks one child per worker.

Usage (the pool builds it, see launch.py)::

    python [the model's interpreter flags] _launcher.py CONTROL_FD script PATH [ARGS...]
    python [the model's interpreter flags] _launcher.py CONTROL_FD module NAME [ARGS...]

It is run by path by the model's own interpreter, which may not have modelpool
installed: it imports only the standard library, never modelpool.

How it works. Before the model runs, `sys.stdin` is replaced by a reader whose first
read enters template mode; `for line in sys.stdin`, `readline()`, `input()` and
`sys.stdin.buffer` all go through it (a model that reads with `os.read(0, ...)` or
selects on fd 0 never reaches it; the pool then falls back to plain starts). By then
the model has loaded and printed its ready line. In template mode the launcher stops
the idle helper threads it knows to be safe to stop (tqdm's monitor), checks
that a fork is safe (one thread; no socket, device, epoll or pipe it reads from open),
flushes stdio, calls `gc.freeze()` (so the children's garbage collector does not write
to the shared pages), tells the pool over the control socket, and waits for fork
requests. Each
request carries three file descriptors (the child's stdin, stdout and stderr) and the
child's containment token. The child starts a session of its own (first thing after
the fork, and the template waits for it before it tells the pool of the child: until
then the child is in the template's process group, which the pool kills when the
template ends), takes the three descriptors wherever the template had its own stdin,
stdout and stderr pipes (0, 1 and 2, and any other descriptor of those pipes: a model
that writes its results through os.dup(1), or opened /dev/stdout, writes to its own,
see _Template.take_stdio), and returns from that same first read, which now reads its
own stdin: for the model, nothing happened. The template reaps its children and tells
the pool how each one ended; the pool gets a pidfd for each child, so it sees the exit
itself too.

Immortal objects (CPython 3.12 and 3.13): once the pool asks ("immortalize"), the
template marks every object of the model's immortal, so that its children's reads no
longer write the shared pages (_immortal.py, loaded by its path, says how and what it
costs). The walk takes seconds for millions of objects: it runs in slices of
WALK_SLICE, and a fork request is served between two, from the template as it is then.
Each "forked" says whether the child came after the walk; once it is done the template
says "immortal", and the pool replaces the children forked before by new ones. An
interpreter on which it is not safe is refused, with the reason ("not_immortal").

The containment token is the MODELPOOL_MODEL variable, which the pool's reaper reads
from /proc/PID/environ: the environment a process started with, which a change to
os.environ does not reach. So the launcher rewrites the token where the kernel shows
it, in the template's own initial environment, just before each fork, and back just
after: the child has its own token from its first instant. The template's token is
long enough for any child's; a shorter one is padded with NUL bytes, which readers of
the environment see as empty entries (C's environ still points at the token itself).

Messages on the control socket (SOCK_SEQPACKET, one JSON object each):
  to the pool    {"event": "fork_point", "pid": P}
                 {"event": "unsafe", "reason": "..."}
                 {"event": "forked", "id": N, "pid": P, "immortal": B} + the child's pidfd
                 {"event": "fork_failed", "id": N, "error": "...", "unsafe": B}
                 {"event": "exited", "pid": P, "status": S}          (S as subprocess's)
                 {"event": "immortal", "objects": N, "seconds": T}
                 {"event": "not_immortal", "reason": "..."}
  from the pool  {"op": "fork", "id": N, "token": "...", "env": {...}}
                                                            + stdin, stdout, stderr
                 {"op": "immortalize"}

A fork request's "env" is how the child's environment differs from the template's
(with --devices, its device: {"MODELPOOL_DEVICE": "1", "CUDA_VISIBLE_DEVICES": "1"};
null unsets a variable). The child sets it in os.environ, and so in the C library's
environment, before the model's code runs again: what CUDA and its kin read when they
first touch a device. It also writes it over the end of its initial environment, which
the pool leaves room for (see _EnvTail), so /proc/PID/environ shows it too. With a
thread budget (threads.py), the template loads with OMP_NUM_THREADS and its kin at 1,
and a child's "env" gives it its own: set in os.environ for the libraries that start
later, and taken by those the template loaded already (torch, and what the model's
threadpoolctl finds; see _take_thread_budget).

The template leaves template mode when its stdin closes (the pool stops it) or the
control socket does (the pool is gone): its read then returns end-of-file, and the
model ends its own way, as it would have without the launcher.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import fcntl
import gc
import importlib.util
import io
import json
import os
import runpy
import select
import signal
import socket
import stat
import sys
import time
import types

TYPE_CHECKING = False  # not typing's: no import the model has not made
if TYPE_CHECKING:
    from typing import Any

TOKEN_VAR = "MODELPOOL_MODEL"
ROOM_VAR = "MODELPOOL_ENV_ROOM"  # room for a child's variables, see _EnvTail
PLAIN_VAR = "MODELPOOL_PLAIN_ENV"  # JSON: a plain model's thread variables (_become_plain)
MAX_MESSAGE = 64 * 1024
ENV_START_FIELD = 50  # /proc/PID/stat fields (1-based): where the initial environment is
HARMLESS_DEVICE_MAJOR = 1  # /dev/null, /dev/zero, /dev/urandom and friends
SESSION_WAIT = 2.0  # seconds a new child gets to be in its own session (the pool waits 5)
WALK_SLICE = 0.01  # seconds of the immortal walk between two looks at the control socket
WALK_QUIET = 0.05  # seconds without a fork request before the walk goes on (a burst first)


def _initial_environment() -> list[tuple[int, bytes]]:
    """This process's initial environment, where /proc/PID/environ shows it: each entry
    ("NAME=value") with its address."""
    with open("/proc/self/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (the state): field N is fields[N - 3]
    start = int(fields[ENV_START_FIELD - 3])
    end = int(fields[ENV_START_FIELD - 2])
    entries = []
    offset = 0
    for entry in ctypes.string_at(start, end - start).split(b"\0"):
        entries.append((start + offset, entry))
        offset += len(entry) + 1
    return entries


def _blank_initial(name: str) -> None:
    """Write NUL bytes over the variable `name` in this process's initial environment
    (empty entries to readers of /proc/PID/environ), which its children copy."""
    key = name.encode() + b"="
    for address, entry in _initial_environment():
        if entry.startswith(key):
            ctypes.memmove(address, b"\0" * len(entry), len(entry))


class _EnvSlot:
    """Where the containment token's value sits in this process's initial environment."""

    def __init__(self) -> None:
        self.address = 0
        self.length = 0
        self.original = b""
        key = TOKEN_VAR.encode() + b"="
        for address, entry in _initial_environment():
            if entry.startswith(key):
                self.address = address + len(key)
                self.length = len(entry) - len(key)
                self.original = entry[len(key) :]
                return

    @property
    def found(self) -> bool:
        return self.length > 0

    def write(self, token: bytes) -> None:
        """Write a token over the template's; a shorter one is padded with NUL bytes."""
        assert len(token) <= self.length
        ctypes.memmove(self.address, token.ljust(self.length, b"\0"), self.length)


class _EnvTail:
    """The end of the initial environment, which a child rewrites with its own variables.

    The pool starts a template with the variables its children get other values of
    (with --devices, CUDA_VISIBLE_DEVICES empty) last, followed by ROOM_VAR, padding
    that gives them room. A child writes its own entries over that tail, padded with
    NUL bytes (empty entries to readers, as the token's padding), so /proc/PID/environ
    shows its device as os.environ does, each variable once. Where the tail is not so
    (no room, or not enough), nothing is written; a variable also named before the tail
    (a thread budget's, see threads.py) is set in os.environ only.
    """

    def __init__(self) -> None:
        entries = _initial_environment()
        room = ROOM_VAR.encode() + b"="
        self.entries: list[tuple[int, bytes]] = []  # up to the room, which must be last
        for index, (_, entry) in enumerate(entries):
            if entry.startswith(room) and not any(later for _, later in entries[index + 1 :]):
                self.entries = entries[: index + 1]

    def rewrite(self, env: dict[str, str | None]) -> None:
        """In a child: its entries over the tail, if they fit (see the class)."""
        if not self.entries:
            return
        wanted = {key.encode() for key in env}
        start = len(self.entries) - 1
        while start > 0 and self.entries[start - 1][1].partition(b"=")[0] in wanted:
            start -= 1
        before = {entry.partition(b"=")[0] for _, entry in self.entries[:start]}
        address = self.entries[start][0]
        room_address, room = self.entries[-1]
        length = room_address + len(room) + 1 - address
        payload = b"".join(  # one named before the tail (a thread variable) stays as it was
            f"{key}={value}".encode() + b"\0"
            for key, value in env.items()
            if value is not None and key.encode() not in before
        )
        if len(payload) <= length:
            ctypes.memmove(address, payload.ljust(length, b"\0"), length)


class _Template:
    """Template mode: entered once, at the model's first read of stdin."""

    def __init__(self, control: socket.socket, plain_env: dict[str, str | None]) -> None:
        self.control = control
        self.plain_env = plain_env  # its thread budget as a plain model (see _become_plain)
        self.entered = False
        self.closed = False  # template mode ended: reads return end-of-file
        self.env = _EnvSlot()
        self.tail = _EnvTail()
        self.children: set[int] = set()
        self._wakeup_read = -1
        self._wakeup_write = -1
        self._old_wakeup = -1
        self._old_sigchld: object = None
        self._session_write = -1  # during a fork of ours: the child says "in my session"
        self._watching = _thread.allocate_lock()  # held while the load is watched
        self.early: str | None = None  # why it cannot be forked, found while it loaded
        self._watcher = 0  # the watch's thread id
        self.stdio = _pipe_identities()  # its stdin, stdout and stderr pipes, as it started
        self.walk: Any = None  # while its objects are made immortal: _immortal.Walk
        self.immortal = False  # they are, all: children forked from now on share them
        self._walk_started = 0.0
        self._walk_after = 0.0  # the walk waits for a burst of fork requests to be served

    # -- entering ----------------------------------------------------------------------

    def watch_load(self) -> None:
        """Watch the model while it loads, from a thread of the launcher's own (started
        with _thread, invisible to the model's threading), so that a model that cannot
        be forked is known as soon as it starts a thread pool in C, not only at its
        fork point: the pool then starts plain models at once (see `_watch`)."""
        self._watching.acquire()
        _thread.start_new_thread(self._watch, ())

    def _watch(self) -> None:
        """Until the fork point: C threads (neither the main thread, this one, nor one of
        Python's threading) that last EARLY_AFTER seconds are a thread pool, which no
        fork point will be rid of (OpenMP's, OpenBLAS's, ...): the template says so at
        once, while the model still loads."""
        me = self._watcher = _thread.get_native_id()
        since: float | None = None
        try:
            while not self.entered:
                time.sleep(WATCH_EVERY)
                if self.entered:
                    return
                others = _c_threads({me})
                if not others:
                    since = None
                elif since is None:
                    since = time.monotonic()
                elif time.monotonic() - since >= EARLY_AFTER:
                    names = ", ".join(sorted({_task_name(tid) for tid in others}))
                    self.early = (
                        f"it started {len(others)} thread(s) named {names} as it loaded, "
                        f"which a fork would not copy: {C_THREADS_FIX}"
                    )
                    self.send({"event": "unsafe", "reason": self.early, "early": True})
                    return
        except Exception:  # a watch that fails leaves the check to the fork point
            return
        finally:
            self._watching.release()

    def enter(self) -> None:
        """Become the template; return in each child (or here once template mode ends)."""
        self.entered = True
        with self._watching:  # the watch has ended, and said its last
            pass
        if self.early is not None:  # the pool was told: it starts the models plainly
            self._become_plain()
            return
        _wait_for_threads(0, gone=self._watcher)  # it leaves /proc/self/task just after
        _stop_idle_helpers()
        problem = self.unsafe()
        if problem is not None:
            self.send({"event": "unsafe", "reason": problem})
            self._become_plain()
            return  # a plain model from now on: the pool starts the others plainly
        _flush()
        gc.freeze()
        self.send({"event": "fork_point", "pid": os.getpid()})
        self._serve()

    def _become_plain(self) -> None:
        """Template mode is over before it began: this process is a plain model from now
        on, which the pool gives a worker rather than throw its load away. It takes the
        thread budget a plain start would have had, in place of the template's one
        thread each (see threads.py), as a forked child does."""
        self.control.close()
        for key, value in self.plain_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _take_thread_budget(self.plain_env)

    def unsafe(self, received: list[int] | None = None) -> str | None:
        """Why a fork now would not be safe, or None. `received`: the descriptors a fork
        request brought (the child's stdio), which are the child's to have."""
        if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
            return "it needs Python 3.9 or later on Linux 5.3 or later (os.pidfd_open)"
        if not self.env.found:
            return f"its environment has no {TOKEN_VAR}, so its children could not be contained"
        threads = os.listdir("/proc/self/task")
        if len(threads) > 1:
            return (
                f"it runs {len(threads)} threads, and a fork copies only one: {_describe_threads()}"
            )
        ours = {self.control.fileno(), self._wakeup_read, self._wakeup_write, *(received or [])}
        for fd, what in _open_descriptors(ours, self.stdio):
            return f"it holds {what} open (fd {fd}), which every child would share"
        return None

    # -- serving -----------------------------------------------------------------------

    def _serve(self) -> None:
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_write, False)
        self._old_sigchld = signal.signal(signal.SIGCHLD, _ignore)
        self._old_wakeup = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self._wakeup_read, select.POLLIN)
        poller.register(0, 0)  # only its hang-up: the pool closed the template's stdin
        while True:
            wait = None if self.walk is None else max(0.0, self._walk_after - time.monotonic())
            ready = poller.poll(None if wait is None else wait * 1000)
            if not ready and self.walk is not None and time.monotonic() >= self._walk_after:
                self._walk_some()
            for fd, events in ready:
                if fd == self._wakeup_read:
                    os.read(self._wakeup_read, 4096)
                    self._reap()
                elif fd == 0:
                    if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        self._leave()
                        return
                elif fd == self.control.fileno() and self._on_request():
                    return  # in a child, or template mode ended

    def _on_request(self) -> bool:
        """Handle one message from the pool; True in a new child, or when the pool is gone."""
        try:
            message, fds, _, _ = socket.recv_fds(self.control, MAX_MESSAGE, 3)
        except OSError:
            message, fds = b"", []
        if not message:
            for fd in fds:
                os.close(fd)
            self._leave()
            return True
        request = json.loads(message)
        if request.get("op") == "immortalize":
            for fd in fds:
                os.close(fd)
            self._immortalize()
            return False
        ident = request.get("id")
        token = str(request.get("token", "")).encode()
        env = request.get("env") or {}
        error = self.unsafe(fds)
        if error is not None:
            for fd in fds:
                os.close(fd)
            self.send({"event": "fork_failed", "id": ident, "error": error, "unsafe": True})
            return False
        if len(fds) != 3:
            error = f"the request carried {len(fds)} file descriptors, not 3"
        if error is None and not 0 < len(token) <= self.env.length:
            error = f"the token is {len(token)} bytes long, the room for it {self.env.length}"
        if error is None:
            error = _env_problem(env)
        if error is not None:
            for fd in fds:
                os.close(fd)
            self.send({"event": "fork_failed", "id": ident, "error": error})
            return False
        _flush()
        gc.freeze()
        self.env.write(token)
        session_read, self._session_write = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            error = f"fork: {exc}"
            pid = -1
        if pid == 0:
            os.close(session_read)
            self._become_child(fds, token.decode(), env)
            return True
        self.env.write(self.env.original)
        os.close(self._session_write)
        self._session_write = -1
        for fd in fds:
            os.close(fd)
        if pid > 0:
            error = _wait_for_session(session_read, pid)
        os.close(session_read)
        if error is not None:
            self.send({"event": "fork_failed", "id": ident, "error": error})
            return False
        self.children.add(pid)
        self._walk_after = time.monotonic() + WALK_QUIET
        pidfd = os.pidfd_open(pid)
        try:
            self.send(
                {"event": "forked", "id": ident, "pid": pid, "immortal": self.immortal}, [pidfd]
            )
        finally:
            os.close(pidfd)
        return False

    def after_fork_in_child(self) -> None:
        """os.fork()'s first act in a child of ours, before any at-fork hook of the
        model's: a session of its own, and word of it to the template.

        Until then the child is in the template's process group, which the pool kills
        when the template ends: the template tells the pool of a child only once it
        has left that group, so a template that dies at once never takes it along. A
        fork of the model's own (none in template mode) is left alone.
        """
        if self._session_write < 0:
            return
        try:
            os.setsid()
            os.write(self._session_write, b"s")
        finally:
            os.close(self._session_write)
            self._session_write = -1

    def _become_child(self, fds: list[int], token: str, env: dict[str, str | None]) -> None:
        """In the child, in a session of its own already (`after_fork_in_child`): its own
        stdio and environment changes, nothing of the template's."""
        self._restore_signals()
        self.control.close()
        for fd in (self._wakeup_read, self._wakeup_write):
            os.close(fd)
        self.walk = None  # the template's to finish
        self.take_stdio(fds)
        os.environ[TOKEN_VAR] = token  # the initial environment has it already (see above)
        for key, value in env.items():  # setenv() copies: nothing points into the tail then
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.tail.rewrite(env)
        self.children.clear()
        _take_thread_budget(env)

    def take_stdio(self, fds: list[int]) -> None:
        """In a child: its own stdin, stdout and stderr (`fds`) wherever the template had
        its own pipes, so no child reads or writes its siblings' (the pool hears nothing
        of a child that writes its results to the template's stdout).

        A model may have kept a pipe of its stdio under another descriptor: os.dup(1)
        before os.dup2(2, 1) (library prints kept out of its results), or
        open("/dev/stdout"), which on Linux opens the same pipe again. Every descriptor
        of one of those three pipes (a pipe cannot be opened but through one of its own
        descriptors) gets the child's, as a plain start would have it: fd 1 is the
        child's stderr if the template's fd 1 was its stderr pipe.
        """
        targets: dict[int, int] = {}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in fds:
                continue
            try:
                mode = os.fstat(fd)
            except OSError:
                continue  # the listing's own descriptor, closed by now
            identity = (mode.st_dev, mode.st_ino)
            if stat.S_ISFIFO(mode.st_mode) and identity in self.stdio:
                targets[fd] = fds[self.stdio.index(identity)]
        for fd, own in targets.items():
            os.dup2(own, fd, inheritable=fd <= 2 or os.get_inheritable(fd))
        for fd in fds:
            os.close(fd)

    def _immortalize(self) -> None:
        """The pool asks for the model's objects to be made immortal: start the walk (it
        runs between requests, see _serve), or say why not."""
        if self.walk is not None or self.immortal:
            return
        try:
            immortal = _load_immortal()
            reason = immortal.problem()
            if reason is None:
                own = {_Template.enter.__code__.co_filename, immortal.__file__}
                self.walk = immortal.Walk(immortal.model_frames(own), {id(self)})
                self._walk_started = time.monotonic()
                self._walk_after = self._walk_started + WALK_QUIET  # the first forks first
        except Exception as exc:  # a file of modelpool's gone missing, say
            reason = f"it could not start: {exc!r}"
        if reason is not None:
            self.send({"event": "not_immortal", "reason": reason})

    def _walk_some(self) -> None:
        """One slice of the walk, with the collector off (no finalizer of the model's may
        run, and change what is walked); once done, "immortal"."""
        walk = self.walk
        enabled = gc.isenabled()
        gc.disable()
        try:
            done = walk.step(WALK_SLICE)
        except Exception as exc:  # what was marked stays so; the rest stays mortal
            self.walk = None
            self.send({"event": "not_immortal", "reason": f"the walk failed: {exc!r}"})
            return
        finally:
            if enabled:
                gc.enable()
        if done:
            self.walk = None
            self.immortal = True
            seconds = round(time.monotonic() - self._walk_started, 3)
            self.send({"event": "immortal", "objects": walk.objects, "seconds": seconds})

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                self.send({"event": "exited", "pid": pid, "status": code})

    def _leave(self) -> None:
        """Template mode ends: the model reads end-of-file and ends its own way."""
        self._reap()
        self._restore_signals()
        for fd in (self._wakeup_read, self._wakeup_write):
            os.close(fd)
        self.control.close()
        self.closed = True

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        signal.signal(signal.SIGCHLD, self._old_sigchld)  # type: ignore[arg-type]

    def send(self, message: dict[str, object], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        try:
            if fds:
                socket.send_fds(self.control, [data], fds)
            else:
                self.control.send(data)
        except OSError:
            pass  # the pool is gone: the next poll sees the socket closed


class _Stdin(io.RawIOBase):
    """The model's stdin: its first read makes the process a template (see above)."""

    def __init__(self, template: _Template) -> None:
        super().__init__()
        self._template = template

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0

    def isatty(self) -> bool:
        return os.isatty(0)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._template.entered:
            self._template.enter()
        if self._template.closed:
            return 0
        return os.readv(0, [buffer])


def _wait_for_session(session_read: int, pid: int) -> str | None:
    """Wait for a new child's word that it is in its own session (see
    `_Template.after_fork_in_child`); why not, with the child killed, or None."""
    poller = select.poll()
    poller.register(session_read, select.POLLIN)
    if poller.poll(SESSION_WAIT * 1000) and os.read(session_read, 1):
        return None
    os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
    return f"the child did not start a session of its own within {SESSION_WAIT:g} s"


def _env_problem(env: object) -> str | None:
    """Why a fork request's environment changes cannot be made, or None."""
    if not isinstance(env, dict):
        return f"its env is {type(env).__name__}, not an object"
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or key == TOKEN_VAR:
            return f"its env names a variable that cannot be set: {key!r}"
        if value is not None and (not isinstance(value, str) or "\0" in value):
            return f"its env gives {key} a value that is not text: {value!r}"
    return None


HELPER_WAIT = 1.0  # seconds a stopped helper thread gets to be gone from /proc/self/task
WATCH_EVERY = 0.05  # seconds between two looks at the threads of a loading model
EARLY_AFTER = 0.5  # seconds a thread started in C must last while it loads to be a pool
C_THREADS_FIX = (
    "started in C, by a library's thread pool (OpenMP, MKL and OpenBLAS start theirs at "
    "import, HF tokenizers at its first batch): --model-threads (not 0) keeps them to the "
    "main thread while the template loads, as OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "
    "OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false in the service's environment do"
)


def _stop_idle_helpers() -> None:
    """At the fork point: stop the idle helper threads known to be safe to stop, which
    the children start again when they need them.

    tqdm's monitor: the daemon thread behind every progress bar (transformers' "Loading
    weights" among them), started with the first bar, even a disabled one
    (TQDM_DISABLE=1), and left running. `TMonitor.exit()` stops and joins it; tqdm
    starts a new one in a child whose bar needs it (it checks `monitor.report()`).
    Only what the model imported is touched: nothing is imported here.
    """
    threading = sys.modules.get("threading")
    if threading is None:
        return
    stopped = 0
    for thread in threading.enumerate():
        if type(thread).__module__ != "tqdm._monitor" or not hasattr(thread, "exit"):
            continue
        with contextlib.suppress(Exception):  # the model's code: whatever it does
            thread.exit()
            owner = getattr(thread, "tqdm_cls", None)
            if owner is not None and getattr(owner, "monitor", None) is thread:
                owner.monitor = None
            stopped += 1
    if stopped:  # a joined thread leaves /proc/self/task a moment later
        _wait_for_threads(len(threading.enumerate()))


def _wait_for_threads(count: int, gone: int = 0) -> None:
    """Wait a moment (HELPER_WAIT at most) for no more than `count` threads to run, or
    for thread `gone` to be gone: a thread that ended leaves /proc/self/task just after."""
    deadline = time.monotonic() + HELPER_WAIT
    while time.monotonic() < deadline:
        tasks = os.listdir("/proc/self/task")
        if (str(gone) not in tasks) if gone else len(tasks) <= count:
            return
        time.sleep(0.001)


def _c_threads(exclude: set[int]) -> list[str]:
    """The threads (their ids) that are neither the main one, nor one of Python's
    threading, nor in `exclude`: threads started in C."""
    threading = sys.modules.get("threading")
    known = {getattr(t, "native_id", None) for t in threading.enumerate()} if threading else set()
    known |= exclude | {os.getpid()}
    return [tid for tid in os.listdir("/proc/self/task") if int(tid) not in known]


def _describe_threads() -> str:
    """Each thread but the main one: Python's by name, with what would end it; the
    others (started in C) by their names in /proc, with the fix."""
    threading = sys.modules.get("threading")
    known = list(threading.enumerate()) if threading is not None else []
    said = []
    for thread in known:
        if thread is getattr(threading, "main_thread", lambda: None)():
            continue
        said.append(_python_thread(thread))
    others = _c_threads(set())
    if others:
        names = sorted({_task_name(tid) for tid in others})
        said.append(f"{len(others)} thread(s) named {', '.join(names)}, {C_THREADS_FIX}")
    return "; ".join(said) or "threads that ended as they were counted"


def _python_thread(thread: object) -> str:
    """One thread of Python's threading, and how the model could end it in time."""
    name = getattr(thread, "name", "?")
    if type(thread).__module__ == "tqdm._monitor":
        return (
            f"{name!r}, tqdm's monitor, which did not stop: set tqdm.tqdm.monitor_interval = 0 "
            "before the model imports tqdm"
        )
    if name.startswith("ThreadPoolExecutor"):
        return f"{name!r}, an executor's worker: shut the executor down before reading sys.stdin"
    return f"{name!r}, the model's own: end (join) it before the first read of sys.stdin"


def _task_name(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as file:
            return repr(file.read().strip())
    except OSError:
        return "?"


def _take_thread_budget(env: dict[str, str | None]) -> None:
    """In a child: the thread budget its environment changes give it (OMP_NUM_THREADS and
    its kin, see threads.py), taken by the libraries the template already loaded, which
    read those variables once, at their start, when the template had one thread each.

    torch's intra-op threads (`torch.set_num_threads`), and the OpenMP and BLAS
    libraries loaded: by the model's threadpoolctl, where it imported it, or else by
    their own calls (`_limit_loaded_libraries`). Nothing is imported here. Each pool
    starts its threads when next used.
    """
    omp = _count(env.get("OMP_NUM_THREADS"))
    blas = _count(env.get("OPENBLAS_NUM_THREADS") or env.get("MKL_NUM_THREADS"))
    torch = sys.modules.get("torch")
    if omp is not None and torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(omp)
    threadpoolctl = sys.modules.get("threadpoolctl")
    if threadpoolctl is None:
        _limit_loaded_libraries(omp, blas)
        return
    for limit, api in ((omp, "openmp"), (blas, "blas")):
        if limit is not None:
            with contextlib.suppress(Exception):
                threadpoolctl.threadpool_limits(limits=limit, user_api=api)


# The thread-count calls of the libraries threadpoolctl knows best, by their files' names.
THREAD_CALLS = {
    "libgomp": ("omp", ("omp_set_num_threads",)),
    "libomp": ("omp", ("omp_set_num_threads",)),
    "libiomp": ("omp", ("omp_set_num_threads",)),
    "libmkl_rt": ("blas", ("MKL_Set_Num_Threads",)),
    "libopenblas": ("blas", ("openblas_set_num_threads", "openblas_set_num_threads64_")),
    "libscipy_openblas": (  # numpy's and scipy's own builds
        "blas",
        ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"),
    ),
}


def _limit_loaded_libraries(omp: int | None, blas: int | None) -> None:
    """Without the model's threadpoolctl: what it would do for the commonest libraries.
    Those this process has loaded (/proc/self/maps), each by its own call, through
    ctypes; none is loaded here (RTLD_NOLOAD)."""
    limits = {"omp": omp, "blas": blas}
    paths = set()
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").partition("/")[2]
            if path and os.path.basename(path).startswith(tuple(THREAD_CALLS)):
                paths.add("/" + path)
    for path in sorted(paths):
        name = os.path.basename(path)
        kind, symbols = next(v for k, v in THREAD_CALLS.items() if name.startswith(k))
        limit = limits[kind]
        if limit is None:
            continue
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        for symbol in symbols:
            call = getattr(library, symbol, None)
            if call is not None:
                with contextlib.suppress(Exception):
                    call(ctypes.c_int(limit))
                break


def _count(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit() or int(value) < 1:
        return None
    return int(value)


def _open_descriptors(ours: set[int], stdio: list[tuple[int, int] | None]) -> list[tuple[int, str]]:
    """File descriptors a child must not share with its siblings: sockets, devices, epolls,
    and the reading ends of pipes (a helper's answers: each child would take its
    siblings'). `ours`: the launcher's own, left out; and so are the template's stdio
    pipes (`stdio`), which each child gets its own of (see _Template.take_stdio)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in (0, 1, 2) or fd in ours:
            continue
        try:
            mode = os.fstat(fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if stat.S_ISFIFO(mode.st_mode) and (mode.st_dev, mode.st_ino) in stdio:
            continue
        if stat.S_ISSOCK(mode.st_mode):
            found.append((fd, "a socket"))
        elif stat.S_ISCHR(mode.st_mode) and os.major(mode.st_rdev) != HARMLESS_DEVICE_MAJOR:
            found.append((fd, f"a device ({target})"))
        elif target.startswith("anon_inode:"):
            found.append((fd, f"an {target}"))
        elif stat.S_ISFIFO(mode.st_mode) and _read_only(fd):
            found.append((fd, "the reading end of a pipe"))
    return found


def _pipe_identities() -> list[tuple[int, int] | None]:
    """This process's stdin, stdout and stderr (fds 0, 1 and 2) as it started: each
    one's (device, inode) if it is a pipe (as the pool starts a template), else None."""
    identities: list[tuple[int, int] | None] = []
    for fd in (0, 1, 2):
        try:
            mode = os.fstat(fd)
        except OSError:
            identities.append(None)
            continue
        pipe = stat.S_ISFIFO(mode.st_mode)
        identities.append((mode.st_dev, mode.st_ino) if pipe else None)
    return identities


def _load_immortal() -> types.ModuleType:
    """_immortal.py, beside this file, by its path: neither in sys.modules nor on sys.path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_immortal.py")
    spec = importlib.util.spec_from_file_location("_modelpool_immortal", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_only(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    except OSError:
        return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()


def _ignore(signum: int, frame: object) -> None:
    """SIGCHLD's handler in template mode: the wakeup fd does the work."""


def _install_stdin(template: _Template) -> None:
    original = sys.stdin
    encoding = getattr(original, "encoding", None) or "utf-8"
    errors = getattr(original, "errors", None) or "strict"
    reader = io.BufferedReader(_Stdin(template))
    sys.stdin = io.TextIOWrapper(reader, encoding=encoding, errors=errors, newline="\n")


def _run(kind: str, target: str, args: list[str]) -> None:
    """Run the model as `python script` or `python -m module` would."""
    keep_path = not (sys.flags.isolated or getattr(sys.flags, "safe_path", False))
    if kind == "module":
        if keep_path:
            sys.path[0] = os.getcwd()
        if importlib.util.find_spec(target) is None:
            print(f"{sys.executable}: No module named {target}", file=sys.stderr)
            sys.exit(1)
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    if not os.path.exists(target):
        error = "[Errno 2] No such file or directory"
        print(f"{sys.executable}: can't open file {target!r}: {error}", file=sys.stderr)
        sys.exit(2)
    if keep_path:
        sys.path[0] = os.path.dirname(os.path.realpath(target))
    sys.argv = [target, *args]
    runpy.run_path(target, run_name="__main__")


def _model_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """A traceback without its first frames, the launcher's and runpy's: the model's own
    frames, as `python script.py` prints them."""
    ours = {os.path.realpath(__file__), os.path.realpath(runpy.__file__ or "")}
    while tb is not None and tb.tb_next is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in ours and os.path.realpath(name) not in ours and name != "<frozen runpy>":
            break
        tb = tb.tb_next
    return tb


def main() -> None:
    control_fd, kind, target, *args = sys.argv[1:]
    os.environ.pop(ROOM_VAR, None)  # the model sees none of it; /proc/PID/environ keeps it
    plain_env = json.loads(os.environ.pop(PLAIN_VAR, "") or "{}")
    _blank_initial(PLAIN_VAR)  # nor its children, in /proc/PID/environ
    control = socket.socket(fileno=int(control_fd))
    control.set_inheritable(False)
    template = _Template(control, plain_env)
    os.register_at_fork(after_in_child=template.after_fork_in_child)  # before the model's
    _install_stdin(template)
    template.watch_load()
    try:
        _run(kind, target, args)
    except Exception as exc:  # what Python does for an uncaught one, minus our frames
        exc.__traceback__ = _model_frames(exc.__traceback__)  # what excepthook prints
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)


if __name__ == "__main__":
    main()
