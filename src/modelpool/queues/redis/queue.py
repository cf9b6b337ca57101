"""`RedisQueue`: the cluster's shared queue behind the `JobQueue` interface.

The pool sees one object; this one only wires the parts together (see the package's
docstring for how they work) and runs their tasks while the pool runs: the caller's
side (caller.py), the worker's side (consumer.py), the outbox that sends what workers
write (outbox.py), the heartbeat (membership.py), and the server they share
(server.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client.core import Metric

from modelpool.core.errors import ModelFailed, QueueTimeout
from modelpool.core.job import Job
from modelpool.queues.base import JobQueue, NodeStatus, QueueMetrics
from modelpool.queues.redis.caller import Callers
from modelpool.queues.redis.consumer import Consumer
from modelpool.queues.redis.membership import Membership
from modelpool.queues.redis.outbox import Outbox
from modelpool.queues.redis.server import STREAM_TIMEOUT_SECONDS, Server, connect
from modelpool.queues.redis.wire import replies_stream
from modelpool.settings.config import PoolConfig
from modelpool.settings.config import redact_url as redact

log = logging.getLogger("modelpool.redis")


class RedisQueue(JobQueue):
    """The shared queue of a cluster; see the package's docstring for how it works."""

    requeue_while_closing = True  # the stream outlives this node: others can serve it

    def __init__(
        self, config: PoolConfig, metrics: QueueMetrics, node: str, node_status: NodeStatus
    ) -> None:
        assert config.queue is not None
        self._config = config
        self.node = node
        replies = replies_stream(node)
        self._replies = replies
        self._server = Server(config.queue, config.unhealthy_after)
        self._outbox = Outbox(self._server, node, config.timeout)
        self._callers = Callers(self._server, self._outbox, config, metrics, replies)
        self._consumer = Consumer(self._server, self._outbox, node)
        self._membership = Membership(
            self._server, config, node, node_status, self._callers, self._consumer, replies
        )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A blocking read holds a connection: one per worker, and some for the rest.
        connections = self._config.workers + 16
        url = self._server.url
        async with connect(url, connections, STREAM_TIMEOUT_SECONDS) as client:
            self._server.attach(client)
            # The pool does not wait for the server: it must still stop on a signal
            # while the server is down. Callers get 503 until the queue is reached.
            task_status.started()
            await self._server.setup(self._replies)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._callers.read_replies, client)
                nursery.start_soon(self._outbox.run, client)
                nursery.start_soon(self._membership.beat, client)
                log.info("queue %s: node %s joined", redact(url), self.node)
                self._server.connected.set()
                self._consumer.wake()

    async def flush(self) -> None:
        with trio.move_on_after(self._config.exit_grace + 1):
            await self._outbox.sent()
        await self._membership.leave()

    # -- what /status, /metrics and /healthz show ---------------------------------------

    @property
    def length(self) -> int:
        return self._membership.waiting

    def remote_ready(self) -> int:
        return self._membership.remote_ready()

    def status(self) -> dict[str, Any]:
        return self._membership.status()

    def metrics(self) -> Iterator[Metric]:
        return self._membership.metrics()

    @property
    def unavailable(self) -> str | None:
        return self._server.unavailable

    def problem(self) -> str | None:
        return self._server.problem()

    # -- the caller's side ------------------------------------------------------------

    async def put(self, job: Job) -> None:
        await self._callers.put(job)

    async def wait(self, job: Job) -> None:
        try:
            if await self._callers.wait(job):
                self._give_up(job)
        finally:
            if job.done.is_set():
                self._callers.forget(job)

    def _give_up(self, job: Job) -> None:
        """No model took the job in time, or the one that took it never answered."""
        if job.taken.is_set():
            job.fail(ModelFailed("no answer from the worker that took it"))
        else:
            self.abandon(job)
            job.fail(QueueTimeout())

    def abandon(self, job: Job) -> None:
        self._callers.abandon(job)

    def waiting_callers(self) -> list[Job]:
        return self._callers.waiting()

    async def drained(self) -> None:
        await self._callers.drained()

    def take_unclaimed(self) -> list[Job]:
        return []  # the stream's jobs wait there for any node

    # -- the worker's side ------------------------------------------------------------

    async def get(self) -> Job:
        return await self._consumer.get()

    def claim(self, job: Job) -> bool:
        return self._consumer.claim(job)

    def requeue(self, job: Job) -> None:
        self._consumer.requeue(job)

    def close(self) -> None:
        self._consumer.close()

    def has_work(self) -> bool:
        return self._consumer.has_work()
