"""Tasks that run beside the workers until the pool has stopped (started by open_pool).

The queue's own tasks and the reaper's sweep run for as long as the pool does: a shared
queue must still send what the workers left it to send. Neither ends by itself, so each
runs in a nursery of its own that is cancelled once the pool's `stopped` is set, and
open_pool's nursery then has nothing left to wait for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from modelpool.process.reaper import Reaper
    from modelpool.queues.base import JobQueue


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


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a group, however deeply nested."""
    error = group.exceptions[0]
    return first_error(error) if isinstance(error, BaseExceptionGroup) else error
