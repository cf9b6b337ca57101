"""The callers' side of the pool: a request becomes a job, and its answer comes back.

`Pool.predict` is this. A request is checked (the request schema) and encoded into one
line before it is queued, so a bad one is refused at once and never reaches a model;
its answer, or the PoolError saying why there is none, goes back to the caller with its
request id, and the request is counted under its outcome. The workers' side of the
queue (taking a job, queueing it again) is the pool's (pool.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio

from modelpool.core.codec import encode_request
from modelpool.core.errors import PoolError, QueueTimeout, ShuttingDown
from modelpool.core.job import Job, Timing
from modelpool.core.kinds import Outcome

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
    def _stop_idle_starts(self) -> None: ...


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
        self, request: Any, request_id: str | None, timing: Timing | None
    ) -> dict[str, Any]:
        """See Pool.predict."""
        self._requests += 1
        request_id = request_id or f"{self._prefix}-{self._requests}"
        started = trio.current_time()
        outcome: Outcome | None = None
        job: Job | None = None
        try:
            try:
                job = await self._submit(request, request_id)
            except PoolError as exc:
                exc.request_id = request_id
                raise
            result = await self._answer(job)
            outcome = Outcome.OK
            return result
        except PoolError as exc:
            outcome = exc.outcome
            raise
        except trio.Cancelled:
            outcome = Outcome.CLIENT_GONE  # the caller stopped waiting
            raise
        finally:
            total = trio.current_time() - started
            if outcome is not None:
                self._metrics.request_done(outcome, total)
            if timing is not None:
                if job is not None:
                    timing.queue_wait = job.timing.queue_wait
                    timing.compute = job.timing.compute
                    timing.worker, timing.pid = job.timing.worker, job.timing.pid
                timing.total = total

    async def _submit(self, request: Any, request_id: str) -> Job:
        if self._pool.closing:
            raise ShuttingDown()
        if self._schema is not None:
            self._schema.check(request)
        config = self._config
        wire_id = None if config.id_field is None else f"{self._prefix}.{self._requests}"
        line = encode_request(request, config.id_field, wire_id)
        job = Job(line, request_id, wire_id, config.queue_timeout)
        await self._pool.queue.put(job)
        return job

    async def _answer(self, job: Job) -> dict[str, Any]:
        """The job's answer, or QueueTimeout if no worker took it within the queue timeout."""
        queue = self._pool.queue
        try:
            await queue.wait(job)
        finally:
            if not job.done.is_set():
                queue.abandon(job)
                self._pool._stop_idle_starts()
        if isinstance(job.error, QueueTimeout):
            timeout = self._config.queue_timeout
            log.warning("request %s: no model free within %g s", job.request_id, timeout)
            self._pool._stop_idle_starts()  # it left the queue: maybe the last one, while draining
        return job.result()
