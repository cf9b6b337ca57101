"""The open client connections: how many there may be, which one makes room for a new
client, and how long a write to a client may wait.

This is the accounting the listener (listener.py) consults; it holds no socket loop of
its own, so the rules below can be read, and changed, apart from hypercorn's machinery.

- At most `max_connections` connections are open at a time (about 18 KiB and one
  file descriptor each), fewer if the open-files limit leaves no room for them beside
  the models' pipes (`connection_budget`). When a new client comes at the limit, a
  connection that waits on its client is closed to make room for it: first one whose
  request body arrives below --min-body-rate (bodyrate.py; it is answered 408), else
  the one that has waited longest: an idle keep-alive connection, one that has not
  finished sending its request headers, or one whose client has read nothing of its
  response for `STALLED_SEND` seconds. Only when every other connection has a request
  in progress does the service stop accepting, and new connections wait in the
  kernel's backlog until one closes. Slow or idle connections thus cannot starve other
  clients, nor use up the file descriptors model restarts need.
- Room is made only for a client that is there: at the limit, the listener waits for
  one to knock (`admit`'s `newcomer`) before it closes anything. Looking as soon as
  the last slot is taken closes, with no client waiting, whoever is then between its
  connect and its headers: which connections stay open then depends on whose request
  was already counted as in progress, a race with the clients.
- Every write to a client is bounded: one that accepts nothing of its response for
  `send_timeout` seconds has its connection closed (hypercorn alone would wait for
  ever, shielded from every cancellation, shutdown included).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from math import inf
from typing import TYPE_CHECKING, Any

import trio

from modelpool.http.bodyrate import BodyArrival, MinBodyRate

if TYPE_CHECKING:
    from modelpool.http._hypercorn import (
        ASGIFramework,
        ASGIReceiveCallable,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )

# The listener's logger, as before these rules had a module of their own.
log = logging.getLogger("modelpool.listener")

FD_RESERVE = 64  # descriptors kept free for logs, pipes of restarting models and the like
FDS_PER_MODEL = 8  # three pipes, a pidfd, and slack
STALLED_SEND = 1.0  # seconds a response write waits on its client before it may be evicted


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (up to the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit to %d: %s", target, exc)
    return soft


def connection_budget(max_connections: int, models: int) -> int:
    """How many connections may be open without starving models of file descriptors."""
    wanted = max_connections + models * FDS_PER_MODEL + FD_RESERVE
    limit = raise_fd_limit(wanted)
    budget = limit - models * FDS_PER_MODEL - FD_RESERVE
    if budget < max_connections:
        budget = max(budget, 1)
        log.warning(
            "the open-files limit is %d: at most %d connections, not %d, leave room for models",
            limit,
            budget,
            max_connections,
        )
        return budget
    return max_connections


class Connection:
    """One open client connection: its stream, whether a request is in progress, how its
    request's body arrives, and the writes to its client under way."""

    def __init__(self, stream: trio.SocketStream, peer: tuple[str, int], send_timeout: float):
        self.stream = stream
        self.peer = peer
        self.requests = 0
        self.last_active = trio.current_time()
        self.scope = trio.CancelScope()
        self.send_timeout = send_timeout
        self.sending_since: float | None = None  # when a write last made progress
        self.body = BodyArrival()  # kept by its protocol (http1.py)
        # Answers its request 408 and closes it, given the rate it fell below (http1's
        # time_out_body, set by listener.py)
        self.on_slow_body: Callable[[float], object] | None = None
        self._sends: set[trio.CancelScope] = set()
        self._timed_out = False

    @property
    def aborted(self) -> bool:
        return self.scope.cancel_called

    @property
    def leaving(self) -> bool:
        """It has been told to end (aborted, or its slow body timed out): it soon will."""
        return self._timed_out or self.scope.cancel_called

    def time_out_body(self, bytes_per_second: float) -> None:
        """Its request body arrives below `bytes_per_second`: answered 408 and closed
        (`on_slow_body`), or closed if it has no one to answer it."""
        self._timed_out = True
        self.body.ended()
        if self.on_slow_body is None:
            self.abort()
        else:
            self.on_slow_body(bytes_per_second)

    def waiting_on_client(self, now: float) -> float | None:
        """Since when it has waited on its client (for a request, or to read a response),
        if it may be closed to make room; None while a request is being worked on."""
        if not self.requests:
            return self.last_active
        if self.sending_since is not None and now - self.sending_since >= STALLED_SEND:
            return self.sending_since
        return None

    @contextmanager
    def sending(self) -> Iterator[None]:
        """A write to the client: shielded from cancellation, except by `abort()` and by
        making no progress (see `progressed`) for `send_timeout`, which aborts too.

        hypercorn shields its socket writes, so that a cancelled request never leaves half
        a response on a connection that goes on; and the write that ends a response must
        be shielded too (see `Connections.track`). A shield with no way out would let a
        client that never reads hold its connection and the shutdown for ever.
        """
        now = trio.current_time()
        scope = trio.CancelScope(shield=True, deadline=now + self.send_timeout)
        if self.aborted:
            scope.cancel()
        if not self._sends:
            self.sending_since = now
        self._sends.add(scope)
        try:
            with scope:
                yield
        finally:
            self._sends.discard(scope)
            if not self._sends:
                self.sending_since = None
        if scope.cancelled_caught and not self.aborted:
            log.info(
                "closing the connection from %s:%d: its client has read nothing for %g s",
                *self.peer,
                self.send_timeout,
            )
            self.abort()

    def progressed(self) -> None:
        """The client accepted some of what is being written: its writes get more time."""
        now = trio.current_time()
        self.sending_since = now
        for scope in self._sends:
            scope.deadline = now + self.send_timeout

    def abort(self) -> None:
        """End it now, writes under way included: its handler and the writes are cancelled;
        the socket is closed as the handler ends (see listener.serve)."""
        self.scope.cancel()
        for scope in self._sends:
            scope.cancel()


class Connections:
    """The open connections, by peer address; what /status reports and the limit acts on."""

    def __init__(
        self, limit: int, send_timeout: float = inf, min_body_rate: MinBodyRate | None = None
    ) -> None:
        self.limit = limit
        self.send_timeout = send_timeout
        self.min_body_rate = min_body_rate or MinBodyRate(0, 0)
        self.evicted = 0
        self._by_peer: dict[tuple[str, int], Connection] = {}
        self._slots = trio.Semaphore(limit)
        self._none_open = trio.Event()
        self._none_open.set()

    @property
    def open(self) -> int:
        return len(self._by_peer)

    async def admit(self, newcomer: Callable[[], Awaitable[object]] | None = None) -> None:
        """Wait for room for one more connection. At the limit, once `newcomer` returns
        (a client waits to be accepted), close one that waits on its client to make room
        (`_make_room`); if none may be closed yet, look again every STALLED_SEND."""
        if self._slots.value == 0 and newcomer is not None:
            await newcomer()
        while self._slots.value == 0:
            # one told to end already frees its slot soon: no other is closed meanwhile
            if not any(connection.leaving for connection in self._by_peer.values()):
                self._make_room(trio.current_time())
            # Every connection may have a request in progress; one whose client stops
            # reading its answer, or whose body falls below the rate, may be closed
            # later: look again then.
            with trio.move_on_after(STALLED_SEND):
                await self._slots.acquire()
                return
        await self._slots.acquire()

    def _make_room(self, now: float) -> None:
        """Close one connection that waits on its client, if one may be: the one whose
        body has been arriving longest below the rate (answered 408), else the one that
        has waited longest (closed)."""
        slow: dict[Connection, float] = {}
        waiting: dict[Connection, float] = {}
        for connection in self._by_peer.values():
            if self.min_body_rate.too_slow(connection.body, now):
                slow[connection] = connection.body.since or now
            elif (since := connection.waiting_on_client(now)) is not None:
                waiting[connection] = since
        if slow:
            min(slow, key=slow.__getitem__).time_out_body(self.min_body_rate.bytes_per_second)
        elif waiting:
            min(waiting, key=waiting.__getitem__).abort()  # its handler ends at once
        else:
            return
        self.evicted += 1

    def opened(self, stream: trio.SocketStream) -> Connection:
        """Register a new connection; OSError if its client is already gone."""
        peer = _peer(stream.socket.getpeername())
        connection = Connection(stream, peer, self.send_timeout)
        self._by_peer[connection.peer] = connection
        if self._none_open.is_set():
            self._none_open = trio.Event()
        return connection

    def closed(self, connection: Connection | None) -> None:
        """A connection ended (or never started): its slot is free again."""
        if connection is not None and self._by_peer.get(connection.peer) is connection:
            del self._by_peer[connection.peer]
            if not self._by_peer:
                self._none_open.set()
        self._slots.release()

    async def close_all(
        self, within: float, hurry: Callable[[], Awaitable[object]], hurried_within: float
    ) -> None:
        """Give the open connections `within` seconds to end (at most `hurried_within` from
        when `hurry` returns), then abort every one still open."""
        with trio.move_on_after(within) as window:
            async with trio.open_nursery() as nursery:

                async def hurry_up() -> None:
                    await hurry()
                    window.deadline = min(window.deadline, trio.current_time() + hurried_within)

                nursery.start_soon(hurry_up)
                await self._none_open.wait()
                nursery.cancel_scope.cancel()
        for connection in list(self._by_peer.values()):
            connection.abort()

    def track(self, app: ASGIFramework) -> ASGIFramework:
        """Wrap `app` so each connection knows when it has a request in progress, and the
        `send` that ends a response is shielded from cancellation (`Connection.sending`).

        After the last body chunk, hypercorn recycles the connection for its next request
        from inside that very `send` call, while quart-trio cancels the request's nursery
        as soon as it sees the disconnect hypercorn queued on the way. The cancellation
        reached the recycling: hypercorn's own keep-alive timer, started there, was
        cancelled, so idle keep-alive connections were never closed (not after
        keep_alive_timeout, and not on shutdown, which then waited for graceful_timeout).
        listener.KeepAliveTimer starts no task there any more, but the recycling still
        hands the stream's end to hypercorn's stream, which waits. The other sends (the
        status line, body chunks) recycle nothing: only their socket writes are shielded
        (listener.PromptTCPServer.protocol_send), as hypercorn's are. fastpath.py's
        requests do not come through here: they keep the same account themselves.
        """

        async def tracked(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            client = scope.get("client")
            connection = None if client is None else self._by_peer.get(_peer(client))
            if connection is None or scope["type"] != "http":
                await app(scope, receive, send)
                return
            sending = connection.sending

            async def send_the_end_shielded(message: ASGISendEvent) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    with sending():
                        await send(message)
                else:
                    await send(message)

            connection.requests += 1
            try:
                await app(scope, receive, send_the_end_shielded)
            finally:
                connection.requests -= 1
                connection.last_active = trio.current_time()

        return tracked


def _peer(address: Any) -> tuple[str, int]:
    return (str(address[0]), int(address[1]))
