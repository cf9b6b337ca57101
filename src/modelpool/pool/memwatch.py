"""The --model-max-rss watch: models that grow past the memory limit are replaced or killed.

Every second it looks at every ready model. One over the limit while idle is recycled
by surge (operations.py): its replacement is ready before it retires, so no request
notices. One over the limit while computing keeps its request unless it grows past
MEMORY_MARGIN times the limit: then it is killed at once, its request gets 502, and
its worker starts a fresh model.

A module of its own because it is a loop beside the workers, not part of any: it only
reads what workers report and asks the pool to act.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from modelpool.core.kinds import RestartReason, WorkerState

if TYPE_CHECKING:
    from modelpool.pool.worker import Worker
    from modelpool.settings.config import PoolConfig

MEMORY_CHECK_INTERVAL = 1.0  # seconds between two looks at every model's memory
MEMORY_MARGIN = 1.2  # during a request, a model is killed only past 120 % of the limit


class WatchedPool(Protocol):
    """What the memory watch needs of the pool (pool.py's Pool is one)."""

    @property
    def config(self) -> PoolConfig: ...
    @property
    def stopped(self) -> trio.Event: ...
    @property
    def workers(self) -> Sequence[Worker]: ...
    def _recycle(
        self, worker: Worker, why: str, reason: RestartReason = RestartReason.RECYCLED
    ) -> None:
        """Replace `worker` by surge: the pool's, for its own modules."""


async def watch_memory(pool: WatchedPool) -> None:
    """Every second, replace (idle) or kill (busy, past the margin) models over the limit.

    What a model holds is its handle's to say: a spawned model's resident memory, a
    forked one's private pages (not the pages it shares with its template). Both
    are read from /proc in a thread: a forked model's walks its page tables (about
    1.4 ms for 300 MiB), which the event loop, serving every request, must not wait
    on. A worker whose model changed meanwhile is looked at again next time."""
    limit = pool.config.model_max_rss
    assert limit is not None
    while not pool.stopped.is_set():
        watched = [
            (worker, worker.pid)
            for worker in pool.workers
            if worker.retiring is None and worker.ready
        ]
        usage = await trio.to_thread.run_sync(_memory_of, [worker for worker, _ in watched])
        for (worker, pid), used in zip(watched, usage, strict=True):
            if worker.retiring is not None or not worker.ready or worker.pid != pid:
                continue
            if used is None or used <= limit:
                continue
            what = f"uses {used:.0f} MiB, over --model-max-rss {limit:g} MiB"
            if worker.state is WorkerState.BUSY and used > limit * MEMORY_MARGIN:
                worker.kill_for_memory(what)
            elif worker.ask_recycle():
                pool._recycle(worker, what, RestartReason.MEMORY)
        with trio.move_on_after(MEMORY_CHECK_INTERVAL):
            await pool.stopped.wait()


def _memory_of(workers: list[Worker]) -> list[float | None]:
    """What each worker's model holds, for --model-max-rss: in a thread (see watch_memory)."""
    return [worker.memory_mib() for worker in workers]
