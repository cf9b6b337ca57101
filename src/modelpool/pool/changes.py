"""A fleet's models change while it serves: SIGHUP re-reads the config file.

What the new config declares is compared with what runs, model by model:

- **Added**: its pool starts at once, with one worker (its min-workers, if more), and
  requests for it wait in its queue while it loads; the slot arbiter (slots.py) then
  gives it its share, taking idle slots from the others. If its command cannot start,
  it is logged and the model is not served; the others are untouched.
- **Removed**: no new request is routed to it (404), and its pool drains: what it has
  queued and computes is answered, then its models stop. Its slots go to the others.
- **Changed** (any of its options but its share of slots): a pool of the new config
  starts beside the old one, with as many workers; once they are ready, requests go
  to it, and the old pool drains and stops. Capacity never drops and no request fails;
  meanwhile the model runs up to twice its slots. If the new one cannot start, the old
  one keeps serving.
- **Unchanged**: it keeps running; a new min-workers or max-workers applies at once.

The budget (`workers`) and the default model are taken from the new config too.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import trio

from modelpool.core.errors import ShuttingDown
from modelpool.pool.fleet import Fleet
from modelpool.pool.pool import Pool
from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.fleet")

SHARE_FIELDS = {"workers", "min_workers", "max_workers"}  # a model's share, not the model


def same_model(a: PoolConfig, b: PoolConfig) -> bool:
    """Whether two configs of one model run it the same way (its share aside)."""
    return all(
        getattr(a, each.name) == getattr(b, each.name)
        for each in dataclasses.fields(a)
        if each.name not in SHARE_FIELDS
    )


async def reconfigure(fleet: Fleet, new: PoolConfig) -> dict[str, Any]:
    """Make `fleet` run the models of `new`; what was added, removed, changed, kept.

    ValueError if `new` cannot replace what runs (one model, where several run)."""
    if not new.models or not fleet.several:
        raise ValueError("switching between one model and several needs a restart")
    async with fleet._changing:  # a second SIGHUP waits for the first's change
        return await _reconfigure(fleet, new)


async def _reconfigure(fleet: Fleet, new: PoolConfig) -> dict[str, Any]:
    assert fleet.slots is not None and fleet.runner is not None
    configs = new.model_configs
    report: dict[str, Any] = {"added": [], "removed": [], "changed": [], "kept": []}
    for name in [n for n in fleet.pools if n not in configs]:
        pool = fleet._unroute(name)
        pool.shutdown()
        report["removed"].append(name)
        log.info("model %s removed: it drains and stops", name)
    fleet.slots.resize(max(new.workers, sum(b.low for b in fleet.slots.bounds.values())))
    async with trio.open_nursery() as nursery:
        for name, config in configs.items():
            running = fleet.pools.get(name)
            if running is None:
                nursery.start_soon(_add, fleet, name, config, report)
            elif not same_model(running.model_config, config):
                nursery.start_soon(_change, fleet, name, running, config, report)
            else:
                fleet._route(name, running, config)
                report["kept"].append(name)
    fleet.slots.resize(new.workers)
    fleet.default_name = new.default_model_name  # if it failed to start: 404 until it runs
    fleet.config = new
    log.info("models changed: %s", report)
    return report


async def _add(fleet: Fleet, name: str, config: PoolConfig, report: dict[str, Any]) -> None:
    assert fleet.runner is not None
    log.info("model %s added: starting it", name)
    first = dataclasses.replace(config, workers=max(1, config.min_workers))
    pool = await fleet.runner.start(name, first, fatal=False)
    if pool is None:
        report.setdefault("failed", []).append(name)
        return
    fleet._started(pool)
    fleet._route(name, pool, config)
    report["added"].append(name)


async def _change(
    fleet: Fleet, name: str, old: Pool, config: PoolConfig, report: dict[str, Any]
) -> None:
    """Start the new config's pool beside the old one; swap once it is ready."""
    assert fleet.runner is not None
    share = max(1, sum(1 for w in old.workers if w.retiring is None))
    log.info("model %s changed: starting %d worker(s) of its new config beside it", name, share)
    new = await fleet.runner.start(name, dataclasses.replace(config, workers=share), fatal=False)
    if new is None:
        report.setdefault("failed", []).append(name)
        return
    fleet._started(new)
    try:
        await new.wait_ready()
    except ShuttingDown:
        if not fleet.closing:
            log.error("model %s: its new config did not start; the old one keeps serving", name)
            report.setdefault("failed", []).append(name)
        return
    fleet._route(name, new, config)
    old.shutdown()
    report["changed"].append(name)
    log.info("model %s now runs its new config; the old one drains and stops", name)
