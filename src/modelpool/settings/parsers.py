"""How an option's text (a flag's value, a MODELPOOL_* variable, a string in a config file)
becomes its value.

Syntax is judged here (is it a number at all); sense is judged once, by the option's check
(checks.py), when PoolConfig or ServerConfig is made. A parser raises `BadValue` saying
what is wrong; the command line reports it with the flag and where the text came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from modelpool.core.logs import FORMATS
from modelpool.settings.checks import is_words, split_command

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class BadValue(ValueError):
    """A text an option cannot take; the message says why, for the user."""


def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise BadValue(f"{text!r} is not a whole number") from None


def number(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise BadValue(f"{text!r} is not a number") from None


def seconds_or_none(text: str) -> float | None:
    """A number of seconds, where 0 means no limit."""
    value = number(text)
    if math.isnan(value) or value < 0:
        raise BadValue(f"must be 0 (no limit) or a number of seconds, got {text!r}")
    return None if value == 0 else value


def count_or_none(text: str) -> int | None:
    """A whole number, where 0 means off."""
    value = integer(text)
    if value < 0:
        raise BadValue(f"must be 0 (off) or a whole number, got {text!r}")
    return None if value == 0 else value


def count_or_auto(text: str) -> int | None:
    """A whole number, or "auto" (None: the default, worked out when it is used)."""
    if text.strip().lower() == "auto":
        return None
    value = integer(text)
    if value < 0:
        raise BadValue(f"must be auto or a whole number, got {text!r}")
    return value


def mib_or_none(text: str) -> float | None:
    """A size in MiB, where 0 means no limit."""
    value = number(text)
    if not math.isfinite(value) or value < 0:
        raise BadValue(f"must be 0 (no limit) or a number of MiB, got {text!r}")
    return None if value == 0 else value


def command(text: str) -> list[str]:
    """A command line, split into its words as a shell would (see checks.split_command)."""
    try:
        return split_command(text)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def schema_file(text: str) -> dict[str, Any]:
    from modelpool.core.schema import load_schema  # jsonschema only for those who use it

    try:
        return load_schema(text)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise BadValue(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


def log_format(text: str) -> str:
    if text.lower() not in FORMATS:
        raise BadValue(f"must be one of {', '.join(FORMATS)}, got {text!r}")
    return text.lower()


def choice(*words: str) -> Callable[[str], str]:
    """A parser of one of `words` (any case)."""

    def one_of(text: str) -> str:
        if text.strip().lower() not in words:
            raise BadValue(f"must be one of {', '.join(words)}, got {text!r}")
        return text.strip().lower()

    return one_of


def text_value(text: str) -> str:
    return text


def word_list(words: list[Any]) -> list[str]:
    """A command as a config file's list of words: `["python3", "-u", "model.py"]`."""
    if not words or not is_words(words):
        raise BadValue("must be a list of strings naming a program")
    return words


def device_list(ids: list[Any]) -> tuple[str, ...] | None:
    """Devices as a config file's list, of strings or numbers: `[0, 1]`."""
    if not all(isinstance(word, str | int) and not isinstance(word, bool) for word in ids):
        raise BadValue("must be a list of device ids, as [0, 1]")
    return tuple(str(word) for word in ids) or None
