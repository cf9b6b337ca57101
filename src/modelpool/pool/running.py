"""`run_pool`: one model's pool's run, for the duration of a block, and the tasks that
run beside its workers until it has stopped (`open_pool`, opening.py, is the library's).

The pool (pool.py) is built in a nursery of its own, with the tasks that run for as long
as it does: the queue's own tasks and the reaper's sweep (a shared queue must still send
what the workers left it to send), the memory watch (--max-memory-mib) and the preloaded
models' refresh (--preload). Neither of the first two ends by itself, so each runs in a
nursery of its own that is cancelled once the pool's `stopped` is set, and the pool's
nursery then has nothing left to wait for. An error that means the pool cannot run at
all (a model command that cannot be run, a queue no backend can open) comes out of
`run_pool` as itself, not inside an exception group.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from modelpool.core.errors import ModelCommandError
from modelpool.pool.memwatch import watch_memory
from modelpool.pool.pool import Pool
from modelpool.pool.refresh import watch_preloaded
from modelpool.process import devices, threads
from modelpool.process.reaper import Reaper
from modelpool.settings.config import ConfigError, PoolConfig

if TYPE_CHECKING:
    from modelpool.queues.base import JobQueue

log = logging.getLogger("modelpool.pool")


@asynccontextmanager
async def run_pool(
    config: PoolConfig | None = None,
    reaper: Reaper | None = None,
    model_name: str | None = None,
    other_devices: Callable[[Pool], Iterable[str | None]] | None = None,
) -> AsyncIterator[Pool]:
    """One model's pool for the duration of the block, as `open_pool` (opening.py) says,
    with the same errors: `open_pool` runs it for a config of one model, `open_fleet`
    for each of several. `model_name` names it in logs and /status, one of several models
    (fleet.py), whose workers' devices `other_devices` says (a new worker takes the least
    used).
    """
    config = config or PoolConfig()
    if config.models:
        raise ConfigError("models", "declares several models: open_fleet runs them")
    reaper = reaper or Reaper()
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(config, nursery, reaper, model_name, other_devices)
            model = "" if model_name is None else f" of model {model_name}"
            command = " ".join(config.model_cmd)
            log.info("starting %d model(s)%s: %s", config.workers, model, command)
            if config.workers:
                log.info("thread budget: %s", threads.plan(config).describe())
            if model_name is None:  # several models share the devices: see fleetrun.py
                devices.warn_unused(config.devices, config.workers)
            await nursery.start(run_queue_until_stopped, pool.queue, pool.stopped)
            nursery.start_soon(sweep_until_stopped, reaper, pool.stopped)
            if config.model_max_rss is not None:
                nursery.start_soon(watch_memory, pool)
            if config.preload:
                nursery.start_soon(watch_preloaded, pool)
            try:
                yield pool
            finally:
                pool.shutdown()
    except BaseExceptionGroup as group:
        raise_fatal(group)
    finally:
        with trio.CancelScope(shield=True):
            await reaper.final_sweep()


async def run_queue_until_stopped(
    queue: JobQueue,
    stopped: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The queue's own tasks (a shared queue's connection, replies, heartbeat) run until
    the pool has stopped and the queue has sent what its workers left it to send."""
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        task_status.started()
        await stopped.wait()
        await queue.flush()
        nursery.cancel_scope.cancel()


async def sweep_until_stopped(reaper: Reaper, stopped: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        await stopped.wait()
        nursery.cancel_scope.cancel()


def raise_fatal(group: BaseExceptionGroup) -> NoReturn:
    """Raise an error of `group` that means the pool cannot run (a model command that
    cannot be run, a queue no backend can open) as itself; else the group."""
    fatal = group.subgroup((ModelCommandError, ConfigError))
    if fatal is None:
        raise group
    raise first_error(fatal) from None


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a group, however deeply nested."""
    error = group.exceptions[0]
    return first_error(error) if isinstance(error, BaseExceptionGroup) else error
