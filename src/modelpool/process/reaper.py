"""Containment: every process a model starts dies with its model, wherever it moved itself.

A model runs in a session of its own, so one `killpg` reaches every helper that stayed in
its process group. A helper can leave the group (`setsid`, `setpgid`) or leave the
model's tree altogether (a double fork or a daemon: its parent exits and it is
re-parented). Three mechanisms cover those, from the cheapest:

1. The process tree: when a model is killed, every process still below it in the tree
   is killed too, found through /proc (procfs.py), round after round until none is left.
2. A token: every model gets `MODELPOOL_MODEL=<unique token>` in its environment, which
   its descendants inherit. An orphan that carries the token of a model that has ended
   is killed.
3. Adoption (`adopt_orphans=True`, which `modelpool serve` uses): the process becomes a
   child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so every orphan from a model's
   tree is re-parented to it rather than to init, however it escaped and whatever it did
   to its environment. Adopted processes are killed unless they carry the token of a
   live model (a live model's helper is left alone until its model ends), and each is
   reaped by its own pid: `waitpid(-1)` would steal the exit status of trio's children.

Adoption is process-wide, and would kill any other child the process has, so an
embedding program only turns it on if the pool's models are its only child processes.
Without it, mechanisms 1 and 2 still catch every escape that keeps its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from modelpool.process.procfs import (
    all_pids,
    command_of,
    descendants,
    environ_value,
    is_zombie,
    own_children,
)

log = logging.getLogger("modelpool.reaper")

TOKEN_VAR = "MODELPOOL_MODEL"
PR_SET_CHILD_SUBREAPER = 36
KILL_ROUNDS = 10  # a tree that keeps forking while it is killed is walked again
SWEEP_INTERVAL = 1.0  # how often adopted orphans are looked for without a reason
REAP_RETRY = 0.02  # how soon a killed orphan is looked at again, to reap it
FINAL_SWEEP = 3.0  # how long the last sweep at shutdown waits for orphans to die

# token -> pid of every live model in this process, shared by all pools in it: one
# pool's sweep must never mistake another pool's model for an orphan. Keyed by the
# token, which is never reused, where a pid may be.
_live: dict[str, int] = {}


class Reaper:
    """Kills what a model leaves behind; see the module's docstring for how."""

    def __init__(self, adopt_orphans: bool = False) -> None:
        self.adopt_orphans = adopt_orphans
        self.killed = 0  # orphans and descendants killed, for /status and tests
        self._spawning = trio.Lock()
        self._kick = trio.Event()
        self._wanted: set[str] = set()  # tokens waiting for a look for their carriers
        self._looking: trio.Event | None = None  # set when the look under way ends
        self._looks_started = self._looks_finished = 0  # one look at a time, in order
        self._prefix = secrets.token_hex(6)
        self._count = 0
        if adopt_orphans:
            become_subreaper()

    def new_token(self) -> str:
        """A token no other model, in this process or any other, carries."""
        self._count += 1
        return f"{self._prefix}-{os.getpid()}-{self._count}"

    @asynccontextmanager
    async def spawning(self) -> AsyncIterator[None]:
        """Hold off sweeps while a model is being started.

        trio starts processes from a thread, so a new model is a child of ours for a
        moment before it is registered; a sweep then would take it for an orphan.
        """
        async with self._spawning:
            yield

    def model_started(self, pid: int, token: str) -> None:
        _live[token] = pid

    def kill_tree(self, pid: int, walk: bool = True) -> None:
        """SIGKILL a model's process group and, if it is not reaped yet, its whole tree.

        The walk stops at other live models: the children a preloaded template forked
        are below it in the tree, but each is a model of its own, with its own worker.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if not walk:
            return
        spare = set(_live.values()) - {pid}
        for _ in range(KILL_ROUNDS):
            alive = [p for p in descendants(pid, spare) if not is_zombie(p)]
            if not alive:
                break
            self._kill(alive)

    async def model_reaped(self, pid: int, token: str) -> None:
        """The model is gone for good: nothing that carries its token may outlive it."""
        _live.pop(token, None)
        await self.kill_leftovers(token)

    async def kill_leftovers(self, token: str) -> None:
        """Kill every process that carries `token`, now: its model has exited.

        The carriers are looked for among this process's children when it adopts
        orphans (an escaped helper is re-parented to it), else among every process.
        A look reads /proc and costs the same for one token as for many, so it runs
        in a thread, and the tokens of models that end while one is under way share
        the next: a pool stopping hundreds of models at once makes a few looks, not
        hundreds, and the event loop goes on meanwhile. A live model is skipped
        unread: it carries a token of its own.
        """
        self._wanted.add(token)
        needed = self._looks_started + 1  # the next look to start covers it
        while self._looks_finished < needed:
            if self._looking is None:
                tokens, self._wanted = self._wanted, set()
                self._looks_started += 1
                self._looking = trio.Event()
                live = frozenset(_live.values())
                try:
                    await trio.to_thread.run_sync(self._kill_carriers, tokens, live)
                finally:
                    self._looks_finished += 1
                    self._looking.set()
                    self._looking = None
                self.sweep()  # and the orphans of models no longer alive
            else:
                await self._looking.wait()

    def sweep(self) -> None:
        """Kill and reap adopted orphans, unless they belong to a live model."""
        if not self.adopt_orphans:
            return
        if self._spawning.locked():
            self._kick.set()  # the background sweep will do it once the start is over
            return
        self._sweep_now()

    def _sweep_now(self) -> None:
        live_pids = set(_live.values())
        doomed = []
        for child in own_children():
            if child in live_pids:
                continue
            if is_zombie(child):
                _reap(child)
            elif token_of(child) not in _live:
                doomed.append(child)
        if doomed:
            self._kill(doomed)
            self._kick.set()  # come back soon to reap them

    async def run(self) -> None:
        """Sweep now and then, and soon after each kill, for as long as the pool runs."""
        if not self.adopt_orphans:
            return
        while True:
            with trio.move_on_after(SWEEP_INTERVAL):
                await self._kick.wait()
            if self._kick.is_set():
                self._kick = trio.Event()
                await trio.sleep(REAP_RETRY)
            async with self._spawning:
                self._sweep_now()

    async def final_sweep(self) -> None:
        """When the pool has stopped: sweep until no orphan is left, or give up and say so."""
        if not self.adopt_orphans:
            return
        with trio.move_on_after(FINAL_SWEEP):
            while self._orphans():
                async with self._spawning:
                    self._sweep_now()
                await trio.sleep(REAP_RETRY)
        left = self._orphans()
        if left:
            log.error("orphans still alive after %g s: %s", FINAL_SWEEP, left)

    def _orphans(self) -> list[int]:
        live_pids = set(_live.values())
        return [c for c in own_children() if c not in live_pids and token_of(c) not in _live]

    def _kill_carriers(self, tokens: set[str], live: frozenset[int]) -> None:
        """Kill the processes that carry one of `tokens`: adopted ones, or any at all."""
        for _ in range(1 if self.adopt_orphans else KILL_ROUNDS):
            candidates = own_children() if self.adopt_orphans else all_pids()
            carriers = [
                p
                for p in candidates
                if p not in live and token_of(p) in tokens and not is_zombie(p)
            ]
            if not carriers:
                return
            self._kill(carriers)

    def _kill(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            self.killed += 1
            log.warning("killed pid %d, left behind by a model: %s", pid, command_of(pid))


def become_subreaper() -> None:
    """Make orphaned descendants re-parent to this process instead of to init (Linux)."""
    if not sys.platform.startswith("linux"):
        log.warning("not Linux: orphans that escape a model's process group cannot be adopted")
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        log.warning("cannot become a child subreaper: %s", os.strerror(error))


def token_of(pid: int) -> str | None:
    """The model token in a process's environment, if it still carries one."""
    return environ_value(pid, TOKEN_VAR)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
