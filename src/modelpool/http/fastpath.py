"""`POST /predict` answered on the connection itself, beside hypercorn's ASGI streams.

A prediction is the one request that comes by the thousand. Through ASGI each one costs,
before and after the app's handler: a scope, a task with a message queue of its own,
hypercorn's stream state machine, its header checks, and a socket write for the status
line, another for the body and a third for the end; and through quart a request object,
its headers as a werkzeug `Headers`, an app and a request context, `g`, the
before/after hooks, and a task to read the body beside the handler's.

Here hypercorn's HTTP/1.1 protocol (http1.py) hands a `POST /predict` it has parsed to a
`PredictStream` instead of an ASGI stream: one task per request that waits for the body,
asks the pool, and writes the whole answer in one write (framed as h11 frames it, see
`HTTP11Protocol.respond`). What a client or operator sees is what the quart app (app.py) gives,
made by app.py's own pieces: the request id (requestid.py), the API key check
(auth.py), the bodies and statuses of errors (`pool_error_answer`, `http_error_body`,
`internal_error_body`), `Connection: close` while the pool drains, the metrics, and the
access log line (`log_access`), written, as quart's after-request hook writes it,
before the answer is sent. tests/test_fastpath.py compares both, byte for byte.

Only what can be answered without quart is taken (`Predictions.stream_for`); everything
else goes to hypercorn's ASGI stream and the quart app untouched, before a byte of its
body has been read: other paths and methods (405, OPTIONS, HEAD), a request the API key
refuses (401: quart answers it without reading the body), one with a Host or an Origin
that is not the service's (403, see origins.py), a Content-Length over
--max-body-bytes (413 at once), a chunked body (which may grow past the limit as it
comes: quart answers 413 while it reads on, which is what lets the connection go on), a
root path or server names (hypercorn's own checks). A body that takes longer than
--body-timeout gets the same 408 here, counted in the metrics as quart's handler counts
it; what more of it comes is read and dropped meanwhile, and the connection is then
closed, as after quart's 408.

As with quart-trio, a client that hangs up while its request waits or computes cancels
it (the pool counts it as `client_gone`), and nothing is sent or logged for it.

`--no-fast-predict` (ServerConfig.fast_predict, MODELPOOL_FAST_PREDICT=0) turns this off:
every request then goes through quart, and the HTTP tests run against both paths.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import trio
from werkzeug.exceptions import HTTPException, RequestTimeout

from modelpool.core import logs
from modelpool.core.asks import PRIORITY_HEADER, TIMEOUT_HEADER, request_priority, request_timeout
from modelpool.core.codec import parse_request
from modelpool.core.errors import BadRequest, PoolError
from modelpool.core.job import Timing
from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from
from modelpool.http._hypercorn import Body, EndBody, StreamClosed
from modelpool.http.app import (
    http_error_body,
    internal_error_body,
    json_body,
    log_access,
    pool_error_answer,
)
from modelpool.http.auth import ApiKey
from modelpool.http.origins import Origins
from modelpool.pool.fleet import Fleet
from modelpool.settings.config import ServerConfig

if TYPE_CHECKING:
    import h11

    from modelpool.http._hypercorn import StreamEvent
    from modelpool.http.connections import Connection

PATH = "/predict"
TARGET = PATH.encode()
REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
TIMEOUT = TIMEOUT_HEADER.lower().encode()
PRIORITY = PRIORITY_HEADER.lower().encode()
CONTENT_TYPE = (b"content-type", b"application/json")
CLOSE = (b"connection", b"close")

Headers = list[tuple[bytes, bytes]]


class Responder(Protocol):
    """What a PredictStream needs of its connection's protocol (http1.HTTP11Protocol)."""

    async def respond(self, status: int, headers: Headers, body: bytes, keep_alive: bool) -> None:
        """Write the whole answer at once, and end the request (the connection goes on
        to the next one, or closes); `keep_alive`: the request allows it to go on."""


class Predictions:
    """The service's side of the fast path: which requests it takes, and their answers."""

    def __init__(self, fleet: Fleet, config: ServerConfig, origins: Origins | None) -> None:
        self._fleet = fleet  # its default model's pool, looked up per request: it may change
        self._config = config
        self._api_key = None if config.api_key is None else ApiKey(config.api_key)
        self._origins = origins  # as the app's (origins.guard_for)

    def stream_for(
        self,
        request: h11.Request,
        responder: Responder,
        connection: Connection,
        client: tuple[str, int] | None,
    ) -> PredictStream | None:
        """A stream for `request` if this path answers it, else None (quart will)."""
        if request.method != b"POST" or request.target.partition(b"?")[0] != TARGET:
            return None
        request_id = authorization = length = host = origin = within = priority = None
        keep_alive = request.http_version == b"1.1"  # as h11 decides it
        for name, value in request.headers:  # h11 gives the names in lower case
            if name == b"content-length":
                length = value
            elif name == b"connection" and b"close" in _tokens(value):
                keep_alive = False
            elif name == REQUEST_ID:
                request_id = request_id if request_id is not None else value
            elif name == b"authorization":
                authorization = authorization if authorization is not None else value
            elif name == b"host":
                host = host if host is not None else value
            elif name == b"origin":
                origin = origin if origin is not None else value
            elif name == TIMEOUT:
                within = within if within is not None else value
            elif name == PRIORITY:
                priority = priority if priority is not None else value
        # quart answers these: a chunked body (which may grow past the limit as it comes),
        # a Content-Length over the limit (413), a request the API key refuses (401), a
        # Host or an Origin not the service's (403)
        if length is None or int(length) > self._config.max_body:
            return None
        origins = self._origins
        if origins is not None and origins.refusal("POST", _text(host), _text(origin)):
            return None
        if self._api_key is not None:
            header = None if authorization is None else authorization.decode("latin-1")
            if not self._api_key.allows(PATH, header):
                return None
        client_id = None if request_id is None else request_id.decode("latin-1")
        stream = PredictStream(self, responder, connection, client, client_id, keep_alive)
        stream.asks = (_text(within), _text(priority))
        return stream

    async def answer(self, stream: PredictStream) -> tuple[int, Headers, bytes]:
        """The status, headers and body that answer `stream`'s request; the access log
        line is written here, before they are sent."""
        started = stream.started
        request_id = request_id_from(stream.client_id)
        logs.set_field("request_id", request_id)
        timing: Timing | None = None
        extra: dict[str, str] = {}
        try:
            try:
                value = parse_request(await stream.body(self._config.body_timeout))
                within, priority = request_timeout(stream.asks[0]), request_priority(stream.asks[1])
            except (BadRequest, HTTPException):
                took = time.perf_counter() - started
                self._fleet.default.metrics.request_done(BadRequest.outcome, took)
                raise
            timing = Timing(priority=priority, deadline=within)
            status, answer = (
                200,
                await self._fleet.default.predict(
                    value, request_id, timing, timeout=within, priority=priority
                ),
            )
        except PoolError as exc:
            exc.request_id = request_id
            status, answer, extra = pool_error_answer(exc, self._config.expose_model_stderr)
        except HTTPException as exc:  # 408: the body has not come to its end
            status = exc.code or 500
            answer = {**http_error_body(exc, self._config.max_body), "request_id": request_id}
        except Exception:
            status, answer = 500, internal_error_body(request_id, "POST", PATH)
        data = json_body(answer)
        headers = [CONTENT_TYPE, (b"content-length", b"%d" % len(data))]
        headers += [
            (name.replace("_", "-").lower().encode(), v.encode()) for name, v in extra.items()
        ]
        headers.append((REQUEST_ID, request_id.encode()))
        if self._fleet.closing:
            headers.append(CLOSE)  # so clients stop sending on it
        if self._config.access_log:
            client = stream.client
            log_access(None if client is None else client[0], "POST", PATH, status, timing, started)
        return status, headers, data


class PredictStream:
    """One `POST /predict` on a connection: the protocol feeds it the body as it comes
    (`handle`, as it feeds hypercorn's streams), and its task (`run`) answers it.

    Its client hanging up (StreamClosed before the answer) cancels the request.
    """

    def __init__(
        self,
        predictions: Predictions,
        responder: Responder,
        connection: Connection,
        client: tuple[str, int] | None,
        client_id: str | None,
        keep_alive: bool,
    ) -> None:
        self.started = time.perf_counter()
        self.keep_alive = keep_alive
        self.client = client
        self.client_id = client_id
        self.asks: tuple[str | None, str | None] = (None, None)  # its timeout and priority
        self._predictions = predictions
        self._responder = responder
        self._connection = connection
        self._chunks: list[bytes] = []
        self._complete = False
        self._arrived: trio.Event | None = None  # made only if the task waits for the body
        self._answering = False
        self._scope = trio.CancelScope()

    async def handle(self, event: StreamEvent) -> None:
        """An event of the request from the protocol: body, its end, or the connection's."""
        if isinstance(event, Body):
            if not self._complete:
                self._chunks.append(bytes(event.data))
        elif isinstance(event, EndBody):
            self._complete = True
            if self._arrived is not None:
                self._arrived.set()
        elif isinstance(event, StreamClosed) and not self._answering:
            self._scope.cancel()  # the client has gone: nothing is to be sent

    async def body(self, within: float) -> bytes:
        """The whole body, once it has come; RequestTimeout if not `within` seconds."""
        if not self._complete:
            self._arrived = trio.Event()
            with trio.move_on_after(within):
                await self._arrived.wait()
            if not self._complete:
                self._complete = True  # what more comes is dropped
                raise RequestTimeout()
        return b"".join(self._chunks)

    async def run(self) -> None:
        """Answer the request, unless its client goes first."""
        connection = self._connection
        connection.requests += 1
        try:
            with self._scope:
                status, headers, data = await self._predictions.answer(self)
                self._answering = True
            if not self._answering:
                return
            # Not cancelled half-way: what of it cannot be written at once is written
            # shielded (listener.PromptTCPServer), and nothing else in it waits.
            await self._responder.respond(status, headers, data, self.keep_alive)
        finally:
            connection.requests -= 1
            connection.last_active = trio.current_time()


def _text(value: bytes | None) -> str | None:
    """A header's value as quart reads it (Latin-1), or None if it was not sent."""
    return None if value is None else value.decode("latin-1")


def _tokens(value: bytes) -> list[bytes]:
    """A comma-separated header's tokens, in lower case (as h11 reads `Connection`)."""
    return [token.strip() for token in value.lower().split(b",")]
