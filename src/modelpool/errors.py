"""What can go wrong with one prediction, as exceptions that carry a JSON-ready payload."""

from __future__ import annotations

from typing import Any


class PoolError(Exception):
    """Base of every error `Pool.predict` raises; `payload()` is what a client is shown."""

    message = "prediction failed"

    def payload(self) -> dict[str, Any]:
        return {"error": self.message}


class BadRequest(PoolError):
    """The request cannot be sent to a model (not serialisable as one JSON line)."""

    message = "bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, "detail": self.detail}


class QueueFull(PoolError):
    """Too many requests are already waiting; the caller should retry later."""

    message = "queue full"


class QueueTimeout(PoolError):
    """No model became free within the queue timeout."""

    message = "no model available"


class ShuttingDown(PoolError):
    """The pool is stopping and takes no new work, or gave up on this job while stopping."""

    message = "shutting down"


class ModelTimeout(PoolError):
    """The model computed for longer than the timeout and was killed."""

    message = "model timeout"


class ModelFailed(PoolError):
    """The model died, or broke the protocol, before it printed a result."""

    message = "model failed"

    def __init__(
        self, detail: str, exit_code: int | None = None, stderr: list[str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.exit_code = exit_code
        self.stderr = stderr or []

    def payload(self) -> dict[str, Any]:
        return {
            "error": self.message,
            "detail": self.detail,
            "exit_code": self.exit_code,
            "stderr": self.stderr,
        }
