"""What the pool says about itself: /status, /healthz's answer, and a node's heartbeat.

These only read the pool, and each is read by someone else (the HTTP service, the
status page, the other nodes of a cluster), so they live apart from what runs the pool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import trio

from modelpool.process import threads

if TYPE_CHECKING:
    from modelpool.pool.metrics import PoolMetrics
    from modelpool.pool.worker import Worker
    from modelpool.process.preload import Preloader
    from modelpool.process.reaper import Reaper
    from modelpool.queues.base import JobQueue
    from modelpool.settings.config import PoolConfig

# What a node's heartbeat tells the cluster of each of its workers.
HEARTBEAT_KEYS = ("id", "state", "pid", "served", "failed", "restarts", "generation", "device")


class ReportedPool(Protocol):
    """What the reports read of the pool (pool.py's Pool is one)."""

    @property
    def config(self) -> PoolConfig: ...
    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def queue(self) -> JobQueue: ...
    @property
    def reaper(self) -> Reaper: ...
    @property
    def preloader(self) -> Preloader | None: ...
    @property
    def metrics(self) -> PoolMetrics: ...
    @property
    def closing(self) -> bool: ...
    @property
    def ready_count(self) -> int: ...
    @property
    def local_ready(self) -> int: ...
    @property
    def serves_http(self) -> bool: ...
    @property
    def model_was_ready(self) -> bool: ...


def status(pool: ReportedPool) -> dict[str, Any]:
    """What `GET /status` shows: every worker, the queue, health and the last minute."""
    healthy, problem = health(pool)
    return {
        "workers": [w.snapshot() for w in pool.workers],
        "size": len(pool.workers),
        "ready": pool.ready_count,
        "queue": pool.queue.length,
        "max_queue": pool.config.max_queue,
        "shutting_down": pool.closing,
        "healthy": healthy,
        "problem": problem,
        "orphans_killed": pool.reaper.killed,
        "template": None if pool.preloader is None else pool.preloader.snapshot(),
        "model_threads": threads.plan(pool.config).snapshot(),
        "recent": pool.metrics.recent.summary(),
        **pool.queue.status(),
    }


def node_status(pool: ReportedPool) -> dict[str, Any]:
    """This node as other nodes of a cluster see it (its heartbeat)."""
    return {
        "pid": os.getpid(),
        "http": pool.serves_http,
        "ready": pool.local_ready,
        "size": len(pool.workers),
        "shutting_down": pool.closing,
        "workers": [
            {key: snapshot[key] for key in HEARTBEAT_KEYS}
            for snapshot in (w.snapshot() for w in pool.workers)
        ],
    }


class Health(NamedTuple):
    """What `GET /healthz` answers: `body()` is its JSON body, `http_status` its status.

    It unpacks as the pair `healthy, detail = pool.health()`; `/healthz` is made from it,
    so the library and the route cannot disagree.
    """

    healthy: bool
    """False once every model has kept failing for `unhealthy_after` seconds, or the
    shared queue has been unreachable that long."""
    detail: str | None = None
    """Why not, when not healthy: the body's "detail" (None when healthy)."""

    @property
    def status(self) -> Literal["ok", "failing"]:
        """The body's "status": "ok", or "failing"."""
        return "ok" if self.healthy else "failing"

    @property
    def http_status(self) -> int:
        """200 when healthy, else 503."""
        return 200 if self.healthy else 503

    def body(self) -> dict[str, str | None]:
        """`{"status": "ok"}`, or `{"status": "failing", "detail": "..."}`."""
        if self.healthy:
            return {"status": self.status}
        return {"status": self.status, "detail": self.detail}


def health(pool: ReportedPool) -> Health:
    """Unhealthy once every model has kept failing for `unhealthy_after` seconds.

    Failing means failing on its own: a start that fails, a model that dies while
    idle. A request that crashes its model says nothing about the model's health,
    and neither does a long first start-up. Before any model was ever ready, every
    model failing is unhealthy at once (with --keep-trying; without, the service
    stops): there is no working version to wait for. `unhealthy_after` None never.
    """
    limit = pool.config.unhealthy_after
    queue_problem = pool.queue.problem()
    if queue_problem is not None:
        return Health(False, queue_problem)
    now = trio.current_time()
    since = [w.failing(now) for w in pool.workers]
    if limit is None or not since or None in since:
        return Health(True)
    failing_for = now - max(s for s in since if s is not None)
    if failing_for < limit and pool.model_was_ready:
        return Health(True)
    last = next((w.failure_summary for w in pool.workers if w.failure_summary), "")
    if not pool.model_was_ready:
        never = "no model was ever ready: every model failed to start"
        return Health(False, f"{never}; last: {last}")
    return Health(False, f"every model has failed for {failing_for:.0f} s; last: {last}")
