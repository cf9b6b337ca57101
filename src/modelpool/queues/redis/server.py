"""This node's client of the queue server, and what it knows of the server's health.

Every part of the queue sends commands through one client and reports here how they
went: `down` on what the server or the network did to a command, `up` on success. So
the node says in one voice whether the queue is reachable (/readyz, /healthz,
/status), logs a change once, and mends a stream or group the server lost wherever
the loss shows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

from modelpool.queues.redis.scripts import Scripts
from modelpool.queues.redis.wire import GROUP, STREAM
from modelpool.settings.config import redact_url as redact

log = logging.getLogger("modelpool.redis")

STREAM_TIMEOUT_SECONDS = 5.0  # any command: an answer within this, or the connection is dropped
RETRY_SECONDS = 1.0

# What the server or the network can do to a command; a node logs it, says the queue is
# down, and tries again. A missing stream or group is mended where it shows.
SERVER_ERRORS = (RedisError, OSError, trio.TooSlowError, TimeoutError)


class Server:
    """The queue server as this node sees it: its client, once there is one, and its health."""

    def __init__(self, url: str, unhealthy_after: float | None) -> None:
        self.url = url
        self._unhealthy_after = unhealthy_after
        self.client: coredis.Redis[bytes] | None = None
        self._scripts: Scripts | None = None
        self.connected = trio.Event()  # set once the stream and group are there
        self._down_since: float | None = None
        self._down_reason = "not tried yet"

    @property
    def scripts(self) -> Scripts:
        """The Lua scripts, registered with the client (only once there is one)."""
        assert self._scripts is not None
        return self._scripts

    def attach(self, client: coredis.Redis[bytes]) -> None:
        """Use `client` from now on."""
        self.client = client
        self._scripts = Scripts.register(client)

    async def setup(self, replies: str) -> None:
        """Create the stream and its group if need be; wait for the server if it is down.

        A former run's replies stream under this node's name is deleted: its answers
        are for callers that are gone.
        """
        assert self.client is not None
        while True:
            try:
                await self.ensure_group(self.client)
                await self.client.delete([replies])  # a former run's, under this name
                self.up()
                return
            except SERVER_ERRORS as exc:
                self.down(exc)
                log.warning("queue %s: cannot reach it (%s); trying again", redact(self.url), exc)
                await trio.sleep(RETRY_SECONDS)

    async def ensure_group(self, client: coredis.Redis[bytes]) -> None:
        with contextlib.suppress(StreamDuplicateConsumerGroupError):
            await client.xgroup_create(STREAM, GROUP, identifier="0", mkstream=True)

    async def mend_lost_group(self, client: coredis.Redis[bytes], exc: BaseException) -> bool:
        """If `exc` says the stream or its group is gone, make them anew; whether it did.

        The server lost them: a restart without persistence, a FLUSHALL, or a failover
        to a replica that had not received them yet. The jobs that waited in the stream
        are lost with it; their callers learn it from the heartbeat's check for lost
        entries (membership.py) within two heartbeats.
        """
        if not missing_group(exc):
            return False
        try:
            await self.ensure_group(client)
        except SERVER_ERRORS as again:
            self.down(again)
            return False
        log.warning("queue %s: the job stream was gone; made anew", redact(self.url))
        return True

    # -- health ---------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    @property
    def down_reason(self) -> str:
        return self._down_reason

    @property
    def unavailable(self) -> str | None:
        if not self.connected.is_set():
            return f"not connected to the queue yet: {self._down_reason}"
        if self._down_since is not None:
            return f"the queue is unreachable: {self._down_reason}"
        return None

    def problem(self) -> str | None:
        limit = self._unhealthy_after
        if self._down_since is None or limit is None:
            return None
        down_for = time.monotonic() - self._down_since
        if down_for < limit:
            return None
        return f"the queue has been unreachable for {down_for:.0f} s: {self._down_reason}"

    def up(self) -> None:
        if self._down_since is not None:
            log.info("queue %s: reachable again", redact(self.url))
        self._down_since = None

    def down(self, exc: BaseException) -> None:
        if isinstance(exc, ReadOnlyError) and self.client is not None:
            # A failover made this server a replica: new connections find the primary
            # (through the Sentinels, when there are some).
            self.client.connection_pool.disconnect()
        reason = (str(exc) or type(exc).__name__)[:300]
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("queue %s: unreachable: %s", redact(self.url), reason)
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
