"""modelpool: a pool of warm, long-lived model processes behind POST /predict.

The names below are imported when first used, not with the package: `modelpool serve`
starts its models before it imports the rest of what it needs (see service/server.py), and an
embedder who needs only the pool does not pay for the HTTP stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpool.core.errors import (
        BadRequest,
        DeadlineExceeded,
        DeadlineUnmet,
        FirstStartFailed,
        ModelCommandError,
        ModelFailed,
        ModelTimeout,
        PoolError,
        QueueFull,
        QueueTimeout,
        QueueUnavailable,
        ShuttingDown,
        UnknownModel,
    )
    from modelpool.core.job import Timing
    from modelpool.pool.fleet import Fleet
    from modelpool.pool.fleetrun import open_fleet
    from modelpool.pool.metrics import PoolMetrics
    from modelpool.pool.opening import open_pool
    from modelpool.pool.pool import Pool
    from modelpool.pool.report import Health
    from modelpool.process.reaper import Reaper
    from modelpool.settings.config import ConfigError, PoolConfig, ServerConfig

_WHERE = {
    "ConfigError": "settings.config",
    "PoolConfig": "settings.config",
    "ServerConfig": "settings.config",
    "BadRequest": "core.errors",
    "DeadlineExceeded": "core.errors",
    "DeadlineUnmet": "core.errors",
    "FirstStartFailed": "core.errors",
    "ModelCommandError": "core.errors",
    "ModelFailed": "core.errors",
    "ModelTimeout": "core.errors",
    "PoolError": "core.errors",
    "QueueFull": "core.errors",
    "QueueTimeout": "core.errors",
    "QueueUnavailable": "core.errors",
    "ShuttingDown": "core.errors",
    "UnknownModel": "core.errors",
    "Fleet": "pool.fleet",
    "open_fleet": "pool.fleetrun",
    "Timing": "core.job",
    "PoolMetrics": "pool.metrics",
    "Health": "pool.report",
    "Pool": "pool.pool",
    "open_pool": "pool.opening",
    "Reaper": "process.reaper",
}
__all__ = [
    "BadRequest",
    "ConfigError",
    "DeadlineExceeded",
    "DeadlineUnmet",
    "FirstStartFailed",
    "Fleet",
    "Health",
    "ModelCommandError",
    "ModelFailed",
    "ModelTimeout",
    "Pool",
    "PoolConfig",
    "PoolError",
    "PoolMetrics",
    "QueueFull",
    "QueueTimeout",
    "QueueUnavailable",
    "Reaper",
    "ServerConfig",
    "ShuttingDown",
    "Timing",
    "UnknownModel",
    "open_fleet",
    "open_pool",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'modelpool' has no attribute {name!r}")
    if _WHERE[name].startswith("settings."):
        # The queue backends register their URL schemes, which PoolConfig checks at once
        # (see settings/queueurl.py); their checks import no queue, no client library.
        import_module(".queues.backends", __name__)
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
