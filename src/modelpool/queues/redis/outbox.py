"""The outbox: every write a worker asks for, sent by one task, batched into pipelines.

A worker settles a job without waiting on the network: what it asks the server to
do goes here, each as a small record of its kind, and one task sends what has
accumulated in one pipeline, again and again until the server takes it. Every write
is safe to send twice: the caller keeps the first answer, and a requeue runs only
while its entry is pending.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import coredis
import trio
from coredis.patterns.pipeline import Pipeline
from coredis.typing import KeyT, ValueT

from modelpool.queues.redis.remote import RemoteJob
from modelpool.queues.redis.server import RETRY_SECONDS, SERVER_ERRORS, Server
from modelpool.queues.redis.wire import (
    GROUP,
    REPLY_MAXLEN,
    REPLY_TTL_SECONDS,
    STREAM,
    answer_fields,
    requeued_entry,
    taken_fields,
)

log = logging.getLogger("modelpool.redis")

BATCH = 128  # writes sent in one pipeline at most


@dataclass(frozen=True)
class Drop:
    """Delete a job's entry that no worker has been given yet (its caller left)."""

    entry_id: bytes


@dataclass(frozen=True)
class Discard:
    """Acknowledge and delete an entry given to this node that is no job: nobody's."""

    entry_id: bytes


@dataclass(frozen=True)
class Taken:
    """Tell a job's caller that a worker of this node took it."""

    job: RemoteJob


@dataclass(frozen=True)
class Requeue:
    """Put a job back into the stream, and tell its caller its new entry."""

    job: RemoteJob


@dataclass(frozen=True)
class Answer:
    """Send a settled job's answer to its caller; acknowledge and delete its entry."""

    job: RemoteJob


Write = Drop | Discard | Taken | Requeue | Answer


class Outbox:
    """Writes waiting to be sent; `run` sends them while the queue runs."""

    def __init__(self, server: Server, node: str, timeout: float) -> None:
        self._server = server
        self._node = node
        self._timeout = timeout  # a worker's timeout, told to callers with "taken"
        self._send, self._receive = trio.open_memory_channel[Write](math.inf)
        self._unsent = 0
        self._all_sent = trio.Event()
        self._all_sent.set()

    def post(self, write: Write) -> None:
        """Send `write` soon; never blocks."""
        if self._unsent == 0:
            self._all_sent = trio.Event()
        self._unsent += 1
        self._send.send_nowait(write)

    async def sent(self) -> None:
        """Return once every write posted so far is sent."""
        await self._all_sent.wait()

    async def run(self, client: coredis.Redis[bytes]) -> None:
        async for first in self._receive:
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            count = len(batch)
            while batch:
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for write in batch:
                            self._write(pipe, write)
                    self._server.up()
                    break
                except SERVER_ERRORS as exc:
                    # Every write is safe to send twice: the caller keeps the first answer,
                    # and a requeue runs only while its entry is pending.
                    self._server.down(exc)
                    log.warning("queue: %d write(s) not sent (%s); trying again", len(batch), exc)
                    await trio.sleep(RETRY_SECONDS)
            self._unsent -= count
            if self._unsent == 0:
                self._all_sent.set()

    def _write(self, pipe: Pipeline[bytes], write: Write) -> None:
        match write:
            case Drop(entry_id):
                pipe.xdel(STREAM, [entry_id])
            case Discard(entry_id):  # delivered to this node, but not a job: nobody's
                pipe.xack(STREAM, GROUP, [entry_id])
                pipe.xdel(STREAM, [entry_id])
            case Taken(job):
                self._reply(pipe, job, taken_fields(self._node, self._timeout))
            case Requeue(job):
                entry = job.entry
                keys: list[KeyT] = [STREAM, entry.reply_to]
                args: list[ValueT] = [
                    GROUP,
                    entry.entry_id,
                    REPLY_MAXLEN,
                    REPLY_TTL_SECONDS,
                    entry.key,
                ]
                args += requeued_entry(entry.fields, job.attempts)
                self._server.scripts.requeue(keys, args, client=pipe)
            case Answer(job):
                self._reply(pipe, job, answer_fields(job, self._node))
                pipe.xack(STREAM, GROUP, [job.entry_id])
                pipe.xdel(STREAM, [job.entry_id])

    def _reply(self, pipe: Pipeline[bytes], job: RemoteJob, fields: dict[str, Any]) -> None:
        fields["key"] = job.entry.key
        pipe.xadd(
            job.entry.reply_to,
            fields,
            trim_strategy=coredis.PureToken.MAXLEN,
            threshold=REPLY_MAXLEN,
            trim_operator=coredis.PureToken.APPROXIMATELY,
        )
        pipe.expire(job.entry.reply_to, REPLY_TTL_SECONDS)
