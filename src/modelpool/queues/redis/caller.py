"""The caller's side: put a job into the stream, wait for its answer, or take it back.

Each request of this node gets a key of this run, under which its job is queued and
its worker's notices and answer come back, on this node's replies stream. One task
reads that stream and hands each reply to the request it names; a request waits with
a deadline that the notices move (a worker took it: now its answer is due), so the
queue timeout works as on one machine. The mapping from a job to its key stays here:
the job itself knows nothing of this queue.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
from dataclasses import dataclass

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.typing import ValueT

from modelpool.core.errors import QueueFull, QueueUnavailable
from modelpool.core.job import Job
from modelpool.queues.base import QueueMetrics
from modelpool.queues.redis.outbox import Drop, Outbox
from modelpool.queues.redis.server import RETRY_SECONDS, SERVER_ERRORS, Server
from modelpool.queues.redis.wire import (
    BEAT_SECONDS,
    GROUP,
    STREAM,
    AnswerReply,
    Fields,
    RequeuedReply,
    TakenReply,
    job_entry,
    raw,
    read_reply,
    reply_key,
)
from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.redis")

ADMIT_SECONDS = 5.0  # how long a request may wait for the server to queue it
CONNECT_WAIT_SECONDS = 5.0  # how long a request waits for a node still connecting
TAKEN_GRACE_SECONDS = 1.0  # past a job's deadline, how long its front waits for a late "taken"
ANSWER_SLACK_SECONDS = 5.0  # beyond the worker's timeout and a reclaim, before giving up


@dataclass
class Call:
    """A request of this node's, waiting for its answer from some worker."""

    job: Job
    key: bytes  # its name in its entry and in every reply about it
    entry_id: bytes | None = None
    answer_by: float = math.inf  # trio time; set when a worker takes it
    observed: bool = False  # its queue wait went into the histogram
    missing: bool = False  # its entry was not in the stream at the last heartbeat
    scope: trio.CancelScope | None = None  # its wait, whose deadline notices move

    def deadline(self) -> float:
        """Until when to wait: for a worker to take it, or, once one did, for its answer."""
        if self.job.taken.is_set():
            return self.answer_by
        # A worker may take it up to its deadline; its word takes a moment to come.
        return math.inf if self.job.take_by is None else self.job.take_by + TAKEN_GRACE_SECONDS

    def moved(self) -> None:
        """A notice changed what it waits for: its wait's deadline follows."""
        if self.scope is not None:
            self.scope.deadline = self.deadline()

    def checked(self, present: bool) -> None:
        """Whether its entry was in the stream at a heartbeat: missing twice, it is lost.

        An entry is also gone, for a moment, when a worker has answered it and the
        answer is on its way; so a job is failed only when its entry is missing twice,
        a heartbeat apart.
        """
        present = present or self.job.taken.is_set()
        if not present and self.missing and not self.job.done.is_set():
            self.job.fail(QueueUnavailable("the queue server lost it (restart or failover)"))
        self.missing = not present


class Callers:
    """This node's requests waiting for answers, and the reader of their replies."""

    def __init__(
        self,
        server: Server,
        outbox: Outbox,
        config: PoolConfig,
        metrics: QueueMetrics,
        replies: str,
    ) -> None:
        self._server = server
        self._outbox = outbox
        self._config = config
        self._metrics = metrics
        self._replies = replies
        self._token = secrets.token_hex(6)  # keys of this run only: old replies never match
        self._numbers = itertools.count(1)
        self._by_key: dict[bytes, Call] = {}  # what a reply names
        self._by_job: dict[Job, Call] = {}  # what the pool names
        self._none_left = trio.Event()  # set when the last caller is answered
        self._last_reply_id = b"0-0"

    async def put(self, job: Job) -> None:
        with trio.move_on_after(CONNECT_WAIT_SECONDS):
            await self._server.connected.wait()  # a request that comes while the node starts
        if self._server.client is None or not self._server.connected.is_set():
            raise QueueUnavailable(f"not connected to the queue yet: {self._server.down_reason}")
        key = f"{self._token}:{next(self._numbers)}".encode()
        fields = job_entry(job, key, self._replies)
        call = Call(job, key)
        self._by_key[key] = call  # before the entry exists: its notices may come at once
        self._by_job[job] = call
        queued = False
        try:
            # Shielded, so a caller who leaves meanwhile still learns the entry's id and
            # can take it out again; bounded, so a silent server cannot hold it.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + ADMIT_SECONDS
                try:
                    entry_id = await self._queue_entry(fields)
                except SERVER_ERRORS as exc:
                    raise QueueUnavailable(f"cannot reach the queue: {exc}") from None
            if scope.cancelled_caught:
                self._server.down(TimeoutError(f"no answer within {ADMIT_SECONDS:g} s"))
                raise QueueUnavailable(f"the queue did not answer within {ADMIT_SECONDS:g} s")
            if entry_id is None:
                raise QueueFull()
            call.entry_id, job.queued, queued = entry_id, True, True
            if trio.current_effective_deadline() == -math.inf:
                self.abandon(job)  # its caller left while it was queued: take it out
                await trio.lowlevel.checkpoint()  # and it leaves now, Cancelled
            # No checkpoint otherwise: a job queued is the caller's to wait for (or to
            # abandon), and a cancellation here would leave it with nobody.
        finally:
            if not queued:  # refused, unreachable, or its caller gave up meanwhile
                self.forget(job)

    async def _queue_entry(self, fields: list[ValueT]) -> bytes | None:
        """Admit and add one entry; its id, or None if the queue is full."""
        client, admit = self._server.client, self._server.scripts.admit
        assert client is not None
        try:
            try:
                entry_id: bytes | None = await admit(
                    [STREAM], [GROUP, self._config.max_queue, *fields]
                )
            except RedisError as exc:
                if not await self._server.mend_lost_group(client, exc):
                    raise
                entry_id = await admit([STREAM], [GROUP, self._config.max_queue, *fields])
        except SERVER_ERRORS as exc:
            self._server.down(exc)  # every request fails meanwhile: /readyz and /healthz say so
            raise
        self._server.up()
        return entry_id

    async def wait(self, job: Job) -> bool:
        """Wait until `job` is settled; True if its deadline passed first.

        Then the queue gives up on it (`RedisQueue.wait`), through its own `abandon`.
        Cancellation (the caller went away) leaves the job to `abandon`.
        """
        call = self._by_job.get(job)
        if call is None or job.done.is_set():
            return False
        with trio.CancelScope(deadline=call.deadline()) as call.scope:
            await job.done.wait()  # however it is settled, this wakes
        return call.scope.cancelled_caught and not job.done.is_set()

    def abandon(self, job: Job) -> None:
        job.abandoned = True
        call = self.forget(job)
        if call is not None and call.entry_id is not None and not job.taken.is_set():
            self._outbox.post(Drop(call.entry_id))  # no worker has it yet: none will

    def waiting(self) -> list[Job]:
        """Every job of this node's callers still waiting (answered ones are gone)."""
        return [call.job for call in self._by_key.values()]

    def untaken(self) -> list[Call]:
        """The calls whose job is in the stream and no worker took yet."""
        return [c for c in self._by_key.values() if c.entry_id and not c.job.taken.is_set()]

    async def drained(self) -> None:
        while self._by_key:
            self._none_left = trio.Event()
            await self._none_left.wait()

    def forget(self, job: Job) -> Call | None:
        """Its caller has its answer, or stopped waiting: replies about it are ignored."""
        call = self._by_job.pop(job, None)
        if call is not None:
            del self._by_key[call.key]
        if not self._by_key:
            self._none_left.set()
        return call

    # -- the replies ------------------------------------------------------------------

    @property
    def last_reply_id(self) -> bytes:
        """The last reply handed over: the replies stream may be trimmed up to it."""
        return self._last_reply_id

    def read_anew(self, unless_read_since: bytes) -> None:
        """The replies stream was made anew: read it from its start, unless a reply was
        read since `unless_read_since` (then the reader already reads the new one)."""
        if self._last_reply_id == unless_read_since:
            # The stream was made anew (FLUSHALL, a restart, its expiry): its entries
            # are numbered by the server's clock, maybe below the last one read here,
            # and would never be read. Read it from its start; a reply read twice is
            # ignored the second time.
            self._last_reply_id = b"0-0"

    async def read_replies(self, client: coredis.Redis[bytes]) -> None:
        """Hand every reply in this node's stream to the request it answers."""
        while True:
            try:
                found = await client.xread(
                    {self._replies: self._last_reply_id}, count=256, block=1000
                )
            except SERVER_ERRORS as exc:
                self._server.down(exc)
                await trio.sleep(RETRY_SECONDS)
                continue
            for entry in (found or {}).get(self._replies.encode(), ()):
                self._last_reply_id, fields = raw(entry)
                try:
                    self._on_reply(fields)
                except (KeyError, ValueError, RecursionError) as exc:  # another version wrote it
                    log.error(
                        "queue: a reply it cannot read (%s); skipped: %.300r",
                        exc,
                        entry.field_values,
                    )

    def _on_reply(self, fields: Fields) -> None:
        call = self._by_key.get(reply_key(fields))
        if call is None:
            return  # its caller gave up, or an answer came twice: the first one counted
        job, now = call.job, trio.current_time()
        reply = read_reply(fields, self._config.timeout)
        match reply:
            case TakenReply(timeout):
                job.taken.set()
                job.timing.queue_wait = now - job.enqueued_at
                # The worker's own timeout, then time for a reclaim if its node dies.
                reclaim = 1.5 * self._config.reclaim_after + BEAT_SECONDS
                call.answer_by = now + timeout + reclaim + ANSWER_SLACK_SECONDS
                if not call.observed:
                    call.observed = True
                    self._metrics.queue_wait.observe(job.timing.queue_wait)
                call.moved()
            case RequeuedReply(entry_id):
                job.taken = trio.Event()  # back in the stream, waiting for a model again
                call.entry_id, call.missing = entry_id, False
                call.moved()
            case AnswerReply(worker, pid, compute, value, error):
                job.timing.worker, job.timing.pid, job.timing.compute = worker, pid, compute
                if error is None:
                    assert value is not None
                    job.succeed(value)
                else:
                    job.fail(error)
