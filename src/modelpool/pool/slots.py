"""Slots follow demand: which model runs in each of --workers' slots, moment to moment.

With several models (settings/models.py), `--workers` is a budget of model processes
computing at once, whichever model they run, and each model has a pool of its own
(pool.py). The arbiter looks at every pool every TICK seconds and:

1. **Fills** a free slot (the budget grew, or a model gave one back): to the model
   whose requests wait with no slot coming for them, else to the model with the
   fewest slots, within each model's `max-workers`.
2. **Moves** a slot when a model has requests waiting, no idle worker, no start under
   way for them, and is under its `max-workers`, while another model has an idle
   worker, nothing waiting, and more than its `min-workers`: that idle worker is
   retired (it computes nothing; its model is stopped gracefully) and a worker of the
   waiting model starts in its place, on its device. Under --preload, with the
   waiting model's template ready, that start is a fork: a few milliseconds. Else it
   is a whole load, so the move is made only when the wait it saves, the requests
   waiting times the model's mean compute time over its workers, is longer than the
   model's last start took.
3. **Holds** a slot with the model it moved to for HOLD_MIN seconds at least, and at
   least HOLD_STARTS times what a start of that model costs now (its fastest start
   among its workers: a fork's, under --preload): the process started in it is not
   given away before. So no slot flaps between two models faster than its moves pay
   off, and a steady mix settles with few moves.

A surge's extra worker (a reload's, a recycle's: operations.py) is no slot of its own:
it is neither counted nor given away, and it replaces a worker of its model one for
one. The workers of a pool that drains (a model removed or replaced, changes.py) count
against the budget until they have stopped, so no fill starts beside them; they are
never given away either. Moves are counted in `modelpool_slot_moves_total{from,to}`.
A retired worker's model may take up to --exit-grace to exit after the slot has moved:
for that long one more process than the budget exists, computing nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from modelpool.core.kinds import WorkerState

if TYPE_CHECKING:
    from modelpool.pool.worker import Worker
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.slots")

TICK = 0.01  # seconds between two looks at the pools
HOLD_MIN = 1.0  # seconds a model keeps a slot moved to it, at least
HOLD_STARTS = 2.0  # ... and at least this many of its starts


class SlotPool(Protocol):
    """What the arbiter needs of each model's pool (pool.py's Pool is one)."""

    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def queue_length(self) -> int: ...
    @property
    def closing(self) -> bool: ...
    def _replacement_forks(self) -> bool: ...
    @property
    def config(self) -> PoolConfig: ...
    @property
    def metrics(self) -> ComputeMean: ...
    def _add_worker(
        self,
        config: None = None,
        generation: None = None,
        trial: bool = False,
        device: str | None = None,
    ) -> Worker: ...


class ComputeMean(Protocol):
    def mean_compute(self) -> float | None: ...


class MoveCounter(Protocol):
    def count_slot_move(self, source: str, target: str) -> None: ...


@dataclass
class Bounds:
    """A model's share of the slots: at least `low`, at most `high` (None: the budget)."""

    low: int
    high: int | None


@dataclass
class _Seen:
    """One model's pool as one look saw it (its surge workers left out)."""

    serving: list[Worker]
    idle: list[Worker]
    coming: int  # workers whose model is starting
    queued: int

    @property
    def unserved(self) -> int:
        """Requests waiting that no idle worker, nor one starting, will take soon."""
        return self.queued - self.coming if not self.idle else 0


class Slots:
    """The arbiter of one fleet's slots; `draining` counts the workers of pools that
    drain (no longer routed to), which the budget counts until they stop; `done` says
    when to stop looking (the fleet is shutting down)."""

    def __init__(
        self,
        budget: int,
        pools: Mapping[str, SlotPool],
        bounds: Mapping[str, Bounds],
        metrics: MoveCounter,
        draining: Callable[[], int] = lambda: 0,
        done: Callable[[], bool] = lambda: False,
    ) -> None:
        self.budget = budget
        self._pools = pools
        self.bounds = dict(bounds)
        self._metrics = metrics
        self._draining = draining
        self._done = done
        self._held: dict[Worker, float] = {}  # a worker started by a move: held until
        self.moves = 0

    def high(self, name: str) -> int:
        """The most slots model `name` may have."""
        high = self.bounds[name].high
        return self.budget if high is None else min(high, self.budget)

    def pin(self, name: str, workers: int) -> None:
        """Model `name` keeps `workers` slots from now on (its min and max); ValueError
        if the others' minimums leave it fewer."""
        others = sum(b.low for n, b in self.bounds.items() if n != name)
        if others + workers > self.budget:
            room = self.budget - others
            raise ValueError(
                f"model {name} can have {room} slot(s) at most: the other models keep "
                f"{others} (their min-workers) of the {self.budget}"
            )
        self.bounds[name] = Bounds(workers, workers)

    def resize(self, budget: int) -> None:
        """A new budget; ValueError if it is under the models' minimums together."""
        floor = sum(b.low for b in self.bounds.values())
        if budget < floor:
            raise ValueError(f"the models keep {floor} slot(s) at least (their min-workers)")
        self.budget = budget

    def reachable(self) -> int:
        """The slots the models can fill: the budget, or less if their maximums are."""
        return min(self.budget, sum(self.high(name) for name in self.bounds))

    def shares(self) -> dict[str, int]:
        """The slots each model has now (its workers not retiring, surges aside)."""
        return {name: len(_serving(pool)) for name, pool in self._pools.items()}

    async def run(self) -> None:
        """Look and act every TICK seconds until the fleet shuts down."""
        while not self._done():
            self.step()
            await trio.sleep(TICK)

    def step(self) -> None:
        """One look at every pool, and the fills and moves it calls for."""
        seen = {
            name: _look(pool)
            for name, pool in self._pools.items()
            if not pool.closing and name in self.bounds
        }
        now = trio.current_time()
        self._held = {w: t for w, t in self._held.items() if t > now and w.retiring is None}
        self._keep_within(seen)
        total = sum(len(each.serving) for each in seen.values())
        draining = self._draining()
        while total + draining < self.budget and (name := self._to_fill(seen)) is not None:
            self._start(name, seen, None)
            total += 1
        if total > self.budget:
            self._give_back(seen, total - self.budget)
            return
        for name in sorted(seen, key=lambda n: -seen[n].unserved):
            target = seen[name]
            below = len(target.serving) < self.bounds[name].low
            if not below and (target.unserved <= 0 or len(target.serving) >= self.high(name)):
                continue
            if not below and not self._worth_a_start(name, target):
                continue
            found = self._donor(seen, name, below)
            if found is not None:
                self._move(seen, *found, name)

    def _move(self, seen: Mapping[str, _Seen], donor: str, worker: Worker, target: str) -> None:
        seen[donor].idle.remove(worker)
        seen[donor].serving.remove(worker)
        worker.retire(f"its slot moves to model {target}")
        usable = self._pools[target].config.devices or ()
        self._start(target, seen, worker.device if worker.device in usable else None)
        self._metrics.count_slot_move(donor, target)
        self.moves += 1
        log.info("slot moved from model %s to model %s", donor, target)

    def _keep_within(self, seen: Mapping[str, _Seen]) -> None:
        """Retire the workers of a model over its maximum (pinned lower): idle ones
        first; a busy one after its request."""
        for name, each in seen.items():
            while len(each.serving) > self.high(name):
                pick = each.idle.pop() if each.idle else each.serving[-1]
                if pick in each.idle:
                    each.idle.remove(pick)
                each.serving.remove(pick)
                pick.retire(f"model {name} keeps {self.high(name)} slot(s)")

    def _to_fill(self, seen: Mapping[str, _Seen]) -> str | None:
        room = [n for n in seen if len(seen[n].serving) < self.high(n)]
        if not room:
            return None
        waiting = [n for n in room if seen[n].unserved > 0]
        if waiting:
            return max(waiting, key=lambda n: seen[n].unserved)
        return min(room, key=lambda n: len(seen[n].serving))

    def _start(self, name: str, seen: Mapping[str, _Seen], device: str | None) -> None:
        pool = self._pools[name]
        worker = pool._add_worker(device=device)
        seen[name].serving.append(worker)
        seen[name].coming += 1
        hold = max(HOLD_MIN, HOLD_STARTS * _start_seconds(pool))
        self._held[worker] = trio.current_time() + hold

    def _give_back(self, seen: Mapping[str, _Seen], extra: int) -> None:
        """The budget shrank: retire idle workers above their model's minimum."""
        for name, each in seen.items():
            while extra and each.idle and len(each.serving) > self.bounds[name].low:
                worker = each.idle.pop()
                each.serving.remove(worker)
                worker.retire("the slot budget shrank")
                extra -= 1

    def _donor(
        self, seen: Mapping[str, _Seen], target: str, below: bool = False
    ) -> tuple[str, Worker] | None:
        """The model that can best spare an idle worker for `target`, and that worker,
        if any: one with nothing waiting, above its minimum, whose worker is not held;
        for a `target` below its minimum, any model above its own with an idle worker."""
        best: tuple[str, Worker] | None = None
        for name, each in seen.items():
            if name == target or len(each.serving) <= self.bounds[name].low:
                continue
            free = [w for w in each.idle if below or w not in self._held]
            if not free or (each.queued and not below):
                continue
            if best is None or len(each.idle) > len(seen[best[0]].idle):
                best = (name, free[-1])
        return best

    def _worth_a_start(self, name: str, seen: _Seen) -> bool:
        """Whether a start pays off: a fork always; a whole load only if the wait it
        saves is longer than the load."""
        pool = self._pools[name]
        if pool._replacement_forks():
            return True
        compute = pool.metrics.mean_compute()
        if compute is None:
            return True  # nothing known yet: a first request waits either way
        saved = seen.unserved * compute / max(1, len(seen.serving))
        return saved > _start_seconds(pool)


def _serving(pool: SlotPool) -> list[Worker]:
    """A pool's workers that hold slots: not retiring, and no surge's extra one."""
    return [w for w in pool.workers if w.retiring is None and not w.trial]


def _look(pool: SlotPool) -> _Seen:
    serving = _serving(pool)
    idle = [w for w in serving if w.state is WorkerState.IDLE]
    coming = sum(1 for w in serving if w.state in (WorkerState.STARTING, WorkerState.RESTARTING))
    return _Seen(serving, idle, coming, pool.queue_length)


def _start_seconds(pool: SlotPool) -> float:
    """What a start of the pool's model costs now: its fastest among its workers (a
    fork's, once its template is loaded; 0 if none is known)."""
    starts = [w.start_seconds for w in pool.workers if w.start_seconds is not None]
    return min(starts, default=0.0)
