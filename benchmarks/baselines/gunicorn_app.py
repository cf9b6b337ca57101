"""Baseline (d): a plain gunicorn app, each sync worker owning one warm model3 process.

What one would write without modelpool: `gunicorn -w 4` (sync workers), and every worker
starts its own model when it boots and keeps it. Each request is read, checked as JSON,
written to the worker's model as one compact line, and answered with the model's
`result: ` line. It is a baseline for the bench, not part of the product: no queue, no
timeouts, no restarts. A worker's model is busy only while that worker handles a request,
so a worker that waits for a slow client's body leaves its model idle; and a sync
worker closes the connection after each answer (no keep-alive).

    python -m gunicorn --workers 4 --bind 127.0.0.1:PORT \\
        --pythonpath benchmarks/baselines gunicorn_app:app

Each worker prints `gunicorn_app: model ready` to stderr once its model is ready: the
bench counts those lines to time the start-up. MODEL3 (the model's path) and model3's own
MODEL3_* variables come from the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MODEL3 = os.environ.get("MODEL3", str(Path(__file__).resolve().parents[2] / "model3.py"))
READY_LINE = "ready: Model-initialized"
RESULT = "result: "


def start_model() -> subprocess.Popen[str]:
    """Start model3 and wait for its ready line; the worker's stdin and stdout pipes to it.

    The model stays in the worker's process group, and exits when the worker's end of its
    stdin closes (the worker exits or is killed).
    """
    model = subprocess.Popen(
        [sys.executable, "-u", MODEL3], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    for line in model.stdout:
        if line.startswith(READY_LINE):
            print("gunicorn_app: model ready", file=sys.stderr, flush=True)
            return model
    raise RuntimeError(f"model3 exited with code {model.wait()} before it was ready")


# gunicorn imports the app in each worker after the fork (no --preload), so every worker
# owns the model it starts here.
MODEL = start_model()


def ask_model(line: str) -> str:
    """One request line in, the JSON text of the model's result line out."""
    MODEL.stdin.write(line + "\n")
    MODEL.stdin.flush()
    for answer in MODEL.stdout:
        if answer.startswith(RESULT):
            return answer[len(RESULT) :].strip()
    raise RuntimeError("model3 closed its stdout")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """POST a JSON value: 200 with the model's result, or 400 if the body is not JSON."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    try:
        line = json.dumps(json.loads(body), separators=(",", ":"))
    except ValueError:
        status, answer = "400 Bad Request", '{"error": "bad request"}'
    else:
        status, answer = "200 OK", ask_model(line)
    payload = answer.encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]
