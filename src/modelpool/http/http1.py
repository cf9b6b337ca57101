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
"""

from __future__ import annotations

import contextlib
import json
import logging

import h2.config
import h2.connection
import h2.errors
import h11
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol

from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from

log = logging.getLogger("modelpool.http")

REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
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
    """hypercorn's HTTP/1.1 protocol, never turning into HTTP/2, and refusing ambiguous
    requests (see the module docstring)."""

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
            (b"connection", b"close"),
            (REQUEST_ID, request_id.encode()),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=data))
        await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())
