"""What can go wrong with one prediction, as exceptions that carry a JSON-ready payload.

Each error knows the id of the request it answers (`request_id`), so every error body a
client sees names the request, and the log lines about it can be found. Each class
carries what it maps to, as class attributes: its HTTP `status`, its `outcome` (the
metrics label, and its name on a shared queue's wire) and whether the client should
retry later (`retry_later`: a `Retry-After` header). The HTTP layer and the wire read
them from the error, never from a table of classes, so a subclass inherits its parent's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modelpool.core.kinds import FailureKind, Outcome


class PoolError(Exception):
    """Base of every error `Pool.predict` raises; `payload()` is what a client is shown."""

    message = "prediction failed"
    status: int = 500  # the HTTP status that answers it
    outcome: Outcome = Outcome.ERROR  # its label in modelpool_requests_total{outcome}
    retry_later: bool = False  # a passing condition: the answer says when to retry
    retry_after: int | None = None  # when to, in seconds, if known (else Retry-After: 1)
    request_id: str | None = None

    def payload(self) -> dict[str, Any]:
        return self._with_id({"error": self.message})

    def _with_id(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return body


class DetailedError(PoolError):
    """An error whose payload says why in a `detail` line of its own."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def payload(self) -> dict[str, Any]:
        return self._with_id({"error": self.message, "detail": self.detail})


class BadRequest(DetailedError):
    """The request cannot be sent to a model: not JSON, too deep, or refused by the schema."""

    message = "bad request"
    status = 400
    outcome = Outcome.BAD_REQUEST


class UnknownModel(DetailedError):
    """The request names a model the service does not serve; `models` are those it does."""

    message = "unknown model"
    status = 404
    outcome = Outcome.BAD_REQUEST

    def __init__(self, name: str, models: Sequence[str]) -> None:
        super().__init__(f"no model is named {name!r}; the models are: {', '.join(models)}")
        self.models = list(models)

    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "models": self.models}


class DeadlineExceeded(DetailedError):
    """Its deadline (X-Request-Timeout) passed before a model took it: no model will."""

    message = "deadline exceeded"
    status = 504
    outcome = Outcome.DEADLINE_EXCEEDED


class DeadlineUnmet(DetailedError):
    """Refused at once: the work queued ahead of it would take past its deadline."""

    message = "deadline cannot be met"
    status = 503
    outcome = Outcome.DEADLINE_UNMET
    retry_later = True

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "retry_after": self.retry_after}


class Cancelled(PoolError):
    """Its caller went away while a model computed it, and the model was killed for it
    (--cancel-computing): no one reads this answer; it is what the request is counted as."""

    message = "cancelled"
    status = 499
    outcome = Outcome.CANCELLED


class QueueFull(PoolError):
    """Too many requests are already waiting; the caller should retry later."""

    message = "queue full"
    status = 503
    outcome = Outcome.QUEUE_FULL
    retry_later = True


class QueueTimeout(PoolError):
    """No model became free within the queue timeout."""

    message = "no model available"
    status = 503
    outcome = Outcome.QUEUE_TIMEOUT
    retry_later = True


class QueueUnavailable(DetailedError):
    """The shared queue (Redis) cannot be reached, or lost the request."""

    message = "queue unavailable"
    status = 503
    outcome = Outcome.QUEUE_UNAVAILABLE
    retry_later = True


class ShuttingDown(PoolError):
    """The pool is stopping and takes no new work, or gave up on this job while stopping."""

    message = "shutting down"
    status = 503
    outcome = Outcome.SHUTTING_DOWN


class ModelTimeout(DetailedError):
    """The model computed for longer than the timeout and was killed.

    `detail` says how long it had and, if it printed lines meanwhile but no result
    line, the last of them: the usual mistake of a model that answers in plain JSON.
    """

    message = "model timeout"
    status = 504
    outcome = Outcome.TIMEOUT


class ModelFailed(PoolError):
    """The model died, or broke the protocol, before it gave a usable result.

    `detail` is one line that says why, without anything the model printed: a model's
    stderr can hold file paths and data of other users. The last stderr lines are kept
    in `stderr` for the log, for /status, and for answers when the operator asks.
    """

    message = "model failed"
    status = 502
    outcome = Outcome.MODEL_FAILED

    def __init__(
        self,
        detail: str,
        exit_code: int | None = None,
        stderr: list[str] | None = None,
        kind: FailureKind = FailureKind.CRASHED,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.exit_code = exit_code
        self.stderr = stderr or []
        self.kind = kind

    def payload(self, expose_stderr: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error": self.message,
            "detail": self.detail,
            "exit_code": self.exit_code,
        }
        if expose_stderr:
            body["stderr"] = list(self.stderr)
        return self._with_id(body)


class ModelCommandError(Exception):
    """The model command cannot be run at all (missing, not executable).

    Raised out of `open_pool` when it happens before any model was ever ready: retrying
    a command that cannot be executed would only hide the mistake.
    """


class FirstStartFailed(ModelCommandError):
    """Every model failed before its ready line, and no model was ever ready.

    At first start that is almost always a mistake in the command (a typo in a file
    name, a missing package) that restarting will not mend; so, unless asked to keep
    trying (`keep_trying`), `open_pool` raises this and the command line exits with
    code 3, as for a command that cannot be run at all.

    `verdict` says why; `stderr` holds the model's last stderr lines, quoted after it
    in the message, and kept apart so that a text log can show them one to a line.
    """

    def __init__(self, verdict: str, stderr: Sequence[str] = ()) -> None:
        self.verdict = verdict
        self.stderr = list(stderr)
        if self.stderr:
            message = f"{verdict}; its last stderr lines:\n    " + "\n    ".join(self.stderr)
        else:
            message = f"{verdict}; it printed nothing on stderr"
        super().__init__(message)
