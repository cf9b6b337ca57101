"""Several models behind one service: a pool per model, and the slots they share.

Each model declared (settings/models.py) runs in a Pool of its own (pool.py): its own
workers, FIFO queue, template, limits and live operations, as one model always did.
The fleet holds them by name, sends each request to its model's pool, says what they
all do (/status, /healthz, /metrics, GET /models) and runs the arbiter that moves slots
between them by demand within --workers (slots.py). With no model declared it holds
one pool, named `default`, and adds nothing: no arbiter, and /status and /metrics as
they always were.

Embed it as a pool::

    config = PoolConfig(models={"v3": {"model_cmd": "python3 model3.py"},
                                "v2": {"model_cmd": "python3 model_v2.py"}})
    async with open_fleet(config) as fleet:
        answer = await fleet.predict({"data": 3}, model="v2")
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from modelpool.core.errors import UnknownModel
from modelpool.core.job import Timing
from modelpool.core.kinds import Priority, WorkerState
from modelpool.pool.fleetmetrics import FleetMetrics
from modelpool.pool.metrics import Recent
from modelpool.pool.operations import Busy
from modelpool.pool.pool import Pool
from modelpool.pool.report import Health
from modelpool.pool.slots import Bounds, Slots
from modelpool.pool.worker import Worker
from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.fleet")

SCALE_WAIT = 60.0  # seconds an admin scale waits for its models to be ready, at most


class PoolStarter(Protocol):
    """Starts a model's pool while the fleet runs (fleetrun.py's PoolRunner is one)."""

    async def start(self, name: str, config: PoolConfig, fatal: bool = True) -> Pool | None: ...


class Fleet:
    """The models of one service, by name; built and run by `open_fleet`.

    `pools` maps each model's name to its pool, in the order declared; `default_name`
    is the model `predict` asks when none is named; `slots` the arbiter (None with one
    model); `stopped` is set once every pool has stopped.
    """

    def __init__(
        self, config: PoolConfig, pools: dict[str, Pool], runner: PoolStarter | None = None
    ) -> None:
        self.config = config
        self.pools = pools  # routed to; the slots and the metrics read this very dict
        self.several = bool(config.models)
        self.default_name = config.default_model_name
        self.runner = runner  # starts a model's pool while the fleet runs (changes.py)
        self._running: set[Pool] = set(pools.values())  # routed or not, until stopped
        self._serving_http = False
        self._changing = trio.Lock()  # one change of its models at a time (changes.py)
        self._scaling = trio.Lock()  # one admin scale at a time
        self.slots: Slots | None = None
        self.metrics: FleetMetrics | None = None
        if self.several:
            bounds = {name: bounds_of(pool.config) for name, pool in pools.items()}
            self.metrics = FleetMetrics(pools, lambda: self.slots.shares() if self.slots else {})
            self.slots = Slots(
                config.workers,
                pools,
                bounds,
                self.metrics,
                draining=self._draining_workers,
                done=lambda: self.closing,
            )
            for pool in pools.values():
                pool._siblings = self.pool

    @property
    def default(self) -> Pool:
        """The default model's pool; UnknownModel if it is not served (it failed to
        start after a change of the config)."""
        return self.pool(self.default_name)

    def pool(self, name: str | None = None) -> Pool:
        """The pool of model `name` (the default model's if None); UnknownModel if none."""
        pool = self.pools.get(self.default_name if name is None else name)
        if pool is None:
            raise UnknownModel(self.default_name if name is None else name, list(self.pools))
        return pool

    async def predict(
        self,
        request: Any,
        request_id: str | None = None,
        timing: Timing | None = None,
        model: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline: see Pool.predict)
        priority: Priority | str = Priority.NORMAL,
    ) -> dict[str, Any]:
        """Model `model`'s answer to `request` (the default model's if None), as
        Pool.predict; UnknownModel if no model has that name."""
        pool = self.pool(model)
        return await pool.predict(request, request_id, timing, timeout=timeout, priority=priority)

    # What systemd is told (sdnotify.py) and /readyz: every model's figures together.

    @property
    def workers(self) -> list[Worker]:
        return [w for pool in self.pools.values() for w in pool.workers]

    @property
    def local_ready(self) -> int:
        return sum(pool.local_ready for pool in self.pools.values())

    @property
    def ready_count(self) -> int:
        return sum(pool.ready_count for pool in self.pools.values())

    @property
    def queue_length(self) -> int:
        return sum(pool.queue_length for pool in self.pools.values())

    async def wait_changed(self) -> None:
        """Wait until a worker of any model changes state (or joins or leaves)."""
        async with trio.open_nursery() as nursery:
            for pool in self.pools.values():
                nursery.start_soon(_then_cancel, pool.wait_changed, nursery.cancel_scope)

    async def wait_ready(self) -> None:
        """Wait until every model's workers are ready; ShuttingDown if stopping."""
        for pool in self.pools.values():
            await pool.wait_ready()

    async def wait_stopped(self) -> None:
        """Wait until every model's pool has stopped (those a change retires too)."""
        while self._running:
            pool = next(iter(self._running))
            await pool.stopped.wait()
            self._running.discard(pool)

    def shutdown(self) -> None:
        for pool in list(self._running):
            pool.shutdown()

    def kill(self) -> None:
        for pool in list(self._running):
            pool.kill()

    def mark_serving_http(self) -> None:
        self._serving_http = True
        for pool in self._running:
            pool.mark_serving_http()

    # -- its models change (changes.py) --------------------------------------------------

    def _started(self, pool: Pool) -> None:
        """A pool now runs beside the others (not routed to yet)."""
        self._running.add(pool)
        if self._serving_http:
            pool.mark_serving_http()
        if self.closing:
            pool.shutdown()

    def _route(self, name: str, pool: Pool, config: PoolConfig) -> Pool | None:
        """Requests for `name` go to `pool` from now on; the pool they went to before, if any."""
        before = self.pools.get(name)
        self.pools[name] = pool
        pool._siblings = self.pool
        if self.slots is not None:
            self.slots.bounds[name] = bounds_of(config)
        return before

    def _unroute(self, name: str) -> Pool:
        """No request goes to model `name` from now on; its pool."""
        if self.slots is not None:
            del self.slots.bounds[name]
        return self.pools.pop(name)

    def _draining_workers(self) -> int:
        """Workers of running pools no request is routed to (draining, or a change's
        new pool not yet swapped in), not yet stopped: the budget counts them."""
        routed = set(self.pools.values())
        return sum(
            1
            for pool in self._running
            if pool not in routed and not pool.stopped.is_set()
            for w in pool.workers
            if w.state is not WorkerState.STOPPED
        )

    @property
    def closing(self) -> bool:
        """Shut down (or killed): every pool is closing, routed to or not."""
        return bool(self._running) and all(pool.closing for pool in self._running)

    async def scale_slots(self, workers: int, model: str | None) -> dict[str, Any]:
        """With several models: model `model` keeps `workers` slots from now on (its min
        and max), or without one the budget becomes `workers`. Answered once the shares
        are so and their models ready, or after SCALE_WAIT seconds with what they are;
        ValueError if the models' minimums do not allow it."""
        assert self.slots is not None
        if self._scaling.locked():
            raise Busy("a scale is already running")
        async with self._scaling:
            return await self._scale_slots(workers, model)

    async def _scale_slots(self, workers: int, model: str | None) -> dict[str, Any]:
        assert self.slots is not None
        started = trio.current_time()
        before = self.slots.shares()
        if model is None:
            self.slots.resize(workers)
        else:
            self.pool(model)
            self.slots.pin(model, workers)
        with trio.move_on_after(SCALE_WAIT):
            while not self._settled(workers, model):
                await self.wait_changed()
        return {
            "model": model,
            "workers": workers,
            "before": before if model is None else before[model],
            "shares": self.slots.shares(),
            "settled": self._settled(workers, model),
            "seconds": round(trio.current_time() - started, 3),
        }

    def _settled(self, workers: int, model: str | None) -> bool:
        assert self.slots is not None
        shares = self.slots.shares()
        if model is not None and shares[model] != workers:
            return False
        if model is None and sum(shares.values()) != self.slots.reachable():
            return False
        names = [model] if model is not None else list(self.pools)
        return all(
            w.ready for name in names for w in self.pools[name].workers if w.retiring is None
        )

    # -- what it says of itself ---------------------------------------------------------

    def health(self) -> Health:
        """Healthy while every model is (see report.health); else which is not, and why."""
        if not self.several:
            return self.default.health()
        for name, pool in self.pools.items():
            health = pool.health()
            if not health.healthy:
                return Health(False, f"model {name}: {health.detail}")
        return Health(True)

    def describe(self, name: str) -> dict[str, Any]:
        """What `GET /models/{name}` shows of one model (UnknownModel if none)."""
        pool = self.pool(name)
        states = [w.state for w in pool.workers if w.retiring is None]
        low, high = 1, self.config.workers
        if self.slots is not None:
            low, high = self.slots.bounds[name].low, self.slots.high(name)
        template = None if pool.preloader is None else pool.preloader.snapshot()
        return {
            "name": name,
            "default": name == self.default_name,
            "command": pool.model_config.model_cmd,
            "workers": len(states),
            "ready": sum(1 for s in states if s in (WorkerState.IDLE, WorkerState.BUSY)),
            "busy": sum(1 for s in states if s is WorkerState.BUSY),
            "queued": pool.queue_length,
            "min_workers": low,
            "max_workers": high,
            "template": None if template is None else template.get("state"),
        }

    def models(self) -> list[dict[str, Any]]:
        """What `GET /models` lists: each model, as `describe`."""
        return [self.describe(name) for name in self.pools]

    def status(self) -> dict[str, Any]:
        """What `GET /status` shows: the one pool's status; with several models, the
        figures of all of them, each model's status, and the slots."""
        if not self.several:
            return self.default.status()
        each = {name: pool.status() for name, pool in self.pools.items()}
        health = self.health()
        workers = [
            {**worker, "model": name}
            for name, status in each.items()
            for worker in status["workers"]
        ]
        assert self.slots is not None
        return {
            **each[self.default_name],
            "workers": workers,
            "size": sum(status["size"] for status in each.values()),
            "ready": sum(status["ready"] for status in each.values()),
            "queue": sum(status["queue"] for status in each.values()),
            "queue_by_priority": {
                p: sum(status.get("queue_by_priority", {}).get(p, 0) for status in each.values())
                for p in Priority
            },
            "shutting_down": any(status["shutting_down"] for status in each.values()),
            "healthy": health.healthy,
            "problem": health.detail,
            "recent": Recent.merged([pool.metrics.recent for pool in self.pools.values()]),
            "default_model": self.default_name,
            "models": {name: {**self.describe(name), "status": each[name]} for name in each},
            "slots": {
                "budget": self.slots.budget,
                "shares": self.slots.shares(),
                "moves": self.slots.moves,
            },
        }

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """What `GET /metrics` answers (see fleetmetrics.py)."""
        if self.metrics is None:
            return self.default.metrics.exposition(accept)
        return self.metrics.exposition(accept)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def bounds_of(config: PoolConfig) -> Bounds:
    """A model's share of the slots, from its own config."""
    return Bounds(config.min_workers, config.max_workers)
