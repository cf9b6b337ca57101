"""Baseline (b): the trivial quart-trio route, the reference for modelpool's overhead.

modelpool's HTTP face is a quart-trio app on hypercorn's trio worker; this is the least
such an app can do per request: one route that reads the body and answers a constant.
The issue's targets are ratios against it. The bench runs it as:

    python -m hypercorn --worker-class trio --bind 127.0.0.1:PORT \\
        benchmarks/baselines/quart_route.py:app
"""

from __future__ import annotations

from quart import request
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.post("/predict")
async def predict() -> dict[str, bool]:
    """Read the body as a real endpoint must, compute nothing, answer a constant."""
    await request.get_data()
    return {"ice_found": True}
