"""A worker owns one model process at a time and feeds it jobs from the pool's queue.

Its loop: start a model (after a back-off delay if models keep failing on their own),
wait for the ready line, then take jobs one by one. A job that times out, crashes the
model or gets a broken answer costs the model: the worker answers the job, kills the
model and everything it started, and starts a fresh one. So does a model that goes out
of step (prints a result nobody asked for): its current request keeps its first result,
but the model is not trusted with another.

At first start, while no model of the pool was ever ready, a model that fails before
its ready line is no reason to back off and retry but a mistake in the command: once
every worker's model failed so, the pool gives up (FirstStartFailed), unless it was
told to keep trying (see Pool.first_start_failed).
"""

from __future__ import annotations

import enum
import logging
import shlex
import time
from typing import TYPE_CHECKING, Any

import trio

from modelpool.core import logs
from modelpool.core.codec import ResultError, parse_result
from modelpool.core.errors import (
    FirstStartFailed,
    ModelCommandError,
    ModelFailed,
    ModelTimeout,
    ShuttingDown,
)
from modelpool.core.job import Job
from modelpool.process.model import CommandNotRunnable, ModelProcess, StartFailed, open_model

if TYPE_CHECKING:
    from modelpool.pool.pool import Pool
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.worker")

HEALTHY_UPTIME = 5.0  # seconds a model must stay up to count as healthy
QUOTED_STDERR_CHARS = 500  # of each stderr line the first-start verdict quotes


class State(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class Worker:
    """One slot of the pool; `scope` is cancelled by the pool to stop it early.

    A worker runs one command (`config.model_cmd`) of one `generation` for its whole
    life. New versions, recycling and resizing never change a worker: they start new
    workers and retire old ones (see operations.py). A `trial` worker is a surge
    replacement: if its first model fails to start, it gives up instead of retrying,
    so whoever started it can tell at once. Its `device` (--devices) is fixed too:
    every model it starts gets that one (see devices.py).
    """

    def __init__(
        self,
        index: int,
        pool: Pool,
        config: PoolConfig | None = None,
        generation: int = 1,
        trial: bool = False,
        device: str | None = None,
    ) -> None:
        self.index = index
        self.name = f"worker {index}"
        self.device = device
        self.generation = generation
        self.trial = trial
        self.state = State.STARTING
        self.served = 0
        self.failed = 0
        self.restarts = 0
        self.failing_since: float | None = None  # trio time of the first failure in a row
        self.last_failure: dict[str, Any] | None = None
        self.failure_summary: str | None = None  # last_failure's detail, fit for /healthz
        self.failed_first_start = False  # a model failed before any of the pool's was ready
        self.scope = trio.CancelScope()
        self._pool = pool
        self._config = config or pool.config
        self.retiring: str | None = None  # why it is being retired, once it is
        self.start_failure: str | None = None  # why a trial worker gave up
        self.became_ready = trio.Event()
        self.ended = trio.Event()
        self._idle_scope: trio.CancelScope | None = None  # cancelled to retire it while idle
        self._model_served = 0  # answers by the current model, for --max-requests
        self._model_limit: int | None = None
        self._recycle_asked = False
        self._memory_kill: str | None = None  # why the model was killed for its memory
        self._starts = 0
        self._failures_in_a_row = 0  # models that failed with no request to blame
        self._ready_at = 0.0
        self._start: dict[str, Any] | None = None  # how its current model started, how fast
        self._model: ModelProcess | None = None
        self._restart_reason = "crashed"  # why the current model will be replaced
        self._busy_total = 0.0  # seconds spent computing, for modelpool_model_busy_seconds
        self._state_since = time.monotonic()
        self._job: Job | None = None

    @property
    def config(self) -> PoolConfig:
        return self._config

    @property
    def pid(self) -> int | None:
        """The current model's pid, while there is one."""
        return None if self._model is None else self._model.pid

    @property
    def ready(self) -> bool:
        return self.state in (State.IDLE, State.BUSY)

    def failing(self, now: float) -> float | None:
        """Since when this worker's models keep failing on their own; None if they do not.

        A model that has served a request, or stayed up for HEALTHY_UPTIME, ends a run
        of failures: one that dies a moment after its ready line does not.
        """
        if self.failing_since is None:
            return None
        if self.ready and now - self._ready_at >= HEALTHY_UPTIME:
            self.failing_since = None
        return self.failing_since

    def memory_mib(self) -> float | None:
        """What its current model holds, for --model-max-rss (see ModelHandle.memory_mib).

        Called from a thread (see Operations.watch_memory): the model is read once."""
        model = self._model
        return None if model is None else model.proc.memory_mib()

    def busy_seconds(self) -> float:
        """Seconds this worker's models have spent computing, the current request included."""
        if self.state is State.BUSY:
            return self._busy_total + time.monotonic() - self._state_since
        return self._busy_total

    def snapshot(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "id": self.index,
            "state": self.state.value,
            "generation": self.generation,
            "device": self.device,
            "model_cmd": self._config.model_cmd,
            "retiring": self.retiring,
            "pid": self.pid,
            "start": self._start if self.ready else None,
            "uptime": round(now - self._ready_at, 3) if self.ready else None,
            "request_id": None if self._job is None else self._job.request_id,
            "request_age": (
                None if self._job is None else round(time.monotonic() - self._state_since, 3)
            ),
            "busy_seconds": round(self.busy_seconds(), 6),
            "served": self.served,
            "failed": self.failed,
            "restarts": self.restarts,
            "next_backoff": self._config.backoff(self._failures_in_a_row),
            "last_failure": self.last_failure,
        }

    async def run(self) -> None:
        logs.set_field("worker", self.index)
        try:
            with self.scope:
                await self._loop()
        finally:
            self._set(State.STOPPED)
            self.ended.set()

    def retire(self, reason: str) -> None:
        """Stop taking jobs: at once if idle or starting, after its current job if busy.

        Its model is then stopped gracefully (stdin closed, `exit_grace`, SIGKILL).
        """
        if self.retiring is not None:
            return
        self.retiring = reason
        log.info("%s: retiring (%s)", self.name, reason)
        if self.state in (State.STARTING, State.RESTARTING):
            self.scope.cancel()
        elif self._idle_scope is not None:
            self._idle_scope.cancel()

    def _set(self, state: State) -> None:
        now = time.monotonic()
        was_ready = self.ready
        if self.state is State.BUSY:
            self._busy_total += now - self._state_since
        if state is not self.state:
            self._state_since = now
        self.state = state
        if was_ready != self.ready:
            self._pool.ready_models += 1 if self.ready else -1
        if not (was_ready and self.ready):  # idle <-> busy, twice a request, is no news to the pool
            self._pool.worker_changed()

    async def _loop(self) -> None:
        while self._pool.wants_models() and self.retiring is None:
            delay = self._pool.starter_for(self).backoff(self._config, self._failures_in_a_row)
            if self._starts:
                self.restarts += 1
                self._pool.metrics.restarts.labels(reason=self._restart_reason).inc()
                log.info(
                    "%s: restart %d in %.1f s (%d failure(s) on its own in a row)",
                    self.name,
                    self.restarts,
                    delay,
                    self._failures_in_a_row,
                )
            if delay:
                self._set(State.RESTARTING)
                await trio.sleep(delay)
            self._starts += 1
            self._set(State.STARTING)
            if await self._one_model():
                return

    async def _one_model(self) -> bool:
        """Start a model and serve with it; True when the pool has no more jobs to give."""
        try:
            starter = self._pool.starter_for(self)
            opened = open_model(
                self._config, self.name, self._pool.reaper, starter, device=self.device
            )
            async with opened as model:
                self._model = model
                await model.wait_ready()
                self._ready_at = trio.current_time()
                took = self._ready_at - model.started_at
                self._start = {"method": model.method, "seconds": round(took, 4)}
                self._pool.metrics.model_start.labels(method=model.method).observe(took)
                log.info("%s ready after %.1f s (%s)", model.name, took, model.method)
                self._model_served = 0
                self._model_limit = self._pool.request_limit()
                self._recycle_asked = False
                self._memory_kill = None
                self.became_ready.set()
                return await self._serve(model)
        except* StartFailed as group:  # raised inside open_model's nursery: grouped
            for exc in group.exceptions:
                # Fatal only for the service's own command, before it ever served: a
                # trial (a reload or a resize) that cannot run its command is a failed
                # operation, whenever it comes, and the models already there serve on.
                if (
                    isinstance(exc, CommandNotRunnable)
                    and not self.trial
                    and not self._pool.ever_ready
                ):
                    raise ModelCommandError(str(exc)) from exc
                started = self._model
                summary = exc.summary if isinstance(exc, StartFailed) else None
                stderr = exc.stderr if isinstance(exc, StartFailed) else []
                self._failed_on_its_own("start_failed", str(exc), started, summary, stderr)
                if not self.trial and self._pool.first_start_failed(self):
                    raise FirstStartFailed(*self._first_start_verdict(exc, started)) from exc
                log.error("%s%s", exc, "" if started is None else started.stderr_note())
                if self.trial:
                    self.start_failure = str(exc)
        finally:
            self._model = None
            logs.set_field("pid", None)
        return self.start_failure is not None  # a trial gives up: its starter decides

    def _first_start_verdict(
        self, exc: Exception, model: ModelProcess | None
    ) -> tuple[str, list[str]]:
        """Why the service gives up at first start: the failure, the command, its stderr.

        Elsewhere a model's stderr stays out of ERROR lines (it may hold users' data,
        see ModelProcess.stderr_note). Here it belongs in: no request ever reached
        the model, and a user whose service stops at once must see why without
        knowing where to look (the typo's "can't open file", the ImportError).
        """
        command = shlex.join(self._config.model_cmd)
        verdict = (
            f"{exc}; every model failed to start and none was ever ready "
            f"(--keep-trying keeps restarting them); command: {command}"
        )
        tail = model.stderr_tail if model is not None else getattr(exc, "stderr", [])
        if not tail:
            return verdict, []
        lines = [
            line if len(line) <= QUOTED_STDERR_CHARS else line[:QUOTED_STDERR_CHARS] + "..."
            for line in tail
        ]
        return verdict, lines

    def kill_model(self) -> None:
        """Hard stop: SIGKILL the current model and its tree without waiting."""
        if self._model is not None:
            self._model.kill_group()

    async def _serve(self, model: ModelProcess) -> bool:
        """Feed jobs to a ready model; True when the pool has no more jobs to give."""
        model.on_stale = self._pool.metrics.stale_results.inc
        while True:
            if self.retiring is not None:
                return True
            self._set(State.IDLE)
            job: Job | None = None
            # One scope for both reasons to stop waiting: the model's trouble, or retire().
            with model.cancel_on_trouble() as self._idle_scope:
                try:
                    job = await self._pool.queue.get()
                except trio.EndOfChannel:
                    return True
            self._idle_scope = None
            if job is None:  # receiving is cancel-safe: no job was lost
                if model.stdout_ended.is_set() or model.out_of_step:
                    await self._replace_unprompted(model)
                    return False
                return True  # retired while idle
            if not self._pool.take(job):
                continue
            if not await self._run(model, job):
                return False

    async def _run(self, model: ModelProcess, job: Job) -> bool:
        """Serve one job; False when the model must be replaced."""
        self._job, model.request_id = job, job.request_id
        try:
            with logs.field("request_id", job.request_id):
                return await self._compute(model, job)
        finally:
            self._job = model.request_id = None

    async def _compute(self, model: ModelProcess, job: Job) -> bool:
        self._set(State.BUSY)
        job.timing.worker, job.timing.pid = self.index, model.pid
        started = trio.current_time()
        try:
            if model.stdout_ended.is_set() or model.out_of_step:
                self._pool.retry(job, "model failed before it received the request")
                await self._replace_unprompted(model)
                return False
            payload: bytes | None = None
            with trio.move_on_after(self._config.timeout) as deadline:
                model.expect_result(job.wire_id)
                try:
                    await model.send(job.line)
                except trio.BrokenResourceError:
                    self._pool.retry(job, "model stopped reading before the request")
                    await self._replace_unprompted(model)
                    return False
                try:
                    payload = await model.receive_result()
                except trio.EndOfChannel:
                    payload = None
            job.timing.compute = trio.current_time() - started
            self._pool.metrics.compute.observe(job.timing.compute)
            if deadline.cancelled_caught:
                late = f"no result after {self._config.timeout:g} s"
                error = ModelTimeout(late + model.missing_result(quote=True))
                await self._fail(model, job, error, late + model.missing_result(quote=False))
                return False
            if payload is None:
                failure = await model.describe_failure()
                if self._memory_kill is not None:
                    failure = ModelFailed(f"model killed: it {self._memory_kill}", kind="memory")
                await self._fail(model, job, failure)
                return False
            try:
                value = parse_result(payload, self._config.id_field, job.wire_id)
            except ResultError as exc:
                failure = ModelFailed(f"model printed an invalid result: {exc}", kind="protocol")
                await self._fail(model, job, failure)
                return False
            self.served += 1
            self._model_served += 1
            self._failures_in_a_row = 0
            self.failing_since = None
            log.debug(  # per request: --access-log gives one line at INFO
                "%s request %s served in %.2f s (queued %.2f s)",
                model.name,
                job.request_id,
                job.timing.compute,
                started - job.enqueued_at,
            )
            job.succeed(value)
            await model.catch_up()
            if model.out_of_step or model.hung:
                await self._replace_after_answer(model, job)
                return False
            self._maybe_recycle()
            return True
        finally:
            if not job.done.is_set() and not job.queued:
                job.fail(ShuttingDown())

    def _maybe_recycle(self) -> None:
        """Past its --max-requests, ask the pool for a replacement (once per model)."""
        limit = self._model_limit
        if limit is not None and self._model_served >= limit and self.ask_recycle():
            self._pool.recycle(self, f"served {self._model_served} requests (--max-requests)")

    def ask_recycle(self) -> bool:
        """True the first time a replacement is asked for this model."""
        if self._recycle_asked:
            return False
        self._recycle_asked = True
        return True

    def allow_recycle(self) -> None:
        """A replacement failed to start: it may be asked for again."""
        self._recycle_asked = False

    def kill_for_memory(self, what: str) -> None:
        """Kill a model that grew past the memory limit while computing: its request gets 502."""
        if self._model is not None and self._memory_kill is None:
            self._memory_kill = what
            log.error("%s %s; killing it", self._model.name, what)
            self._model.kill_group()

    async def _fail(
        self,
        model: ModelProcess,
        job: Job,
        error: ModelTimeout | ModelFailed,
        logged: str | None = None,
    ) -> None:
        """Kill and reap a model that failed a job, then answer the job.

        `logged` is what the log (and /healthz) says of the error when str(error), for
        the client and /status, quotes what the model printed.
        """
        await model.kill()
        self._set(State.RESTARTING)
        self.failed += 1
        reason = "timeout" if isinstance(error, ModelTimeout) else error.kind
        what = str(error) if logged is None else logged
        self._record(reason, str(error), job.request_id, model, what)
        note = model.stderr_note()  # not the lines: they may carry users' data
        log.error(
            "%s request %s failed, model killed: %s%s", model.name, job.request_id, what, note
        )
        job.fail(error)

    async def _replace_after_answer(self, model: ModelProcess, job: Job) -> None:
        """The model answered, then printed another result (it is out of step), or did
        not get back to reading its stdin within --timeout (it is hung)."""
        self._set(State.RESTARTING)
        await model.kill()
        reason, what = (
            ("protocol", model.out_of_step) if model.out_of_step else ("timeout", model.hung)
        )
        detail = f"{what} (after answering request {job.request_id})"
        self._record(reason, detail, job.request_id, model)
        log.error("%s %s; replaced", model.name, detail)

    async def _replace_unprompted(self, model: ModelProcess) -> None:
        """A model died, or went out of step, with no request to blame."""
        self._set(State.RESTARTING)
        if model.out_of_step:
            what, reason = model.out_of_step, "protocol"
        else:
            failure = await model.describe_failure()
            what, reason = f"died while idle: {failure.detail}", "died_idle"
            if self._memory_kill is not None:
                what, reason = f"killed: it {self._memory_kill}", "memory"
        await model.kill()
        note = model.stderr_note()  # not the lines: they may carry users' data
        log.error("%s %s; killed%s", model.name, what, note)
        if trio.current_time() - self._ready_at > self._config.backoff_max:
            self._failures_in_a_row = 0  # it had been healthy for a good while
        self._failed_on_its_own(reason, what, model)

    def _failed_on_its_own(
        self,
        reason: str,
        detail: str,
        model: ModelProcess | None = None,
        summary: str | None = None,
        stderr: list[str] | None = None,
    ) -> None:
        """Count a failure towards the back-off and the pool's health."""
        self._failures_in_a_row += 1
        if self.failing_since is None:
            self.failing_since = trio.current_time()
        self._record(reason, detail, None, model, summary, stderr)

    def _record(
        self,
        reason: str,
        detail: str,
        request_id: str | None,
        model: ModelProcess | None,
        summary: str | None = None,
        stderr: list[str] | None = None,
    ) -> None:
        """Keep the last failure for /status: the one place a model's stderr is shown.

        `summary` is the detail without what the model printed, for /healthz. `stderr`
        is that of the process that failed when it was not this worker's model (a
        --preload template that could not load).
        """
        self._restart_reason = reason
        self.failure_summary = detail if summary is None else summary
        self.last_failure = {
            "at": time.time(),
            "reason": reason,
            "detail": detail,
            "request_id": request_id,
            "pid": None if model is None else model.pid,
            "exit_code": None if model is None else model.proc.returncode,
            "stderr": model.stderr_tail if model is not None else (stderr or []),
        }
