"""Listening sockets and hypercorn's trio connection loop, run with our own limits.

hypercorn's `serve()` binds, accepts and shuts down in one call. The service needs three
things it does not offer, so this module runs hypercorn's own trio `TCPServer` per
connection the way `hypercorn.trio.run.worker_serve` does, with these differences:

- The socket is bound first (binding.py), before any model starts, so a port in use
  is an error at once and not after the models have loaded.
- At most `max_connections` connections are open at a time (about 18 KiB and one
  file descriptor each). When a new client comes at the limit, the connection that
  has been idle longest is closed to make room for it: an idle keep-alive connection,
  or one that has not finished sending its request headers. Only when every
  connection has a request in progress does the service stop accepting, and new
  connections wait in the kernel's backlog until one closes. Idle connections thus
  cannot starve other clients, nor use up the file descriptors model restarts need.
- Shutdown has two steps. `stop_accepting` closes the listeners but keeps open
  connections, so a request that arrives on one while the pool drains is answered
  (503, with `Connection: close`) rather than cut off. `close_connections` then closes
  idle connections, and gives responses still being written `graceful_timeout`.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    Scope,
)
from hypercorn.utils import repr_socket_addr, wrap_app

log = logging.getLogger("modelpool.listener")

FD_RESERVE = 64  # descriptors kept free for logs, pipes of restarting models and the like
FDS_PER_MODEL = 8  # three pipes, a pidfd, and slack


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


class PromptTCPServer(TCPServer):
    """hypercorn's connection, ended as soon as its peer has gone.

    hypercorn's trio TCPServer closes the socket when the client hangs up, but keeps
    the connection's tasks until its keep-alive timer runs out; the connection would
    count as open, against `max_connections`, for up to `keep_alive_timeout`.
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class Connection:
    """One open client connection: its stream, and whether a request is in progress."""

    def __init__(self, stream: trio.SocketStream, peer: tuple[str, int]) -> None:
        self.stream = stream
        self.peer = peer
        self.requests = 0
        self.last_active = trio.current_time()
        self.scope = trio.CancelScope()

    @property
    def evicted(self) -> bool:
        return self.scope.cancel_called

    def evict(self) -> None:
        """End it now. Only for a connection with no request in progress: hypercorn
        keeps even a closed connection's tasks until its idle timer runs out, so its
        handler is cancelled rather than its socket shut down."""
        self.scope.cancel()


class Connections:
    """The open connections, by peer address; what /status reports and the limit acts on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.evicted = 0
        self._by_peer: dict[tuple[str, int], Connection] = {}
        self._slots = trio.Semaphore(limit)

    @property
    def open(self) -> int:
        return len(self._by_peer)

    async def admit(self) -> None:
        """Wait for room for one more connection, closing the longest-idle one if need be."""
        if self._slots.value == 0:
            idle = [c for c in self._by_peer.values() if not c.requests and not c.evicted]
            if idle:
                oldest = min(idle, key=lambda c: c.last_active)
                oldest.evict()
                self.evicted += 1
        await self._slots.acquire()

    def opened(self, stream: trio.SocketStream) -> Connection:
        """Register a new connection; OSError if its client is already gone."""
        connection = Connection(stream, _peer(stream.socket.getpeername()))
        self._by_peer[connection.peer] = connection
        return connection

    def closed(self, connection: Connection | None) -> None:
        """A connection ended (or never started): its slot is free again."""
        if connection is not None and self._by_peer.get(connection.peer) is connection:
            del self._by_peer[connection.peer]
        self._slots.release()

    def track(self, app: ASGIFramework) -> ASGIFramework:
        """Wrap `app` so each connection knows when it has a request in progress."""

        async def tracked(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            client = scope.get("client")
            connection = None if client is None else self._by_peer.get(_peer(client))
            if connection is None or scope["type"] != "http":
                await app(scope, receive, send)
                return
            connection.requests += 1
            try:
                await app(scope, receive, send)
            finally:
                connection.requests -= 1
                connection.last_active = trio.current_time()

        return tracked


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
                await PromptTCPServer(wrapped, config, context, state, stream)
        finally:
            await stream.aclose()  # closes even when cancelled
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
            connection_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
