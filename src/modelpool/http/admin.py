"""POST /admin/reload and /admin/scale: live operations over HTTP.

Who may ask: with an API key, whoever sends it (auth.py checks it before this runs);
without one, only clients on this machine (loopback addresses), as a service without
a key listens on loopback anyway unless told otherwise. A new model command is more
than an operation: it runs whatever it names as the service's user, so without a key
it is refused even from loopback (any local user could send it); a plain reload, which
runs the command the operator chose, is not. Every request must say its body is JSON
(`Content-Type: application/json`, even with no body), which a web page cannot say of a
request it sends to another origin without the browser asking first (a preflight, which
the service never grants): so a page of another origin cannot run an operation,
whether its browser sends `Origin` (see origins.py) or not. Every action is logged with
the address that asked and what it did. Each answer comes when the operation has
finished, with what happened to each worker; the operation itself runs in the pool, so
a client that hangs up does not stop it half-way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from modelpool.core.errors import UnknownModel
from modelpool.pool.fleet import Fleet
from modelpool.pool.operations import Busy, OperationFailed
from modelpool.settings.checks import ConfigError, is_loopback
from modelpool.settings.options import option
from modelpool.settings.pool_options import WORKERS

log = logging.getLogger("modelpool.admin")
NEEDS_KEY = "set --api-key to change the model command over HTTP"
JSON = "application/json"
NEEDS_JSON = f"send admin requests with Content-Type: {JSON} (a body, if any, is a JSON object)"


class AdminRequestError(ValueError):
    """The body of an admin request makes no sense."""


def add_admin_routes(
    app: QuartTrio, fleet: Fleet, api_key_set: bool, json_response: Callable[..., Response]
) -> None:
    """Each route's body may name a `"model"` (the default one's otherwise); with several
    models, a scale is of the slots (Fleet.scale_slots)."""

    def answer(status: int, body: dict[str, Any]) -> Response:
        return json_response(status, {**body, "request_id": g.get("request_id")})

    def refused() -> Response | None:
        address = request.remote_addr
        if api_key_set or (address is not None and is_loopback(address)):
            return None
        return forbidden("admin paths answer only loopback clients when no API key is set")

    def forbidden(detail: str) -> Response:
        log.warning(
            "admin: refused %s %s from %s (no API key set): %s",
            request.method,
            request.path,
            request.remote_addr,
            detail,
        )
        return answer(403, {"error": "forbidden", "detail": detail})

    async def body() -> dict[str, Any]:
        raw = await request.get_data(cache=False)
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise AdminRequestError(f"body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise AdminRequestError("body must be a JSON object")
        return value

    def route(
        what: str,
        read: Callable[[dict[str, Any]], Any],
        operation_of: Callable[[str | None], Any],
        key_only: Callable[[dict[str, Any]], str | None] = lambda options: None,
    ) -> None:
        """POST /admin/<what>: check who asks, read the body, run the operation, report.

        `key_only` names what in a body only a holder of the API key may ask for.
        """

        async def handle() -> Response:
            if (no := refused()) is not None:
                return no
            if request.mimetype != JSON:
                return answer(415, {"error": "unsupported media type", "detail": NEEDS_JSON})
            try:
                options = await body()
                model = _model(options)
                pool = fleet.pool(model)
                argument = read(options)
            except AdminRequestError as exc:
                return answer(400, {"error": "bad request", "detail": str(exc)})
            except UnknownModel as exc:
                return answer(404, exc.payload())
            if not api_key_set and (reason := key_only(options)) is not None:
                return forbidden(reason)
            who = request.remote_addr or "-"
            log.info("admin: %s asked by %s", what, who)
            if pool.closing:
                return answer(503, {"error": "shutting down"})
            try:
                operation = operation_of(model)
                if fleet.slots is not None and what == "scale":
                    report = await operation(argument)
                else:
                    report = await pool.operations.detached(operation, argument)
            except ValueError as exc:
                return answer(409, {"error": "not possible", "detail": str(exc)})
            except Busy as exc:
                log.warning("admin: %s asked by %s refused: %s", what, who, exc)
                return answer(409, {"error": "busy", "detail": str(exc)})
            except OperationFailed as exc:
                log.error("admin: %s asked by %s failed: %s", what, who, exc)
                return answer(502, {"error": f"{what} failed", "detail": str(exc), **exc.report})
            log.info("admin: %s asked by %s done: %s", what, who, json.dumps(report))
            return answer(200, {"status": "done", **report})

        app.add_url_rule(f"/admin/{what}", f"admin_{what}", handle, methods=["POST"])

    def scale_of(model: str | None) -> Any:
        if fleet.slots is None:
            return fleet.pool(model).operations.scale
        return lambda workers: fleet.scale_slots(workers, model)

    route("reload", _model_cmd, lambda model: fleet.pool(model).operations.reload, _changes_command)
    route("scale", _workers, scale_of)


def _model(options: dict[str, Any]) -> str | None:
    """The model a body names (taken out of it), or None: the default one."""
    model = options.pop("model", None)
    if model is not None and not isinstance(model, str):
        raise AdminRequestError("model must be a model's name")
    return model


def _changes_command(options: dict[str, Any]) -> str | None:
    """Why a body may not be obeyed without the API key: it names a model command."""
    return NEEDS_KEY if options.get("model_cmd") is not None else None


def _model_cmd(options: dict[str, Any]) -> list[str] | None:
    """The new command, judged as PoolConfig(model_cmd=...) and --model-cmd judge it."""
    unknown = set(options) - {"model_cmd"}
    if unknown:
        raise AdminRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    value = options.get("model_cmd")
    if value is None:
        return None
    try:
        words: list[str] = option("model_cmd").validate(value)
    except ConfigError as exc:
        if isinstance(value, str):  # a command line: say what is wrong with it
            raise AdminRequestError(f"model_cmd: {exc.problem}") from None
        raise AdminRequestError("model_cmd must be a command line or a list of strings") from None
    return words


def _workers(options: dict[str, Any]) -> int:
    """The new number of workers, within the bounds of --workers (at least one)."""
    unknown = set(options) - {"workers"}
    if unknown:
        raise AdminRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    value = options.get("workers")
    try:
        workers: int = WORKERS("workers", value)
    except ConfigError:
        span = f"from {WORKERS.minimum:g} to {WORKERS.maximum:g}"
        raise AdminRequestError(f"workers must be a whole number {span}") from None
    return workers
