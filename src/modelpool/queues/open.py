"""`open_queue`: the one place that picks a queue from the configuration.

It is a module of its own so that nothing imports both queues: the interface
(base.py) and the local queue know nothing of Redis, and the Redis queue, with
coredis, is imported only here and only when `config.queue` names a server, so a
local pool never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelpool.queues.base import JobQueue, NodeStatus, QueueMetrics
from modelpool.queues.local import LocalQueue

if TYPE_CHECKING:
    from modelpool.settings.config import PoolConfig


def open_queue(
    config: PoolConfig, metrics: QueueMetrics, node: str, node_status: NodeStatus
) -> JobQueue:
    """The queue the configuration asks for: in-process, or a Redis stream (`config.queue`).

    `node_status` is what this node tells the others about itself (a shared queue's
    heartbeat); a local queue has nobody to tell.
    """
    if config.queue is None:
        return LocalQueue(config.max_queue, metrics)
    from modelpool.queues.redis.queue import (
        RedisQueue,  # imported only when used: no cost to a local pool
    )

    return RedisQueue(config, metrics, node, node_status)
