"""Where jobs wait for a free model: one interface, two implementations.

The pool and its workers see only `JobQueue`. Callers `put` a job and `wait` for its
answer; idle workers `get` the oldest job, `claim` it, and settle it through the job
itself (`Job.succeed` / `Job.fail`). `LocalQueue`, the default, is one trio memory
channel in this process. `RedisQueue` (redisqueue.py) is a Redis stream shared by
every node of a cluster, so the first free model on any machine takes the oldest job.
`open_queue` picks one from the configuration; nothing else branches on it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from modelpool.core.errors import QueueFull, QueueTimeout

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from modelpool.core.job import Job
    from modelpool.pool.metrics import PoolMetrics
    from modelpool.settings.config import PoolConfig


class JobQueue(ABC):
    """The FIFO between callers and workers, and how an answer gets back to its caller."""

    #: whether a job whose model died before reading it can be queued again while stopping
    requeue_while_closing = False
    #: what this node tells other nodes about itself (the pool sets it)
    node_status: Callable[[], dict[str, Any]] = dict

    @property
    @abstractmethod
    def length(self) -> int:
        """Jobs waiting for a model (for the whole cluster, where there is one)."""

    def remote_ready(self) -> int:
        """Models ready elsewhere that take this queue's jobs (0 for a local queue)."""
        return 0

    def status(self) -> dict[str, Any]:
        """What /status adds for this kind of queue (the cluster's nodes, for Redis)."""
        return {}

    def problem(self) -> str | None:
        """Why the queue cannot serve now, if it cannot (for /healthz)."""
        return None

    @property
    def unavailable(self) -> str | None:
        """Why a job put now would be refused, or None while the queue takes jobs.

        /readyz says 503 with it, at once (a local queue is always there), so a load
        balancer stops sending requests that could only fail; `problem` waits longer.
        """
        return None

    def metrics(self) -> Iterator[Metric]:
        """Gauges this kind of queue adds to /metrics (the cluster's, for Redis)."""
        return iter(())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work the queue needs while the pool runs (a local queue needs none)."""
        task_status.started()

    @abstractmethod
    async def put(self, job: Job) -> None:
        """Queue a new job, or raise QueueFull (or another PoolError) at once."""

    @abstractmethod
    async def wait(self, job: Job) -> None:
        """Return once `job` is settled; QueueTimeout if no model takes it by `job.take_by`.

        Cancellation (the caller went away) leaves the job to `abandon`.
        """

    @abstractmethod
    def abandon(self, job: Job) -> None:
        """Its caller stopped waiting: drop the job if it still waits, forget its answer."""

    @abstractmethod
    async def get(self) -> Job:
        """The oldest job, for an idle worker; cancel-safe. EndOfChannel once closed and empty."""

    @abstractmethod
    def claim(self, job: Job) -> bool:
        """A worker takes `job`; False if it must be skipped (its caller is gone, or too late)."""

    @abstractmethod
    def requeue(self, job: Job) -> None:
        """Queue a claimed job once more (its model died before it could have read it)."""

    @abstractmethod
    def close(self) -> None:
        """Take no new jobs; `get` ends once the jobs this node must still serve are served."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether this node's workers may still get a job (False once closed and drained)."""

    @abstractmethod
    def waiting_callers(self) -> list[Job]:
        """Jobs of this node's callers that no worker of this node will settle (hard stop)."""

    @abstractmethod
    def take_unclaimed(self) -> list[Job]:
        """Remove and return every job still waiting for a worker of this node (hard stop)."""

    async def drained(self) -> None:
        """Return once no caller of this node waits for an answer any more."""
        return

    async def flush(self) -> None:
        """Return once what the workers left to send is sent (their answers, for Redis)."""
        return


class LocalQueue(JobQueue):
    """One memory channel in this process: the single-machine default.

    Admission is counted here rather than by the channel's buffer, so a request whose
    caller gave up stops counting against `max_queue` at once, even before a worker
    pops it and skips it.
    """

    def __init__(self, max_queue: int, metrics: PoolMetrics) -> None:
        self._max_queue = max_queue
        self._metrics = metrics
        self._send, self._receive = trio.open_memory_channel[Any](math.inf)
        self._pending = 0
        self._closed = False

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
        with trio.CancelScope(deadline=deadline) as job.queue_deadline:
            await job.done.wait()
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
        return await self._receive.receive()

    def claim(self, job: Job) -> bool:
        if job.abandoned:
            return False
        job.queued = False
        self._pending -= 1
        if job.queue_deadline is not None:
            job.queue_deadline.deadline = math.inf  # the queue timeout no longer applies
        waited = trio.current_time() - job.enqueued_at
        job.timing.queue_wait = waited
        if job.attempts == 0:  # a job queued again is one request: observe it once
            self._metrics.queue_wait.observe(waited)
        return True

    def requeue(self, job: Job) -> None:
        self._enqueue(job)

    def close(self) -> None:
        self._closed = True
        self._send.close()

    def has_work(self) -> bool:
        return self._pending > 0 or not self._closed

    def waiting_callers(self) -> list[Job]:
        return []  # every job is in the channel or with a worker of this pool

    def take_unclaimed(self) -> list[Job]:
        jobs = []
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


def open_queue(config: PoolConfig, metrics: PoolMetrics, node: str) -> JobQueue:
    """The queue the configuration asks for: in-process, or a Redis stream (`config.queue`)."""
    if config.queue is None:
        return LocalQueue(config.max_queue, metrics)
    from modelpool.queues.redisqueue import (
        RedisQueue,  # imported only when used: no cost to a local pool
    )

    return RedisQueue(config, metrics, node)
