"""Serving with one ready model: jobs from the queue, one at a time, until the model must go.

A job that times out, crashes the model or gets a broken answer costs the model: the
session answers the job, kills the model and everything it started, and ends, so that
its worker starts a fresh one. So does a model that goes out of step (prints a result
nobody asked for): its current request keeps its first result, but the model is not
trusted with another.

A module of its own because it holds what lives as long as one model (its answers
against --max-requests, the job in hand, the wait for the next one), where a worker
(worker.py) holds what lives as long as its slot: its counts, its failures, its back-off.
It tells its worker what happened through `SessionOwner`, and takes jobs through
`JobSource`: it knows neither the worker nor the pool beyond those.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from modelpool.core import logs
from modelpool.core.codec import ResultError, parse_result
from modelpool.core.errors import Cancelled, ModelFailed, ModelTimeout, ShuttingDown
from modelpool.core.kinds import FailureKind, RestartReason, WorkerState

if TYPE_CHECKING:
    from modelpool.core.job import Job
    from modelpool.process.model import ModelProcess
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.worker")


class ServingMetrics(Protocol):
    """What a session counts (metrics.py's PoolMetrics is one)."""

    def count_compute(self, seconds: float) -> None: ...
    def count_stale_result(self) -> None: ...


class JobSource(Protocol):
    """What a session needs of the pool: its jobs (the pool's members for its workers,
    private by name: not the library's surface), and where it counts."""

    @property
    def metrics(self) -> ServingMetrics: ...

    async def _next_job(self) -> Job:
        """The oldest job; EndOfChannel once the pool has no more for this node."""
        ...

    def _take(self, job: Job) -> bool: ...
    def _retry(self, job: Job, reason: str) -> None: ...


class SessionOwner(Protocol):
    """What a session needs of the worker that runs it (worker.py's Worker is one)."""

    @property
    def index(self) -> int: ...
    @property
    def retiring(self) -> str | None: ...
    @property
    def memory_kill(self) -> str | None: ...
    def set_state(self, state: WorkerState) -> None: ...
    def answered(self) -> None: ...
    def worn_out(self, why: str) -> None: ...
    def forget_failures(self) -> None: ...
    def job_failed(
        self, reason: RestartReason, detail: str, request_id: str, model: ModelProcess, summary: str
    ) -> None: ...
    def record(
        self, reason: RestartReason, detail: str, request_id: str | None, model: ModelProcess
    ) -> None: ...
    def failed_on_its_own(
        self, reason: RestartReason, detail: str, model: ModelProcess
    ) -> None: ...


class ModelSession:
    """One ready model's service; `serve` returns once the model must go or work ends.

    `limit` is how many answers the model may give (--max-requests), `ready_at` the
    trio time of its ready line.
    """

    def __init__(
        self,
        owner: SessionOwner,
        pool: JobSource,
        model: ModelProcess,
        config: PoolConfig,
        limit: int | None,
        ready_at: float,
    ) -> None:
        self._owner = owner
        self._pool = pool
        self._model = model
        self._config = config
        self._limit = limit
        self._ready_at = ready_at
        self._served = 0  # answers by this model, for --max-requests
        self._idle_scope: trio.CancelScope | None = None  # cancelled to retire it while idle
        self.job: Job | None = None  # the one it computes, if any

    def stop_waiting(self) -> None:
        """Retired while idle: stop waiting for a job (one in hand is finished first)."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def serve(self) -> bool:
        """Feed jobs to the ready model; True when the pool has no more jobs to give."""
        model = self._model
        model.on_stale = self._pool.metrics.count_stale_result
        while True:
            if self._owner.retiring is not None:
                return True
            self._owner.set_state(WorkerState.IDLE)
            job: Job | None = None
            # One scope for both reasons to stop waiting: the model's trouble, or retire().
            with model.cancel_on_trouble() as self._idle_scope:
                try:
                    job = await self._pool._next_job()
                except trio.EndOfChannel:
                    return True
            self._idle_scope = None
            if job is None:  # receiving is cancel-safe: no job was lost
                if model.stdout_ended.is_set() or model.out_of_step:
                    await self._replace_unprompted()
                    return False
                return True  # retired while idle
            if not self._pool._take(job):
                continue
            if not await self._run(job):
                return False

    async def _run(self, job: Job) -> bool:
        """Serve one job; False when the model must be replaced."""
        model = self._model
        self.job, model.request_id = job, job.request_id
        try:
            with logs.field("request_id", job.request_id):
                return await self._compute(job)
        finally:
            self.job = model.request_id = None

    async def _compute(self, job: Job) -> bool:
        model = self._model
        self._owner.set_state(WorkerState.BUSY)
        job.timing.worker, job.timing.pid = self._owner.index, model.pid
        started = trio.current_time()
        # Whether the job is still this session's to settle: once handed back to the
        # queue, another worker may take it while this one replaces its model.
        owned = True
        try:
            if model.stdout_ended.is_set() or model.out_of_step:
                owned = False
                self._pool._retry(job, "model failed before it received the request")
                await self._replace_unprompted()
                return False
            payload: bytes | None = None
            unread = False  # the model's output ended with the request still in its stdin
            limit = self._config.timeout
            if job.deadline is not None:  # X-Request-Timeout: what is left of it, at most
                limit = min(limit, max(0.0, job.deadline - started))
            # Its caller going away may cancel this too (intake.py, --cancel-computing).
            with trio.move_on_after(limit) as deadline:
                job.compute_scope = deadline
                model.expect_result(job.wire_id)
                try:
                    await model.send(job.line)
                except trio.BrokenResourceError:
                    owned = False
                    self._pool._retry(job, "model stopped reading before the request")
                    await self._replace_unprompted()
                    return False
                try:
                    payload = await model.receive_result()
                except trio.EndOfChannel:
                    # Every byte of the request still in the pipe: the model never read
                    # any of it (it is the last thing written), however late it died.
                    unread = model.unread_input() >= len(job.line)
            job.compute_scope = None
            if deadline.cancelled_caught and job.cancelled_by_caller:
                job.timing.compute = trio.current_time() - started
                await self._fail(job, Cancelled(), "its caller went away (--cancel-computing)")
                return False
            if unread:
                owned = False
                self._pool._retry(job, "model died before it read the request")
                await self._replace_unprompted()
                return False
            job.timing.compute = trio.current_time() - started
            self._pool.metrics.count_compute(job.timing.compute)
            if deadline.cancelled_caught:
                late = f"no result after {limit:g} s"
                if limit < self._config.timeout:
                    late += " (what was left of its X-Request-Timeout)"
                error = ModelTimeout(late + model.missing_result(quote=True))
                await self._fail(job, error, late + model.missing_result(quote=False))
                return False
            if payload is None:
                failure = await model.describe_failure()
                if (memory_kill := self._owner.memory_kill) is not None:
                    failure = ModelFailed(
                        f"model killed: it {memory_kill}", kind=FailureKind.MEMORY
                    )
                await self._fail(job, failure)
                return False
            try:
                value = parse_result(payload, self._config.id_field, job.wire_id)
            except ResultError as exc:
                failure = ModelFailed(
                    f"model printed an invalid result: {exc}", kind=FailureKind.PROTOCOL
                )
                await self._fail(job, failure)
                return False
            self._owner.answered()
            self._served += 1
            log.debug(  # per request: --access-log gives one line at INFO
                "%s request %s served in %.2f s (queued %.2f s)",
                model.name,
                job.request_id,
                job.timing.compute,
                started - job.enqueued_at,
            )
            job.succeed(value)
            # The answer goes out before the model is looked at: its caller, runnable
            # since `succeed`, has had its turn once this task has yielded twice (trio
            # runs every runnable task once per turn, in either order); a look at the
            # model (procfs, its pipe) before it held up every answer.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            await model.catch_up()
            if model.out_of_step or model.hung:
                await self._replace_after_answer(job)
                return False
            if self._limit is not None and self._served >= self._limit:
                self._owner.worn_out(f"served {self._served} requests (--max-requests)")
            return True
        finally:
            if owned and not job.done.is_set():
                job.fail(ShuttingDown())

    async def _fail(
        self, job: Job, error: ModelTimeout | ModelFailed | Cancelled, logged: str | None = None
    ) -> None:
        """Kill and reap a model that failed a job, then answer the job.

        `logged` is what the log (and /healthz) says of the error when str(error), for
        the client and /status, quotes what the model printed.
        """
        model = self._model
        await model.kill()
        self._owner.set_state(WorkerState.RESTARTING)
        if isinstance(error, ModelTimeout):
            reason = RestartReason.TIMEOUT
        elif isinstance(error, Cancelled):
            reason = RestartReason.CANCELLED
        else:
            reason = RestartReason(error.kind)
        what = str(error) if logged is None else logged
        self._owner.job_failed(reason, str(error), job.request_id, model, what)
        note = model.stderr_note()  # not the lines: they may carry users' data
        level = logging.WARNING if isinstance(error, Cancelled) else logging.ERROR
        verb = "cancelled" if isinstance(error, Cancelled) else "failed"
        log.log(
            level,
            "%s request %s %s, model killed: %s%s",
            model.name,
            job.request_id,
            verb,
            what,
            note,
        )
        job.fail(error)

    async def _replace_after_answer(self, job: Job) -> None:
        """The model answered, then printed another result (it is out of step), or did
        not get back to reading its stdin within --timeout (it is hung)."""
        model = self._model
        self._owner.set_state(WorkerState.RESTARTING)
        await model.kill()
        if model.out_of_step:
            reason, what = RestartReason.PROTOCOL, model.out_of_step
        else:
            reason, what = RestartReason.TIMEOUT, str(model.hung)
        detail = f"{what} (after answering request {job.request_id})"
        self._owner.record(reason, detail, job.request_id, model)
        log.error("%s %s; replaced", model.name, detail)

    async def _replace_unprompted(self) -> None:
        """The model died, or went out of step, with no request to blame."""
        model = self._model
        self._owner.set_state(WorkerState.RESTARTING)
        if model.out_of_step:
            what, reason = model.out_of_step, RestartReason.PROTOCOL
        else:
            failure = await model.describe_failure()
            what, reason = f"died while idle: {failure.detail}", RestartReason.DIED_IDLE
            if (memory_kill := self._owner.memory_kill) is not None:
                what, reason = f"killed: it {memory_kill}", RestartReason.MEMORY
        await model.kill()
        note = model.stderr_note()  # not the lines: they may carry users' data
        log.error("%s %s; killed%s", model.name, what, note)
        if trio.current_time() - self._ready_at > self._config.backoff_max:
            self._owner.forget_failures()  # it had been healthy for a good while
        self._owner.failed_on_its_own(reason, what, model)
