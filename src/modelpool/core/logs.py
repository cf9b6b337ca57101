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

    Much of what is logged comes from outside: a request's path and client, a
    model's output, an error's detail. A CR or LF in it would end the line and let
    the rest pass for a record of its own, so the line is escaped as a whole (see
    `escape`), whatever field carries the character: no call site can forget. A
    traceback keeps its lines, each escaped and indented, so that every line that
    starts at the margin is a record's first; so do the lines a record quotes
    (`quoted`, a list of strings: a model's last stderr lines), one to a line after
    the message.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            text = f"{text} request_id={request_id}"
        lines = [escape(text), *getattr(record, "quoted", ())]
        if record.exc_info:
            lines.extend(self.formatException(record.exc_info).splitlines())
        elif record.exc_text:
            lines.extend(record.exc_text.splitlines())
        if record.stack_info:
            lines.extend(self.formatStack(record.stack_info).splitlines())
        return "\n    ".join([lines[0], *(escape(line) for line in lines[1:])])


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every character that is not printable written as an escape.

    Control characters (C0, DEL, C1) become `\\n`, `\\r`, `\\t` or `\\xNN`, and the
    other unprintable ones (line and paragraph separators, format characters such
    as bidirectional overrides) `\\uNNNN`: a log line stays one line, and shows what
    it holds. Printable text, the common case, is returned as it is.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


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
