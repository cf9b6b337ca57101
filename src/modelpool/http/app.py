"""The HTTP face of the pool: POST /predict, plus /healthz, /readyz, /status, /metrics and
the live status page at /.

Everything a client can get wrong is answered here, before a model is involved, and
every answer, error or not, is a JSON object. Every response carries the request's id
in `X-Request-ID` (the client's own, if it sent a sane one), and every error body
carries it as `request_id`, so a failed request can be found in the log. Without an API
key, a request whose Host or Origin is not the service's own is refused (403) before
anything else is looked at: origins.py says why and which.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from modelpool.core import logs
from modelpool.core.asks import (
    PRIORITY_HEADER,
    TIMEOUT_HEADER,
    request_priority,
    request_timeout,
)
from modelpool.core.codec import Answer, parse_request
from modelpool.core.errors import BadRequest, ModelFailed, PoolError, UnknownModel
from modelpool.core.job import Timing
from modelpool.core.requestid import REQUEST_ID_HEADER, request_id_from
from modelpool.http._quart import allowed_methods
from modelpool.http.admin import add_admin_routes
from modelpool.http.auth import ApiKey
from modelpool.http.connections import Connections
from modelpool.http.origins import Origins
from modelpool.pool.fleet import Fleet
from modelpool.settings.config import ServerConfig

log = logging.getLogger("modelpool.http")
access_log = logging.getLogger("modelpool.access")
STATUS_PAGE = resources.files("modelpool.http").joinpath("status.html").read_bytes()

RETRY_AFTER_SECONDS = "1"


def json_body(body: dict[str, Any]) -> bytes:
    """An answer's body: one JSON object and a newline (what fastpath.py sends too); a
    model's result as its model wrote it, where that is standard JSON (codec.Answer)."""
    if type(body) is Answer and body.raw is not None:
        return body.raw
    return (json.dumps(body) + "\n").encode()


def json_response(status: int, body: dict[str, Any], **headers: str) -> Response:
    response = Response(json_body(body), status=status, content_type="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


class ModelpoolApp(QuartTrio):
    """The app, whose answers to OPTIONS are JSON too."""

    async def make_default_options_response(self) -> Response:
        """The methods the path allows, in `Allow` and in the body."""
        methods = allowed_methods()
        return json_response(200, {"allow": methods}, Allow=", ".join(methods))


def create_app(
    fleet: Fleet,
    config: ServerConfig,
    connections: Connections | None = None,
    *,
    origins: Origins | None,
) -> QuartTrio:
    """The app for the models of `fleet` (one, or several by name: POST /predict asks
    the default one); `origins` judges each request's Host and Origin
    (origins.guard_for: None when an API key is set)."""
    app = ModelpoolApp("modelpool")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = config.body_timeout
    api_key = None if config.api_key is None else ApiKey(config.api_key)

    @app.before_request
    async def identify_and_authorize() -> Response | None:
        g.started = time.perf_counter()
        g.timing = None
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        logs.set_field("request_id", g.request_id)
        if origins is not None and (why := refusal(origins)) is not None:
            log.warning(
                "refused %s %s from %s: %s", request.method, request.path, request.remote_addr, why
            )
            body = {"error": "forbidden", "detail": why, "request_id": g.request_id}
            return json_response(403, body)
        if api_key is not None and not api_key.allows(
            request.path, request.headers.get("Authorization")
        ):
            return json_response(
                401,
                {"error": "unauthorized", "request_id": g.request_id},
                WWW_Authenticate='Bearer realm="modelpool"',
            )
        return None

    @app.after_request
    async def tag(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
        if fleet.closing:
            response.headers["Connection"] = "close"  # so clients stop sending on it
        if config.access_log:
            started = g.get("started", time.perf_counter())
            client, method, path = request.remote_addr, request.method, request.path
            log_access(client, method, path, response.status_code, g.get("timing"), started)
        return response

    @app.post("/predict")
    async def predict() -> Response:
        return await predict_with(None)

    @app.post("/models/<name>/predict")
    async def predict_model(name: str) -> Response:
        return await predict_with(name)

    async def predict_with(name: str | None) -> Response:
        """The body is read first, whatever follows (an answer before it would leave it
        unread on the connection, which then could not be kept alive); then an unknown
        model is a 404, whatever the body; the model's pool is the one that serves it
        once the body is read (a change of its config swaps pools, see pool/changes.py)."""
        try:
            try:
                body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
                fleet.pool(name)
                value = parse_request(body)
                within = request_timeout(request.headers.get(TIMEOUT_HEADER))
                priority = request_priority(request.headers.get(PRIORITY_HEADER))
            except BadRequest:
                count_bad_request(name)
                raise
            model = fleet.pool(name)
            g.timing = Timing(priority=priority, deadline=within)
            result = await model.predict(
                value, g.request_id, g.timing, timeout=within, priority=priority
            )
        except PoolError as exc:
            exc.request_id = g.request_id
            return pool_error_response(exc, config.expose_model_stderr)
        return json_response(200, result)

    def count_bad_request(name: str | None) -> None:
        """A request refused before it reached its model's pool, counted in its metrics."""
        if (counted := fleet.pools.get(name or fleet.default_name)) is not None:
            counted.metrics.request_done(BadRequest.outcome, time.perf_counter() - g.started)

    @app.get("/models")
    async def models() -> Response:
        return json_response(200, {"default": fleet.default_name, "models": fleet.models()})

    @app.get("/models/<name>")
    async def model(name: str) -> Response:
        try:
            return json_response(200, fleet.describe(name))
        except UnknownModel as exc:
            exc.request_id = g.request_id
            return pool_error_response(exc)

    @app.get("/")
    async def status_page() -> Response:
        return Response(STATUS_PAGE, content_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = fleet.exposition(request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        health = fleet.health()
        return json_response(health.http_status, health.body())

    @app.get("/readyz")
    async def readyz() -> Response:
        status = fleet.status()
        ready = status["ready"] > 0 and not status["shutting_down"]
        body = {key: status[key] for key in ("ready", "size", "queue", "shutting_down")}
        if (unavailable := fleet.default.queue.unavailable) is not None:
            ready, body["detail"] = False, unavailable  # a request would get 503
        return json_response(200 if ready else 503, body)

    @app.get("/status")
    async def status() -> Response:
        body = fleet.status()
        if connections is not None:
            body["connections"] = {
                "open": connections.open,
                "limit": connections.limit,
                "evicted_idle": connections.evicted,
            }
        return json_response(200, body)

    add_admin_routes(app, fleet, api_key is not None, json_response)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        body = http_error_body(exc, config.max_body)
        name = (request.view_args or {}).get("name")
        if code in (408, 413) and request.path in ("/predict", f"/models/{name}/predict"):
            count_bad_request(name)
        body["request_id"] = g.get("request_id")
        response = json_response(code, body)
        allow = dict(exc.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        body = internal_error_body(g.get("request_id"), request.method, request.path)
        return json_response(500, body)

    return app


def refusal(origins: Origins) -> str | None:
    """Why `origins` refuses the request being handled, or None."""
    headers = request.headers
    return origins.refusal(request.method, headers.get("Host"), headers.get("Origin"))


def http_error_body(exc: HTTPException, max_body: int) -> dict[str, Any]:
    """The body of an HTTP-level refusal (405, 408, 413, ...), without its request_id."""
    if (exc.code or 500) == 413:
        return {"error": "request body too large", "max_body": max_body}
    return {"error": (exc.name or "error").lower()}


def internal_error_body(request_id: str | None, method: str, path: str) -> dict[str, Any]:
    """Log the exception being handled, and the body of the 500 that answers it."""
    log.exception("request %s: unhandled error in %s %s", request_id, method, path)
    return {"error": "internal error", "request_id": request_id}


def log_access(
    client: str | None, method: str, path: str, status: int, timing: Timing | None, started: float
) -> None:
    """One line of the access log (logger modelpool.access): the request and its timings;
    `started` is the perf_counter() of its arrival."""
    timing = timing or Timing()
    total = time.perf_counter() - started
    client = client or "-"
    access_log.info(
        '%s "%s %s" %d queue=%s compute=%s total=%.3fs worker=%s pid=%s priority=%s deadline=%s',
        client,
        method,
        path,
        status,
        _seconds(timing.queue_wait),
        _seconds(timing.compute),
        total,
        "-" if timing.worker is None else timing.worker,
        "-" if timing.pid is None else timing.pid,
        timing.priority or "-",
        _seconds(timing.deadline),
        extra={
            "client": client,
            "method": method,
            "path": path,
            "status": status,
            "queue_wait": timing.queue_wait,
            "compute": timing.compute,
            "total": round(total, 6),
            "worker": timing.worker,
            "pid": timing.pid,
            "priority": timing.priority,
            "deadline": timing.deadline,
        },
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def pool_error_response(exc: PoolError, expose_stderr: bool = False) -> Response:
    status, body, headers = pool_error_answer(exc, expose_stderr)
    return json_response(status, body, **headers)


def pool_error_answer(
    exc: PoolError, expose_stderr: bool = False
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """What answers a PoolError: status, body, and extra headers (as json_response takes them).

    The status and the retry come from the error's class (core/errors.py), so a subclass
    is answered as its parent is."""
    body = exc.payload(expose_stderr) if isinstance(exc, ModelFailed) else exc.payload()
    retry = RETRY_AFTER_SECONDS if exc.retry_after is None else str(exc.retry_after)
    headers = {"Retry_After": retry} if exc.retry_later else {}
    return exc.status, body, headers
