"""Listening sockets and hypercorn's trio connection loop, run with our own limits.

hypercorn's `serve()` binds, accepts and shuts down in one call. The service needs more
than it offers, so this module runs hypercorn's own trio `TCPServer` per connection the
way `hypercorn.trio.run.worker_serve` does, with these differences:

- The socket is bound first (binding.py), before any model starts, so a port in use
  is an error at once and not after the models have loaded.
- HTTP/1.1 only: hypercorn's switches to cleartext HTTP/2 are off (see http1.py).
- At most `max_connections` connections are open at a time, the one that has waited
  longest on its client making room for a new one, and every write to a client is
  bounded: connections.py keeps that account, and says why; here the listener accepts
  only when it has room (`LimitedListener`), and each connection's writes go through
  it (`PromptTCPServer`).
- Shutdown has two steps. `stop_accepting` closes the listeners but keeps open
  connections, so a request that arrives on one while the pool drains is answered
  (503, with `Connection: close`) rather than cut off. `close_connections` then closes
  idle connections, and gives responses still being written `graceful_timeout`, or
  `hard_stop_slack` once `hard_stop` has come; whatever is left then is closed, in
  the middle of a write or not.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from modelpool.http.connections import Connection, Connections
from modelpool.http.http1 import HTTP11Protocol

SEND_CHUNK = 2**16  # bytes written at a time; each one accepted counts as progress


def sockets(sock: socket.socket) -> Sockets:
    """hypercorn's view of the socket binding.py bound."""
    return Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])


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
        # hypercorn declares an SSLStream, but reads a plain one as well (its own
        # worker_serve passes either): its type does not say so.
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
                # in place of hypercorn's ProtocolWrapper, which would switch to HTTP/2;
                # TCPServer declares the wrapper's type for the attribute, and calls on
                # it only what HTTP11Protocol has too (initiate, handle)
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
    lifespan_state: LifespanState = {}
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
