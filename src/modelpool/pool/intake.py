"""The callers' side of the pool: a request becomes a job, and its answer comes back.

`Pool.predict` is this. A request is checked (the request schema) and encoded into one
line before it is queued, so a bad one is refused at once and never reaches a model;
its answer, or the PoolError saying why there is none, goes back to the caller with its
request id, and the request is counted under its outcome. The workers' side of the
queue (taking a job, queueing it again) is the pool's (pool.py).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

import trio

from modelpool.core.codec import encode_request
from modelpool.core.errors import (
    DeadlineExceeded,
    DeadlineUnmet,
    PoolError,
    QueueTimeout,
    ShuttingDown,
)
from modelpool.core.job import Job, Timing
from modelpool.core.kinds import Outcome, Priority

if TYPE_CHECKING:
    from modelpool.core.schema import RequestSchema
    from modelpool.pool.metrics import PoolMetrics
    from modelpool.queues.base import JobQueue
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.pool")


class IntakePool(Protocol):
    """What the intake needs of the pool (pool.py's Pool is one); `_stop_idle_starts` is
    the pool's, for its own modules (not the library's surface)."""

    @property
    def closing(self) -> bool: ...
    @property
    def queue(self) -> JobQueue: ...
    @property
    def ready_count(self) -> int: ...
    def _stop_idle_starts(self) -> None: ...
    def _replacement_forks(self) -> bool: ...


class Intake:
    """Requests in, answers out; `prefix` starts every request id it makes up."""

    def __init__(
        self, pool: IntakePool, config: PoolConfig, metrics: PoolMetrics, prefix: str
    ) -> None:
        self._pool = pool
        self._config = config
        self._metrics = metrics
        self._prefix = prefix
        self._requests = 0
        self._schema: RequestSchema | None = None
        if config.request_schema is not None:
            from modelpool.core.schema import RequestSchema  # jsonschema only for those who use it

            self._schema = RequestSchema(config.request_schema)

    async def predict(
        self,
        request: Any,
        request_id: str | None,
        timing: Timing | None,
        within: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> dict[str, Any]:
        """See Pool.predict (`within`: its `timeout`)."""
        self._requests += 1
        request_id = request_id or f"{self._prefix}-{self._requests}"
        started = trio.current_time()
        outcome: Outcome | None = None
        job: Job | None = None
        if timing is not None:
            timing.priority, timing.deadline = priority, within
        try:
            try:
                deadline = None if within is None else started + within
                job = await self._submit(request, request_id, deadline, priority)
            except PoolError as exc:
                exc.request_id = request_id
                raise
            result = await self._answer(job, within)
            outcome = Outcome.OK
            return result
        except PoolError as exc:
            outcome = exc.outcome
            raise
        except trio.Cancelled:
            # the caller stopped waiting: its model is stopped for it, if it computes it
            # and --cancel-computing says so
            cancelled = job is not None and self._cancel(job)
            outcome = Outcome.CANCELLED if cancelled else Outcome.CLIENT_GONE
            raise
        finally:
            total = trio.current_time() - started
            if outcome is not None:
                self._metrics.request_done(outcome, total, priority)
            if timing is not None:
                if job is not None:
                    timing.queue_wait = job.timing.queue_wait
                    timing.compute = job.timing.compute
                    timing.worker, timing.pid = job.timing.worker, job.timing.pid
                timing.total = total

    async def _submit(
        self, request: Any, request_id: str, deadline: float | None, priority: Priority
    ) -> Job:
        if self._pool.closing:
            raise ShuttingDown()
        if self._schema is not None:
            self._schema.check(request)
        if deadline is not None:
            self._refuse_if_late(deadline, priority)
        config = self._config
        wire_id = None if config.id_field is None else f"{self._prefix}.{self._requests}"
        line = encode_request(request, config.id_field, wire_id)
        job = Job(line, request_id, wire_id, config.queue_timeout, deadline, priority)
        await self._pool.queue.put(job)
        return job

    def _refuse_if_late(self, deadline: float, priority: Priority) -> None:
        """DeadlineUnmet if the requests queued ahead of it (of its class and above) would
        keep every model busy past its deadline, at their measured mean compute time."""
        mean, ready = self._metrics.mean_compute(), self._pool.ready_count
        if mean is None or not ready:
            return
        by_class = self._pool.queue.waiting_by_priority()
        ahead = sum(n for p, n in by_class.items() if Priority(p).rank >= priority.rank)
        if not by_class:
            ahead = self._pool.queue.length  # a shared queue keeps no classes
        wait = ahead * mean / ready
        left = deadline - trio.current_time()
        if wait > left:
            raise DeadlineUnmet(
                f"{ahead} request(s) queued ahead of it would keep the {ready} model(s) "
                f"busy for about {wait:.1f} s, past its deadline ({left:.1f} s from now)",
                retry_after=max(1, math.ceil(wait)),
            )

    async def _answer(self, job: Job, within: float | None) -> dict[str, Any]:
        """The job's answer; QueueTimeout if no worker took it within the queue timeout,
        DeadlineExceeded if none took it before its deadline."""
        queue = self._pool.queue
        try:
            await queue.wait(job)
        finally:
            if not job.done.is_set():
                queue.abandon(job)
                self._pool._stop_idle_starts()
        if isinstance(job.error, QueueTimeout):
            self._pool._stop_idle_starts()  # it left the queue: maybe the last one, while draining
            waited = trio.current_time() - job.enqueued_at
            if job.deadline is not None and job.take_by == job.deadline:
                detail = f"it waited {waited:.2f} s in the queue: no model was free before its"
                error = DeadlineExceeded(f"{detail} deadline ({within:g} s)")
                error.request_id = job.request_id
                raise error
            limit = self._config.queue_timeout
            log.warning("request %s: no model free within %g s", job.request_id, limit)
        return job.result()

    def _cancel(self, job: Job) -> bool:
        """Its caller went away: stop the model computing it, if one does and
        --cancel-computing says to (auto: when its replacement is a fork)."""
        policy = self._config.cancel_computing
        if policy == "never" or not job.taken.is_set() or job.done.is_set():
            return False
        if policy == "auto" and not self._pool._replacement_forks():
            return False
        return job.cancel_computing()
