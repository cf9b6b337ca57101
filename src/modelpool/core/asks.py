"""What a request asks of the queue, in its headers: how long its client will wait in
all (`X-Request-Timeout`), and its class (`X-Request-Priority`).

Both HTTP paths (the quart route and the fast path) read them here, so a bad value is
refused alike, with 400 and what to send instead, before the request is queued.
"""

from __future__ import annotations

import math

from modelpool.core.errors import BadRequest
from modelpool.core.kinds import Priority

TIMEOUT_HEADER = "X-Request-Timeout"
PRIORITY_HEADER = "X-Request-Priority"
CLASSES = ", ".join(p.value for p in Priority)


def request_timeout(value: str | None, name: str = TIMEOUT_HEADER) -> float | None:
    """Seconds from `X-Request-Timeout` (a positive, finite number), None if absent;
    `name` is what a refusal calls it (the library's `timeout`)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def request_priority(value: str | None, name: str = PRIORITY_HEADER) -> Priority:
    """The class from `X-Request-Priority` (normal if absent)."""
    if value is None:
        return Priority.NORMAL
    try:
        return Priority(value.strip().lower())
    except ValueError:
        raise BadRequest(f"{name} must be one of {CLASSES}, got {value!r}") from None


def asked(timeout: float | None, priority: Priority | str) -> tuple[float | None, Priority]:
    """The library's `timeout` and `priority`, judged as the headers are (BadRequest)."""
    within = None if timeout is None else request_timeout(repr(float(timeout)), "timeout")
    if type(priority) is Priority:  # as the HTTP paths pass it: nothing to judge
        return within, priority
    return within, request_priority(str(priority), "priority")
