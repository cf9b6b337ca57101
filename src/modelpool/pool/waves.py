"""Starting and retiring many workers without holding up the event loop.

A resize may start or stop hundreds of workers. All at once, their first steps (a
model's pipes, its exit, its leftovers) would run in the same turns of the event loop
and hold up every request meanwhile. In waves of CHANGE_AT_ONCE, a turn stays short
whatever the pool's size, and the next worker starts (or is retired) as soon as one
is done. Models start one after another anyway (see the reaper), so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from modelpool.pool.worker import Worker

CHANGE_AT_ONCE = 8  # workers a resize starts, or stops, at the same time


async def first_model(worker: Worker) -> None:
    """Wait until a trial worker's first model is ready, or it gave up."""
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            await worker.became_ready.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(ready)
        await worker.ended.wait()
        nursery.cancel_scope.cancel()


async def start_in_waves(add_trial: Callable[[], Worker], count: int) -> list[Worker]:
    """Start `count` trial workers by `add_trial`, CHANGE_AT_ONCE at a time; wait until
    each is ready or gave up."""
    trials: list[Worker] = []
    slots = trio.Semaphore(CHANGE_AT_ONCE)

    async def start(worker: Worker) -> None:
        try:
            await first_model(worker)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            await slots.acquire()
            trials.append(add_trial())
            nursery.start_soon(start, trials[-1])
    return trials


async def retire_in_waves(workers: Sequence[Worker], reason: str) -> None:
    """Retire `workers` and wait until they have ended, CHANGE_AT_ONCE at a time."""
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
