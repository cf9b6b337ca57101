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


def request_timeout(value: str | None) -> float | None:
    """Seconds from `X-Request-Timeout` (a positive, finite number), None if absent."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {value!r}")
    return seconds


def request_priority(value: str | None) -> Priority:
    """The class from `X-Request-Priority` (normal if absent)."""
    if value is None:
        return Priority.NORMAL
    try:
        return Priority(value.strip().lower())
    except ValueError:
        raise BadRequest(f"{PRIORITY_HEADER} must be one of {CLASSES}, got {value!r}") from None
