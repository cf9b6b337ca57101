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

A `POST /predict` that fastpath.py can answer gets a `PredictStream` in place of
hypercorn's ASGI stream, and its answer is written whole, in one write (`respond`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h11
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol

from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from

if TYPE_CHECKING:
    from modelpool.http.connections import Connection
    from modelpool.http.fastpath import Headers, Predictions

log = logging.getLogger("modelpool.http")

REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
CLOSE = (b"connection", b"close")
AMBIGUOUS_FRAMING = (
    "a request may not carry both Content-Length and Transfer-Encoding: send one of them"
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

    async def _create_stream(self, request: h11.Request) -> None:
        predictions, connection, config = self._predictions, self._connection, self.config
        stream = None
        # a root path or server names: hypercorn's own checks, in its ASGI stream
        if predictions and connection and not config.root_path and not config.server_names:
            stream = predictions.stream_for(request, self, connection, self.client)
        if stream is None:
            await super()._create_stream(request)
            return
        # hypercorn's streams have the same `handle`; its attribute's type names only them
        self.stream = stream  # type: ignore[assignment]
        self.task_group.spawn(stream.run)
        self.keep_alive_requests += 1
        await self.context.mark_request()

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
            await self._next_cycle()
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

    async def _next_cycle(self) -> None:
        """What hypercorn's recycling does after a response h11 framed, for one framed
        here: a fresh h11 connection, given what the client sent after this request."""
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

    async def handle(self, event: Event) -> None:
        with contextlib.suppress(RequestRefused):
            await super().handle(event)

    async def _check_protocol(self, event: h11.Request) -> None:
        # hypercorn's check switches to HTTP/2 here; `Upgrade: h2c` is simply not looked at.
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            await self.send(RawData(data=HTTP_1_1_REQUIRED))
            await self.send(Closed())
            raise RequestRefused()
        headers = dict(event.headers)  # h11 gives the names in lower case
        if b"content-length" in headers and b"transfer-encoding" in headers:
            client_id = headers.get(REQUEST_ID)
            request_id = request_id_from(None if client_id is None else client_id.decode("latin-1"))
            log.info(
                "request %s from %s refused: both Content-Length and Transfer-Encoding",
                request_id,
                "-" if self.client is None else f"{self.client[0]}:{self.client[1]}",
            )
            await self._refuse(400, "bad request", AMBIGUOUS_FRAMING, request_id)
            raise RequestRefused()

    async def _refuse(self, status: int, error: str, detail: str, request_id: str) -> None:
        """Answer the request in JSON, as the app would have, and close the connection."""
        body = json.dumps({"error": error, "detail": detail, "request_id": request_id})
        data = body.encode() + b"\n"
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            CLOSE,
            (REQUEST_ID, request_id.encode()),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=data))
        await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())
