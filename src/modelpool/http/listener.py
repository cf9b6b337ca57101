"""Listening sockets and hypercorn's trio connection loop, run with our own limits.

hypercorn's `serve()` binds, accepts and shuts down in one call. The service needs more
than it offers, so this module runs hypercorn's own trio `TCPServer` per connection the
way `hypercorn.trio.run.worker_serve` does, with these differences:

- The socket is bound first (service/binding.py), before any model starts, so a port in use
  is an error at once and not after the models have loaded.
- HTTP/1.1 only: hypercorn's switches to cleartext HTTP/2 are off (see http1.py), and
  the predictions fastpath.py answers are given to it on the connection (`predictions`).
- The keep-alive timer is one task per connection whose deadline each request moves
  (keepalive.py), not a task started afresh for every request; reads and writes on the
  client's socket try the system call first (core/eagerio.py).
- At most `max_connections` connections are open at a time, one that waits on its
  client making room for a new one, and every write to a client is bounded:
  connections.py keeps that account, and says why; here the listener accepts only when
  it has room, or a client waits for it to make some (`LimitedListener`), and each
  connection's writes go through it (`PromptTCPServer`), as does the 408 of one whose
  body arrives too slowly when room must be made (`Connection.on_slow_body`).
- Shutdown has two steps. `stop_accepting` closes the listeners but keeps open
  connections, so a request that arrives on one while the pool drains is answered
  (503, with `Connection: close`) rather than cut off. `close_connections` then closes
  idle connections, and gives responses still being written `graceful_timeout`, or
  `hard_stop_slack` once `hard_stop` has come; whatever is left then is closed, in
  the middle of a write or not.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import h11
import trio

from modelpool.core.eagerio import EagerReader, write_now
from modelpool.http._hypercorn import (
    MAX_RECV,
    AppWrapper,
    ASGIFramework,
    Closed,
    ConnectionState,
    Event,
    Lifespan,
    LifespanState,
    RawData,
    Sockets,
    TaskGroup,
    TCPServer,
    Updated,
    WorkerContext,
    parse_socket_addr,
    repr_socket_addr,
    wrap_app,
)
from modelpool.http._hypercorn import Config as HypercornConfig
from modelpool.http.connections import Connection, Connections
from modelpool.http.http1 import HTTP11Protocol
from modelpool.http.keepalive import KeepAliveTimer

if TYPE_CHECKING:
    from modelpool.http.fastpath import Predictions

SEND_CHUNK = 2**16  # bytes written at a time; each one accepted counts as progress
LINGER = 2.0  # seconds a connection closed before its request was read reads on (`_close`)
LINGER_BYTES = 2**20  # and bytes it reads (and drops) at most meanwhile


def sockets(sock: socket.socket) -> Sockets:
    """hypercorn's view of the socket service/binding.py bound."""
    return Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])


class PromptTCPServer(TCPServer):
    """hypercorn's connection, in HTTP/1.1 only, with bounded writes (`Connection.sending`),
    a keep-alive timer of its own (`KeepAliveTimer`), and ended as soon as its peer has
    gone.

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
        predictions: Predictions | None = None,
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self.connection = connection
        self.predictions = predictions
        self.keep_alive = KeepAliveTimer(
            config.keep_alive_timeout, context.terminated, stream.socket.fileno
        )
        self.http1: HTTP11Protocol  # self.protocol, as its own type (set by `run`)
        self._reading = False  # while the reading task reads (`read_data`)
        self._linger_until: float | None = None  # when a lingering close ends (`close_socket`)
        self._reads = trio.CancelScope()  # the reading task's; its deadline: `_linger_until`

    async def run(self) -> None:
        """hypercorn's TCPServer.run for a plain TCP stream, with HTTP11Protocol."""
        sock = self.socket_stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self.http1 = HTTP11Protocol(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                    predictions=self.predictions,
                    connection=self.connection,
                )
                # in place of hypercorn's ProtocolWrapper, which would switch to HTTP/2
                self.use_protocol(self.http1, task_group)
                await self.http1.initiate()
                self.keep_alive.idle()
                task_group.spawn(self.keep_alive.run, self.initiate_server_close)
                self.connection.on_slow_body = partial(task_group.spawn, self.http1.time_out_body)
                await self.read_data()
        except OSError:
            pass
        finally:
            self.connection.on_slow_body = None  # its tasks are over: it is simply closed
            await self.close_socket()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            if event.idle:
                self.keep_alive.idle()
            else:
                self.keep_alive.busy()
            return
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        data = memoryview(event.data)
        lock = self.send_lock
        if lock.locked() or self.connection.aborted:
            async with lock:
                await self._send_waiting(data)
            return
        # No other write under way: write now what the socket takes (core/eagerio.py),
        # which is most answers, whole; wait only for what is left, if anything.
        lock.acquire_nowait()
        try:
            sent = 0
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                sent = write_now(self.socket_stream.socket.fileno(), data) if data else 0
            if sent < len(data):  # the waiting way finds any error, and says so
                await self._send_waiting(data[sent:])
        finally:
            lock.release()

    async def _send_waiting(self, data: memoryview) -> None:
        """Write `data`, waiting for the client to take it (see `Connection.sending`);
        the connection ends if it cannot be written."""
        try:
            with self.connection.sending():
                while True:  # at least once, as hypercorn: even b"" lets others run
                    await self.socket_stream.send_all(data[:SEND_CHUNK])
                    self.connection.progressed()
                    data = data[SEND_CHUNK:]
                    if not data:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            # Busy: hypercorn is closing the connection (send_eof) from its reading task
            await self.http1.handle(Closed())

    async def read_data(self) -> None:
        """hypercorn's TCPServer.read_data, reading eagerly (core/eagerio.py), and
        lingering when the connection is closed before its request was read
        (`close_socket`).

        Every read is in `_reads`, whose deadline the lingering close sets: a read that
        waits on a client that sends nothing ends then too, not only one that returns."""
        socket = self.socket_stream.socket
        reader = EagerReader(socket.fileno, MAX_RECV)
        read_timeout = self.config.read_timeout
        self._reading = True
        with self._reads:
            while self._linger_until is None:
                try:
                    if read_timeout is None:
                        data = await reader.receive_some()
                    else:
                        with trio.fail_after(read_timeout):
                            data = await reader.receive_some()
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                await self.http1.handle(RawData(data))
                if data == b"":
                    break
            else:
                dropped = 0
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    while dropped < LINGER_BYTES and (data := await reader.receive_some()):
                        dropped += len(data)  # dropped: the connection is closing
        self._reading = False
        await self.http1.handle(Closed())
        self.keep_alive.end()

    async def close_socket(self) -> None:
        """hypercorn's close (the end of our sending, then the socket), lingering first if
        the client's request was not read to its end (a refusal before its body: 413, 408,
        an ambiguous framing; or of its headers: 431, 400), or the client may still be
        sending after a request that closed the connection (`Connection: close`).

        Closing a socket with data unread resets the connection, and a client still
        sending then gets the reset instead of the answer it was sent. So, as nginx's
        `lingering_close` does, what the client still sends is read and dropped until it
        closes its end, LINGER has passed, or LINGER_BYTES have come (the reading task
        does it, see `_read_data`): a refused client cannot make the service read more,
        nor hold its connection longer, whether it sends or not; and when the service
        stops, a lingering connection is closed at once, as an idle one is (keepalive.py).
        """
        with contextlib.suppress(
            trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError
        ):
            await self.socket_stream.send_eof()
        if self._linger_until is None and self._reading:
            their_state = self.http1.connection.their_state
            if their_state in (h11.SEND_BODY, h11.ERROR, h11.MUST_CLOSE):
                self._linger_until = trio.current_time() + LINGER
                self._reads.deadline = self._linger_until
                self.keep_alive.closing()
                return
        await self.socket_stream.aclose()


class LimitedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts only when `connections` has room for one more."""

    def __init__(self, inner: trio.SocketListener, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections

    async def accept(self) -> trio.SocketStream:
        await self._connections.admit(self._knocked)
        try:
            return await self._inner.accept()
        except BaseException:
            self._connections.closed(None)
            raise

    async def _knocked(self) -> None:
        """Until a client waits to be accepted (its listening socket is readable)."""
        await trio.lowlevel.wait_readable(self._inner.socket)

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
    predictions: Predictions | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on bound `sockets` until both shutdown steps have come and gone;
    the POST /predict requests `predictions` takes (fastpath.py) are answered by it."""
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
                await PromptTCPServer(
                    wrapped, config, context, state, stream, connection, predictions
                )
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
