"""The single-machine queue: one trio memory channel in this process.

It is the default, and the one a pool without `queue` uses; it needs no server and
imports nothing beyond trio. It lives apart from the interface (base.py) so that the
Redis queue, which shares only the interface, does not come with it.

A job queued again (its model died before reading it) goes to the head of the queue,
not behind the jobs that came after it: to a worker already waiting, if one is, or
else before anything in the channel (`_front`).
"""

from __future__ import annotations

import math
from collections import deque

import trio

from modelpool.core.errors import QueueFull, QueueTimeout
from modelpool.core.job import Job
from modelpool.queues.base import JobQueue, QueueMetrics


class LocalQueue(JobQueue):
    """One memory channel in this process: the single-machine default.

    Admission is counted here rather than by the channel's buffer, so a request whose
    caller gave up stops counting against `max_queue` at once, even before a worker
    pops it and skips it.
    """

    def __init__(self, max_queue: int, metrics: QueueMetrics) -> None:
        self._max_queue = max_queue
        self._metrics = metrics
        self._send, self._receive = trio.open_memory_channel[Job](math.inf)
        self._front: deque[Job] = deque()  # jobs queued again, taken before the channel's
        self._pending = 0
        self._closed = False
        # The wait of each caller whose job no worker took yet: its deadline is the
        # queue timeout, which `claim` lifts.
        self._deadlines: dict[Job, trio.CancelScope] = {}

    @property
    def length(self) -> int:
        return self._pending

    async def put(self, job: Job) -> None:
        if self._pending >= self._max_queue:
            raise QueueFull()
        self._enqueue(job)

    async def wait(self, job: Job) -> None:
        # One wait, whose deadline is the queue timeout until a worker takes the job and
        # lifts it (see `claim`): waiting for "taken", then for "done", cost the caller a
        # task switch per request.
        deadline = math.inf if job.take_by is None else job.take_by
        with trio.CancelScope(deadline=deadline) as scope:
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
        self.abandon(job)
        job.fail(QueueTimeout())

    def abandon(self, job: Job) -> None:
        job.abandoned = True
        if job.queued:
            job.queued = False
            job.line = b""  # it waits in the channel until a worker skips it: keep it small
            self._pending -= 1

    async def get(self) -> Job:
        if self._front:
            await trio.lowlevel.checkpoint_if_cancelled()
            job = self._front.popleft()  # nothing awaited since the look: still there
            await trio.lowlevel.cancel_shielded_checkpoint()
            return job
        return await self._receive.receive()

    def claim(self, job: Job) -> bool:
        if job.abandoned:
            return False
        job.queued = False
        self._pending -= 1
        scope = self._deadlines.get(job)
        if scope is not None:
            scope.deadline = math.inf  # the queue timeout no longer applies
        waited = trio.current_time() - job.enqueued_at
        job.timing.queue_wait = waited
        if job.attempts == 0:  # a job queued again is one request: observe it once
            self._metrics.queue_wait.observe(waited)
        return True

    def requeue(self, job: Job) -> None:
        """At the head: a waiting worker gets it at once (the channel hands a job to the
        worker that has waited longest, and a worker waits only while the channel is
        empty); with none waiting, the next `get` takes it before the channel's jobs."""
        if self._receive.statistics().tasks_waiting_receive:
            self._enqueue(job)
            return
        job.queued = True
        self._pending += 1
        self._front.append(job)

    def close(self) -> None:
        self._closed = True
        self._send.close()

    def has_work(self) -> bool:
        return self._pending > 0 or not self._closed

    def waiting_callers(self) -> list[Job]:
        return []  # every job is in the channel or with a worker of this pool

    def take_unclaimed(self) -> list[Job]:
        jobs = [job for job in self._front if self.claim(job)]
        self._front.clear()
        while True:
            try:
                job = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return jobs
            if self.claim(job):
                jobs.append(job)

    def _enqueue(self, job: Job) -> None:
        job.queued = True
        self._pending += 1
        self._send.send_nowait(job)
