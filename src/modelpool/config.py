"""Settings of the pool and of the HTTP service, with the defaults the README documents."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

MiB = 1024 * 1024


def bundled_model_path() -> Path:
    """Where the reference model3.py lives.

    A wheel carries a copy inside the package; a source checkout (or an editable
    install) keeps the one at the repository root.
    """
    packaged = Path(str(resources.files("modelpool"))) / "model3.py"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "model3.py"


def default_model_cmd() -> list[str]:
    """The bundled model, run unbuffered by the interpreter that runs the service."""
    return [sys.executable, "-u", str(bundled_model_path())]


@dataclass(frozen=True)
class PoolConfig:
    """How many models to keep warm, how to start them and how long to wait for them."""

    model_cmd: list[str] = field(default_factory=default_model_cmd)
    workers: int = 4
    ready_line: str = "ready: Model-initialized"
    timeout: float = 10.0
    init_timeout: float = 60.0
    max_queue: int = 256
    queue_timeout: float | None = 120.0
    max_line: int = 16 * MiB
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    drain_timeout: float | None = None
    exit_grace: float = 5.0
    stderr_tail: int = 20
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.model_cmd:
            raise ValueError("model_cmd must name a program")
        positive = {
            "workers": self.workers,
            "timeout": self.timeout,
            "init_timeout": self.init_timeout,
            "max_queue": self.max_queue,
            "max_line": self.max_line,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("queue_timeout", "drain_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.exit_grace < 0:
            raise ValueError(f"exit_grace must not be negative, got {self.exit_grace}")

    @property
    def effective_drain_timeout(self) -> float:
        """How long in-flight and queued requests may run once shutdown starts.

        The default, one second past the request timeout, lets every request that was
        already computing finish or time out on its own.
        """
        if self.drain_timeout is not None:
            return self.drain_timeout
        return self.timeout + 1.0

    def backoff(self, failures: int) -> float:
        """Delay before the next start after `failures` start-up failures in a row."""
        if failures <= 0:
            return 0.0
        return min(self.backoff_initial * 2 ** (failures - 1), self.backoff_max)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front: where it listens and what it accepts."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = 1 * MiB
    keep_alive_timeout: float = 5.0
    access_log: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_body <= 0:
            raise ValueError(f"max_body must be positive, got {self.max_body}")
        if self.keep_alive_timeout <= 0:
            raise ValueError(f"keep_alive_timeout must be positive, got {self.keep_alive_timeout}")
