"""The job queue as a Redis (or Valkey) stream, shared by every node of a cluster.

One stream holds the jobs, in arrival order, read by one consumer group: an idle
worker on any node asks for one entry (`XREADGROUP ... COUNT 1 BLOCK`), so the oldest
job goes to the first free model anywhere. The entry stays pending until the worker
has answered (`XACK`, then `XDEL`, so the stream holds only jobs not yet answered).

A job carries its caller's node, its request id, the line for the model, how many
times it was taken, and its deadline: the wall-clock time by which a model must take
it. A worker that takes it later answers 503 and does not run it. Every answer goes to
the stream of replies of the caller's node, read by one task there that hands each to
its waiting request. A worker also tells the caller when it takes the job, so the
caller's queue timeout works as on one machine.

A node that dies mid-job leaves its entries pending. Live nodes refresh their pending
entries every second (`XCLAIM ... JUSTID` resets their idle time), so an entry idle
for `reclaim_after` seconds belongs to a dead node: any live node claims it
(`XAUTOCLAIM`) and queues it once more if it is still within its deadline and was
taken only once, as a local model that died before reading its request; otherwise its
caller gets 502. Only its own callers' answers are lost when a front dies: its replies
stream expires.

Every node writes a heartbeat (its workers' states) into one hash every second, so
any front's /status and /metrics show every node. Writes from workers (notices,
answers, acknowledgements) go through one outbox task, batched into pipelines, so a
worker never waits on the network to settle a job.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import (
    ReadOnlyError,
    RedisError,
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from prometheus_client.core import GaugeMetricFamily, Metric

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
from modelpool.core.job import MAX_ATTEMPTS, Job
from modelpool.queues.jobqueue import JobQueue
from modelpool.settings.config import redact_url as redact

if TYPE_CHECKING:
    from modelpool.pool.metrics import PoolMetrics
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.redis")

PREFIX = "modelpool"
STREAM = f"{PREFIX}:jobs"
GROUP = "models"
NODES = f"{PREFIX}:nodes"
BLOCK_MS = 500  # a worker's blocking read; also how long a retire may wait for it
READ_SLACK_SECONDS = 2.0  # past BLOCK_MS, how long a read may hang on a silent server
STREAM_TIMEOUT_SECONDS = 5.0  # any command: an answer within this, or the connection is dropped
ADMIT_SECONDS = 5.0  # how long a request may wait for the server to queue it
BEAT_SECONDS = 1.0  # heartbeat, refresh of pending entries, status of the cluster
TAKEN_GRACE_SECONDS = 1.0  # past a job's deadline, how long its front waits for a late "taken"
NODE_STALE_SECONDS = 5.0  # a node silent this long is shown as gone
REPLY_TTL_SECONDS = 300  # a dead front's replies stream expires this long after its last reply
REPLY_MAXLEN = 10_000
ANSWER_SLACK_SECONDS = 5.0  # beyond the worker's timeout and a reclaim, before giving up
RETRY_SECONDS = 1.0
CONNECT_WAIT_SECONDS = 5.0  # how long a request waits for a node still connecting
LOST_CHECK_LIMIT = 1024  # waiting jobs checked per heartbeat for entries the server lost
ERRORS: dict[str, type[PoolError]] = {
    cls.outcome: cls for cls in (ModelTimeout, ModelFailed, QueueTimeout, ShuttingDown, BadRequest)
}

# Admission and queueing in one step, so two fronts cannot both take the last place:
# waiting jobs are those in the stream that no consumer has been given yet.
ADMIT = """
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""
WAITING = """
return redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
"""
# Trim a node's replies up to the last one it read, if the stream still holds that one;
# false if not: the stream was made anew since, and it must be read from its start.
TRIM_REPLIES = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 1) == 0 then return false end
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
return 1
"""
# A job back into the stream, and its caller told its new entry, in one step. It runs
# only while the old entry is still pending, so sending it twice queues the job once.
REQUEUE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'key', ARGV[5], 'kind', 'requeued',
           'entry', id)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""

# What the server or the network can do to a command; a node logs it, says the queue is
# down, and tries again. A missing stream or group is mended where it shows.
SERVER_ERRORS = (RedisError, OSError, trio.TooSlowError, TimeoutError)


@dataclass
class _Caller:
    """A request of this node's, waiting for its answer from some worker."""

    job: Job
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


class BadEntry(ValueError):
    """Data in a shared key that this version cannot read: another node's version, or a
    person, wrote it. It is skipped and logged; it must never stop a node."""


class RemoteJob(Job):
    """A job read from the stream: settling it sends the answer to its caller's node.

    BadEntry if the entry is not a job as this version writes them: one JSON line for
    the model, where its answer goes, and numbers where numbers belong.
    """

    def __init__(self, queue: RedisQueue, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            line, request_id = fields[b"line"], fields[b"rid"].decode()
            wire_id = fields[b"wid"].decode() or None
            key, reply_to = fields[b"key"], fields[b"reply"]
            attempts, enqueued_wall = int(fields[b"n"]), float(fields[b"at"])
            take_by_wall = float(fields[b"by"]) if fields[b"by"] else None
        except (KeyError, ValueError, AttributeError) as exc:
            raise BadEntry(f"not a job: {exc!r}") from None
        if not line.endswith(b"\n") or line.count(b"\n") != 1:
            raise BadEntry("its line for the model is not one line")  # it would shift answers
        if not (request_id.isprintable() and key and reply_to):
            raise BadEntry("its request id, key or reply stream is not readable")
        if wire_id is not None and not wire_id.isprintable():
            raise BadEntry("its wire id is not readable")
        if attempts < 0 or not math.isfinite(enqueued_wall):
            raise BadEntry("its attempts or its time is not a count or a time")
        if take_by_wall is not None and not math.isfinite(take_by_wall):
            raise BadEntry("its deadline is not a time")
        super().__init__(line, request_id, wire_id)
        self.queue = queue
        self.entry_id = entry_id
        self.fields = fields
        self.key = key
        self.reply_to = reply_to
        self.attempts = attempts
        self.enqueued_wall = enqueued_wall
        self.take_by_wall = take_by_wall
        self.enqueued_at = trio.current_time() - max(0.0, time.time() - self.enqueued_wall)
        self.queued = True

    def _settle(self) -> None:
        super()._settle()
        self.queue.send_answer(self)


class RedisQueue(JobQueue):
    """The shared queue of a cluster; see the module's docstring for how it works."""

    requeue_while_closing = True  # the stream outlives this node: others can serve it

    def __init__(self, config: PoolConfig, metrics: PoolMetrics, node: str) -> None:
        assert config.queue is not None
        self._url = config.queue
        self._config = config
        self._metrics = metrics
        self.node = node
        self._replies = f"{PREFIX}:replies:{node}"
        self._token = secrets.token_hex(6)  # keys of this run only: old replies never match
        self._numbers = itertools.count(1)
        self._client: coredis.Redis[bytes] | None = None
        self._admit: Any = None  # the Lua scripts, once there is a client
        self._waiting_script: Any = None
        self._requeue_script: Any = None
        self._trim_script: Any = None
        self._held: list[RemoteJob] = []  # read by a worker that was cancelled meanwhile
        self._connected = trio.Event()
        self._closed = False
        self._wake = trio.Event()  # connected, or closed: what an idle worker waits for
        self._callers: dict[bytes, _Caller] = {}
        self._no_callers = trio.Event()  # set when the last caller is answered
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self._unsent = 0
        self._all_sent = trio.Event()
        self._all_sent.set()
        self._in_flight: set[bytes] = set()  # entries this node's workers hold
        self._waiting = 0  # the cluster's waiting jobs, as of the last heartbeat
        self._nodes: list[dict[str, Any]] = []
        self._bad_nodes: set[bytes] = set()  # entries of the nodes hash logged as unreadable
        self._down_since: float | None = None
        self._down_reason = "not tried yet"
        self._last_reply_id = b"0-0"

    # -- running ----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A blocking read holds a connection: one per worker, and some for the rest.
        connections = self._config.workers + 16
        async with connect(self._url, connections, STREAM_TIMEOUT_SECONDS) as client:
            self._client = client
            self._admit = client.register_script(ADMIT)
            self._waiting_script = client.register_script(WAITING)
            self._requeue_script = client.register_script(REQUEUE)
            self._trim_script = client.register_script(TRIM_REPLIES)
            # The pool does not wait for the server: it must still stop on a signal
            # while the server is down. Callers get 503 until the queue is reached.
            task_status.started()
            await self._setup(client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_replies, client)
                nursery.start_soon(self._send_outbox, client)
                nursery.start_soon(self._beat, client)
                log.info("queue %s: node %s joined", redact(self._url), self.node)
                self._connected.set()
                self._wake.set()

    async def _setup(self, client: coredis.Redis[bytes]) -> None:
        """Create the stream and its group if need be; wait for the server if it is down."""
        while True:
            try:
                await self._ensure_group(client)
                await client.delete([self._replies])  # a former run's, under this name
                self._up()
                return
            except SERVER_ERRORS as exc:
                self._down(exc)
                log.warning("queue %s: cannot reach it (%s); trying again", redact(self._url), exc)
                await trio.sleep(RETRY_SECONDS)

    async def _ensure_group(self, client: coredis.Redis[bytes]) -> None:
        with contextlib.suppress(StreamDuplicateConsumerGroupError):
            await client.xgroup_create(STREAM, GROUP, identifier="0", mkstream=True)

    async def _mend_lost_group(self, client: coredis.Redis[bytes], exc: BaseException) -> bool:
        """If `exc` says the stream or its group is gone, make them anew; whether it did.

        The server lost them: a restart without persistence, a FLUSHALL, or a failover
        to a replica that had not received them yet. The jobs that waited in the stream
        are lost with it; their callers learn it from `_find_lost` within two heartbeats.
        """
        if not missing_group(exc):
            return False
        try:
            await self._ensure_group(client)
        except SERVER_ERRORS as again:
            self._down(again)
            return False
        log.warning("queue %s: the job stream was gone; made anew", redact(self._url))
        return True

    async def flush(self) -> None:
        with trio.move_on_after(self._config.exit_grace + 1):
            await self._all_sent.wait()
        if self._client is not None:
            with trio.move_on_after(1), contextlib.suppress(*SERVER_ERRORS):
                await self._client.hdel(NODES, [self.node])

    # -- the caller's side ------------------------------------------------------------

    @property
    def length(self) -> int:
        return self._waiting

    async def put(self, job: Job) -> None:
        with trio.move_on_after(CONNECT_WAIT_SECONDS):
            await self._connected.wait()  # a request that comes while the node starts
        if self._client is None or not self._connected.is_set():
            raise QueueUnavailable(f"not connected to the queue yet: {self._down_reason}")
        key = f"{self._token}:{next(self._numbers)}".encode()
        job.queue_key = key
        take_by = "" if job.take_by is None else repr(time.time() + job.take_by - job.enqueued_at)
        fields = {
            "key": key,
            "reply": self._replies,
            "line": job.line,
            "rid": job.request_id,
            "wid": job.wire_id or "",
            "by": take_by,
            "at": repr(time.time()),
            "n": "0",
        }
        flat = [value for pair in fields.items() for value in pair]
        caller = _Caller(job)
        self._callers[key] = caller  # before the entry exists: its notices may come at once
        queued = False
        try:
            # Shielded, so a caller who leaves meanwhile still learns the entry's id and
            # can take it out again; bounded, so a silent server cannot hold it.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + ADMIT_SECONDS
                try:
                    entry_id = await self._queue_entry(flat)
                except SERVER_ERRORS as exc:
                    raise QueueUnavailable(f"cannot reach the queue: {exc}") from None
            if scope.cancelled_caught:
                self._down(TimeoutError(f"no answer within {ADMIT_SECONDS:g} s"))
                raise QueueUnavailable(f"the queue did not answer within {ADMIT_SECONDS:g} s")
            if entry_id is None:
                raise QueueFull()
            caller.entry_id, job.queued, queued = entry_id, True, True
            if trio.current_effective_deadline() == -math.inf:
                self.abandon(job)  # its caller left while it was queued: take it out
                await trio.lowlevel.checkpoint()  # and it leaves now, Cancelled
            # No checkpoint otherwise: a job queued is the caller's to wait for (or to
            # abandon), and a cancellation here would leave it with nobody.
        finally:
            if not queued:  # refused, unreachable, or its caller gave up meanwhile
                self._forget(key)

    async def _queue_entry(self, flat: list[Any]) -> bytes | None:
        """Admit and add one entry; its id, or None if the queue is full."""
        assert self._client is not None
        try:
            try:
                entry_id = await self._admit([STREAM], [GROUP, self._config.max_queue, *flat])
            except RedisError as exc:
                if not await self._mend_lost_group(self._client, exc):
                    raise
                entry_id = await self._admit([STREAM], [GROUP, self._config.max_queue, *flat])
        except SERVER_ERRORS as exc:
            self._down(exc)  # every request fails meanwhile: /readyz and /healthz say so
            raise
        self._up()
        return entry_id

    async def wait(self, job: Job) -> None:
        caller = self._callers.get(job.queue_key)
        try:
            while caller is not None and not job.done.is_set():
                with trio.CancelScope(deadline=caller.deadline()) as caller.scope:
                    await job.done.wait()  # however it is settled, this wakes
                if caller.scope.cancelled_caught and not job.done.is_set():
                    self._give_up(job)
        finally:
            if job.done.is_set():
                self._forget(job.queue_key)

    def _give_up(self, job: Job) -> None:
        """No model took the job in time, or the one that took it never answered."""
        if job.taken.is_set():
            job.fail(ModelFailed("no answer from the worker that took it"))
        else:
            self.abandon(job)
            job.fail(QueueTimeout())

    def abandon(self, job: Job) -> None:
        job.abandoned = True
        caller = self._forget(job.queue_key)
        if caller is not None and caller.entry_id is not None and not job.taken.is_set():
            self._post("drop", caller.entry_id)  # no worker has it yet: none will

    def waiting_callers(self) -> list[Job]:
        return [caller.job for caller in self._callers.values()]  # answered ones are no-ops

    def take_unclaimed(self) -> list[Job]:
        return []  # the stream's jobs wait there for any node

    async def drained(self) -> None:
        while self._callers:
            self._no_callers = trio.Event()
            await self._no_callers.wait()

    def _forget(self, key: bytes | None) -> _Caller | None:
        caller = self._callers.pop(key, None)
        if not self._callers:
            self._no_callers.set()
        return caller

    async def _read_replies(self, client: coredis.Redis[bytes]) -> None:
        """Hand every reply in this node's stream to the request it answers."""
        while True:
            try:
                found = await client.xread(
                    {self._replies: self._last_reply_id}, count=256, block=1000
                )
            except SERVER_ERRORS as exc:
                self._down(exc)
                await trio.sleep(RETRY_SECONDS)
                continue
            for entry in (found or {}).get(self._replies.encode(), ()):
                self._last_reply_id = entry.identifier
                try:
                    self._on_reply(entry.field_values)
                except (KeyError, ValueError, RecursionError) as exc:  # another version wrote it
                    log.error(
                        "queue: a reply it cannot read (%s); skipped: %.300r",
                        exc,
                        entry.field_values,
                    )

    def _on_reply(self, fields: dict[bytes, bytes]) -> None:
        caller = self._callers.get(fields.get(b"key", b""))
        if caller is None:
            return  # its caller gave up, or an answer came twice: the first one counted
        job, kind, now = caller.job, fields.get(b"kind"), trio.current_time()
        if kind == b"taken":
            # The worker's own timeout, then time for a reclaim if its node dies.
            timeout = float(fields.get(b"timeout") or self._config.timeout)
            if not 0 < timeout < math.inf:
                raise BadEntry(f"a worker's timeout that is no time: {timeout!r}")
            job.taken.set()
            job.timing.queue_wait = now - job.enqueued_at
            reclaim = 1.5 * self._config.reclaim_after + BEAT_SECONDS
            caller.answer_by = now + timeout + reclaim + ANSWER_SLACK_SECONDS
            if not caller.observed:
                caller.observed = True
                self._metrics.queue_wait.observe(job.timing.queue_wait)
            caller.moved()
        elif kind == b"requeued":
            if not fields.get(b"entry"):
                raise BadEntry("a requeue notice without its new entry")
            job.taken = trio.Event()  # back in the stream, waiting for a model again
            caller.entry_id, caller.missing = fields[b"entry"], False
            caller.moved()
        elif kind in (b"ok", b"error"):
            worker = fields.get(b"worker", b"").decode() or None
            pid = int(fields[b"pid"]) if fields.get(b"pid") else None
            compute = float(fields[b"compute"]) if fields.get(b"compute") else None
            if compute is not None and not 0 <= compute < math.inf:
                raise BadEntry(f"a compute time that is no time: {compute!r}")
            if kind == b"ok":
                value = json.loads(fields[b"value"])
                if not isinstance(value, dict):
                    raise BadEntry("a value that is not a JSON object")
            else:
                error = error_from(fields)
            job.timing.worker, job.timing.pid, job.timing.compute = worker, pid, compute
            if kind == b"ok":
                job.succeed(value)
            else:
                job.fail(error)
        else:
            raise BadEntry(f"a reply of an unknown kind: {kind!r}")

    # -- the worker's side ------------------------------------------------------------

    async def get(self) -> Job:
        await self._wake.wait()
        while True:
            if self._closed or self._client is None:
                raise trio.EndOfChannel
            if self._held:  # the oldest job this node read, kept in its place
                return self._held.pop(0)
            job, error = None, None
            # A read cancelled half-way could lose an entry the server already gave us,
            # so it is shielded, and short; a cancellation is honoured between reads. A
            # server gone silent ends it too: an entry it gave meanwhile is reclaimed.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + BLOCK_MS / 1000 + READ_SLACK_SECONDS
                try:
                    found = await self._client.xreadgroup(
                        GROUP, self.node, {STREAM: ">"}, count=1, block=BLOCK_MS
                    )
                    for entry in (found or {}).get(STREAM.encode(), ())[:1]:
                        job = self._job_from(entry.identifier, entry.field_values)
                        if job is not None:
                            self._in_flight.add(job.entry_id)
                    self._up()
                except SERVER_ERRORS as exc:
                    error = exc
            if scope.cancelled_caught:
                error = TimeoutError("no answer to a blocking read")
            if job is not None and self._closed:
                self.requeue(job)  # stopping: it is for the other nodes
            elif job is not None and trio.current_effective_deadline() == -math.inf:
                self._held.append(job)  # cancelled meanwhile: the next get() has it
            elif job is not None:
                return job
            if error is not None:
                await self._on_read_error(error)
            await trio.lowlevel.checkpoint()

    def _job_from(self, entry_id: bytes, fields: dict[bytes, bytes]) -> RemoteJob | None:
        """The job an entry of the stream holds; None, and the entry dropped, if it is
        not one (each entry is read once, so it is logged once)."""
        try:
            return RemoteJob(self, entry_id, fields)
        except BadEntry as exc:
            log.error(
                "queue: entry %s of %s is not a job this version reads (%s); dropped: %.300r",
                entry_id.decode(errors="replace"),
                STREAM,
                exc,
                fields,
            )
            self._post("discard", entry_id)
            return None

    async def _on_read_error(self, exc: BaseException) -> None:
        assert self._client is not None
        if not await self._mend_lost_group(self._client, exc):
            self._down(exc)
            await trio.sleep(RETRY_SECONDS)

    def claim(self, job: Job) -> bool:
        assert isinstance(job, RemoteJob)
        job.queued = False
        job.timing.queue_wait = max(0.0, time.time() - job.enqueued_wall)
        if job.take_by_wall is not None and time.time() > job.take_by_wall:
            log.warning("request %s: taken after its deadline; not run", job.request_id)
            job.fail(QueueTimeout())
            return False
        self._post("taken", job)
        return True

    def requeue(self, job: Job) -> None:
        job.queued = True
        self._post("requeue", job)

    def send_answer(self, job: RemoteJob) -> None:
        self._in_flight.discard(job.entry_id)
        self._post("answer", job)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        for job in self._held:  # read, never run: the other nodes can
            self.requeue(job)
        self._held.clear()

    def has_work(self) -> bool:
        return not self._closed

    # -- the outbox: every write a worker asks for, batched ---------------------------

    def _post(self, kind: str, item: Any) -> None:
        if kind == "requeue":
            self._in_flight.discard(item.entry_id)
        if self._unsent == 0:
            self._all_sent = trio.Event()
        self._unsent += 1
        self._outbox_send.send_nowait((kind, item))

    async def _send_outbox(self, client: coredis.Redis[bytes]) -> None:
        async for first in self._outbox:
            batch = [first]
            while len(batch) < 128:
                try:
                    batch.append(self._outbox.receive_nowait())
                except trio.WouldBlock:
                    break
            count = len(batch)
            while batch:
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for kind, item in batch:
                            self._write(pipe, kind, item)
                    self._up()
                    break
                except SERVER_ERRORS as exc:
                    # Every write is safe to send twice: the caller keeps the first answer,
                    # and a requeue runs only while its entry is pending.
                    self._down(exc)
                    log.warning("queue: %d write(s) not sent (%s); trying again", len(batch), exc)
                    await trio.sleep(RETRY_SECONDS)
            self._unsent -= count
            if self._unsent == 0:
                self._all_sent.set()

    def _write(self, pipe: Any, kind: str, item: Any) -> None:
        if kind == "drop":
            pipe.xdel(STREAM, [item])
            return
        if kind == "discard":  # delivered to this node, but not a job: nobody's
            pipe.xack(STREAM, GROUP, [item])
            pipe.xdel(STREAM, [item])
            return
        job: RemoteJob = item
        if kind == "taken":
            fields = {"kind": "taken", "worker": self.node, "timeout": repr(self._config.timeout)}
            self._reply(pipe, job, fields)
            return
        if kind == "requeue":
            fields = {**job.fields, b"n": str(job.attempts).encode()}
            flat = [value for pair in fields.items() for value in pair]
            keys = [STREAM, job.reply_to]
            args = [GROUP, job.entry_id, REPLY_MAXLEN, REPLY_TTL_SECONDS, job.key, *flat]
            self._requeue_script(keys, args, client=pipe)
            return
        self._reply(pipe, job, answer_fields(job, self.node))
        pipe.xack(STREAM, GROUP, [job.entry_id])
        pipe.xdel(STREAM, [job.entry_id])

    def _reply(self, pipe: Any, job: RemoteJob, fields: dict[str, Any]) -> None:
        fields["key"] = job.key
        pipe.xadd(
            job.reply_to,
            fields,
            trim_strategy=coredis.PureToken.MAXLEN,
            threshold=REPLY_MAXLEN,
            trim_operator=coredis.PureToken.APPROXIMATELY,
        )
        pipe.expire(job.reply_to, REPLY_TTL_SECONDS)

    # -- heartbeat, refresh, reclaim, the cluster's status ----------------------------

    async def _beat(self, client: coredis.Redis[bytes]) -> None:
        reclaim_every = max(BEAT_SECONDS, self._config.reclaim_after / 2)
        next_reclaim = trio.current_time() + reclaim_every
        while True:
            try:
                await self._beat_once(client)
                if trio.current_time() >= next_reclaim:
                    next_reclaim = trio.current_time() + reclaim_every
                    await self._reclaim(client)
                self._up()
            except SERVER_ERRORS as exc:
                if not await self._mend_lost_group(client, exc):
                    self._down(exc)  # down, out of memory, read-only: the server's trouble
            await trio.sleep(BEAT_SECONDS)

    async def _beat_once(self, client: coredis.Redis[bytes]) -> None:
        status = {
            "node": self.node,
            "host": socket.gethostname(),
            "at": time.time(),
            **self.node_status(),
        }
        in_flight = list(self._in_flight)
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(NODES, {self.node: json.dumps(status)})
            if in_flight:  # still ours: reset their idle time, so no one reclaims them
                pipe.xclaim(STREAM, GROUP, self.node, 0, in_flight, justid=True)
            # Replies already handed over are of no more use.
            last_read = self._last_reply_id
            trimmed = self._trim_script([self._replies], [last_read], client=pipe)
            nodes = pipe.hgetall(NODES)
            waiting = self._waiting_script([STREAM], [GROUP], client=pipe)
        if not await trimmed and self._last_reply_id == last_read:
            # The stream was made anew (FLUSHALL, a restart, its expiry): its entries
            # are numbered by the server's clock, maybe below the last one read here,
            # and would never be read. Read it from its start; a reply read twice is
            # ignored the second time.
            self._last_reply_id = b"0-0"
        self._waiting = max(0, int(await waiting))
        now, alive, gone, found = time.time(), [], [], await nodes
        for name, text in found.items():
            entry = read_heartbeat(name, text)
            if entry is None:
                self._bad_heartbeat(name, text)
            elif now - entry["at"] > NODE_STALE_SECONDS:
                gone.append(name)
            else:
                alive.append(entry)
        self._bad_nodes &= found.keys()  # one that comes back bad is logged again
        if gone:
            await client.hdel(NODES, gone)
        self._nodes = sorted(alive, key=lambda e: e["node"])
        await self._find_lost(client)

    def _bad_heartbeat(self, name: bytes, text: bytes) -> None:
        """Skip an entry of the nodes hash that is no heartbeat; say so once per entry."""
        if name in self._bad_nodes:
            return
        self._bad_nodes.add(name)
        log.error(
            "queue: %s's entry %r is not a heartbeat this version reads; skipped: %.200r",
            NODES,
            name.decode(errors="replace"),
            text,
        )

    async def _find_lost(self, client: coredis.Redis[bytes]) -> None:
        """Fail this node's waiting jobs whose entries the server no longer has.

        A server restarted without persistence, or a replica promoted before it got
        the newest entries, has lost them: no worker will ever take them. An entry is
        also gone, for a moment, when a worker has answered it and the answer is on its
        way; so a job is failed only when its entry is missing twice, a heartbeat apart.
        """
        callers = [c for c in self._callers.values() if c.entry_id and not c.job.taken.is_set()][
            :LOST_CHECK_LIMIT
        ]
        if not callers:
            return
        async with client.pipeline(transaction=False) as pipe:
            found = [pipe.xrange(STREAM, c.entry_id, c.entry_id, count=1) for c in callers]
        for caller, entries in zip(callers, found, strict=True):
            present = bool(await entries) or caller.job.taken.is_set()
            if not present and caller.missing and not caller.job.done.is_set():
                caller.job.fail(QueueUnavailable("the queue server lost it (restart or failover)"))
            caller.missing = not present

    async def _reclaim(self, client: coredis.Redis[bytes]) -> None:
        """Take back the jobs of nodes that stopped refreshing them (they died)."""
        idle_ms = int(self._config.reclaim_after * 1000)
        start: Any = "0-0"
        while True:
            reply = await client.xautoclaim(STREAM, GROUP, self.node, idle_ms, start, count=64)
            start, entries = reply[0], reply[1]
            deleted = [entry.identifier for entry in entries if not entry.field_values]
            for entry in entries:
                if entry.field_values:
                    self._reclaimed(entry.identifier, entry.field_values)
            if deleted:  # Redis 6.2 hands out entries deleted meanwhile: let them go
                await client.xack(STREAM, GROUP, deleted)
            if start in (b"0-0", "0-0"):
                return

    def _reclaimed(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        job = self._job_from(entry_id, fields)
        if job is None:
            return
        job.attempts += 1  # the node that died had taken it
        log.warning(
            "request %s: its node stopped answering for %g s; reclaimed",
            job.request_id,
            self._config.reclaim_after,
        )
        expired = job.take_by_wall is not None and time.time() > job.take_by_wall
        if job.attempts >= MAX_ATTEMPTS or expired:
            job.fail(ModelFailed("the node that took it stopped answering", kind="crashed"))
        else:
            self.requeue(job)

    # -- what /status, /metrics and /healthz show ---------------------------------------

    def remote_ready(self) -> int:
        return sum(n.get("ready", 0) for n in self._nodes if n["node"] != self.node)

    def status(self) -> dict[str, Any]:
        return {
            "cluster": {
                "queue": redact(self._url),
                "node": self.node,
                "waiting": self._waiting,
                "reachable": self._down_since is None,
                "nodes": self._nodes,
            }
        }

    @property
    def unavailable(self) -> str | None:
        if not self._connected.is_set():
            return f"not connected to the queue yet: {self._down_reason}"
        if self._down_since is not None:
            return f"the queue is unreachable: {self._down_reason}"
        return None

    def problem(self) -> str | None:
        limit = self._config.unhealthy_after
        if self._down_since is None or limit is None:
            return None
        down_for = time.monotonic() - self._down_since
        if down_for < limit:
            return None
        return f"the queue has been unreachable for {down_for:.0f} s: {self._down_reason}"

    def metrics(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(
            "modelpool_cluster_nodes", "Nodes that sent a heartbeat lately", value=len(self._nodes)
        )
        yield nodes
        workers = GaugeMetricFamily(
            "modelpool_cluster_workers", "Workers of every node, by state", labels=["node", "state"]
        )
        for node in self._nodes:
            counts: dict[str, int] = {}
            for worker in node.get("workers", []):
                counts[worker["state"]] = counts.get(worker["state"], 0) + 1
            for state, count in sorted(counts.items()):
                workers.add_metric([node["node"], state], count)
        yield workers

    def _up(self) -> None:
        if self._down_since is not None:
            log.info("queue %s: reachable again", redact(self._url))
        self._down_since = None

    def _down(self, exc: BaseException) -> None:
        if isinstance(exc, ReadOnlyError) and self._client is not None:
            # A failover made this server a replica: new connections find the primary
            # (through the Sentinels, when there are some).
            self._client.connection_pool.disconnect()
        reason = (str(exc) or type(exc).__name__)[:300]
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("queue %s: unreachable: %s", redact(self._url), reason)
        self._down_reason = reason


def missing_group(error: BaseException) -> bool:
    """Whether the server says the stream or its consumer group does not exist.

    coredis raises StreamConsumerGroupError for the server's NOGROUP (from a command or
    from a script), whose text no longer holds the word; a plain ResponseError with it
    is what other versions may raise.
    """
    if isinstance(error, StreamDuplicateConsumerGroupError):
        return False
    if isinstance(error, StreamConsumerGroupError):
        return True
    return isinstance(error, ResponseError) and "NOGROUP" in str(error)


def read_heartbeat(name: bytes, text: bytes) -> dict[str, Any] | None:
    """A node's heartbeat, if `text` is one as this version writes them; else None.

    What /status, /metrics and /readyz read of it is checked: its name (the hash's
    key), its time, its ready count and its workers' states.
    """
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past reason
        return None
    if not isinstance(entry, dict) or entry.get("node") != name.decode(errors="replace"):
        return None
    at, ready, workers = entry.get("at"), entry.get("ready", 0), entry.get("workers", [])
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    if isinstance(ready, bool) or not isinstance(ready, int) or ready < 0:
        return None
    if not isinstance(workers, list):
        return None
    if not all(isinstance(w, dict) and isinstance(w.get("state"), str) for w in workers):
        return None
    return entry


def answer_fields(job: Job, node: str) -> dict[str, Any]:
    """An answer as a reply entry: the value, or the error with what its payload needs."""
    timing = job.timing
    fields: dict[str, Any] = {
        "worker": f"{node}/{timing.worker}" if timing.worker is not None else "",
        "pid": "" if timing.pid is None else str(timing.pid),
        "compute": "" if timing.compute is None else repr(timing.compute),
    }
    error = job.error
    if error is None:
        fields["kind"] = "ok"
        fields["value"] = json.dumps(job.result(), separators=(",", ":"))
        return fields
    fields["kind"] = "error"
    fields["error"] = error.outcome
    if isinstance(error, ModelFailed):
        fields["detail"] = error.detail
        fields["exit_code"] = "" if error.exit_code is None else str(error.exit_code)
        fields["stderr"] = json.dumps(error.stderr)
        fields["failure"] = error.kind
    elif isinstance(error, BadRequest | ModelTimeout):
        fields["detail"] = str(error)
    return fields


def error_from(fields: dict[bytes, bytes]) -> PoolError:
    """The PoolError a reply entry stands for; ValueError (BadEntry) if it is unreadable."""
    cls = ERRORS.get(fields.get(b"error", b"").decode(), ModelFailed)
    detail = fields.get(b"detail", b"").decode()
    if cls is ModelFailed:
        exit_code = fields.get(b"exit_code", b"")
        stderr = json.loads(fields.get(b"stderr", b"[]"))
        if not (isinstance(stderr, list) and all(isinstance(line, str) for line in stderr)):
            raise BadEntry("a model's stderr that is not a list of lines")
        return ModelFailed(
            detail or "the model failed",
            exit_code=int(exit_code) if exit_code else None,
            stderr=stderr,
            kind=fields.get(b"failure", b"crashed").decode(),
        )
    if cls is BadRequest:
        return BadRequest(detail)
    if cls is ModelTimeout:
        return ModelTimeout(detail)
    return cls()


@asynccontextmanager
async def connect(
    url: str, max_connections: int, stream_timeout: float
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the server a queue URL names.

    `redis://` and `rediss://` name one server (coredis reads the URL: password, db,
    TLS). `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` names
    Sentinels; the client asks them for SERVICE's primary, and again after a failover.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis+sentinel":
        client = coredis.Redis.from_url(
            url,
            decode_responses=False,
            max_connections=max_connections,
            stream_timeout=stream_timeout,
        )
        async with client:
            yield client
        return
    hosts = parts.netloc.rsplit("@", 1)[-1].split(",")
    sentinels = [TCPLocation(host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1])) for host in hosts]
    service, _, db = parts.path.strip("/").partition("/")
    sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(sentinels, decode_responses=False)
    async with sentinel:
        primary = sentinel.primary_for(
            service,
            db=int(db or 0),
            password=parts.password,
            max_connections=max_connections,
            stream_timeout=stream_timeout,
        )
        async with primary:
            yield primary
