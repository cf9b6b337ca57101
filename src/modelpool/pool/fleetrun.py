"""`open_fleet`: every model of a config run in a pool of its own, in one nursery, with
the slots' arbiter beside them, for the duration of a block (see fleet.py).

The pools run as tasks of the fleet's nursery (`PoolRunner`), so that a change of the
config (changes.py) can start a model's pool while the others serve, and stop one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from modelpool.core.errors import ModelCommandError
from modelpool.pool.fleet import Fleet
from modelpool.pool.pool import Pool
from modelpool.pool.running import raise_fatal, run_pool
from modelpool.process import devices
from modelpool.process.reaper import Reaper
from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.fleet")


class PoolRunner:
    """Runs each model's pool in the fleet's nursery, for as long as the pool runs."""

    def __init__(self, nursery: trio.Nursery, reaper: Reaper | None) -> None:
        self._nursery = nursery
        self._reaper = reaper
        self.fleet: Fleet | None = None  # told of a pool that could not start (not fatal)
        self._pools: list[Pool] = []  # every pool it started, for the devices they use

    def other_devices(self, asking: Pool) -> list[str | None]:
        """The devices of every serving worker of the running pools but `asking`."""
        self._pools = [pool for pool in self._pools if not pool.stopped.is_set()]
        others = (pool for pool in self._pools if pool is not asking)
        return [w.device for pool in others for w in pool.workers if w.retiring is None]

    async def start(self, name: str, config: PoolConfig, fatal: bool = True) -> Pool | None:
        """A pool of model `name`, started. If not `fatal` (a model added or changed
        while the fleet runs), its command's failing to start stops that pool only: it
        is logged, and None returned (or, if it failed once started, it is no longer
        routed to)."""
        pool: Pool | None = await self._nursery.start(self._run, name, config, fatal)
        return pool

    async def _run(
        self,
        name: str,
        config: PoolConfig,
        fatal: bool,
        task_status: trio.TaskStatus[Pool | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started: Pool | None = None
        try:
            async with run_pool(config, self._reaper, name, self.other_devices) as pool:
                started = pool
                self._pools.append(pool)
                task_status.started(pool)
                await pool.stopped.wait()
        except ModelCommandError as exc:
            if fatal:
                raise
            log.error("model %s cannot start, so it is not served: %s", name, exc)
            if started is None:
                task_status.started(None)
            elif self.fleet is not None and self.fleet.pools.get(name) is started:
                self.fleet._unroute(name)


@asynccontextmanager
async def open_fleet(
    config: PoolConfig | None = None, reaper: Reaper | None = None
) -> AsyncIterator[Fleet]:
    """Run every model of `config` for the duration of the block, each in a pool of its
    own (see run_pool, whose errors it raises), and the slots' arbiter; on exit, drain
    them all at once and stop every model."""
    config = config or PoolConfig()
    if not config.models:
        async with run_pool(config, reaper) as pool:
            yield Fleet(config, {config.default_model_name: pool})
        return
    fleet: Fleet | None = None
    try:
        async with trio.open_nursery() as nursery:
            runner = PoolRunner(nursery, reaper)
            pools: dict[str, Pool] = {}
            try:
                devices.warn_unused(config.devices, config.workers)
                for name, model in config.model_configs.items():
                    started = await runner.start(name, model)
                    assert started is not None  # fatal: it raises instead
                    pools[name] = started
                fleet = runner.fleet = Fleet(config, pools, runner)
                assert fleet.slots is not None
                nursery.start_soon(fleet.slots.run)
                yield fleet
            finally:
                for pool in pools.values():
                    pool.shutdown()
                if fleet is not None:
                    fleet.shutdown()
    except BaseExceptionGroup as group:
        raise_fatal(group)
