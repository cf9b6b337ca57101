"""A worker is one slot of the pool: it owns one model process at a time.

Its loop: start a model (after a back-off delay if models keep failing on their own), wait
for the ready line, then serve jobs with it (a `ModelSession`, serving.py) until the model
must be replaced, and start the next. The worker keeps what outlives each model: its counts,
its last failure, how many models failed in a row (the back-off).

At first start, while no model of the pool was ever ready, a model that fails before its
ready line is no reason to back off and retry but a mistake in the command: once every
worker's model failed so, the pool gives up (FirstStartFailed), unless it was told to keep
trying (see Pool._first_start_failed).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from modelpool.core import logs
from modelpool.core.errors import FirstStartFailed, ModelCommandError
from modelpool.core.kinds import RestartReason, StartMethod, WorkerState
from modelpool.pool.modelmemory import MemorySeen
from modelpool.pool.serving import JobSource, ModelSession, ServingMetrics
from modelpool.process.failures import first_start_verdict
from modelpool.process.model import CommandNotRunnable, ModelProcess, StartFailed, open_model

if TYPE_CHECKING:
    from modelpool.process.reaper import Reaper
    from modelpool.process.starter import ModelStarter
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.worker")

HEALTHY_UPTIME = 5.0  # seconds a model must stay up to count as healthy


class WorkerMetrics(ServingMetrics, Protocol):
    """What a worker counts (metrics.py's PoolMetrics is one)."""

    def count_restart(self, reason: RestartReason) -> None: ...
    def count_model_start(self, method: StartMethod, seconds: float) -> None: ...


class WorkerPool(JobSource, Protocol):
    """What a worker needs of its pool (pool.py's Pool is one), besides its jobs: the
    pool's members for its workers, private by name (not the library's surface)."""

    @property
    def ever_ready(self) -> bool: ...

    model_name: str | None  # with several models (fleet.py), its model's name

    @property
    def reaper(self) -> Reaper: ...
    @property
    def metrics(self) -> WorkerMetrics: ...
    def _wants_models(self) -> bool: ...
    def _starter_for(self, worker: Worker) -> ModelStarter: ...
    def _request_limit(self) -> int | None: ...
    def _first_start_failed(self, worker: Worker) -> bool: ...
    def _recycle(self, worker: Worker, why: str) -> None: ...
    def _worker_changed(self, ready: bool | None = None) -> None: ...


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
        pool: WorkerPool,
        config: PoolConfig,
        generation: int = 1,
        trial: bool = False,
        device: str | None = None,
    ) -> None:
        self.index = index
        model = "" if pool.model_name is None else f"model {pool.model_name} "
        self.name = f"{model}worker {index}"
        self.device = device
        self.generation = generation
        self.trial = trial
        self.state = WorkerState.STARTING
        self.served = 0
        self.failed = 0
        self.restarts = 0
        self.failing_since: float | None = None  # trio time of the first failure in a row
        self.last_failure: dict[str, Any] | None = None
        self.failure_summary: str | None = None  # last_failure's detail, fit for /healthz
        self.failed_first_start = False  # a model failed before any of the pool's was ready
        self.scope = trio.CancelScope()
        self._pool = pool
        self._config = config
        self.retiring: str | None = None  # why it is being retired, once it is
        self.start_failure: str | None = None  # why a trial worker gave up
        self.became_ready = trio.Event()
        self.ended = trio.Event()
        self._session: ModelSession | None = None  # while its model is ready
        self._recycle_asked = False
        self._memory_kill: str | None = None  # why the model was killed for its memory
        self._starts = 0
        self._failures_in_a_row = 0  # models that failed with no request to blame
        self._ready_at = 0.0
        self._start: dict[str, Any] | None = None  # how its current model started, how fast
        self.start_seconds: float | None = None  # how long its last start took (slots.py)
        self._model: ModelProcess | None = None
        self._restart_reason = RestartReason.CRASHED  # why the current model will be replaced
        self._busy_total = 0.0  # seconds spent computing, for modelpool_model_busy_seconds
        self.memory_seen = MemorySeen()  # filled in by the memory watch (refresh.py)
        self._state_since = time.monotonic()

    @property
    def config(self) -> PoolConfig:
        return self._config

    @property
    def pid(self) -> int | None:
        """The current model's pid, while there is one."""
        return None if self._model is None else self._model.pid

    @property
    def ready(self) -> bool:
        return self.state in (WorkerState.IDLE, WorkerState.BUSY)

    @property
    def memory_kill(self) -> str | None:
        """Why its current model was killed for its memory, if it was."""
        return self._memory_kill

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

        Called from a thread (see memwatch.py): the model is read once."""
        model = self._model
        return None if model is None else model.proc.memory_mib()

    @property
    def forked(self) -> bool:
        """Whether its current model was forked from a --preload template."""
        model = self._model
        return model is not None and model.method is StartMethod.FORK

    def busy_seconds(self) -> float:
        """Seconds this worker's models have spent computing, the current request included."""
        if self.state is WorkerState.BUSY:
            return self._busy_total + time.monotonic() - self._state_since
        return self._busy_total

    def snapshot(self) -> dict[str, Any]:
        now = trio.current_time()
        job = None if self._session is None else self._session.job
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
            "request_id": None if job is None else job.request_id,
            "request_age": (
                None if job is None else round(time.monotonic() - self._state_since, 3)
            ),
            "busy_seconds": round(self.busy_seconds(), 6),
            "memory": self.memory_seen.for_status(self.pid),
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
            self.set_state(WorkerState.STOPPED)
            self.ended.set()

    def retire(self, reason: str) -> None:
        """Stop taking jobs: at once if idle or starting, after its current job if busy.

        Its model is then stopped gracefully (stdin closed, `exit_grace`, SIGKILL).
        """
        if self.retiring is not None:
            return
        self.retiring = reason
        log.info("%s: retiring (%s)", self.name, reason)
        if self.state in (WorkerState.STARTING, WorkerState.RESTARTING):
            self.scope.cancel()
        elif self._session is not None:
            self._session.stop_waiting()

    def set_state(self, state: WorkerState) -> None:
        now = time.monotonic()
        was_ready = self.ready
        if self.state is WorkerState.BUSY:
            self._busy_total += now - self._state_since
        if state is not self.state:
            self._state_since = now
        self.state = state
        if was_ready != self.ready:
            self._pool._worker_changed(ready=self.ready)
        elif not was_ready:  # idle <-> busy, twice a request, is no news to the pool
            self._pool._worker_changed()

    async def _loop(self) -> None:
        while self._pool._wants_models() and self.retiring is None:
            delay = self._pool._starter_for(self).backoff(self._config, self._failures_in_a_row)
            if self._starts:
                self.restarts += 1
                self._pool.metrics.count_restart(self._restart_reason)
                log.info(
                    "%s: restart %d in %.1f s (%d failure(s) on its own in a row)",
                    self.name,
                    self.restarts,
                    delay,
                    self._failures_in_a_row,
                )
            if delay:
                self.set_state(WorkerState.RESTARTING)
                await trio.sleep(delay)
            self._starts += 1
            self.set_state(WorkerState.STARTING)
            if await self._one_model():
                return

    async def _one_model(self) -> bool:
        """Start a model and serve with it; True when the pool has no more jobs to give."""
        try:
            starter = self._pool._starter_for(self)
            opened = open_model(
                self._config, self.name, self._pool.reaper, starter, device=self.device
            )
            async with opened as model:
                self._model = model
                await model.wait_ready()
                self._ready_at = trio.current_time()
                took = self._ready_at - model.started_at
                self._start = {"method": model.method, "seconds": round(took, 4)}
                self.start_seconds = took
                self._pool.metrics.count_model_start(model.method, took)
                log.info("%s ready after %.1f s (%s)", model.name, took, model.method)
                limit = self._pool._request_limit()
                self._recycle_asked = False
                self._memory_kill = None
                self._session = ModelSession(
                    self, self._pool, model, self._config, limit, self._ready_at
                )
                self.became_ready.set()
                no_more_jobs = await self._session.serve()
                if self.retiring == RestartReason.REFRESH:
                    # It answered; a graceful exit would free, so first copy, its template's objects
                    model.kill_group()
                return no_more_jobs
        except* StartFailed as group:  # raised inside open_model's nursery: grouped
            for exc in group.exceptions:
                # Fatal only for the service's own command before it ever served: a trial
                # (reload, resize) that cannot run its command fails; the others serve on.
                if (
                    isinstance(exc, CommandNotRunnable)
                    and not self.trial
                    and not self._pool.ever_ready
                ):
                    raise ModelCommandError(str(exc)) from exc
                started = self._model
                summary = exc.summary if isinstance(exc, StartFailed) else None
                stderr = exc.stderr if isinstance(exc, StartFailed) else []
                self.failed_on_its_own(
                    RestartReason.START_FAILED, str(exc), started, summary, stderr
                )
                if not self.trial and self._pool._first_start_failed(self):
                    tail = started.stderr_tail if started is not None else stderr
                    verdict = first_start_verdict(exc, self._config.model_cmd, tail)
                    raise FirstStartFailed(*verdict) from exc
                log.error("%s%s", exc, "" if started is None else started.stderr_note())
                if self.trial:
                    self.start_failure = str(exc)
        finally:
            self._model = self._session = None
            logs.set_field("pid", None)
        return self.start_failure is not None  # a trial gives up: its starter decides

    def kill_model(self) -> None:
        """Hard stop: SIGKILL the current model and its tree without waiting."""
        if self._model is not None:
            self._model.kill_group()

    # -- replacing a model: asked by its session, by the memory watch -------------------

    def worn_out(self, why: str) -> None:
        """Past its --max-requests: ask the pool for a replacement (once per model)."""
        if self.ask_recycle():
            self._pool._recycle(self, why)

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

    # -- what its models did: the back-off, /healthz and /status ------------------------

    def answered(self) -> None:
        """Its model answered a request: that ends a run of failures."""
        self.served += 1
        self._failures_in_a_row = 0
        self.failing_since = None

    def forget_failures(self) -> None:
        """Its model had been healthy for a good while: the next back-off starts afresh."""
        self._failures_in_a_row = 0

    def job_failed(
        self, reason: RestartReason, detail: str, request_id: str, model: ModelProcess, summary: str
    ) -> None:
        """Its model failed a request (it was killed for it); the request is no sign of
        the model's health, so the back-off does not count it."""
        self.failed += 1
        self.record(reason, detail, request_id, model, summary)

    def failed_on_its_own(
        self,
        reason: RestartReason,
        detail: str,
        model: ModelProcess | None = None,
        summary: str | None = None,
        stderr: list[str] | None = None,
    ) -> None:
        """Count a failure towards the back-off and the pool's health."""
        self._failures_in_a_row += 1
        if self.failing_since is None:
            self.failing_since = trio.current_time()
        self.record(reason, detail, None, model, summary, stderr)

    def record(
        self,
        reason: RestartReason,
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
