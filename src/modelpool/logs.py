"""Logging: text or one JSON object per line, and the request, worker and pid on each line.

The fields come from context variables, not from every call site: a worker task sets
its worker number and its model's pid, and the request id while it serves a job; the
HTTP handler sets the request id. trio copies the context into every task it spawns,
so the tasks that read a model's pipes carry the same fields as their worker. A
logging filter copies whatever is set onto each record, where the JSON formatter
(python-json-logger, a well-kept library, rather than one of our own) picks it up.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
FORMATS = ("text", "json")
FIELDS = ("request_id", "worker", "pid")

_fields: dict[str, contextvars.ContextVar[Any]] = {
    name: contextvars.ContextVar(f"modelpool_log_{name}", default=None) for name in FIELDS
}


def set_field(name: str, value: Any) -> None:
    """Set a field for this task and the tasks it starts from now on."""
    _fields[name].set(value)


@contextlib.contextmanager
def field(name: str, value: Any) -> Iterator[None]:
    """Set a field for the duration of the block."""
    token = _fields[name].set(value)
    try:
        yield
    finally:
        _fields[name].reset(token)


def current(name: str) -> Any:
    return _fields[name].get()


class ContextFields(logging.Filter):
    """Puts the fields that are set onto every record (a record's own `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _fields.items():
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """One line per record, ending with the request's id when the record is about one.

    The worker and pid need no suffix: every message about a model names them
    ("worker 0 [pid 123] ...").
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} request_id={request_id}"


def json_formatter() -> logging.Formatter:
    """timestamp (ISO 8601, UTC), level, logger, message, then the fields that are set."""
    from pythonjsonlogger.json import JsonFormatter  # only for those who ask for JSON

    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record to stderr, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
