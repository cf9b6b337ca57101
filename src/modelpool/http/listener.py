"""Listening sockets and hypercorn's trio connection loop, run with our own limits.

hypercorn's `serve()` binds, accepts and shuts down in one call. The service needs more
than it offers, so this module runs hypercorn's own trio `TCPServer` per connection the
way `hypercorn.trio.run.worker_serve` does, with these differences:

- The socket is bound first (binding.py), before any model starts, so a port in use
  is an error at once and not after the models have loaded.
- HTTP/1.1 only: hypercorn's switches to cleartext HTTP/2 are off (see http1.py).
- At most `max_connections` connections are open at a time (about 18 KiB and one
  file descriptor each). When a new client comes at the limit, the connection that has
  waited longest on its client is closed to make room for it: an idle keep-alive
  connection, one that has not finished sending its request headers, or one whose
  client has read nothing of its response for `STALLED_SEND` seconds. Only when every
  connection has a request in progress does the service stop accepting, and new
  connections wait in the kernel's backlog until one closes. Idle connections thus
  cannot starve other clients, nor use up the file descriptors model restarts need.
- Every write to a client is bounded: one that accepts nothing of its response for
  `send_timeout` seconds has its connection closed (hypercorn alone would wait for
  ever, shielded from every cancellation, shutdown included).
- Shutdown has two steps. `stop_accepting` closes the listeners but keeps open
  connections, so a request that arrives on one while the pool drains is answered
  (503, with `Connection: close`) rather than cut off. `close_connections` then closes
  idle connections, and gives responses still being written `graceful_timeout`, or
  `hard_stop_slack` once `hard_stop` has come; whatever is left then is closed, in
  the middle of a write or not.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from math import inf
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from modelpool.http.http1 import HTTP11Protocol

log = logging.getLogger("modelpool.listener")

FD_RESERVE = 64  # descriptors kept free for logs, pipes of restarting models and the like
FDS_PER_MODEL = 8  # three pipes, a pidfd, and slack
STALLED_SEND = 1.0  # seconds a response write waits on its client before it may be evicted
SEND_CHUNK = 2**16  # bytes written at a time; each one accepted counts as progress


def sockets(sock: socket.socket) -> Sockets:
    """hypercorn's view of the socket binding.py bound."""
    return Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])


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
    """One open client connection: its stream, whether a request is in progress, and the
    writes to its client under way."""

    def __init__(self, stream: trio.SocketStream, peer: tuple[str, int], send_timeout: float):
        self.stream = stream
        self.peer = peer
        self.requests = 0
        self.last_active = trio.current_time()
        self.scope = trio.CancelScope()
        self.send_timeout = send_timeout
        self.sending_since: float | None = None  # when a write last made progress
        self._sends: set[trio.CancelScope] = set()

    @property
    def aborted(self) -> bool:
        return self.scope.cancel_called

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
        the socket is closed as the handler ends (see `serve`)."""
        self.scope.cancel()
        for scope in self._sends:
            scope.cancel()


class Connections:
    """The open connections, by peer address; what /status reports and the limit acts on."""

    def __init__(self, limit: int, send_timeout: float = inf) -> None:
        self.limit = limit
        self.send_timeout = send_timeout
        self.evicted = 0
        self._by_peer: dict[tuple[str, int], Connection] = {}
        self._slots = trio.Semaphore(limit)
        self._none_open = trio.Event()
        self._none_open.set()

    @property
    def open(self) -> int:
        return len(self._by_peer)

    async def admit(self) -> None:
        """Wait for room for one more connection, closing one that waits on its client if
        need be: the one that has waited longest."""
        while self._slots.value == 0:
            now = trio.current_time()
            waiting = {}
            for connection in self._by_peer.values():
                since = None if connection.aborted else connection.waiting_on_client(now)
                if since is not None:
                    waiting[connection] = since
            if waiting:
                min(waiting, key=waiting.__getitem__).abort()
                self.evicted += 1
                break  # its handler ends at once, and frees its slot
            # Every connection has a request in progress; one whose client stops reading
            # its answer may be evicted once STALLED_SEND has passed: look again then.
            with trio.move_on_after(STALLED_SEND):
                await self._slots.acquire()
                return
        await self._slots.acquire()

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

        After the last body chunk, hypercorn restarts its keep-alive idle timer from inside
        that very `send` call, while quart-trio cancels the request's nursery as soon as it
        sees the disconnect hypercorn queued on the way. The cancellation reached the new
        timer, so idle keep-alive connections were never closed: not after
        keep_alive_timeout, and not on shutdown, which then waited for graceful_timeout.
        The other sends (the status line, body chunks) start no timer: only their socket
        writes are shielded (PromptTCPServer.protocol_send), as hypercorn's are.
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


class PromptTCPServer(TCPServer):
    """hypercorn's connection, in HTTP/1.1 only, with bounded writes (`Connection.sending`),
    and ended as soon as its peer has gone.

    hypercorn's trio TCPServer closes the socket when the client hangs up, but keeps
    the connection's tasks until its keep-alive timer runs out; the connection would
    count as open, against `max_connections`, for up to `keep_alive_timeout`.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream,
        connection: Connection,
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.connection = connection

    async def run(self) -> None:
        """hypercorn's TCPServer.run for a plain TCP stream, with HTTP11Protocol."""
        sock = self.stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                # in place of hypercorn's ProtocolWrapper, which would switch to HTTP/2
                self.protocol = HTTP11Protocol(  # type: ignore[assignment]
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                )
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                with self.connection.sending():
                    data = memoryview(event.data)
                    while True:  # at least once, as hypercorn: even b"" lets others run
                        await self.stream.send_all(data[:SEND_CHUNK])
                        self.connection.progressed()
                        data = data[SEND_CHUNK:]
                        if not data:
                            break
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                # Busy: hypercorn is closing the connection (send_eof) from its reading task
                await self.protocol.handle(Closed())

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class LimitedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts only when `connections` has room for one more."""

    def __init__(self, inner: trio.SocketListener, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections

    async def accept(self) -> trio.SocketStream:
        await self._connections.admit()
        try:
            return await self._inner.accept()
        except BaseException:
            self._connections.closed(None)
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


def _peer(address: Any) -> tuple[str, int]:
    return (str(address[0]), int(address[1]))


async def serve(
    app: ASGIFramework,
    config: HypercornConfig,
    sockets: Sockets,
    connections: Connections,
    *,
    stop_accepting: Callable[[], Awaitable[object]],
    close_connections: Callable[[], Awaitable[object]],
    hard_stop: Callable[[], Awaitable[object]],
    hard_stop_slack: float,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on bound `sockets` until both shutdown steps have come and gone."""
    wrapped = wrap_app(connections.track(app), config.wsgi_max_body_size, "asgi")
    lifespan_state: dict = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            connection = connections.opened(stream)
        except OSError:  # the client is already gone
            connections.closed(None)
            await stream.aclose()
            return
        try:
            with connection.scope:
                state = ConnectionState(lifespan_state.copy())
                await PromptTCPServer(wrapped, config, context, state, stream, connection)
        finally:
            try:
                await stream.aclose()  # closes even when cancelled
            finally:
                connections.closed(connection)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connection_nursery:
            listeners = [
                LimitedListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)), connections
                )
                for sock in sockets.insecure_sockets
            ]
            binds = [
                f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
                for sock in sockets.insecure_sockets
            ]
            async with trio.open_nursery() as accept_nursery:
                accept = partial(trio.serve_listeners, handler_nursery=connection_nursery)
                accept_nursery.start_soon(accept, handle, listeners)
                task_status.started(binds)
                await stop_accepting()
                accept_nursery.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await close_connections()
            await context.terminated.set()  # idle connections close; busy ones after answering
            await connections.close_all(config.graceful_timeout, hard_stop, hard_stop_slack)
            connection_nursery.cancel_scope.cancel()  # whatever is left is ending already
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
