"""A job read from the stream by this node's worker, for a caller on some node.

It is a `Job` like any other to the pool and its worker, so a worker serves a remote
caller as it serves a local one; the difference is in settling it: its answer must go
to the caller's node, which the consumer does when it is told (`settled`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from modelpool.core.job import Job
from modelpool.queues.redis.wire import JobEntry


class RemoteJob(Job):
    """A job read from the stream: settling it sends the answer to its caller's node."""

    def __init__(self, entry: JobEntry, settled: Callable[[RemoteJob], None]) -> None:
        super().__init__(entry.line, entry.request_id, entry.wire_id)
        self.entry = entry
        self._settled = settled
        self.attempts = entry.attempts
        # Its time in the queue so far, on this node's clock (another node's wall clock
        # may differ: never more than now).
        self.enqueued_at = trio.current_time() - max(0.0, time.time() - entry.enqueued_wall)
        self.queued = True

    @property
    def entry_id(self) -> bytes:
        """Its entry in the stream, which this node's worker holds until it answers."""
        return self.entry.entry_id

    def expired(self) -> bool:
        """Whether its deadline passed: a model may not take it any more."""
        return self.entry.take_by_wall is not None and time.time() > self.entry.take_by_wall

    def _settle(self) -> None:
        super()._settle()
        self._settled(self)
