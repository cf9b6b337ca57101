"""An error's HTTP status, outcome and retry come from its class, so a subclass inherits them.

core/errors.py is where an error a client can get is added; a subclass of one of its
errors (a more precise kind of model failure, say) must be answered as its parent is,
not fall through a table of exact types into a 500, and must cross a shared queue's wire
as its parent.
"""

from __future__ import annotations

import pytest

from modelpool.core.errors import (
    BadRequest,
    ModelFailed,
    ModelTimeout,
    PoolError,
    QueueFull,
    QueueTimeout,
    QueueUnavailable,
    ShuttingDown,
)
from modelpool.core.job import Job
from modelpool.core.kinds import Outcome
from modelpool.http.app import pool_error_answer
from modelpool.queues.redis.wire import AnswerReply, answer_fields, read_reply


class SlowToWake(ModelTimeout):
    """A kind of timeout no version of modelpool knows."""


class GpuFell(ModelFailed):
    """A kind of model failure no version of modelpool knows."""


class Overbooked(QueueFull):
    """A kind of full queue no version of modelpool knows."""


class Unforeseen(PoolError):
    """A kind of error with nothing more precise to say."""


@pytest.mark.parametrize(
    ("error", "status", "outcome", "retry"),
    [
        (SlowToWake("took 5.0s"), 504, Outcome.TIMEOUT, False),
        (
            GpuFell("exited 139", exit_code=139, stderr=["cuda: gone"]),
            502,
            Outcome.MODEL_FAILED,
            False,
        ),
        (Overbooked(), 503, Outcome.QUEUE_FULL, True),
        (Unforeseen(), 500, Outcome.ERROR, False),
    ],
)
def test_a_subclass_is_answered_as_its_parent(
    error: PoolError, status: int, outcome: Outcome, retry: bool
) -> None:
    error.request_id = "r-1"
    answered, body, headers = pool_error_answer(error, expose_stderr=True)
    assert answered == status
    assert error.outcome == outcome
    assert body["request_id"] == "r-1"
    assert ("Retry_After" in headers) is retry
    if isinstance(error, ModelFailed):
        assert body["stderr"] == ["cuda: gone"] and body["exit_code"] == 139


def test_every_error_a_client_can_get_has_its_own_status_and_outcome() -> None:
    """The statuses docs/http-api.md lists, read from the classes themselves."""
    assert {cls: (cls.status, cls.outcome, cls.retry_later) for cls in ERRORS} == ERRORS


ERRORS = {
    BadRequest: (400, Outcome.BAD_REQUEST, False),
    QueueFull: (503, Outcome.QUEUE_FULL, True),
    QueueTimeout: (503, Outcome.QUEUE_TIMEOUT, True),
    QueueUnavailable: (503, Outcome.QUEUE_UNAVAILABLE, True),
    ShuttingDown: (503, Outcome.SHUTTING_DOWN, False),
    ModelTimeout: (504, Outcome.TIMEOUT, False),
    ModelFailed: (502, Outcome.MODEL_FAILED, False),
}


async def test_a_subclass_crosses_the_shared_queue_as_its_parent() -> None:
    """A worker node fails a job with a subclass; the caller's node reads its parent back,
    with the detail, and answers it with the same status."""
    for error, parent in [
        (SlowToWake("took 5.0s"), ModelTimeout),
        (GpuFell("exited with 139", exit_code=139, stderr=["cuda: gone"]), ModelFailed),
    ]:
        job = Job(b"{}\n", "r-2")
        job.fail(error)
        fields = {
            key.encode(): str(value).encode() for key, value in answer_fields(job, "node-a").items()
        }
        reply = read_reply(fields, default_timeout=1.0)
        assert isinstance(reply, AnswerReply) and reply.error is not None
        assert type(reply.error) is parent
        assert str(reply.error) == str(error)
        assert pool_error_answer(reply.error)[0] == error.status
