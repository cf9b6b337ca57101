"""The internals of hypercorn, quart and trio that modelpool leans on still exist and
behave as the seam modules say (http/_hypercorn.py, http/_quart.py, core/_trio.py).

A new release of one of them that moves such a name fails here first, with a message
that says what moved and which seam reads it; read that seam against the new release.
The names are listed here, apart from the seams, so that these tests run even when a
seam itself no longer imports.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from typing import Any

import h11
import hypercorn.config
import hypercorn.protocol.events
import hypercorn.protocol.h11
import hypercorn.trio.lifespan
import hypercorn.trio.task_group
import hypercorn.trio.tcp_server
import hypercorn.trio.worker_context
import hypercorn.utils
import trio
import trio.testing

HYPERCORN = importlib.metadata.version("hypercorn")
H11PROTOCOL = hypercorn.protocol.h11.H11Protocol
TCPSERVER = hypercorn.trio.tcp_server.TCPServer
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

# hypercorn's private methods the seam points at ours (overridden) or calls (helpers)
PRIVATE_METHODS = {
    H11PROTOCOL: [
        *["_handle_events", "_check_protocol", "_create_stream"],
        *["_send_h11_event", "_close_stream"],
    ],
    TCPSERVER: ["_read_data", "_close", "_initiate_server_close"],
}
# hypercorn's attributes the service reads or writes, as an instance has them
PROTOCOL_ATTRIBUTES = ["app", "can_read", "client", "config", "connection", "context"]
PROTOCOL_ATTRIBUTES += ["keep_alive_requests", "send", "stream", "task_group"]
SERVER_ATTRIBUTES = ["app", "config", "context", "send_lock", "state", "stream"]
CONFIG_ATTRIBUTES = ["bind", "keep_alive_timeout", "graceful_timeout", "read_timeout"]
CONFIG_ATTRIBUTES += ["h11_max_incomplete_size", "keep_alive_max_requests", "root_path"]
CONFIG_ATTRIBUTES += ["server_names", "wsgi_max_body_size", "errorlog", "accesslog"]
# what the seam re-exports, by module
MODULE_NAMES = {
    hypercorn.config: ["Config", "Sockets"],
    hypercorn.events: ["Closed", "Event", "RawData", "Updated"],
    hypercorn.protocol.events: ["Body", "EndBody", "StreamClosed", "Data", "Event", "Response"],
    hypercorn.protocol.h11: ["STREAM_ID", "H11Protocol"],
    hypercorn.trio.tcp_server: ["MAX_RECV", "TCPServer"],
    hypercorn.trio.lifespan: ["Lifespan"],
    hypercorn.trio.task_group: ["TaskGroup"],
    hypercorn.trio.worker_context: ["WorkerContext"],
    hypercorn.utils: ["parse_socket_addr", "repr_socket_addr", "wrap_app"],
}


def moved(what: str, seam: str = "http/_hypercorn.py") -> str:
    return f"hypercorn {HYPERCORN}: {what}; modelpool relies on it in {seam}"


def test_hypercorn_has_every_name_the_seam_takes() -> None:
    import hypercorn.typing

    for module, names in MODULE_NAMES.items():
        for name in names:
            assert hasattr(module, name), moved(f"{module.__name__}.{name} is gone")
    for name in ["AppWrapper", "ASGIFramework", "ConnectionState", "LifespanState", "Event"]:
        assert hasattr(hypercorn.typing, name), moved(f"hypercorn.typing.{name} is gone")


def test_hypercorn_has_the_private_methods_the_seam_names() -> None:
    for cls, names in PRIVATE_METHODS.items():
        for name in names:
            method = getattr(cls, name, None)
            assert inspect.iscoroutinefunction(method), moved(
                f"{cls.__qualname__}.{name} is gone, or no longer a coroutine function"
            )


def new_protocol(
    cls: type[Any] = H11PROTOCOL,
    app: Any = None,
    task_group: Any = None,
    sent: list[Any] | None = None,
    **extra: Any,
) -> Any:
    """A protocol of `cls` for one connection, what it sends kept in `sent`."""
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    kept = [] if sent is None else sent

    async def send(event: Any) -> None:
        kept.append(event)

    args = (app, hypercorn.config.Config(), WorkerContext(None), task_group)
    client = ("127.0.0.1", 1)
    return cls(*args, ConnectionState({}), False, client, client, send, **extra)


def test_hypercorn_objects_have_the_attributes_the_service_uses() -> None:
    protocol = new_protocol()
    for name in PROTOCOL_ATTRIBUTES:
        assert hasattr(protocol, name), moved(f"H11Protocol has no attribute {name}")
    assert isinstance(protocol.connection, h11.Connection), moved("H11Protocol.connection")
    assert protocol.keep_alive_requests == 0, moved("H11Protocol.keep_alive_requests")
    config = hypercorn.config.Config()
    for name in CONFIG_ATTRIBUTES:
        assert hasattr(config, name), moved(f"Config has no {name}")
    assert any(name == b"date" for name, _ in config.response_headers("h11")), moved(
        "Config.response_headers('h11') gives no Date"
    )
    sockets = hypercorn.config.Sockets(secure_sockets=[], insecure_sockets=[], quic_sockets=[])
    assert sockets.insecure_sockets == [], moved("Sockets' fields")


async def test_a_tcp_server_has_the_attributes_the_service_uses() -> None:
    from hypercorn.trio.worker_context import WorkerContext

    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        stream = trio.SocketStream(ours)
        server = TCPSERVER(None, hypercorn.config.Config(), WorkerContext(None), {}, stream)
        for name in SERVER_ATTRIBUTES:
            assert hasattr(server, name), moved(f"TCPServer has no attribute {name}")
        assert server.stream is stream, moved("TCPServer.stream is not the connection's")
        for name in ["run", "protocol_send"]:
            method = getattr(TCPSERVER, name, None)
            assert inspect.iscoroutinefunction(method), moved(f"TCPServer.{name} is gone")


def own_names(cls: type) -> set[str]:
    """What a class of ours defines itself (its dunders aside)."""
    return {name for name in vars(cls) if not name.startswith("__")}


def test_the_seams_names_and_ours_are_not_hypercorns() -> None:
    """A subclass of hypercorn's shares its namespace: a name of ours that hypercorn comes
    to use (`_connection`, say) would silently replace its own."""
    from modelpool.http import _hypercorn
    from modelpool.http.http1 import HTTP11Protocol
    from modelpool.http.listener import PromptTCPServer

    theirs_protocol = set(dir(H11PROTOCOL)) | set(vars(new_protocol()))
    overridden = {"handle", "stream_send", *_hypercorn.H11_HOOKS}  # on purpose, as the seam says
    for cls in (_hypercorn.H11Protocol, HTTP11Protocol):
        clash = (own_names(cls) - overridden) & theirs_protocol
        assert not clash, moved(f"H11Protocol now has {sorted(clash)}, as {cls.__name__} does")
    ours = set(vars(new_protocol(HTTP11Protocol))) - set(vars(new_protocol()))
    assert not ours & theirs_protocol, moved(f"H11Protocol now has {sorted(ours)}")
    theirs_server = set(dir(TCPSERVER))
    overridden = {"run", "protocol_send", *_hypercorn.TCP_HOOKS}
    for cls in (_hypercorn.TCPServer, PromptTCPServer):
        clash = (own_names(cls) - overridden) & theirs_server
        assert not clash, moved(f"TCPServer now has {sorted(clash)}, as {cls.__name__} does")


async def answer_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A trivial ASGI app: 200 and "ok" for any request."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_the_protocols_hooks_are_called_and_it_recycles_inside_the_last_send() -> None:
    """hypercorn calls the seam's hooks (`handle_events`, `check_protocol`,
    `create_stream`), says when a request begins and when the connection is idle again
    (keepalive.py), and recycles the connection from inside the app's last `send`
    (connections.py shields that send)."""
    from modelpool.http import _hypercorn

    called: list[str] = []
    sent: list[Any] = []
    idle_in_last_send: list[bool] = []

    class Probe(_hypercorn.H11Protocol):
        async def handle_events(self) -> None:
            called.append("handle_events")
            await super().handle_events()

        async def check_protocol(self, event: h11.Request) -> None:
            called.append("check_protocol")
            await super().check_protocol(event)

        async def create_stream(self, request: h11.Request) -> None:
            called.append("create_stream")
            await super().create_stream(request)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        idle_in_last_send.append(any(isinstance(e, _hypercorn.Updated) and e.idle for e in sent))

    wrapped = _hypercorn.wrap_app(app, 2**20, "asgi")
    async with _hypercorn.TaskGroup() as task_group:
        protocol = new_protocol(Probe, wrapped, task_group, sent)
        await protocol.handle(_hypercorn.RawData(REQUEST))
    assert called == ["handle_events", "check_protocol", "create_stream"], moved(
        f"H11Protocol's hooks were called as {called}"
    )
    updates = [event.idle for event in sent if isinstance(event, _hypercorn.Updated)]
    assert updates == [False, True], moved(f"H11Protocol sent Updated(idle=...) as {updates}")
    assert idle_in_last_send == [True], moved("H11Protocol no longer recycles in the last send")
    written = b"".join(e.data for e in sent if isinstance(e, _hypercorn.RawData))
    assert written.startswith(b"HTTP/1.1 200 \r\n") and b"\r\nok\r\n" in written, written
    assert protocol.connection.our_state is h11.IDLE, moved("the connection was not recycled")


async def test_a_stream_of_our_own_and_a_fresh_connection_take_the_next_request() -> None:
    """The protocol reads `self.stream` and `self.connection` afresh: a stream adopted
    gets the request's body (fastpath.py), and after `next_cycle` the request the client
    sent behind the first is read from the fresh connection (http1.respond)."""
    from modelpool.http import _hypercorn

    received: list[Any] = []
    requests: list[bytes] = []

    class OwnStream:
        async def handle(self, event: Any) -> None:
            received.append(type(event).__name__)

    async def run() -> None:
        pass

    class Probe(_hypercorn.H11Protocol):
        async def create_stream(self, request: h11.Request) -> None:
            requests.append(request.target)
            await self.adopt_stream(OwnStream(), run)

    post = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    sent: list[Any] = []
    async with _hypercorn.TaskGroup() as task_group:
        protocol = new_protocol(Probe, None, task_group, sent)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(protocol.handle, _hypercorn.RawData(post + REQUEST))
            await trio.testing.wait_all_tasks_blocked()
            assert requests == [b"/a"] and received == ["Body", "EndBody"], moved(
                f"an adopted stream got {received} for {requests}"
            )
            assert protocol.keep_alive_requests == 1, moved("adopt_stream's count")
            protocol.connection.send(h11.Response(status_code=204, headers=[]))
            protocol.connection.send(h11.EndOfMessage())
            await protocol.next_cycle()  # the reading task, paused, goes on with it
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # a reading task still waiting is stuck
        assert requests == [b"/a", b"/"], moved(f"after next_cycle, requests {requests}")
    updates = [event.idle for event in sent if isinstance(event, _hypercorn.Updated)]
    assert updates == [False, True, False], moved(f"Updated(idle=...) as {updates}")


async def test_h11_events_are_framed_and_a_stream_is_closed_by_the_helpers() -> None:
    from modelpool.http import _hypercorn

    received: list[Any] = []

    class OwnStream:
        async def handle(self, event: Any) -> None:
            received.append(event)

    async def run() -> None:
        pass

    sent: list[Any] = []
    async with _hypercorn.TaskGroup() as task_group:
        protocol = new_protocol(_hypercorn.H11Protocol, None, task_group, sent)
        protocol.connection.receive_data(REQUEST)
        protocol.connection.next_event()
        await protocol.adopt_stream(OwnStream(), run)
        await protocol.send_h11_event(h11.Response(status_code=204, headers=[]))
        await protocol.close_stream()
    assert [bytes(e.data[:12]) for e in sent] == [b"HTTP/1.1 204"], moved("_send_h11_event")
    assert [type(e) for e in received] == [_hypercorn.StreamClosed], moved("_close_stream")
    assert protocol.stream is None, moved("_close_stream keeps the stream")


async def test_a_response_goes_through_stream_send_and_closes_an_unfinished_request() -> None:
    """hypercorn's ASGI stream hands the start of a response to the protocol's
    `stream_send` as a `Response` (http1.py adds `Connection: close` there), and closes
    the connection after a response sent before the request was read to its end."""
    from modelpool.http import _hypercorn

    seen: list[Any] = []
    sent: list[Any] = []

    class Probe(_hypercorn.H11Protocol):
        async def stream_send(self, event: Any) -> None:
            seen.append(event)
            await super().stream_send(event)

    wrapped = _hypercorn.wrap_app(answer_ok, 2**20, "asgi")
    head = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n"
    async with _hypercorn.TaskGroup() as task_group:
        protocol = new_protocol(Probe, wrapped, task_group, sent)
        await protocol.handle(_hypercorn.RawData(head))  # its body never comes
        await trio.testing.wait_all_tasks_blocked()
    starts = [event for event in seen if isinstance(event, _hypercorn.Response)]
    assert [event.status_code for event in starts] == [200], moved(f"stream_send got {seen}")
    assert any(isinstance(event, _hypercorn.Closed) for event in sent), moved(
        "a response to a request not read to its end no longer closes the connection"
    )


async def test_the_connections_hooks_are_called_by_hypercorns_own_run() -> None:
    """hypercorn's TCPServer calls the seam's `read_data` and `close_socket` (its run, and
    its protocol_send on Closed), and `initiate_server_close` closes the socket."""
    from modelpool.http import _hypercorn

    called: list[str] = []

    class Probe(_hypercorn.TCPServer):
        async def read_data(self) -> None:
            called.append("read_data")
            await super().read_data()

        async def close_socket(self) -> None:
            called.append("close_socket")
            await super().close_socket()

    config = hypercorn.config.Config()
    config.keep_alive_timeout = 0.01  # hypercorn's run waits for its idle timer to end
    ours, theirs = trio.socket.socketpair()
    with theirs:
        stream = trio.SocketStream(ours)
        server = Probe(None, config, _hypercorn.WorkerContext(None), {}, stream)
        theirs.close()  # the client hangs up at once
        with trio.fail_after(5):
            await server.run()  # hypercorn's own
        assert called == ["read_data", "close_socket"], moved(f"TCPServer's hooks: {called}")
    ours, theirs = trio.socket.socketpair()
    with theirs:
        stream = trio.SocketStream(ours)
        server = Probe(None, hypercorn.config.Config(), _hypercorn.WorkerContext(None), {}, stream)
        async with _hypercorn.TaskGroup() as task_group:
            server.use_protocol(new_protocol(task_group=task_group), task_group)
            await server.protocol_send(_hypercorn.Closed())
            assert called[2:] == ["close_socket"], moved("protocol_send(Closed()) calls _close")
        ours, theirs2 = trio.socket.socketpair()
        with theirs2:
            server.stream = server.socket_stream = trio.SocketStream(ours)
            server.use_protocol(new_protocol(task_group=None), None)
            await server.initiate_server_close()
            assert ours.fileno() == -1, moved("_initiate_server_close leaves the socket open")


async def test_a_lifespan_and_a_worker_context_behave_as_worker_serve_uses_them() -> None:
    from modelpool.http import _hypercorn

    events: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            events.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    config = hypercorn.config.Config()
    lifespan = _hypercorn.Lifespan(_hypercorn.wrap_app(app, 2**20, "asgi"), config, {})
    context = _hypercorn.WorkerContext(None)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            await lifespan.wait_for_shutdown()
    assert events == ["lifespan.startup", "lifespan.shutdown"], moved(f"Lifespan: {events}")
    assert not context.terminated.is_set()
    await context.terminated.set()
    assert context.terminated.is_set(), moved("WorkerContext.terminated")
    await context.mark_request()
    with trio.fail_after(1):
        await context.terminated.wait()
    address = _hypercorn.repr_socket_addr(2, ("127.0.0.1", 8000))  # AF_INET
    assert address == "127.0.0.1:8000", moved(f"repr_socket_addr gives {address}")


async def test_quart_tells_the_methods_a_path_allows() -> None:
    from quart_trio import QuartTrio

    from modelpool.http._quart import allowed_methods

    app = QuartTrio("seams")

    @app.post("/predict")
    async def predict() -> str:
        return "ok"

    message = "quart: request_ctx.url_adapter.allowed_methods(), in http/_quart.py"
    async with app.test_request_context("/predict", method="OPTIONS"):
        assert allowed_methods() == ["OPTIONS", "POST"], message
    async with app.test_request_context("/other", method="OPTIONS"):
        assert allowed_methods() == [], message


async def test_a_closed_trio_stream_gives_the_closed_descriptor() -> None:
    from modelpool.core._trio import CLOSED

    message = "trio {}: a closed {} no longer gives fileno() -1; core/_trio.py assumes it"
    version = importlib.metadata.version("trio")
    read, write = os.pipe()
    os.close(write)
    pipe = trio.lowlevel.FdStream(read)
    assert pipe.fileno() == read
    await pipe.aclose()
    assert pipe.fileno() == CLOSED, message.format(version, "FdStream")
    ours, theirs = trio.socket.socketpair()
    with theirs:
        stream = trio.SocketStream(ours)
        await stream.aclose()
        assert stream.socket.fileno() == CLOSED, message.format(version, "SocketStream's socket")


def test_only_the_seams_reach_into_quart_and_hypercorn() -> None:
    """quart's documented API is what `from quart import ...` (and quart_trio's) gives; its
    modules (`quart.globals`, ...) are its internals, and so are all of hypercorn's: only
    the seams import them. (import-linter checks hypercorn's too, in `nox -s lint`.)"""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "src" / "modelpool"
    internal = re.compile(r"^\s*(from|import) (quart\.|quart_trio\.|hypercorn)", re.MULTILINE)
    seams = {package / "http" / "_quart.py", package / "http" / "_hypercorn.py"}
    reaching = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path not in seams and internal.search(path.read_text())
    ]
    assert reaching == [], f"{reaching} import quart's or hypercorn's internals: use a seam"
