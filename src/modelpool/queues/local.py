"""The single-machine queue: jobs in this process, by class (X-Request-Priority).

It is the default, and the one a pool without `queue` uses; it needs no server and
imports nothing beyond trio. It lives apart from the interface (base.py) so that the
Redis queue, which shares only the interface, does not come with it.

A free worker takes the oldest job of the highest class waiting; within a class, the
oldest (FIFO). A job counts as one class higher for every `aging` seconds it has
waited (--priority-aging): once it has waited twice that, it ranks with the high ones
by its age, and no job that comes later goes before it, however high: no class
starves. --max-queue is shared: a job that finds the queue full takes the place of the
newest of the jobs that rank lowest now, below its own class (which gets 503 queue
full, as it would have had it come last), so a flood of low requests never turns a
high one away, and a high one is refused only by a queue full of high ones (or of
jobs aged as high). A job queued again (its model died before reading it) goes first, before
any class (`_front`).

Idle workers wait on a memory channel of tickets, one sent for each job queued: the
channel hands a ticket straight to the worker that has waited longest (no turn of the
scheduler in between), and the worker then takes the job that ranks first, whichever
job the ticket came with. A job given up on leaves its ticket behind: a worker that
finds no job for it waits for the next.
"""

from __future__ import annotations

import math
from collections import deque

import trio

from modelpool.core.errors import QueueFull, QueueTimeout
from modelpool.core.job import Job
from modelpool.core.kinds import Priority
from modelpool.queues.base import JobQueue, QueueMetrics

LOWEST_FIRST = sorted(Priority, key=lambda p: p.rank)


class LocalQueue(JobQueue):
    """Jobs in this process, by class: the single-machine default.

    Admission is counted here, so a request whose caller gave up stops counting against
    `max_queue` at once, even before a worker finds it and skips it.
    """

    def __init__(self, max_queue: int, metrics: QueueMetrics, aging: float | None = None) -> None:
        self._max_queue = max_queue
        self._metrics = metrics
        self._aging = aging or None  # 0: never
        self._classes: dict[Priority, deque[Job]] = {p: deque() for p in Priority}
        self._front: deque[Job] = deque()  # jobs queued again, taken before any class
        self._waiting = {p: 0 for p in Priority}  # jobs of each class not taken nor given up
        self._send, self._tickets = trio.open_memory_channel[None](math.inf)
        self._pending = 0
        self._closed = False
        # The wait of each caller whose job no worker took yet: its deadline is the
        # queue timeout (or the caller's own deadline), which `claim` lifts.
        self._deadlines: dict[Job, trio.CancelScope] = {}

    @property
    def length(self) -> int:
        return self._pending

    def waiting_by_priority(self) -> dict[str, int]:
        return {str(p): n for p, n in self._waiting.items()}

    def status(self) -> dict[str, object]:
        return {"queue_by_priority": self.waiting_by_priority()}

    async def put(self, job: Job) -> None:
        if self._pending >= self._max_queue and not self._make_room(job.priority):
            raise QueueFull()
        self._enqueue(job)

    async def wait(self, job: Job) -> None:
        # One wait, whose deadline is the queue timeout until a worker takes the job and
        # lifts it (see `claim`; `requeue` sets it again): waiting for "taken", then for
        # "done", cost the caller a task switch per request.
        with trio.CancelScope(deadline=_take_deadline(job)) as scope:
            self._deadlines[job] = scope
            try:
                await job.done.wait()
            finally:
                del self._deadlines[job]
        if job.done.is_set():
            return
        if job.taken.is_set():  # taken just as the deadline passed: its answer comes
            await job.done.wait()
            return
        self._dequeued(job)  # settled below, so no worker takes it (not given up on: its
        job.line = b""  # caller is told, see intake.py)
        job.fail(QueueTimeout())

    def abandon(self, job: Job) -> None:
        job.abandoned = True
        if job.queued:
            self._dequeued(job)
            job.line = b""  # it waits in its class until a worker skips it: keep it small

    async def get(self) -> Job:
        while True:
            await self._tickets.receive()  # EndOfChannel once closed and every ticket taken
            job = self._next()
            if job is not None:
                return job

    def claim(self, job: Job) -> bool:
        if _gone(job) or job.past_deadline(trio.current_time()):
            return False  # its caller's own wait answers it (504 deadline exceeded)
        self._dequeued(job)
        scope = self._deadlines.get(job)
        if scope is not None:
            scope.deadline = math.inf  # the queue timeout no longer applies
        waited = trio.current_time() - job.enqueued_at
        job.timing.queue_wait = waited
        if job.attempts == 0:  # a job queued again is one request: observe it once
            self._metrics.queue_wait.observe(waited)
        return True

    def requeue(self, job: Job) -> None:
        """At the head, before every class: the next `get` takes it. Its caller's wait
        has a deadline again (`Job.queue_again`): no model may be free for a while."""
        job.queue_again(trio.current_time())
        scope = self._deadlines.get(job)
        if scope is not None:
            scope.deadline = _take_deadline(job)
        self._count_in(job)
        self._front.append(job)
        self._send.send_nowait(None)

    def close(self) -> None:
        self._closed = True
        self._send.close()

    def has_work(self) -> bool:
        return self._pending > 0 or not self._closed

    def waiting_callers(self) -> list[Job]:
        return []  # every job is in the queue or with a worker of this pool

    def take_unclaimed(self) -> list[Job]:
        jobs = []
        while (job := self._next()) is not None:
            if self.claim(job):
                jobs.append(job)
        return jobs

    # -- inside -----------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        self._count_in(job)
        self._classes[job.priority].append(job)
        self._send.send_nowait(None)

    def _count_in(self, job: Job) -> None:
        job.queued = True
        self._pending += 1
        self._waiting[job.priority] += 1

    def _dequeued(self, job: Job) -> None:
        """It left the queue (taken, or given up): it no longer counts."""
        if job.queued:
            job.queued = False
            self._pending -= 1
            self._waiting[job.priority] -= 1

    def _next(self) -> Job | None:
        """The job a free worker takes now, removed from the queue: a job queued again
        first, else the head of the class that ranks highest (its aging counted), the
        older on a tie. Jobs given up on are dropped on the way."""
        while self._front:
            job = self._front.popleft()
            if not _gone(job):
                return job
        now = trio.current_time()
        best: deque[Job] | None = None
        best_key = (-1, 0.0)
        for jobs in self._classes.values():
            while jobs and _gone(jobs[0]):
                jobs.popleft()
            if jobs:
                head = jobs[0]
                key = (self._rank(head, now), -head.enqueued_at)
                if key > best_key:
                    best, best_key = jobs, key
        return None if best is None else best.popleft()

    def _rank(self, job: Job, now: float) -> int:
        """Its class's rank, one more for every `aging` seconds it has waited."""
        rank = job.priority.rank
        if self._aging is not None and rank < Priority.HIGH.rank:
            rank += int((now - job.enqueued_at) / self._aging)
        return min(rank, Priority.HIGH.rank)

    def _make_room(self, priority: Priority) -> bool:
        """The queue is full: refuse the newest of the waiting jobs that rank lowest
        now, if below `priority` (503 queue full), for a job of `priority`; False if
        there is none."""
        now = trio.current_time()
        victim: Job | None = None
        victim_key = (priority.rank, -math.inf)  # only a job ranking below it
        for lower in LOWEST_FIRST:
            if lower.rank >= priority.rank:
                break
            for job in self._classes[lower]:
                if job.queued and not _gone(job):
                    key = (self._rank(job, now), -job.enqueued_at)
                    if key < victim_key:
                        victim, victim_key = job, key
        if victim is None:
            return False
        self._dequeued(victim)
        victim.line = b""
        victim.fail(QueueFull())  # settled: a worker skips it
        return True


def _take_deadline(job: Job) -> float:
    """Its caller's wait's deadline while no model has taken it: `take_by`, if any."""
    return math.inf if job.take_by is None else job.take_by


def _gone(job: Job) -> bool:
    """Given up on by its caller, or settled while it waited (refused for a job of a
    higher class): no worker takes it."""
    return job.abandoned or job.done.is_set()
