"""hypercorn, as modelpool uses it: every name the service takes from hypercorn, and every
one of its internals the service leans on, in this one module. The rest of the package
imports hypercorn's names from here, and only from here (an import contract in
pyproject.toml checks it), so that a new hypercorn is read against this module alone;
tests/test_seams.py checks that each name below still exists and behaves as used.

The service runs hypercorn's trio worker its own way (listener.py says why), and for that
extends two of its classes at hooks that hypercorn does not document:

- `H11Protocol`, hypercorn's HTTP/1.1 protocol (extended by http1.py). hypercorn calls its
  private `_handle_events` with every read, and `_check_protocol` and `_create_stream` for
  every request; here they are the public `handle_events`, `check_protocol` and
  `create_stream`, which a subclass overrides (calling hypercorn's own with `super()`),
  and hypercorn's `_send_h11_event` and `_close_stream` are `send_h11_event` and
  `close_stream`.
- `TCPServer`, hypercorn's trio connection (extended by listener.py). Its private
  `_read_data` (the reading loop) and `_close` (the end of the socket) are `read_data` and
  `close_socket` here; `_initiate_server_close` is `initiate_server_close`.

A subclass overrides the public names only: `__init_subclass__` points hypercorn's
private ones at them, once, when the class is made, so that hypercorn calls a subclass's
own at once, as it calls its own (the `/predict` fast path is called so several times per
request); only a call back to hypercorn's (`super()`) goes through the seam.

And it relies on what these classes do, which no test of hypercorn's promises:

- the protocol reads `self.connection` (its h11 connection) and `self.stream` (the
  request's) afresh at every event, so that the protocol may put in its own: a stream of
  its own making for a request (`adopt_stream`, fastpath.py's), and a fresh h11 connection
  for the next request (`next_cycle`, after an answer framed without h11);
- it says when a request begins (`Updated(idle=False)`) and when the connection waits
  for the next one (`Updated(idle=True)`), through the `send` it was given: the
  keep-alive timer (keepalive.py) is driven by these, in place of hypercorn's own
  (`TCPServer._idle_timeout`, a task started afresh for every request), which the
  listener never starts;
- it recycles the connection for its next request from inside the app's `send` of a
  response's last body chunk (connections.py shields that `send`), and only if the
  request was read to its end by then: else it closes the connection;
- its ASGI stream hands the start of a response to the protocol's public `stream_send`
  as a `Response` event, which a subclass may amend (http1.py adds `Connection: close`);
- the connection calls only `initiate` and `handle` on its `protocol`, so an
  `H11Protocol` can stand in for hypercorn's `ProtocolWrapper`, which would switch to
  HTTP/2 (`use_protocol`); and hands `Closed` to `close_socket`;
- `listener.serve` does what `hypercorn.trio.run.worker_serve` does around those
  connections: the app wrapped (`wrap_app`), its lifespan (`Lifespan`), one
  `WorkerContext` whose `terminated` event tells idle connections to close.

Written against hypercorn 0.18 (pyproject.toml allows no other minor version): before
allowing a newer one, run tests/test_seams.py against it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h11
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import h11 as _h11
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Data as PassThrough
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.trio import tcp_server as _tcp
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    H11SendableEvent,
    LifespanState,
    Scope,
)
from hypercorn.typing import Event as WorkerEvent
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

__all__ = [
    "MAX_RECV",
    "STREAM_ID",
    "ASGIFramework",
    "ASGIReceiveCallable",
    "ASGISendCallable",
    "ASGISendEvent",
    "AppWrapper",
    "Body",
    "Closed",
    "Config",
    "ConnectionState",
    "EndBody",
    "Event",
    "H11Protocol",
    "Lifespan",
    "LifespanState",
    "PassThrough",
    "RawData",
    "Response",
    "Scope",
    "Sockets",
    "StreamClosed",
    "StreamEvent",
    "TCPServer",
    "TaskGroup",
    "Updated",
    "WorkerContext",
    "WorkerEvent",
    "parse_socket_addr",
    "repr_socket_addr",
    "wrap_app",
]

STREAM_ID = _h11.STREAM_ID  # the one stream of an HTTP/1.1 connection, in stream events
MAX_RECV = _tcp.MAX_RECV  # bytes hypercorn reads from a socket at a time

# hypercorn's private hooks, and the public names of ours that a subclass overrides
H11_HOOKS = {
    "_handle_events": "handle_events",
    "_check_protocol": "check_protocol",
    "_create_stream": "create_stream",
}
TCP_HOOKS = {"_read_data": "read_data", "_close": "close_socket"}


def _point_hooks(cls: type, hooks: dict[str, str]) -> None:
    """Make hypercorn's private hooks, as `cls` inherits them, call `cls`'s public ones."""
    for private, public in hooks.items():
        setattr(cls, private, getattr(cls, public))


class Stream(Protocol):
    """What a protocol hands a request's events to (hypercorn's streams, fastpath.py's)."""

    async def handle(self, event: StreamEvent) -> None: ...


class H11Protocol(_h11.H11Protocol):
    """hypercorn's HTTP/1.1 protocol, its hooks under public names (see the module
    docstring); `adopt_stream` and `next_cycle` do what hypercorn does with its own
    streams and at the end of a response, for a subclass that makes its own."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _point_hooks(cls, H11_HOOKS)

    # hypercorn's own hooks, for a subclass to call with super()

    async def handle_events(self) -> None:
        """Read the events h11 has parsed, and act on them (hypercorn's)."""
        await super()._handle_events()

    async def check_protocol(self, event: h11.Request) -> None:
        """Look at a request before its stream is made (hypercorn's switches to HTTP/2)."""
        await super()._check_protocol(event)

    async def create_stream(self, request: h11.Request) -> None:
        """Make the request's stream: hypercorn's ASGI stream (or WebSocket's)."""
        await super()._create_stream(request)

    # hypercorn's helpers

    async def send_h11_event(self, event: H11SendableEvent) -> None:
        """Frame `event` with the h11 connection and send it."""
        await self._send_h11_event(event)

    async def close_stream(self) -> None:
        """Tell the request's stream it is over (StreamClosed), and drop it."""
        await self._close_stream()

    async def adopt_stream(self, stream: Stream, run: Callable[[], Awaitable[object]]) -> None:
        """Make `stream` the request's, its task `run`, as `create_stream` makes its own:
        the request's events go to it, and it counts against keep_alive_max_requests."""
        # hypercorn's streams have the same `handle`; its attribute's type names only them
        self.stream = stream  # type: ignore[assignment]
        self.task_group.spawn(run)
        self.keep_alive_requests += 1
        await self.context.mark_request()

    async def next_cycle(self) -> None:
        """What hypercorn does once a response has ended and the connection goes on (its
        `_maybe_recycle`), for a response h11 did not frame (so cannot recycle its
        connection for): a fresh h11 connection, given what the client sent after the
        request, and the protocol ready for the next one."""
        trailing, closed = self.connection.trailing_data
        limit = self.config.h11_max_incomplete_size
        fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        if trailing:
            fresh.receive_data(trailing)
        if closed:
            fresh.receive_data(b"")
        self.connection = fresh
        self.stream = None
        await self.can_read.set()
        await self.send(Updated(idle=True))


class TCPServer(_tcp.TCPServer):
    """hypercorn's trio connection, its hooks under public names (see the module
    docstring), on a plain TCP stream (hypercorn's own type names only TLS streams)."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SocketStream,
    ) -> None:
        # hypercorn declares an SSLStream, but reads a plain one as well (its own
        # worker_serve passes either): its type does not say so.
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.socket_stream = stream

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _point_hooks(cls, TCP_HOOKS)

    async def read_data(self) -> None:
        """Read from the client, handing the protocol what comes, until it ends (hypercorn's)."""
        await super()._read_data()

    async def close_socket(self) -> None:
        """The end of our sending, then the socket closed (hypercorn's)."""
        await super()._close()

    async def initiate_server_close(self) -> None:
        """Close the connection from our side: the protocol told, the socket closed."""
        await self._initiate_server_close()

    def use_protocol(self, protocol: H11Protocol, task_group: TaskGroup) -> None:
        """Serve the connection with `protocol`, its tasks in `task_group`, in place of the
        ProtocolWrapper and task group hypercorn's `run` makes (it switches to HTTP/2)."""
        self._task_group = task_group
        # TCPServer declares the wrapper's type for the attribute, and calls on it only
        # what H11Protocol has too (initiate, handle)
        self.protocol = protocol  # type: ignore[assignment]
