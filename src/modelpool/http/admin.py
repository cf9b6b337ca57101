"""POST /admin/reload and /admin/scale: live operations over HTTP.

Who may ask: with an API key, whoever sends it (auth.py checks it before this runs);
without one, only clients on this machine (loopback addresses), as a service without
a key listens on loopback anyway unless told otherwise. A new model command is more
than an operation: it runs whatever it names as the service's user, so without a key
it is refused even from loopback (any local user could send it); a plain reload, which
runs the command the operator chose, is not. Every action is logged with
the address that asked and what it did. Each answer comes when the operation has
finished, with what happened to each worker; the operation itself runs in the pool, so
a client that hangs up does not stop it half-way.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from modelpool.pool.operations import Busy, OperationFailed
from modelpool.pool.pool import Pool
from modelpool.settings.config import MAX_WORKERS
from modelpool.settings.options import command

log = logging.getLogger("modelpool.admin")
NEEDS_KEY = "set --api-key to change the model command over HTTP"


class AdminRequestError(ValueError):
    """The body of an admin request makes no sense."""


def add_admin_routes(
    app: QuartTrio, pool: Pool, api_key_set: bool, json_response: Callable[..., Response]
) -> None:
    def answer(status: int, body: dict[str, Any]) -> Response:
        return json_response(status, {**body, "request_id": g.get("request_id")})

    def refused() -> Response | None:
        if api_key_set or _is_loopback(request.remote_addr):
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
        operation: Any,
        key_only: Callable[[dict[str, Any]], str | None] = lambda options: None,
    ) -> None:
        """POST /admin/<what>: check who asks, read the body, run the operation, report.

        `key_only` names what in a body only a holder of the API key may ask for.
        """

        async def handle() -> Response:
            if (no := refused()) is not None:
                return no
            try:
                options = await body()
                argument = read(options)
            except AdminRequestError as exc:
                return answer(400, {"error": "bad request", "detail": str(exc)})
            if not api_key_set and (reason := key_only(options)) is not None:
                return forbidden(reason)
            who = request.remote_addr or "-"
            log.info("admin: %s asked by %s", what, who)
            if pool.closing:
                return answer(503, {"error": "shutting down"})
            try:
                report = await pool.operations.detached(operation, argument)
            except Busy as exc:
                log.warning("admin: %s asked by %s refused: %s", what, who, exc)
                return answer(409, {"error": "busy", "detail": str(exc)})
            except OperationFailed as exc:
                log.error("admin: %s asked by %s failed: %s", what, who, exc)
                return answer(502, {"error": f"{what} failed", "detail": str(exc), **exc.report})
            log.info("admin: %s asked by %s done: %s", what, who, json.dumps(report))
            return answer(200, {"status": "done", **report})

        app.add_url_rule(f"/admin/{what}", f"admin_{what}", handle, methods=["POST"])

    route("reload", _model_cmd, pool.operations.reload, _changes_command)
    route("scale", _workers, pool.operations.scale)


def _changes_command(options: dict[str, Any]) -> str | None:
    """Why a body may not be obeyed without the API key: it names a model command."""
    return NEEDS_KEY if options.get("model_cmd") is not None else None


def _model_cmd(options: dict[str, Any]) -> list[str] | None:
    unknown = set(options) - {"model_cmd"}
    if unknown:
        raise AdminRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    value = options.get("model_cmd")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return command(value)  # the same rules as --model-cmd
        except argparse.ArgumentTypeError as exc:
            raise AdminRequestError(f"model_cmd: {exc}") from None
    words_ok = isinstance(value, list) and value and all(isinstance(w, str) for w in value)
    if words_ok and value[0].strip():
        return value
    raise AdminRequestError("model_cmd must be a command line or a list of strings")


def _workers(options: dict[str, Any]) -> int:
    unknown = set(options) - {"workers"}
    if unknown:
        raise AdminRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    value = options.get("workers")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise AdminRequestError(f"workers must be a whole number from 1 to {MAX_WORKERS}")
    return value


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
