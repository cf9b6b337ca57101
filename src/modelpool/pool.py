"""The pool: N workers pulling jobs from one FIFO memory channel.

Embed it in any trio program::

    async with open_pool(PoolConfig(workers=2)) as pool:
        answer = await pool.predict({"data": 3})

Admission is counted here rather than by the channel's buffer, so a request whose
caller gave up stops counting against `max_queue` at once, even before a worker
pops it and skips it.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .codec import encode_request
from .config import PoolConfig
from .errors import (
    ModelCommandError,
    ModelFailed,
    PoolError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from .job import Job, Timing
from .metrics import PoolMetrics
from .operations import Operations
from .reaper import Reaper
from .schema import RequestSchema
from .worker import State, Worker

log = logging.getLogger("modelpool.pool")

MAX_ATTEMPTS = 2  # a job whose model died before reading it is tried once more


class Pool:
    """Hands each request to the first free model; built and run by `open_pool`."""

    def __init__(self, config: PoolConfig, nursery: trio.Nursery, reaper: Reaper) -> None:
        self.config = config
        self.reaper = reaper
        self.closing = False
        self.ever_ready = False
        self.started_at = trio.current_time()
        self._nursery = nursery
        self._send, self.jobs = trio.open_memory_channel[Job](math.inf)
        self._pending = 0
        self._changed = trio.Event()
        self._schema = (
            None if config.request_schema is None else RequestSchema(config.request_schema)
        )
        self._prefix = secrets.token_hex(4)
        self._requests = 0
        self.stopped = trio.Event()
        self.generation = 1  # the model version new workers run; a reload raises it
        self.model_config = config  # what new workers run (a reload changes model_cmd)
        self.retired_busy_seconds = 0.0  # busy time of workers no longer in the pool
        self._indexes = itertools.count()
        self._random = random.Random()
        self.workers: list[Worker] = []
        self.metrics = PoolMetrics(self)
        self.operations = Operations(self)
        for _ in range(config.workers):
            self.add_worker()

    # -- what callers use -------------------------------------------------------------

    async def predict(
        self, request: Any, request_id: str | None = None, timing: Timing | None = None
    ) -> dict[str, Any]:
        """The model's answer to `request`, or a PoolError saying why there is none.

        `request_id` names the request in logs and errors; one is made up if not given.
        `timing`, if given, is filled in with where the request's time went.
        """
        self._requests += 1
        request_id = request_id or f"{self._prefix}-{self._requests}"
        started = trio.current_time()
        outcome: str | None = None
        job: Job | None = None
        try:
            try:
                job = self._submit(request, request_id)
            except PoolError as exc:
                exc.request_id = request_id
                raise
            result = await self._answer(job)
            outcome = "ok"
            return result
        except PoolError as exc:
            outcome = exc.outcome
            raise
        except trio.Cancelled:
            outcome = "client_gone"  # the caller stopped waiting
            raise
        finally:
            total = trio.current_time() - started
            if outcome is not None:
                self.metrics.request_done(outcome, total)
            if timing is not None:
                if job is not None:
                    timing.queue_wait = job.timing.queue_wait
                    timing.compute = job.timing.compute
                    timing.worker, timing.pid = job.timing.worker, job.timing.pid
                timing.total = total

    async def _answer(self, job: Job) -> dict[str, Any]:
        """The job's answer, or QueueTimeout if no worker took it within the queue timeout.

        The queue timeout is the deadline of the one wait, until a worker takes the job
        and lifts it (see `take`): waiting for 'taken' and then for 'done' cost the caller
        a task switch per request.
        """
        timeout = self.config.queue_timeout
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        try:
            with trio.CancelScope(deadline=deadline) as job.queue_deadline:
                await job.done.wait()
            if not job.done.is_set():  # the deadline passed
                if job.taken.is_set():  # just as a worker took the job: its answer comes
                    await job.done.wait()
                else:
                    log.warning("request %s: no model free within %g s", job.request_id, timeout)
                    self._abandon(job)
                    job.fail(QueueTimeout())
        finally:
            if not job.done.is_set():
                self._abandon(job)
        return job.result()

    @property
    def queue_length(self) -> int:
        return self._pending

    @property
    def ready_count(self) -> int:
        return sum(w.ready for w in self.workers)

    async def wait_ready(self, count: int | None = None) -> None:
        """Wait until `count` models (all by default) are ready; ShuttingDown if stopping."""
        want = len(self.workers) if count is None else count
        while self.ready_count < want:
            if self.closing:
                raise ShuttingDown()
            await self._changed.wait()

    def status(self) -> dict[str, Any]:
        healthy, problem = self.health()
        return {
            "workers": [w.snapshot() for w in self.workers],
            "size": len(self.workers),
            "ready": self.ready_count,
            "queue": self._pending,
            "max_queue": self.config.max_queue,
            "shutting_down": self.closing,
            "healthy": healthy,
            "problem": problem,
            "orphans_killed": self.reaper.killed,
            "recent": self.metrics.recent.summary(),
        }

    def health(self) -> tuple[bool, str | None]:
        """Unhealthy once every model has kept failing for `unhealthy_after` seconds.

        Failing means failing on its own: a start that fails, a model that dies while
        idle. A request that crashes its model says nothing about the model's health,
        and neither does a long first start-up.
        """
        limit = self.config.unhealthy_after
        now = trio.current_time()
        since = [w.failing(now) for w in self.workers]
        if limit is None or not since or None in since:
            return True, None
        failing_for = now - max(s for s in since if s is not None)
        if failing_for < limit:
            return True, None
        last = next(
            (w.last_failure["detail"] for w in self.workers if w.last_failure is not None), ""
        )
        return False, f"every model has failed for {failing_for:.0f} s; last: {last}"

    def shutdown(self) -> None:
        """Take no new requests; serve the queued ones until the drain deadline, then stop."""
        if self.closing:
            return
        self.closing = True
        self._send.close()
        log.info(
            "shutting down: %d request(s) queued, draining for up to %g s",
            self._pending,
            self.config.effective_drain_timeout,
        )
        self._nursery.start_soon(self._drain)
        self._stop_idle_starts()

    def kill(self) -> None:
        """Hard stop: SIGKILL every model now; every waiting request gets ShuttingDown."""
        self.shutdown()
        for worker in self.workers:
            worker.kill_model()
        self._abort()

    # -- changing the set of workers (operations.py decides when) ----------------------

    def add_worker(
        self, config: PoolConfig | None = None, generation: int | None = None, trial: bool = False
    ) -> Worker:
        """Start one more worker; it leaves `workers` when it ends (retired or stopped)."""
        worker = Worker(
            next(self._indexes),
            self,
            config or self.model_config,
            self.generation if generation is None else generation,
            trial,
        )
        self.workers.append(worker)
        self._nursery.start_soon(self._run_worker, worker, name=f"modelpool {worker.name}")
        return worker

    async def _run_worker(self, worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            if not self.closing and worker in self.workers:
                self.workers.remove(worker)  # while stopping, /status shows every worker
                self.retired_busy_seconds += worker.busy_seconds()
                self.worker_changed()

    def start_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a task beside the workers (operations that must outlive their caller)."""
        self._nursery.start_soon(fn)

    def request_limit(self) -> int | None:
        """How many answers a new model may give (--max-requests plus jitter), or None."""
        if self.config.max_requests is None:
            return None
        return self.config.max_requests + self._random.randint(0, self.config.max_requests_jitter)

    def recycle(self, worker: Worker, why: str, reason: str = "recycled") -> None:
        """Replace a worker by surge (its replacement is ready before it retires)."""
        if not self.closing:
            self._nursery.start_soon(self.operations.recycle, worker, why, reason)

    # -- what workers use -------------------------------------------------------------

    def take(self, job: Job) -> bool:
        """Claim a job popped from the channel; False if its caller already gave up."""
        if job.abandoned:
            return False
        job.queued = False
        job.attempts += 1
        self._pending -= 1
        waited = trio.current_time() - job.enqueued_at
        job.timing.queue_wait = waited
        if job.attempts == 1:  # a job queued again is one request: observe it once
            self.metrics.queue_wait.observe(waited)
        job.taken.set()
        if job.queue_deadline is not None:
            job.queue_deadline.deadline = math.inf  # the queue timeout no longer applies
        self._stop_idle_starts()
        return True

    def retry(self, job: Job, reason: str) -> None:
        """Queue a job again whose model died before it could have read it."""
        if job.abandoned or self.closing or job.attempts >= MAX_ATTEMPTS:
            job.fail(ModelFailed(reason))
            return
        log.warning("request %s: %s; queued again", job.request_id, reason)
        self._enqueue(job)

    def wants_models(self) -> bool:
        """False once shutting down with nothing left in the queue."""
        return not (self.closing and self._pending == 0)

    def worker_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if not self.ever_ready and self.ready_count == len(self.workers):
            self.ever_ready = True
            elapsed = trio.current_time() - self.started_at
            size = len(self.workers)
            log.info("%d/%d models ready after %.1f s", size, size, elapsed)
        if all(w.state is State.STOPPED for w in self.workers):
            self.stopped.set()

    # -- inside -----------------------------------------------------------------------

    def _submit(self, request: Any, request_id: str) -> Job:
        if self.closing:
            raise ShuttingDown()
        if self._schema is not None:
            self._schema.check(request)
        wire_id = None if self.config.id_field is None else f"{self._prefix}.{self._requests}"
        line = encode_request(request, self.config.id_field, wire_id)
        if self._pending >= self.config.max_queue:
            raise QueueFull()
        job = Job(line, request_id, wire_id)
        self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        job.queued = True
        self._pending += 1
        self._send.send_nowait(job)

    def _abandon(self, job: Job) -> None:
        job.abandoned = True
        if job.queued:
            job.queued = False
            job.line = b""  # it waits in the channel until a worker skips it: keep it small
            self._pending -= 1
            self._stop_idle_starts()

    def _stop_idle_starts(self) -> None:
        """While draining with an empty queue, a model still starting has nothing to do."""
        if self.wants_models():
            return
        for worker in self.workers:
            if worker.state in (State.STARTING, State.RESTARTING):
                worker.scope.cancel()

    async def _drain(self) -> None:
        with trio.move_on_after(self.config.effective_drain_timeout):
            await self.stopped.wait()
        if self.stopped.is_set():
            return
        log.warning(
            "drain deadline passed with %d request(s) queued; stopping all models", self._pending
        )
        self._abort()

    def _abort(self) -> None:
        """Fail every queued job and stop every worker, busy or not."""
        while True:
            try:
                job = self.jobs.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if self.take(job):
                job.fail(ShuttingDown())
        for worker in self.workers:
            worker.scope.cancel()


@asynccontextmanager
async def open_pool(
    config: PoolConfig | None = None, reaper: Reaper | None = None
) -> AsyncIterator[Pool]:
    """Run a pool for the duration of the block; on exit, drain it and stop every model.

    `reaper` decides how far the pool goes to kill what its models leave behind; the
    default kills each model's group, tree and token carriers (see reaper.py). Raises
    ModelCommandError at once if the model command cannot even be executed.
    """
    config = config or PoolConfig()
    reaper = reaper or Reaper()
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(config, nursery, reaper)
            log.info("starting %d model(s): %s", config.workers, " ".join(config.model_cmd))
            nursery.start_soon(_sweep_until_stopped, pool)
            if config.model_max_rss is not None:
                nursery.start_soon(pool.operations.watch_memory)
            try:
                yield pool
            finally:
                pool.shutdown()
    except BaseExceptionGroup as group:
        fatal = group.subgroup(ModelCommandError)
        if fatal is None:
            raise
        raise _first(fatal) from None
    finally:
        with trio.CancelScope(shield=True):
            await reaper.final_sweep()


async def _sweep_until_stopped(pool: Pool) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.reaper.run)
        await pool.stopped.wait()
        nursery.cancel_scope.cancel()


def _first(group: BaseExceptionGroup) -> BaseException:
    error = group.exceptions[0]
    return _first(error) if isinstance(error, BaseExceptionGroup) else error
