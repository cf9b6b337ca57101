"""A worker owns one model process at a time and feeds it jobs from the pool's channel.

Its loop: start a model (after a back-off delay if models keep failing on their own),
wait for the ready line, then take jobs one by one. A job that times out, crashes the
model or gets a broken answer costs the model: the worker answers the job, kills the
model's process group, and starts a fresh one.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from .errors import ModelFailed, ModelTimeout, ShuttingDown
from .job import Job
from .model import ModelProcess, StartFailed, open_model

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("modelpool.worker")


class State(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class Worker:
    """One slot of the pool; `scope` is cancelled by the pool to stop it early."""

    def __init__(self, index: int, pool: Pool) -> None:
        self.index = index
        self.name = f"worker {index}"
        self.state = State.STARTING
        self.served = 0
        self.failed = 0
        self.restarts = 0
        self.scope = trio.CancelScope()
        self._pool = pool
        self._config = pool.config
        self._starts = 0
        self._failures_in_a_row = 0  # models that died with no request to blame
        self._ready_at = 0.0
        self._model: ModelProcess | None = None

    @property
    def pid(self) -> int | None:
        """The current model's pid, while there is one."""
        return None if self._model is None else self._model.pid

    @property
    def ready(self) -> bool:
        return self.state in (State.IDLE, State.BUSY)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.index,
            "state": self.state.value,
            "pid": self.pid,
            "served": self.served,
            "failed": self.failed,
            "restarts": self.restarts,
            "next_backoff": self._config.backoff(self._failures_in_a_row),
        }

    async def run(self) -> None:
        try:
            with self.scope:
                await self._loop()
        finally:
            self._set(State.STOPPED)

    def _set(self, state: State) -> None:
        self.state = state
        self._pool.worker_changed()

    async def _loop(self) -> None:
        while self._pool.wants_models():
            delay = self._config.backoff(self._failures_in_a_row)
            if self._starts:
                self.restarts += 1
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
            try:
                async with open_model(self._config, self.name) as model:
                    self._model = model
                    await model.wait_ready()
                    self._ready_at = trio.current_time()
                    log.info("%s ready after %.1f s", model.name, self._ready_at - model.started_at)
                    if await self._serve(model):
                        return
            except* StartFailed as group:  # raised inside open_model's nursery: grouped
                self._failures_in_a_row += 1
                for exc in group.exceptions:
                    log.error("%s", exc)
            finally:
                self._model = None

    def kill_model(self) -> None:
        """Hard stop: SIGKILL the current model's process group without waiting."""
        if self._model is not None:
            self._model.kill_group()

    async def _serve(self, model: ModelProcess) -> bool:
        """Feed jobs to a ready model; True when the pool has no more jobs to give."""
        while True:
            self._set(State.IDLE)
            with model.cancel_on_death() as death:
                try:
                    job = await self._pool.jobs.receive()
                except trio.EndOfChannel:
                    return True
            if death.cancelled_caught:
                await self._died_unprompted(model, "died while idle")
                return False
            if not self._pool.take(job):
                continue
            if not await self._run(model, job):
                return False

    async def _run(self, model: ModelProcess, job: Job) -> bool:
        """Serve one job; False when the model must be replaced."""
        self._set(State.BUSY)
        started = trio.current_time()
        try:
            if model.stdout_ended.is_set():
                self._pool.retry(job, "model died before it received the request")
                await self._died_unprompted(model, "died while idle")
                return False
            model.busy = True
            payload: bytes | None = None
            with trio.move_on_after(self._config.timeout) as deadline:
                try:
                    await model.send(job.line)
                except trio.BrokenResourceError:
                    self._pool.retry(job, "model stopped reading before the request")
                    await self._died_unprompted(model, "closed its stdin")
                    return False
                try:
                    payload = await model.results.receive()
                except trio.EndOfChannel:
                    payload = None
            if deadline.cancelled_caught:
                timeout = self._config.timeout
                await self._fail(model, job, ModelTimeout(f"no result after {timeout:g} s"))
                return False
            if payload is None:
                await self._fail(model, job, await model.describe_failure())
                return False
            try:
                value = _parse_result(payload)
            except ValueError as exc:
                await self._fail(model, job, ModelFailed(f"model printed an invalid result: {exc}"))
                return False
            self.served += 1
            self._failures_in_a_row = 0
            now = trio.current_time()
            log.info(
                "%s job %d served in %.2f s (queued %.2f s)",
                model.name,
                job.id,
                now - started,
                started - job.enqueued_at,
            )
            job.succeed(value)
            return True
        finally:
            model.busy = False
            if not job.done.is_set() and not job.queued:
                job.fail(ShuttingDown())

    async def _fail(self, model: ModelProcess, job: Job, error: ModelTimeout | ModelFailed) -> None:
        """Kill and reap a model that failed a job, then answer the job."""
        await model.kill()
        self._set(State.RESTARTING)
        self.failed += 1
        log.error("%s job %d failed, model killed: %s", model.name, job.id, error)
        job.fail(error)

    async def _died_unprompted(self, model: ModelProcess, what: str) -> None:
        """A model died with no request to blame: count it towards the back-off."""
        self._set(State.RESTARTING)
        if trio.current_time() - self._ready_at > self._config.backoff_max:
            self._failures_in_a_row = 0  # it had been healthy for a good while
        self._failures_in_a_row += 1
        if model.stdout_ended.is_set():
            what = f"{what}: {(await model.describe_failure()).detail}"
        await model.kill()
        log.error("%s %s; killed", model.name, what)


def _parse_result(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")  # noqa: TRY004
    return value
