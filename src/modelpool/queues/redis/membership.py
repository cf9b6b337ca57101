"""This node as a member of the cluster: heartbeats, lost entries, reclaims, status.

Every node writes a heartbeat (its workers' states) into one hash every second, so
any front's /status and /metrics show every node. With it, in one pipeline, it
refreshes its pending entries (`XCLAIM ... JUSTID` resets their idle time), so an
entry idle for `reclaim_after` seconds belongs to a dead node: any live node claims it
(`XAUTOCLAIM`) and queues it once more if it is still within its deadline and was
taken only once, as a local model that died before reading its request; otherwise its
caller gets 502. It also finds this node's waiting jobs whose entries the server lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import coredis
import trio
from coredis.commands import CommandRequest
from prometheus_client.core import GaugeMetricFamily, Metric

from modelpool.core.errors import ModelFailed
from modelpool.core.job import MAX_ATTEMPTS
from modelpool.core.kinds import FailureKind
from modelpool.queues.base import NodeStatus
from modelpool.queues.redis.caller import Callers
from modelpool.queues.redis.consumer import Consumer
from modelpool.queues.redis.server import SERVER_ERRORS, Server
from modelpool.queues.redis.wire import (
    BEAT_SECONDS,
    GROUP,
    NODES,
    STREAM,
    Fields,
    heartbeat,
    raw,
    read_heartbeat,
)
from modelpool.settings.config import PoolConfig
from modelpool.settings.config import redact_url as redact

log = logging.getLogger("modelpool.redis")

NODE_STALE_SECONDS = 5.0  # a node silent this long is shown as gone
LOST_CHECK_LIMIT = 1024  # waiting jobs checked per heartbeat for entries the server lost


class Membership:
    """The heartbeat task, and what it learnt of the cluster for /status and /metrics."""

    def __init__(
        self,
        server: Server,
        config: PoolConfig,
        node: str,
        node_status: NodeStatus,
        callers: Callers,
        consumer: Consumer,
        replies: str,
    ) -> None:
        self._server = server
        self._config = config
        self.node = node
        self._node_status = node_status
        self._callers = callers
        self._consumer = consumer
        self._replies = replies
        self._waiting = 0
        self._nodes: list[dict[str, Any]] = []
        self._bad_nodes: set[bytes] = set()  # entries of the nodes hash logged as unreadable

    @property
    def waiting(self) -> int:
        """The cluster's waiting jobs, as of the last heartbeat."""
        return self._waiting

    async def beat(self, client: coredis.Redis[bytes]) -> None:
        reclaim_every = max(BEAT_SECONDS, self._config.reclaim_after / 2)
        next_reclaim = trio.current_time() + reclaim_every
        while True:
            try:
                await self._beat_once(client)
                if trio.current_time() >= next_reclaim:
                    next_reclaim = trio.current_time() + reclaim_every
                    await self._reclaim(client)
                self._server.up()
            except SERVER_ERRORS as exc:
                if not await self._server.mend_lost_group(client, exc):
                    self._server.down(exc)  # down, out of memory, read-only: the server's trouble
            await trio.sleep(BEAT_SECONDS)

    async def leave(self) -> None:
        """Take this node's heartbeat out (it stops): it is gone from /status at once."""
        client = self._server.client
        if client is not None:
            with trio.move_on_after(1), contextlib.suppress(*SERVER_ERRORS):
                await client.hdel(NODES, [self.node])

    async def _beat_once(self, client: coredis.Redis[bytes]) -> None:
        status = heartbeat(self.node, self._node_status)
        in_flight = self._consumer.in_flight()
        scripts = self._server.scripts
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(NODES, {self.node: status})
            if in_flight:  # still ours: reset their idle time, so no one reclaims them
                pipe.xclaim(STREAM, GROUP, self.node, 0, in_flight, justid=True)
            # Replies already handed over are of no more use.
            last_read = self._callers.last_reply_id
            trimmed: CommandRequest[int | None] = scripts.trim_replies(
                [self._replies], [last_read], client=pipe
            )
            nodes = pipe.hgetall(NODES)
            waiting: CommandRequest[int] = scripts.waiting([STREAM], [GROUP], client=pipe)
        if not await trimmed:
            self._callers.read_anew(unless_read_since=last_read)
        self._waiting = max(0, int(await waiting))
        now, alive, gone = time.time(), [], []
        found: dict[bytes, bytes] = await nodes
        for name, text in found.items():
            entry = read_heartbeat(name, text)
            if entry is None:
                self._bad_heartbeat(name, text)
            elif now - entry["at"] > NODE_STALE_SECONDS:
                gone.append(name)
            else:
                alive.append(entry)
        self._bad_nodes &= found.keys()  # one that comes back bad is logged again
        if gone:
            await client.hdel(NODES, gone)
        self._nodes = sorted(alive, key=lambda e: e["node"])
        await self._find_lost(client)

    def _bad_heartbeat(self, name: bytes, text: bytes) -> None:
        """Skip an entry of the nodes hash that is no heartbeat; say so once per entry."""
        if name in self._bad_nodes:
            return
        self._bad_nodes.add(name)
        log.error(
            "queue: %s's entry %r is not a heartbeat this version reads; skipped: %.200r",
            NODES,
            name.decode(errors="replace"),
            text,
        )

    async def _find_lost(self, client: coredis.Redis[bytes]) -> None:
        """Fail this node's waiting jobs whose entries the server no longer has.

        A server restarted without persistence, or a replica promoted before it got
        the newest entries, has lost them: no worker will ever take them (see
        `Call.checked` for why an entry must be missing twice).
        """
        calls = self._callers.untaken()[:LOST_CHECK_LIMIT]
        if not calls:
            return
        async with client.pipeline(transaction=False) as pipe:
            found = [pipe.xrange(STREAM, c.entry_id, c.entry_id, count=1) for c in calls]
        for call, entries in zip(calls, found, strict=True):
            call.checked(bool(await entries))

    async def _reclaim(self, client: coredis.Redis[bytes]) -> None:
        """Take back the jobs of nodes that stopped refreshing them (they died)."""
        idle_ms = int(self._config.reclaim_after * 1000)
        start: Any = "0-0"
        while True:
            reply = await client.xautoclaim(STREAM, GROUP, self.node, idle_ms, start, count=64)
            start, entries = reply[0], reply[1]
            deleted = [entry.identifier for entry in entries if not entry.field_values]
            for entry in entries:
                if entry.field_values:
                    self._reclaimed(*raw(entry))
            if deleted:  # Redis 6.2 hands out entries deleted meanwhile: let them go
                await client.xack(STREAM, GROUP, deleted)
            if start in (b"0-0", "0-0"):
                return

    def _reclaimed(self, entry_id: bytes, fields: Fields) -> None:
        job = self._consumer.job_from(entry_id, fields)
        if job is None:
            return
        job.attempts += 1  # the node that died had taken it
        log.warning(
            "request %s: its node stopped answering for %g s; reclaimed",
            job.request_id,
            self._config.reclaim_after,
        )
        if job.attempts >= MAX_ATTEMPTS or job.expired():
            job.fail(
                ModelFailed("the node that took it stopped answering", kind=FailureKind.CRASHED)
            )
        else:
            self._consumer.requeue(job)

    # -- what /status and /metrics show -----------------------------------------------

    def remote_ready(self) -> int:
        return sum(n.get("ready", 0) for n in self._nodes if n["node"] != self.node)

    def status(self) -> dict[str, Any]:
        return {
            "cluster": {
                "queue": redact(self._server.url),
                "node": self.node,
                "waiting": self.waiting,
                "reachable": self._server.reachable,
                "nodes": self._nodes,
            }
        }

    def metrics(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(
            "modelpool_cluster_nodes", "Nodes that sent a heartbeat lately", value=len(self._nodes)
        )
        yield nodes
        workers = GaugeMetricFamily(
            "modelpool_cluster_workers", "Workers of every node, by state", labels=["node", "state"]
        )
        for node in self._nodes:
            counts: dict[str, int] = {}
            for worker in node.get("workers", []):
                counts[worker["state"]] = counts.get(worker["state"], 0) + 1
            for state, count in sorted(counts.items()):
                workers.add_metric([node["node"], state], count)
        yield workers
