"""modelpool: a pool of warm, long-lived model processes behind POST /predict."""

from .config import PoolConfig, ServerConfig
from .errors import (
    BadRequest,
    ModelFailed,
    ModelTimeout,
    PoolError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from .pool import Pool, open_pool

__all__ = [
    "BadRequest",
    "ModelFailed",
    "ModelTimeout",
    "Pool",
    "PoolConfig",
    "PoolError",
    "QueueFull",
    "QueueTimeout",
    "ServerConfig",
    "ShuttingDown",
    "open_pool",
]
