"""modelpool: a pool of warm, long-lived model processes behind POST /predict.

The names below are imported when first used, not with the package: `modelpool serve`
starts its models before it imports the rest of what it needs (see server.py), and an
embedder who needs only the pool does not pay for the HTTP stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigError, PoolConfig, ServerConfig
    from .errors import (
        BadRequest,
        FirstStartFailed,
        ModelCommandError,
        ModelFailed,
        ModelTimeout,
        PoolError,
        QueueFull,
        QueueTimeout,
        QueueUnavailable,
        ShuttingDown,
    )
    from .job import Timing
    from .metrics import PoolMetrics
    from .pool import Pool, open_pool
    from .reaper import Reaper

_WHERE = {
    "ConfigError": "config",
    "PoolConfig": "config",
    "ServerConfig": "config",
    "BadRequest": "errors",
    "FirstStartFailed": "errors",
    "ModelCommandError": "errors",
    "ModelFailed": "errors",
    "ModelTimeout": "errors",
    "PoolError": "errors",
    "QueueFull": "errors",
    "QueueTimeout": "errors",
    "QueueUnavailable": "errors",
    "ShuttingDown": "errors",
    "Timing": "job",
    "PoolMetrics": "metrics",
    "Pool": "pool",
    "open_pool": "pool",
    "Reaper": "reaper",
}
__all__ = [
    "BadRequest",
    "ConfigError",
    "FirstStartFailed",
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
    "open_pool",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'modelpool' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
