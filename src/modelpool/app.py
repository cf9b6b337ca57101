"""The HTTP face of the pool: POST /predict, plus /healthz, /readyz and /status.

Everything a client can get wrong is answered here, before a model is involved, and
every answer, error or not, is a JSON object.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .errors import (
    BadRequest,
    ModelFailed,
    ModelTimeout,
    PoolError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from .pool import Pool

log = logging.getLogger("modelpool.http")

RETRY_AFTER_SECONDS = "1"
STATUS_OF: dict[type[PoolError], int] = {
    BadRequest: 400,
    QueueFull: 503,
    QueueTimeout: 503,
    ShuttingDown: 503,
    ModelTimeout: 504,
    ModelFailed: 502,
}


def json_response(status: int, body: dict[str, Any], **headers: str) -> Response:
    text = json.dumps(body) + "\n"
    response = Response(text, status=status, content_type="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def parse_body(body: bytes) -> Any:
    """The request's JSON value; raises BadRequest with a reason a person can act on."""
    if not body.strip():
        raise BadRequest('empty body: send one JSON value, e.g. {"data": 2}')
    try:
        return json.loads(body, strict=False, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def create_app(pool: Pool, max_body: int) -> QuartTrio:
    app = QuartTrio("modelpool")
    app.config["MAX_CONTENT_LENGTH"] = max_body

    @app.post("/predict")
    async def predict() -> Response:
        try:
            value = parse_body(await request.get_data(cache=False))
            result = await pool.predict(value)
        except PoolError as exc:
            return pool_error_response(exc)
        return json_response(200, result)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(200, {"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        status = pool.status()
        ready = status["ready"] > 0 and not status["shutting_down"]
        body = {key: status[key] for key in ("ready", "size", "queue", "shutting_down")}
        return json_response(200 if ready else 503, body)

    @app.get("/status")
    async def status() -> Response:
        return json_response(200, pool.status())

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        body: dict[str, Any] = {"error": (exc.name or "error").lower()}
        if code == 413:
            body = {"error": "request body too large", "max_body": max_body}
        response = json_response(code, body)
        allow = dict(exc.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response(500, {"error": "internal error"})

    return app


def pool_error_response(exc: PoolError) -> Response:
    status = STATUS_OF.get(type(exc), 500)
    if isinstance(exc, (QueueFull, QueueTimeout)):
        return json_response(status, exc.payload(), Retry_After=RETRY_AFTER_SECONDS)
    return json_response(status, exc.payload())
