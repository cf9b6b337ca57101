"""`POST /predict` straight from ASGI, in front of the quart-trio app (app.py).

A prediction is the one request that comes by the thousand; through quart each one
builds a request object, its headers as a werkzeug `Headers`, an app and a request
context, `g`, runs the before/after hooks, and reads its body in a task of its own next
to the handler's. Here the same request is answered from the ASGI scope and messages
directly, with app.py's own pieces for everything a client or operator sees: the
request id (requestid.py), the API key check (auth.py), the bodies and statuses of
errors (`pool_error_answer`, `http_error_body`, `internal_error_body`), `Connection:
close` while the pool drains, and the access log line (`log_access`), written, as
quart's after-request hook writes it, before the answer is sent.

Only what can be answered without quart is answered here; everything else goes to the
quart app untouched, before a single message of it has been read: other paths and
methods (405, OPTIONS, HEAD), a request the API key refuses (401: quart answers it
without reading the body), a Content-Length over --max-body-bytes (413 at once), a
chunked body (which may grow past the limit as it comes: quart answers 413 while it
reads on, which is what lets the connection go on), and a root path. A body that takes
longer than --body-timeout gets the same 408 here, counted in the metrics as quart's
handler counts it, and what more of it comes is read meanwhile, as quart does.

As with quart-trio, a client that hangs up while its request waits or computes cancels
it (the pool counts it as `client_gone`), and nothing is sent or logged for it.

`MODELPOOL_FAST_PREDICT=0` in the service's environment turns this off (every request
then goes through quart, as before): read once, by `fast_predict_enabled`, so the test
suite can be run against both paths.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout

from modelpool.core import logs
from modelpool.core.codec import parse_request
from modelpool.core.errors import BadRequest, PoolError
from modelpool.core.job import Timing
from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from
from modelpool.http.app import (
    http_error_body,
    internal_error_body,
    json_body,
    log_access,
    pool_error_answer,
)
from modelpool.http.auth import ApiKey
from modelpool.pool.pool import Pool
from modelpool.settings.config import ServerConfig

FAST_PREDICT_VARIABLE = "MODELPOOL_FAST_PREDICT"
PATH = "/predict"
REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
CONTENT_TYPE = (b"content-type", b"application/json")
CLOSE = (b"connection", b"close")


def fast_predict_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether POST /predict takes this path: unless MODELPOOL_FAST_PREDICT is 0."""
    return environ.get(FAST_PREDICT_VARIABLE, "1").strip() != "0"


class ClientGone(Exception):
    """The client hung up before its request was answered: nothing is to be sent."""


class FastPredict:
    """The ASGI app the listener serves: POST /predict here, the rest to `app`."""

    def __init__(self, app: ASGIFramework, pool: Pool, config: ServerConfig) -> None:
        self._app = app
        self._pool = pool
        self._config = config
        self._api_key = None if config.api_key is None else ApiKey(config.api_key)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self._app(scope, receive, send)
            return
        request_id = authorization = length = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                request_id = request_id if request_id is not None else value
            elif name == b"authorization":
                authorization = authorization if authorization is not None else value
            elif name == b"content-length":
                length = value
        # quart answers these: a chunked body (which may grow past the limit as it comes),
        # a Content-Length over the limit (413), a request the API key refuses (401)
        if length is None or int(length) > self._config.max_body:
            await self._app(scope, receive, send)
            return
        if not self._authorized(authorization):
            await self._app(scope, receive, send)
            return
        await self._predict(scope, receive, send, request_id)

    def _authorized(self, authorization: bytes | None) -> bool:
        if self._api_key is None:
            return True
        header = None if authorization is None else authorization.decode("latin-1")
        return self._api_key.allows(PATH, header)

    async def _predict(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        client_id: bytes | None,
    ) -> None:
        started = time.perf_counter()
        request_id = request_id_from(None if client_id is None else client_id.decode("latin-1"))
        logs.set_field("request_id", request_id)
        timing: Timing | None = None
        extra: dict[str, str] = {}
        refused_mid_body = False
        try:
            try:
                body = await self._body(receive)
                value = parse_request(body)
            except (BadRequest, HTTPException):
                self._pool.metrics.request_done(BadRequest.outcome, time.perf_counter() - started)
                raise
            timing = Timing()
            status, answer = 200, await self._answer(receive, value, request_id, timing)
        except ClientGone:
            return
        except PoolError as exc:
            exc.request_id = request_id
            status, answer, extra = pool_error_answer(exc, self._config.expose_model_stderr)
        except HTTPException as exc:  # 408 (or 413): the body has not come to its end
            refused_mid_body = True
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
        if self._pool.closing:
            headers.append(CLOSE)  # so clients stop sending on it
        if self._config.access_log:
            client = scope.get("client")
            log_access(None if client is None else client[0], "POST", PATH, status, timing, started)
        if not refused_mid_body:
            await _send(send, status, headers, data)
            return
        # As quart does, what more of the body comes is read (and dropped) meanwhile.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await _send(send, status, headers, data)
            nursery.cancel_scope.cancel()

    async def _body(self, receive: ASGIReceiveCallable) -> bytes:
        """The whole body, within --body-timeout (408). Its Content-Length is within
        --max-body-bytes and h11 holds the body to it; the limit is checked anyway."""
        chunks = []
        size = 0
        with trio.move_on_after(self._config.body_timeout) as waiting:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._config.max_body:
                    raise RequestEntityTooLarge()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        assert waiting.cancelled_caught
        raise RequestTimeout()

    async def _answer(
        self, receive: ASGIReceiveCallable, value: Any, request_id: str, timing: Timing
    ) -> dict[str, Any]:
        """The pool's answer; ClientGone if the client hangs up first (which cancels it)."""
        answer: dict[str, Any] | None = None
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                answer = await self._pool.predict(value, request_id, timing)
            except Exception as exc:  # raised out here, not inside the nursery's group
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if answer is None:
            raise ClientGone()
        return answer


async def _send(
    send: ASGISendCallable, status: int, headers: list[tuple[bytes, bytes]], data: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _cancel_on_disconnect(receive: ASGIReceiveCallable, scope: trio.CancelScope) -> None:
    """Cancel `scope` once the client has hung up; what else comes (the rest of a body
    being refused) is dropped."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
