"""modelpool: a pool of warm, long-lived model processes behind POST /predict."""

from .config import ConfigError, PoolConfig, ServerConfig
from .errors import (
    BadRequest,
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

__all__ = [
    "BadRequest",
    "ConfigError",
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
