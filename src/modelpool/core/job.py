"""A request on its way through the pool, and the one place its answer is settled."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import trio

from modelpool.core.errors import PoolError
from modelpool.core.kinds import Priority

log = logging.getLogger("modelpool.job")
MAX_ATTEMPTS = 2  # a job whose model died before reading it is tried once more
_numbers = itertools.count(1)


@dataclass
class Timing:
    """Where a request's time went, for the access log: filled in as it happens."""

    queue_wait: float | None = None  # seconds until a model took it (all waits, if retried)
    compute: float | None = None  # seconds from writing it to a model to the outcome
    total: float | None = None  # seconds through the pool
    worker: int | str | None = None  # the worker that served it last (node/index if remote)
    pid: int | None = None  # and its model's pid
    priority: str | None = None  # its class (X-Request-Priority), once its headers are read
    deadline: float | None = None  # seconds its client said it would wait (X-Request-Timeout)


class Job:
    """One request line and the caller waiting for its answer.

    `request_id` names the request to people (logs, error bodies); `wire_id` is the
    unique value sent to the model under `--id-field`, when that is on. `queued` is
    true while the job waits in the queue; `abandoned` once the caller stopped waiting
    (its client went away, or its queue wait ran out). A worker skips an abandoned job
    it has not started, and throws away the answer of one it has. What only one kind
    of queue needs to know of a job (its key in a shared queue, its caller's wait) that
    queue keeps itself.
    """

    def __init__(
        self,
        line: bytes,
        request_id: str,
        wire_id: str | None = None,
        queue_timeout: float | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> None:
        self.number = next(_numbers)
        self.request_id = request_id
        self.wire_id = wire_id
        self.line = line
        self.queued = False
        self.abandoned = False
        self.attempts = 0
        self.enqueued_at = trio.current_time()
        # trio time by which its caller wants its answer (X-Request-Timeout), if it said
        self.deadline = deadline
        self.priority = priority
        self._queue_timeout = queue_timeout
        # trio time by which a model must take it (None: it may wait forever)
        self.take_by = self._take_by(self.enqueued_at)
        # While a model computes it: cancelling this kills the model for it (intake.py,
        # --cancel-computing), as a timeout does.
        self.compute_scope: trio.CancelScope | None = None
        self.cancelled_by_caller = False  # that scope was cancelled for its caller
        self.timing = Timing()
        self.taken = trio.Event()
        self.done = trio.Event()
        self._value: dict[str, Any] | None = None
        self._error: PoolError | None = None

    def _take_by(self, since: float) -> float | None:
        """A queue timeout from `since`, or its deadline if that comes first."""
        waits = [] if self._queue_timeout is None else [since + self._queue_timeout]
        by = waits + ([] if self.deadline is None else [self.deadline])
        return min(by) if by else None

    def queue_again(self, now: float) -> None:
        """Its model died before it could read it: it waits for a model once more, for a
        whole queue timeout from `now` (its deadline still comes first). The fault was
        no caller's, so the wait it already had is not held against it; but a wait for
        a replacement model that backs off for up to --backoff-max is bounded too."""
        self.taken = trio.Event()
        self.take_by = self._take_by(now)

    def past_deadline(self, now: float) -> bool:
        """Whether its caller's deadline has passed at trio time `now`."""
        return self.deadline is not None and now >= self.deadline

    def cancel_computing(self) -> bool:
        """Stop the model computing it (its caller went away); False if none does."""
        if self.compute_scope is None or self.done.is_set():
            return False
        self.cancelled_by_caller = True
        self.compute_scope.cancel()
        return True

    def succeed(self, value: dict[str, Any]) -> None:
        if not self.done.is_set():
            self._value = value
            self._settle()

    def fail(self, error: PoolError) -> None:
        if not self.done.is_set():
            error.request_id = self.request_id
            self._error = error
            self._settle()

    @property
    def error(self) -> PoolError | None:
        """The error it was settled with, if it was settled with one."""
        return self._error

    def result(self) -> dict[str, Any]:
        """The model's answer; raises the PoolError that stands for it instead."""
        assert self.done.is_set(), "job is not done"
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def _settle(self) -> None:
        self.taken.set()  # a settled job waits for no model, wherever it was
        self.done.set()
        if self.abandoned:
            log.info("request %s: its caller is gone; answer dropped", self.request_id)
