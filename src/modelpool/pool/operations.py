"""Live operations on a running pool: rolling reload, resize, recycling, memory limits.

Every one of them changes the pool by surge, never by stopping a model first: a new
worker (a "trial" worker, which gives up if its first model fails to start) is started
beside the old ones, and only once its model is ready is an old worker retired. A
retired worker takes no new job, finishes the one it computes, and its model is stopped
gracefully. So capacity never drops below what it was, no request is failed or held up
by the operation, and a new version that cannot start leaves the old ones serving.

Surges take turns (one lock), so at most one extra model runs at a time: a memory limit
is about not running many at once. Reload and resize also take turns with each other
(another lock); a second one asked for meanwhile is refused with `Busy`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from modelpool.process import devices
from modelpool.process.model import StartFailed
from modelpool.settings.config import ConfigError

if TYPE_CHECKING:
    from modelpool.pool.pool import Pool
    from modelpool.pool.worker import Worker

log = logging.getLogger("modelpool.operations")
T = TypeVar("T")

MEMORY_CHECK_INTERVAL = 1.0  # seconds between two looks at every model's memory
MEMORY_MARGIN = 1.2  # during a request, a model is killed only past 120 % of the limit
RECYCLE_RETRY = 5.0  # seconds before a failed recycle is tried again
CHANGE_AT_ONCE = 8  # workers a resize starts, or stops, at the same time
NOT_SERVING = "reload asked for while the pool is not serving; ignored"


class Busy(Exception):
    """Another reload or resize is running."""


class OperationFailed(Exception):
    """A reload or resize stopped part-way; `report` says what was done before."""

    def __init__(self, detail: str, report: dict[str, Any]) -> None:
        super().__init__(detail)
        self.report = report


class Operations:
    def __init__(self, pool: Pool) -> None:
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

        self._pool.start_task(run)
        await done.wait()
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

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
                step = await self._surge_replace(old, config, generation, "reload")
                replaced.append(step)
                if "failed" in step:
                    detail = f"generation {generation} failed to start: {step['failed']}"
                    log.error("reload stopped: %s; the other workers keep serving", detail)
                    report["seconds"] = round(time.monotonic() - started, 3)
                    raise OperationFailed(detail, report)
            pool.model_config, pool.generation = config, generation
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
                trials = await self._start_in_waves(workers - before)
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
                await _retire_in_waves(chosen, "resize")
            report["seconds"] = round(time.monotonic() - started, 3)
            log.info("resize to %d worker(s) done in %.1f s", workers, report["seconds"])
            return report

    async def _start_in_waves(self, count: int) -> list[Worker]:
        """Start `count` trial workers, CHANGE_AT_ONCE at a time; wait until each is
        ready or gave up (models start one after another anyway, see the reaper).

        Hundreds of new workers at once would all take their first steps in the
        same turn of the event loop, and hold up every request meanwhile.
        """
        trials: list[Worker] = []
        slots = trio.Semaphore(CHANGE_AT_ONCE)

        async def start(worker: Worker) -> None:
            try:
                await _first_model(worker)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                await slots.acquire()
                trials.append(self._pool.add_worker(trial=True))
                nursery.start_soon(start, trials[-1])
        return trials

    # -- recycling --------------------------------------------------------------------

    async def recycle(self, worker: Worker, reason: str, metric_reason: str = "recycled") -> None:
        """Replace one worker by surge, with the same command and generation.

        If its replacement fails to start, the worker keeps serving and the recycle is
        asked for again after RECYCLE_RETRY seconds (the next request may ask sooner).
        """
        if worker.retiring is not None:
            return
        log.info("%s: %s; starting its replacement", worker.name, reason)
        step = await self._surge_replace(worker, worker.config, worker.generation, metric_reason)
        if "failed" in step and worker.retiring is None:
            log.error("%s: its replacement failed to start (%s)", worker.name, step["failed"])
            with trio.move_on_after(RECYCLE_RETRY):
                await self._pool.stopped.wait()
            worker.allow_recycle()

    # -- the surge ----------------------------------------------------------------------

    async def _surge_replace(
        self, old: Worker, config: Any, generation: int, reason: str
    ) -> dict[str, Any]:
        """Start a worker beside `old`; once its model is ready, retire `old`."""
        pool = self._pool
        async with self._surge:
            if old.retiring is not None or pool.closing:
                return {"replaced": old.index, "skipped": "already retiring or shutting down"}
            new = pool.add_worker(config, generation, trial=True, device=old.device)
            await _first_model(new)
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
            pool.metrics.restarts.labels(reason=reason).inc()
            old.retire(reason)
            await old.ended.wait()  # its request finishes; then one extra model at most
            return step

    # -- memory ---------------------------------------------------------------------------

    async def watch_memory(self) -> None:
        """Every second, replace (idle) or kill (busy, past the margin) models over the limit.

        What a model holds is its handle's to say: a spawned model's resident memory, a
        forked one's private pages (not the pages it shares with its template). Both
        are read from /proc in a thread: a forked model's walks its page tables (about
        1.4 ms for 300 MiB), which the event loop, serving every request, must not wait
        on. A worker whose model changed meanwhile is looked at again next time."""
        limit = self._pool.config.model_max_rss
        assert limit is not None
        while not self._pool.stopped.is_set():
            watched = [
                (worker, worker.pid)
                for worker in self._pool.workers
                if worker.retiring is None and worker.ready
            ]
            usage = await trio.to_thread.run_sync(_memory_of, [worker for worker, _ in watched])
            for (worker, pid), used in zip(watched, usage, strict=True):
                if worker.retiring is not None or not worker.ready or worker.pid != pid:
                    continue
                if used is None or used <= limit:
                    continue
                what = f"uses {used:.0f} MiB, over --model-max-rss {limit:g} MiB"
                if worker.state == "busy" and used > limit * MEMORY_MARGIN:
                    worker.kill_for_memory(what)
                elif worker.ask_recycle():
                    self._pool.recycle(worker, what, "memory")
            with trio.move_on_after(MEMORY_CHECK_INTERVAL):
                await self._pool.stopped.wait()


def _memory_of(workers: list[Worker]) -> list[float | None]:
    """What each worker's model holds, for --model-max-rss: in a thread (see watch_memory)."""
    return [worker.memory_mib() for worker in workers]


async def _first_model(worker: Worker) -> None:
    """Wait until a trial worker's first model is ready, or it gave up."""
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            await worker.became_ready.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(ready)
        await worker.ended.wait()
        nursery.cancel_scope.cancel()


async def _retire_in_waves(workers: list[Worker], reason: str) -> None:
    """Retire `workers` and wait until they have ended, CHANGE_AT_ONCE at a time.

    Stopping a model takes a few steps of the event loop (its pipes, its exit, its
    leftovers); hundreds at once would run all those steps in the same turns of the
    loop and hold up every request meanwhile. In waves, a turn stays short whatever
    the pool's size, and the next worker is retired as soon as one has ended.
    """
    slots = trio.Semaphore(CHANGE_AT_ONCE)

    async def retire(worker: Worker) -> None:
        try:
            worker.retire(reason)
            await worker.ended.wait()
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for worker in workers:
            await slots.acquire()
            nursery.start_soon(retire, worker)


def _entry(worker: Worker) -> dict[str, Any]:
    """A worker in a resize's report: its id, pid and, with --devices, its device."""
    entry: dict[str, Any] = {"worker": worker.index, "pid": worker.pid}
    if worker.device is not None:
        entry["device"] = worker.device
    return entry


def _retire_order(worker: Worker) -> int:
    """Which workers to retire first: the cheapest to lose."""
    return {"restarting": 0, "starting": 1, "idle": 2, "busy": 3}.get(worker.state, 4)
