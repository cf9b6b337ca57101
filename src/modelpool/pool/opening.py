"""`open_pool`: the library's way to run a pool, of one model or of several.

With one model (the config declares none), it is that model's pool, as it always was.
With several (`PoolConfig(models=...)`), they run in a fleet (fleet.py), and the block
gets the default model's pool, whose `predict(..., model="v2")` asks any of them; what
only the whole has (every model's status, the slots) is `open_fleet`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modelpool.pool.fleetrun import open_fleet
from modelpool.pool.pool import Pool
from modelpool.pool.running import run_pool
from modelpool.process.reaper import Reaper
from modelpool.settings.config import PoolConfig


@asynccontextmanager
async def open_pool(
    config: PoolConfig | None = None, reaper: Reaper | None = None
) -> AsyncIterator[Pool]:
    """Run a pool for the duration of the block; on exit, drain it and stop every model.

    `reaper` decides how far the pool goes to kill what its models leave behind; the
    default kills each model's group, tree and token carriers (see reaper.py). Raises
    ModelCommandError at once if the model command cannot even be executed, and
    FirstStartFailed (a ModelCommandError) once every model's first start failed,
    unless `config.keep_trying`; ConfigError before any model starts if no queue
    backend can open `config.queue` (see queues/backends.py). With several models
    (`config.models`), the pool of the default one, whose `predict` takes `model=`.
    """
    config = config or PoolConfig()
    if not config.models:
        async with run_pool(config, reaper) as pool:
            yield pool
        return
    async with open_fleet(config, reaper) as fleet:
        yield fleet.default
