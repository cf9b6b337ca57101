"""The worker's side: read the oldest job from the stream, claim it, requeue it.

An idle worker on any node asks for one entry (`XREADGROUP ... COUNT 1 BLOCK`), so the
oldest job goes to the first free model anywhere. The entry stays pending, and this
node refreshes it at every heartbeat (`in_flight`), until the worker has answered;
what the worker then tells the caller goes through the outbox, so settling a job
never waits on the network.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from modelpool.core.errors import QueueTimeout
from modelpool.core.job import Job
from modelpool.queues.redis.outbox import Answer, Discard, Outbox, Requeue, Taken
from modelpool.queues.redis.remote import RemoteJob
from modelpool.queues.redis.server import RETRY_SECONDS, SERVER_ERRORS, Server
from modelpool.queues.redis.wire import GROUP, STREAM, BadEntry, Fields, raw, read_job

log = logging.getLogger("modelpool.redis")

BLOCK_MS = 500  # a worker's blocking read; also how long a retire may wait for it
READ_SLACK_SECONDS = 2.0  # past BLOCK_MS, how long a read may hang on a silent server


class Consumer:
    """This node's workers as consumers of the stream's group."""

    def __init__(self, server: Server, outbox: Outbox, node: str) -> None:
        self._server = server
        self._outbox = outbox
        self._node = node
        self._held: list[RemoteJob] = []  # read by a worker that was cancelled meanwhile
        self._closed = False
        self._wake = trio.Event()  # connected, or closed: what an idle worker waits for
        self._in_flight: set[bytes] = set()  # entries this node's workers hold

    def wake(self) -> None:
        """The queue is connected: idle workers may read."""
        self._wake.set()

    def in_flight(self) -> list[bytes]:
        """The entries this node's workers hold, to keep them from being reclaimed."""
        return list(self._in_flight)

    async def get(self) -> Job:
        await self._wake.wait()
        while True:
            client = self._server.client
            if self._closed or client is None:
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
                    found = await client.xreadgroup(
                        GROUP, self._node, {STREAM: ">"}, count=1, block=BLOCK_MS
                    )
                    for entry in (found or {}).get(STREAM.encode(), ())[:1]:
                        job = self.job_from(*raw(entry))
                        if job is not None:
                            self._in_flight.add(job.entry_id)
                    self._server.up()
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

    def job_from(self, entry_id: bytes, fields: Fields) -> RemoteJob | None:
        """The job an entry of the stream holds; None, and the entry dropped, if it is
        not one (each entry is read once, so it is logged once)."""
        try:
            return RemoteJob(read_job(entry_id, fields), self._send_answer)
        except BadEntry as exc:
            log.error(
                "queue: entry %s of %s is not a job this version reads (%s); dropped: %.300r",
                entry_id.decode(errors="replace"),
                STREAM,
                exc,
                fields,
            )
            self._outbox.post(Discard(entry_id))
            return None

    async def _on_read_error(self, exc: BaseException) -> None:
        client = self._server.client
        assert client is not None
        if not await self._server.mend_lost_group(client, exc):
            self._server.down(exc)
            await trio.sleep(RETRY_SECONDS)

    def claim(self, job: Job) -> bool:
        assert isinstance(job, RemoteJob)
        job.queued = False
        job.timing.queue_wait = max(0.0, time.time() - job.entry.enqueued_wall)
        if job.expired():
            log.warning("request %s: taken after its deadline; not run", job.request_id)
            job.fail(QueueTimeout())
            return False
        self._outbox.post(Taken(job))
        return True

    def requeue(self, job: Job) -> None:
        assert isinstance(job, RemoteJob)
        job.queued = True
        self._in_flight.discard(job.entry_id)
        self._outbox.post(Requeue(job))

    def _send_answer(self, job: RemoteJob) -> None:
        """A job was settled: its answer goes to its caller; its entry is no longer held."""
        self._in_flight.discard(job.entry_id)
        self._outbox.post(Answer(job))

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        for job in self._held:  # read, never run: the other nodes can
            self.requeue(job)
        self._held.clear()

    def has_work(self) -> bool:
        return not self._closed
