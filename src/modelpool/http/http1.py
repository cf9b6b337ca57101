"""HTTP/1.1 only: hypercorn's HTTP/1.1 protocol, without its two switches to cleartext
HTTP/2, and refusing requests whose framing is ambiguous.

hypercorn answers `Upgrade: h2c` with 101 and a client that opens with the HTTP/2 preface
(prior knowledge) in HTTP/2, on any plain-HTTP port. The service does not offer h2c:

- no browser speaks it, and the clients of a loopback inference service (curl, requests,
  httpx, and the proxies that may stand in front) speak HTTP/1.1 by default. uvicorn
  speaks no HTTP/2; gunicorn has offered h2c since 26.2, off by default and then only
  to trusted proxies ("do not expose a cleartext HTTP/2 port"). The one client that
  would want it, a proxy speaking HTTP/2 upstream, can speak HTTP/1.1 as well;
- one HTTP/2 connection carries many requests at once, past `max_connections`;
- hypercorn's HTTP/2 holds a response until the peer opens its flow-control window, and
  forgets it when the peer goes: a client that never opens the window held its
  connection, and the shutdown, for ever.

So `Upgrade: h2c` is ignored, as RFC 9110 section 7.8 allows, and the request is answered
in HTTP/1.1. The HTTP/2 preface is answered with an HTTP/2 GOAWAY frame whose error
code is HTTP_1_1_REQUIRED (RFC 9113 section 7), which HTTP/2 clients report as such
(curl: "received GOAWAY, error=13"), and the connection is closed at once.

A request with both Content-Length and Transfer-Encoding may be an attempt at request
smuggling (RFC 9112 section 6.1): it is refused here, as it is read, with a JSON 400 and
the connection closed; neither its body nor anything after it is read as a request.
Answering it from the app instead raced with hypercorn, which, reading on, saw the next
request after a response saying `Connection: close` and closed the connection under it.

A request that h11 cannot parse (`Content-Length: +7`, a NUL in a header, headers over
the limit) is answered in JSON with a request id, as every other error is, where hypercorn
sends a bare 400 (or 431) with an empty body (`handle_events`).

Once a request that closes the connection (`Connection: close`, HTTP/1.0) has been read,
what the client sends after it is not read as a request: it is dropped, and the request
gets its own answer. hypercorn handed those bytes to h11, which refused them (a peer in
MUST_CLOSE may send nothing more), and answered a bare 400 while the request was cancelled.

A `POST /predict` that fastpath.py can answer gets a `PredictStream` in place of
hypercorn's ASGI stream, and its answer is written whole, in one write (`respond`).

How each request's body arrives is kept on its connection (`Connection.body`): at the
connection limit, one whose body arrives below --min-body-rate is the first to go, with a
408 from here (`time_out_body`, see bodyrate.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h11
import trio

from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from
from modelpool.http._hypercorn import (
    STREAM_ID,
    Body,
    Closed,
    EndBody,
    Event,
    H11Protocol,
    PassThrough,
    RawData,
    Response,
    StreamClosed,
    StreamEvent,
    Updated,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from modelpool.http.connections import Connection
    from modelpool.http.fastpath import Headers, Predictions

log = logging.getLogger("modelpool.http")

REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
CLOSE = (b"connection", b"close")
AMBIGUOUS_FRAMING = (
    "a request may not carry both Content-Length and Transfer-Encoding: send one of them"
)
SLOW_BODY = (
    "the request body came at less than %g bytes a second while the service was at its "
    "connection limit"
)


def _http_1_1_required() -> bytes:
    """A server's HTTP/2 connection preface (SETTINGS), then GOAWAY(HTTP_1_1_REQUIRED)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    connection.initiate_connection()
    connection.close_connection(
        error_code=h2.errors.ErrorCodes.HTTP_1_1_REQUIRED,
        additional_data=b"this service speaks HTTP/1.1 only",
    )
    return connection.data_to_send()


HTTP_1_1_REQUIRED = _http_1_1_required()


class RequestRefused(Exception):
    """The request has been answered here, and the connection closed."""


class HTTP11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, never turning into HTTP/2, refusing ambiguous
    requests, and giving the predictions fastpath.py answers to it (see the module
    docstring)."""

    def __init__(
        self,
        *args: Any,
        predictions: Predictions | None = None,
        connection: Connection | None = None,
    ) -> None:
        super().__init__(*args)
        self._predictions = predictions
        self._connection = connection
        self._client_id: str | None = None  # the X-Request-ID of the request being read

    async def create_stream(self, request: h11.Request) -> None:
        predictions, connection, config = self._predictions, self._connection, self.config
        stream = None
        # a root path or server names: hypercorn's own checks, in its ASGI stream
        if predictions and connection and not config.root_path and not config.server_names:
            stream = predictions.stream_for(request, self, connection, self.client)
        if stream is None:
            await super().create_stream(request)
        else:
            await self.adopt_stream(stream, stream.run)

    async def respond(self, status: int, headers: Headers, body: bytes, keep_alive: bool) -> None:
        """A whole response in one write, as hypercorn would frame it (with its Date and
        Server headers, and `Connection: close` after keep_alive_max_requests); then the
        request's end, as hypercorn's stream would signal it. `keep_alive`: the request
        let the connection go on (HTTP/1.1, no `Connection: close`).

        The common case, a request read to its end on a connection that goes on, is
        framed here and the next request gets a fresh h11 connection with what came
        after this one (h11's framing of a response was a tenth of a prediction's time
        on the server); anything else is framed by h11 and recycled by hypercorn.
        """
        headers = [*headers, *self.config.response_headers("h11")]
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            headers.append(CLOSE)
        connection = self.connection
        if (
            keep_alive
            and connection.their_state is h11.DONE
            and connection.our_state is h11.SEND_RESPONSE
            and CLOSE not in headers
            and not self.context.terminated.is_set()
        ):
            head = b"".join([b"%s: %s\r\n" % header for header in headers])
            await self.send(RawData(data=b"HTTP/1.1 %d \r\n%s\r\n%s" % (status, head, body)))
            await self.next_cycle()
            return
        try:
            data = connection.send(h11.Response(status_code=status, headers=headers))
            data += connection.send(h11.Data(data=body))
            data += connection.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            if connection.their_state != h11.ERROR:
                raise
        else:
            await self.send(RawData(data=data))
        await self.stream_send(StreamClosed(stream_id=STREAM_ID))

    async def stream_send(self, event: StreamEvent) -> None:
        """hypercorn's, but a response sent before its request was read to its end (a
        refusal that does not read the body: 413, 401, 403, 415) says `Connection: close`.

        hypercorn closes the connection after such a response (it goes on to the next
        request only once both sides are done), and a client not told so sent its next
        request on the connection, to find it closed ("Server disconnected without
        sending a response", when the body came after the headers). A server that closes
        a connection after a response says so in it (RFC 9112 section 9.6).
        """
        if (
            isinstance(event, Response)
            and event.status_code >= 200
            and self.connection.their_state is h11.SEND_BODY  # not DONE, nor an Upgrade's
            and CLOSE not in event.headers
        ):
            event = dataclasses.replace(event, headers=[*event.headers, CLOSE])
        await super().stream_send(event)

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData) and self.connection.their_state is h11.MUST_CLOSE:
            return  # after a request that closes the connection: dropped, see the docstring
        with contextlib.suppress(RequestRefused):
            await super().handle(event)

    async def handle_events(self) -> None:
        """hypercorn's H11Protocol.handle_events, but: nothing is read after a request
        that closes the connection; a request h11 cannot parse is answered in JSON
        (`_malformed`); and the arrival of each request's body is kept on its connection."""
        body = None if self._connection is None else self._connection.body
        while True:
            connection = self.connection
            if connection.they_are_waiting_for_100_continue:
                await self.send_h11_event(
                    h11.InformationalResponse(
                        status_code=100, headers=self.config.response_headers("h11")
                    )
                )
            if connection.their_state is h11.MUST_CLOSE:
                break  # what came after it is dropped (`handle`)
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as error:
                if connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                    await self._malformed(error)
                await self.send(Closed())
                break
            if isinstance(event, h11.Request):
                self._client_id = _client_id(event.headers)
                if body is not None:
                    body.began(_now())
                await self.send(Updated(idle=False))
                await self.check_protocol(event)
                await self.create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
            elif (
                event is h11.NEED_DATA
                or isinstance(event, h11.ConnectionClosed)
                or self.stream is None  # a request refused as it was read
            ):
                break
            elif isinstance(event, h11.Data):
                if body is not None:
                    body.came(len(event.data))
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                if body is not None:
                    body.ended()
                await self.stream.handle(EndBody(stream_id=STREAM_ID))
            elif isinstance(event, PassThrough):  # a WebSocket's data, as hypercorn passes it
                await self.stream.handle(event)

    async def _malformed(self, error: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not parse: its status (400, 431), in JSON."""
        status = error.error_status_hint
        # h11's reason, without the bytes it quotes (a header line may be 16 KiB)
        detail = str(error).partition(": ")[0] or "malformed request"
        # its own id if the error is in its body; none can be read from broken headers
        mid_body = self.connection.our_state is h11.SEND_RESPONSE
        request_id = request_id_from(self._client_id if mid_body else None)
        log.info(
            "request %s from %s refused: %s",
            request_id,
            _client(self.client),
            detail,
        )
        await self._json_answer(status, HTTPStatus(status).phrase.lower(), detail, request_id)

    def slow_body(self) -> bool:
        """Whether the request being read has its body still to come, and nothing of its
        answer has been sent: what `time_out_body` answers with 408."""
        connection = self.connection
        return (
            self.stream is not None
            and connection.their_state is h11.SEND_BODY
            and connection.our_state is h11.SEND_RESPONSE
        )

    async def time_out_body(self, bytes_per_second: float) -> None:
        """The request's body arrives too slowly while the service is at its connection
        limit (bodyrate.py): the request is cancelled, as if its client had gone, and
        answered 408 in JSON, and the connection closes (with a lingering close, as any
        refusal before the end of a request). If its body has come meanwhile, or its
        answer has begun, the connection simply closes."""
        if not self.slow_body():
            await self.send(Closed())
            return
        request_id = request_id_from(self._client_id)
        log.info(
            "request %s from %s timed out: its body came too slowly at the connection limit",
            request_id,
            _client(self.client),
        )
        await self.close_stream()
        detail = SLOW_BODY % bytes_per_second
        await self._refuse(408, "request timeout", detail, request_id)

    async def check_protocol(self, event: h11.Request) -> None:
        # hypercorn's check switches to HTTP/2 here; `Upgrade: h2c` is simply not looked at.
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            await self.send(RawData(data=HTTP_1_1_REQUIRED))
            await self.send(Closed())
            raise RequestRefused()
        headers = dict(event.headers)  # h11 gives the names in lower case
        if b"content-length" in headers and b"transfer-encoding" in headers:
            request_id = request_id_from(self._client_id)
            log.info(
                "request %s from %s refused: both Content-Length and Transfer-Encoding",
                request_id,
                _client(self.client),
            )
            await self._refuse(400, "bad request", AMBIGUOUS_FRAMING, request_id)
            raise RequestRefused()

    async def _refuse(self, status: int, error: str, detail: str, request_id: str) -> None:
        """Answer the request in JSON, as the app would have, and close the connection."""
        await self._json_answer(status, error, detail, request_id)
        await self.send(Closed())

    async def _json_answer(self, status: int, error: str, detail: str, request_id: str) -> None:
        """An error answer in JSON, as the app's, saying that the connection closes."""
        body = json.dumps({"error": error, "detail": detail, "request_id": request_id})
        data = body.encode() + b"\n"
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            CLOSE,
            (REQUEST_ID, request_id.encode()),
            *self.config.response_headers("h11"),
        ]
        await self.send_h11_event(h11.Response(status_code=status, headers=headers))
        await self.send_h11_event(h11.Data(data=data))
        await self.send_h11_event(h11.EndOfMessage())


def _client_id(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The request's own X-Request-ID, if it sent one (the first)."""
    for name, value in headers:  # h11 gives the names in lower case
        if name == REQUEST_ID:
            return value.decode("latin-1")
    return None


def _client(client: tuple[str, int] | None) -> str:
    return "-" if client is None else f"{client[0]}:{client[1]}"


def _now() -> float:
    return trio.current_time()
