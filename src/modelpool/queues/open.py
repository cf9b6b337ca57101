"""`open_queue`: the one place that picks a queue from the configuration.

It is a module of its own so that nothing imports both queues: the interface
(base.py) and the local queue know nothing of the shared ones, and a shared queue's
module (the Redis queue, with coredis) is imported only by its backend's opener
(backends.py), only when `config.queue` names one, so a local pool never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelpool.queues.backends import backend_for
from modelpool.queues.base import JobQueue, NodeStatus, QueueMetrics
from modelpool.queues.local import LocalQueue

if TYPE_CHECKING:
    from modelpool.settings.config import PoolConfig


def open_queue(
    config: PoolConfig, metrics: QueueMetrics, node: str, node_status: NodeStatus
) -> JobQueue:
    """The queue the configuration asks for: in-process, or the shared queue
    `config.queue` names, opened by the backend of its URL's scheme (backends.py).

    `node_status` is what this node tells the others about itself (a shared queue's
    heartbeat); a local queue has nobody to tell. ConfigError if no backend can open
    `config.queue`, before any model starts.
    """
    if config.queue is None:
        return LocalQueue(config.max_queue, metrics, config.priority_aging)
    return backend_for(config.queue).open(config, metrics, node, node_status)
