"""Baseline (a): a raw ASGI app that reads the request body and answers a constant.

The floor of the HTTP stack modelpool is built on: no framework, no pool, no model. The
bench runs it on hypercorn's trio worker, as `modelpool serve` runs its app:

    python -m hypercorn --worker-class trio --bind 127.0.0.1:PORT \\
        benchmarks/baselines/raw_asgi.py:app
"""

from __future__ import annotations

from typing import Any

ANSWER = b'{"ice_found": true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """POST anywhere: the whole body is read, then the constant answer is sent."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
