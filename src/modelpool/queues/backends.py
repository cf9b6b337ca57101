"""The queue backends, by the scheme of their URL (--queue): the one list to add one to.

Each backend says which URL schemes are its own, how to check such a URL and what it
needs installed (only the standard library may be imported for these: they run when the
configuration is checked, before any model starts), and how to open its queue (which
may import its client library, then and only then). Importing this module registers
the schemes with settings (`settings/queueurl.py`), which sits below the queues and so
checks a configuration's URL through what is registered here.

Adding a backend: a package beside redis/ with its queue (the `JobQueue` interface of
base.py) and its URL's check, and one `QueueBackend` in BACKENDS (or, from outside,
`register_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelpool.queues.redis import url as redis_url
from modelpool.settings.checks import ConfigError
from modelpool.settings.queueurl import (
    QueueScheme,
    queue_client_problem,
    queue_url_problem,
    redact_url,
    register_queue_scheme,
)

if TYPE_CHECKING:
    from modelpool.queues.base import JobQueue, NodeStatus, QueueMetrics
    from modelpool.settings.config import PoolConfig

Opener = Callable[["PoolConfig", "QueueMetrics", str, "NodeStatus"], "JobQueue"]


@dataclass(frozen=True)
class QueueBackend:
    """A kind of shared queue: its URL schemes, their checks, and how to open one."""

    schemes: tuple[str, ...]
    checks: QueueScheme
    open: Opener


def _open_redis(
    config: PoolConfig, metrics: QueueMetrics, node: str, node_status: NodeStatus
) -> JobQueue:
    from modelpool.queues.redis.queue import RedisQueue  # coredis: only when used

    return RedisQueue(config, metrics, node, node_status)


BACKENDS = (
    QueueBackend(
        redis_url.SCHEMES,
        QueueScheme(redis_url.redis_url_problem, redis_url.redis_client_problem),
        _open_redis,
    ),
)
_BY_SCHEME: dict[str, QueueBackend] = {}


def register_backend(backend: QueueBackend) -> None:
    """Let URLs of `backend`'s schemes name a queue: checked with the configuration, and
    opened by `backend.open` (what this module does with each of BACKENDS)."""
    for scheme in backend.schemes:
        _BY_SCHEME[scheme] = backend
        register_queue_scheme(scheme, backend.checks)


for _backend in BACKENDS:
    register_backend(_backend)


def backend_for(url: str) -> QueueBackend:
    """The backend that opens `url`; ConfigError says why none can, as the configuration's
    check does (it may have been made before the backends were registered)."""
    if (problem := queue_url_problem(url)) is not None:
        raise ConfigError("queue", f"{problem}; got {redact_url(url)!r}")
    if (problem := queue_client_problem(url)) is not None:
        raise ConfigError("queue", problem)
    return _BY_SCHEME[url.partition("://")[0]]
