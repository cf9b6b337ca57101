"""Live operations on a running pool: rolling reload, resize, recycling, memory limits.

Every one of them changes the pool by surge, never by stopping a model first: a new
worker (a "trial" worker, which gives up if its first model fails to start) is started
beside the old ones, and only once its model is ready is an old worker retired. A
retired worker takes no new job, finishes the one it computes, and its model is stopped
gracefully. So capacity never drops below what it was, no request is failed or held up
by the operation, and a new version that cannot start leaves the old ones serving.

Surges take turns (one lock), so at most one extra model runs at a time: a memory limit
is about not running many at once. Reload and resize also take turns with each other
(another lock); a second one asked for meanwhile is refused with `Busy`. Many workers at
once are started and retired in waves (waves.py); the memory limit is watched by
memwatch.py, which asks for recycles here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import trio

from modelpool.core.kinds import RestartReason, WorkerState
from modelpool.pool.waves import first_model, retire_in_waves, start_in_waves
from modelpool.process import devices
from modelpool.process.model import StartFailed
from modelpool.settings.config import ConfigError, PoolConfig

if TYPE_CHECKING:
    from modelpool.pool.worker import Worker
    from modelpool.process.preload import Preloader

log = logging.getLogger("modelpool.operations")
T = TypeVar("T")

RECYCLE_RETRY = 5.0  # seconds before a failed recycle is tried again
NOT_SERVING = "reload asked for while the pool is not serving; ignored"


class RestartCounter(Protocol):
    """Where a surge replacement is counted (metrics.py's PoolMetrics is one)."""

    def count_restart(self, reason: RestartReason) -> None: ...


class OperatedPool(Protocol):
    """What the operations need of the pool (pool.py's Pool is one); the pool's members
    for its operations are private by name (not the library's surface)."""

    @property
    def closing(self) -> bool: ...
    @property
    def stopped(self) -> trio.Event: ...
    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def model_config(self) -> PoolConfig: ...
    @property
    def generation(self) -> int: ...
    @property
    def preloader(self) -> Preloader | None: ...
    @property
    def metrics(self) -> RestartCounter: ...
    def _add_worker(
        self,
        config: PoolConfig | None = None,
        generation: int | None = None,
        trial: bool = False,
        device: str | None = None,
    ) -> Worker: ...
    def _start_task(self, fn: Callable[[], Awaitable[None]]) -> None: ...
    def _switch_model(self, config: PoolConfig, generation: int) -> None:
        """What new workers run from now on: a reload's command and generation."""
        ...


class Busy(Exception):
    """Another reload or resize is running."""


class OperationFailed(Exception):
    """A reload or resize stopped part-way; `report` says what was done before."""

    def __init__(self, detail: str, report: dict[str, Any]) -> None:
        super().__init__(detail)
        self.report = report


class Operations:
    """The live operations on one pool, and the locks by which they take turns."""

    def __init__(self, pool: OperatedPool) -> None:
        self._pool = pool
        self._admin = trio.Lock()  # reload and resize
        self._numbered = pool.generation  # the highest generation number handed out
        self._surge = trio.Lock()  # one extra model at a time

    @property
    def running(self) -> bool:
        return self._admin.locked()

    async def signalled_reload(self) -> None:
        """A rolling reload with the same command, asked for by SIGHUP: no one waits for
        an answer, so its outcome goes to the log only."""
        if self._pool.closing:
            log.warning(NOT_SERVING)
            return
        try:
            await self.detached(self.reload)
        except Busy as exc:
            log.warning("reload not started: %s", exc)
        except OperationFailed:
            pass  # reload() logged why, and the old models keep serving

    async def detached(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an operation in the pool's nursery and wait for it.

        If the caller goes away (an HTTP client hangs up), the operation still runs to
        its end: a reload stopped half-way would leave two generations serving.
        """
        if self._admin.locked():
            raise Busy("a reload or resize is already running")
        done = trio.Event()
        outcome: list[Any] = []

        async def run() -> None:
            try:
                outcome.append(("value", await operation(*args)))
            except (Busy, OperationFailed) as exc:
                outcome.append(("error", exc))
            finally:
                done.set()

        self._pool._start_task(run)
        await done.wait()
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return cast(T, value)

    # -- reload -----------------------------------------------------------------------

    async def reload(self, model_cmd: list[str] | None = None) -> dict[str, Any]:
        """Replace every worker, one at a time by surge, with one of a new generation.

        With `model_cmd`, the new generation runs that command; without, the same one
        (which picks up a new model file). Raises OperationFailed, with what was done,
        if a new model fails to start: the workers not yet replaced keep serving.

        Every attempt gets a number of its own, even one that fails (see
        `_new_generation`), and replaces every worker that does not carry it: so a
        reload after a partly failed one also replaces the workers that attempt left.
        """
        pool = self._pool
        if self._admin.locked():
            raise Busy("a reload or resize is already running")
        async with self._admin:
            started = time.monotonic()
            config = pool.model_config
            replaced: list[dict[str, Any]] = []
            if model_cmd is not None:
                try:
                    config = replace(config, model_cmd=model_cmd)
                except ConfigError as exc:
                    detail = f"model_cmd {exc.problem}"
                    log.error("reload refused: %s", detail)
                    raise OperationFailed(detail, {"model_cmd": model_cmd, "workers": []}) from None
            generation = self._new_generation()
            command = " ".join(config.model_cmd)
            log.info("reload to generation %d: %s", generation, command)
            report = {"generation": generation, "model_cmd": config.model_cmd, "workers": replaced}
            if pool.preloader is not None:
                try:
                    template = await pool.preloader.prepare(generation, config)
                except StartFailed as exc:
                    detail = f"generation {generation}'s template failed to load: {exc}"
                    log.error("reload stopped: %s; the models already there keep serving", detail)
                    report["seconds"] = round(time.monotonic() - started, 3)
                    raise OperationFailed(detail, report) from None
                report["template"] = template.snapshot()
            while (old := self._next_to_replace(generation)) is not None:
                step = await self._surge_replace(old, config, generation, RestartReason.RELOAD)
                replaced.append(step)
                if "failed" in step:
                    detail = f"generation {generation} failed to start: {step['failed']}"
                    log.error("reload stopped: %s; the other workers keep serving", detail)
                    report["seconds"] = round(time.monotonic() - started, 3)
                    raise OperationFailed(detail, report)
            pool._switch_model(config, generation)
            if pool.preloader is not None:
                pool.preloader.retire_others(generation)
            report["seconds"] = round(time.monotonic() - started, 3)
            log.info(
                "reload to generation %d done in %.1f s: %d worker(s) replaced",
                generation,
                report["seconds"],
                len(replaced),
            )
            return report

    def _new_generation(self) -> int:
        """A generation number no worker has had, for one reload attempt.

        A failed attempt's number is not used again: the workers it did replace keep
        it, and `pool.generation` (what new workers run) stays where it was. So one
        number always means one command, and /status never shows two workers with the
        same generation running different commands.
        """
        self._numbered = max(self._numbered, self._pool.generation) + 1
        return self._numbered

    def _next_to_replace(self, generation: int) -> Worker | None:
        """A serving worker not of `generation` (older, or a failed attempt's), idle first."""
        others = [
            w
            for w in self._pool.workers
            if w.generation != generation and w.retiring is None and not w.trial
        ]
        return min(others, key=_retire_order, default=None)

    # -- resize -----------------------------------------------------------------------

    async def scale(self, workers: int) -> dict[str, Any]:
        """Grow by starting new workers (answer once they are ready) or shrink by retiring.

        Shrinking retires workers that are restarting or starting first, then idle
        ones, then busy ones, which finish their request first; with --devices, each
        from a device that has the most workers, so the spread stays even (a grow gives
        new workers the devices with the fewest, see devices.py).

        A resize takes the surge lock for its whole run. A recycle's surge in flight
        would otherwise add its replacement after the resize counted, and replace a
        worker the resize retires as well: the pool would end one too big, for good.
        With the lock, the resize waits for that surge to end, counts a settled pool,
        and any recycle asked for meanwhile waits its turn: it then finds its worker
        retired (and is skipped) or replaces it one for one. So the size the answer
        reports is the size that stays.
        """
        pool = self._pool
        if self._admin.locked():
            raise Busy("a reload or resize is already running")
        async with self._admin, self._surge:
            started = time.monotonic()
            serving = [w for w in pool.workers if w.retiring is None and not w.trial]
            before = len(serving)
            added: list[dict[str, Any]] = []
            retired: list[dict[str, Any]] = []
            report = {"workers": workers, "before": before, "added": added, "retired": retired}
            log.info("resize from %d to %d worker(s)", before, workers)
            if workers > before:
                trials = await start_in_waves(
                    lambda: pool._add_worker(trial=True), workers - before
                )
                failed = []
                for worker in trials:
                    if worker.became_ready.is_set():
                        worker.trial = False  # from now on it restarts like any other
                        added.append(_entry(worker))
                    else:
                        failure = worker.start_failure or "stopped before it was ready"
                        failed.append(failure)
                        added.append({"worker": worker.index, "failed": failure})
                if failed:
                    report["seconds"] = round(time.monotonic() - started, 3)
                    detail = f"{len(failed)} new worker(s) failed to start: {failed[0]}"
                    log.error("resize stopped: %s", detail)
                    raise OperationFailed(detail, report)
            elif workers < before:
                chosen = devices.to_retire(
                    serving, before - workers, lambda w: w.device, _retire_order
                )
                retired.extend(_entry(w) for w in chosen)
                await retire_in_waves(chosen, "resize")
            report["seconds"] = round(time.monotonic() - started, 3)
            log.info("resize to %d worker(s) done in %.1f s", workers, report["seconds"])
            return report

    # -- recycling --------------------------------------------------------------------

    async def recycle(
        self,
        worker: Worker,
        reason: str,
        metric_reason: RestartReason = RestartReason.RECYCLED,
        pid: int | None = None,
    ) -> None:
        """Replace one worker by surge, with the same command and generation.

        `pid` is the model the recycle was asked for (past --max-requests, a memory
        limit): if the worker has another by the time the surge starts (that one died
        and was replaced), the new one is fresh and the recycle is dropped. If its
        replacement fails to start, the worker keeps serving and the recycle is asked
        for again after RECYCLE_RETRY seconds (the next request may ask sooner).
        """
        if worker.retiring is not None:
            return
        log.info("%s: %s; starting its replacement", worker.name, reason)
        step = await self._surge_replace(
            worker, worker.config, worker.generation, metric_reason, pid
        )
        if "failed" in step and worker.retiring is None:
            log.error("%s: its replacement failed to start (%s)", worker.name, step["failed"])
            with trio.move_on_after(RECYCLE_RETRY):
                await self._pool.stopped.wait()
            worker.allow_recycle()

    # -- the surge ----------------------------------------------------------------------

    async def _surge_replace(
        self,
        old: Worker,
        config: PoolConfig,
        generation: int,
        reason: RestartReason,
        pid: int | None = None,
    ) -> dict[str, Any]:
        """Start a worker beside `old`; once its model is ready, retire `old`. With `pid`,
        only while `old` still runs that model."""
        pool = self._pool
        async with self._surge:
            if old.retiring is not None or pool.closing:
                return {"replaced": old.index, "skipped": "already retiring or shutting down"}
            if pid is not None and old.pid != pid:
                log.info("%s: the model to replace [pid %d] is gone; not replaced", old.name, pid)
                return {"replaced": old.index, "skipped": "its model was replaced already"}
            new = pool._add_worker(config, generation, trial=True, device=old.device)
            await first_model(new)
            if not new.became_ready.is_set():
                failure = new.start_failure or "stopped before it was ready (shutting down)"
                return {"replaced": old.index, "by": new.index, "failed": failure}
            new.trial = False
            step: dict[str, Any] = {
                "replaced": old.index,
                "old_pid": old.pid,
                "by": new.index,
                "pid": new.pid,
            }
            if new.device is not None:
                step["device"] = new.device
            pool.metrics.count_restart(reason)
            old.retire(reason)
            if reason in (RestartReason.REFRESH, RestartReason.IMMORTAL):
                # A fresh fork shares its template's pages, so it costs next to no memory:
                # the next child over its limit need not wait for this one's request.
                return step
            await old.ended.wait()  # its request finishes; then one extra model at most
            return step


def _entry(worker: Worker) -> dict[str, Any]:
    """A worker in a resize's report: its id, pid and, with --devices, its device."""
    entry: dict[str, Any] = {"worker": worker.index, "pid": worker.pid}
    if worker.device is not None:
        entry["device"] = worker.device
    return entry


def _retire_order(worker: Worker) -> int:
    """Which workers to retire first: the cheapest to lose (a stopped one comes last)."""
    return RETIRE_ORDER.get(worker.state, len(RETIRE_ORDER))


RETIRE_ORDER = {
    WorkerState.RESTARTING: 0,
    WorkerState.STARTING: 1,
    WorkerState.IDLE: 2,
    WorkerState.BUSY: 3,
}
