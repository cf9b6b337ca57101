"""--preload's memory watch: what each model holds of its own, and fresh forks for the
children of a template that have made too much of it their own (--preload-max-private).

A child forked from a --preload template shares the template's pages until it writes
one: that page is then copied, and it is the child's own (copy-on-write). A model whose
data is bytes (weights, numpy buffers, an mmap) never writes it, and its children share
it for good. A model whose data is Python objects (dicts, lists, strings) writes every
object it reads, its reference count, so each child copies the pages it reads and in
time holds a whole copy again (unless the template's objects are immortal, CPython
3.12+: see _launcher.py). This watch bounds that on any Python: a forked child whose
private memory passes --preload-max-private percent of its template's resident memory
is replaced by a fresh fork, by surge (operations.py): its replacement is ready first,
and it retires after the request it computes, if any. N children then hold about
N x PERCENT % of a template besides the template, whatever they read.

The denominator is the template's resident memory (VmRSS): what one loaded model holds,
the pages its children share with it and its own. The numerator is what a plain start
would have to pay for again: the private pages of the child and of every process below
it.

Once a second, every ready model's shared and private pages are measured (smaps_rollup,
summed over its tree) in a thread: they walk page tables (about 1.4 ms for 300 MiB),
which the event loop must not wait on. /status and `modelpool_model_private_bytes` show
them. A child of a Python-objects model can copy tens of MiB in one request, hundreds in
a second: so with a limit, every GLANCE_INTERVAL between two of those looks, the watch
reads each forked child's count of minor page faults (a few microseconds; each page it
makes its own costs it one), and measures at once a child that may have passed its limit
since it was last measured. A child whose faults keep promising more than they make
its own (pages it frees and faults again) is measured that way at most MEASURE_SHARE of
the time: the cost of the page-table walk is what paces it.

A module of its own beside memwatch.py (--model-max-rss, a limit on what a model holds,
whatever it is): this one is about what a fork shares, and runs only under --preload.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from modelpool.core.kinds import RestartReason
from modelpool.pool.memwatch import MEMORY_CHECK_INTERVAL, WatchedPool
from modelpool.process import procfs

if TYPE_CHECKING:
    from modelpool.pool.worker import Worker
    from modelpool.process.preload import Preloader, Template

GLANCE_INTERVAL = 0.1  # seconds between two glances at the forked children's page faults
MEASURE_SHARE = 0.02  # of the time, a glance may spend measuring any one child, at most
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class RefreshedPool(WatchedPool, Protocol):
    """What the watch needs of the pool (pool.py's Pool is one): what the memory limit's
    watch needs, and the preloader, whose template a child's memory is held against."""

    @property
    def preloader(self) -> Preloader | None: ...


@dataclass(frozen=True)
class Target:
    """One model to look at: its pid, and its template's if it was forked from one."""

    pid: int
    template_pid: int | None


@dataclass(frozen=True)
class Seen:
    """What a look found of one model: its tree's shared and private KiB, and its limit
    (KiB; None if it has none: not forked, or no limit)."""

    shared_kib: int
    private_kib: int
    limit_kib: float | None

    @property
    def over(self) -> bool:
        return self.limit_kib is not None and self.private_kib > self.limit_kib


@dataclass
class _Measured:
    """A model's last measure, which its page faults since are added to."""

    private_kib: int
    faults: int
    next_glance_measure: float  # time.monotonic() before which a glance does not measure it


class Looker:
    """The reads, made in a thread: it keeps each model's last measure between looks.

    Used by one look at a time (the watch awaits each), so it needs no lock."""

    def __init__(self, percent: float) -> None:
        self.percent = percent
        self._measured: dict[int, _Measured] = {}

    def look(self, targets: Sequence[Target], full: bool) -> list[Seen | None]:
        """Measure every target (`full`), or only those whose page faults say they may be
        over their limit; None for a model not measured (or gone)."""
        template_kib: dict[int, int | None] = {}
        for target in targets:
            if target.template_pid is not None and target.template_pid not in template_kib:
                template_kib[target.template_pid] = procfs.rss_kib(target.template_pid)
        seen = [self._look_at(target, full, template_kib) for target in targets]
        wanted = {target.pid for target in targets}
        for pid in [pid for pid in self._measured if pid not in wanted]:
            del self._measured[pid]  # gone, or no longer looked at
        return seen

    def _look_at(
        self, target: Target, full: bool, template_kib: dict[int, int | None]
    ) -> Seen | None:
        limit = self._limit(template_kib.get(target.template_pid or 0))
        if not full and (limit is None or not self._may_be_over(target.pid, limit)):
            return None
        faults = procfs.minor_faults(target.pid)  # first: what comes after is in the next sum
        started = time.monotonic()
        figures = procfs.tree_smaps_kib(target.pid)
        took = time.monotonic() - started
        if not figures or faults is None:
            return None
        seen = Seen(figures["shared"], figures["private"], limit)
        earlier = self._measured.get(target.pid)
        # A glance that measured in vain (its faults promised more than it made its own)
        # waits before it measures this child again: a page-table walk costs.
        in_vain = not full and earlier is not None and not seen.over
        rest = took / MEASURE_SHARE if in_vain else 0.0
        self._measured[target.pid] = _Measured(figures["private"], faults, started + rest)
        return seen

    def _limit(self, template_kib: int | None) -> float | None:
        if not self.percent or not template_kib:
            return None
        return template_kib * self.percent / 100

    def _may_be_over(self, pid: int, limit: float) -> bool:
        """Whether a model may have passed `limit` since it was last measured: what it held
        then, and a page for each minor fault since (see procfs.minor_faults)."""
        measured = self._measured.get(pid)
        if measured is None:
            return True  # never measured: a new child
        if time.monotonic() < measured.next_glance_measure:
            return False
        faults = procfs.minor_faults(pid)
        if faults is None:
            return False
        return measured.private_kib + (faults - measured.faults) * PAGE_KIB > limit


async def watch_preloaded(pool: RefreshedPool) -> None:
    """Measure every ready model once a second, for /status and the metrics; with a
    --preload-max-private limit, glance at forked children in between, and replace (by
    surge, never while computing) those that hold more than it."""
    looker = Looker(pool.config.preload_max_private)
    interval = GLANCE_INTERVAL if looker.percent else MEMORY_CHECK_INTERVAL
    next_full = trio.current_time()
    while not pool.stopped.is_set():
        full = trio.current_time() >= next_full
        if full:
            next_full = trio.current_time() + MEMORY_CHECK_INTERVAL
        watched = [
            (worker, Target(pid, _template_pid(pool, worker)))
            for worker in pool.workers
            if worker.ready and worker.retiring is None and (pid := worker.pid) is not None
        ]
        if watched and (full or any(target.template_pid for _, target in watched)):
            targets = [target for _, target in watched]
            seen = await trio.to_thread.run_sync(looker.look, targets, full)
            for (worker, target), found in zip(watched, seen, strict=True):
                if found is not None and worker.pid == target.pid:
                    _act(pool, worker, target.pid, found)
        with trio.move_on_after(interval):
            await pool.stopped.wait()


def _template_of(pool: RefreshedPool, worker: Worker) -> Template | None:
    """The template `worker`'s model was forked from (of its generation: the one loaded
    now, if its first died since); None if it was not forked."""
    if not worker.forked or pool.preloader is None:
        return None
    return pool.preloader.templates.get(worker.generation)


def _template_pid(pool: RefreshedPool, worker: Worker) -> int | None:
    template = _template_of(pool, worker)
    return None if template is None else template.pid


def _act(pool: RefreshedPool, worker: Worker, pid: int, seen: Seen) -> None:
    """Note what `worker`'s model holds; ask for its replacement if over its limit."""
    worker.memory_seen.note(pid, seen.shared_kib, seen.private_kib)
    if not seen.over or worker.retiring is not None or not worker.ready:
        return
    if _replaced_once_immortal(pool, worker, pid, seen):
        return
    if worker.ask_recycle():
        assert seen.limit_kib is not None
        percent = pool.config.preload_max_private
        why = (
            f"holds {seen.private_kib / 1024:.0f} MiB of its own, over --preload-max-private "
            f"{percent:g} % of its template's {seen.limit_kib * 100 / percent / 1024:.0f} MiB"
        )
        pool._recycle(worker, why, RestartReason.REFRESH)


def _replaced_once_immortal(pool: RefreshedPool, worker: Worker, pid: int, seen: Seen) -> bool:
    """Whether `pid` was forked before its template's objects were made immortal (while
    the walk runs, or since it ended and before its replacement), and holds no more than
    a copy of its template: it is replaced once they are (immortal.py), so a refresh
    would only fork another child that copies what it reads as this one did, and pause
    the walk with its fork. What copying can cost is bounded by the template's size; a
    child that holds more is refreshed as any other. If the walk fails, none is waited
    for (`mortal` empties) and the refresh is back."""
    template = _template_of(pool, worker)
    if template is None or seen.limit_kib is None or pid not in template.immortality.mortal:
        return False
    whole_template = seen.limit_kib * 100 / pool.config.preload_max_private
    return seen.private_kib <= whole_template
