"""The checks of settings' values: each says what is wrong in words for the user, once.

A check is a callable `(name, value) -> value`: it returns the value to keep (a command
line split into words, a list of devices as a tuple) or raises `ConfigError` naming the
field. The option table (options.py) gives every option its check; PoolConfig and
ServerConfig run them, and so do the HTTP admin routes. The same functions serve the
command line through the config classes, so a value is judged alike wherever it comes
from.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from modelpool.settings.queueurl import queue_client_problem, queue_url_problem, redact_url

MiB = 1024 * 1024
MIN_MAX_LINE = 64  # room for "result: " and a small object
MAX_WORKERS = 1024  # models in one pool: past it, a typo rather than a plan (fds, memory)
MIN_RECLAIM_AFTER = 3.0  # nodes refresh their jobs every second: a few beats, at least
NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A device as CUDA_VISIBLE_DEVICES and its kin name one: 0, GPU-<uuid>, MIG-<uuid>,
# MIG-GPU-<uuid>/1/0, 0.1 (a sub-device): printable ASCII, no comma (the list's
# separator), no space, no quote or other character a shell or a list would split on.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+@-]{0,127}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# A host name as --allowed-hosts takes it (in lower case): labels of letters, digits, - and _
HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_][a-z0-9_-]{0,62})*")

Check = Callable[[str, Any], Any]  # (field name, value) -> the value kept; or ConfigError


class ConfigError(ValueError):
    """A setting that makes no sense. `field` is its name in PoolConfig or ServerConfig."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def bundled_model_path() -> Path:
    """Where the reference model3.py lives.

    A wheel carries a copy inside the package; a source checkout (or an editable
    install) keeps the one at the repository root.
    """
    packaged = Path(str(resources.files("modelpool"))) / "model3.py"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[3] / "model3.py"


def default_model_cmd() -> list[str]:
    """The bundled model, run unbuffered by the interpreter that runs the service."""
    return [sys.executable, "-u", str(bundled_model_path())]


def split_command(text: str) -> list[str]:
    """A command line split into words as a POSIX shell would (no shell runs it).

    The one rule for every place a command comes as a string: --model-cmd, its
    variable and config-file key, PoolConfig(model_cmd="..."), and POST /admin/reload.
    Raises ValueError saying what is wrong with it.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot split {text!r} into words: {exc}") from None
    if not words:
        raise ValueError("must name a program")
    return words


def split_devices(text: str) -> tuple[str, ...] | None:
    """A --devices list as its device ids: "0,1" is ("0", "1"); "" (or blanks) is None.

    The one rule for --devices, its variable, its config-file key and
    PoolConfig(devices="0,1"); each id is checked by `device_ids`.
    """
    if not text.strip():
        return None
    return tuple(word.strip() for word in text.split(","))


@dataclass(frozen=True)
class Range:
    """A check that the value is a finite number within bounds (a whole one if `integer`).

    NaN compares false with everything, so a plain `value <= 0` lets it through; it is
    refused here first, along with infinities.
    """

    minimum: float
    above: bool = False  # the minimum itself is refused: greater than it
    integer: bool = False
    maximum: float | None = None

    def __call__(self, name: str, value: Any) -> Any:
        kind = "a whole number" if self.integer else "a finite number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"must be {kind}, got {value!r}")
        if self.integer and not isinstance(value, int):
            raise ConfigError(name, f"must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be {kind}, got {value!r}")
        if self.above and value <= self.minimum:
            raise ConfigError(name, f"must be greater than {self.minimum:g}, got {value:g}")
        if not self.above and value < self.minimum:
            raise ConfigError(name, f"must be at least {self.minimum:g}, got {value:g}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(name, f"must be at most {self.maximum:g}, got {value:g}")
        return value


@dataclass(frozen=True)
class OneOf:
    """A check that the value is one of `words`."""

    words: tuple[str, ...]

    def __call__(self, name: str, value: Any) -> Any:
        if value not in self.words:
            raise ConfigError(name, f"must be one of {', '.join(self.words)}, got {value!r}")
        return value


@dataclass(frozen=True)
class OrNone:
    """A check that lets None through (no limit, none chosen) and checks anything else."""

    check: Check

    def __call__(self, name: str, value: Any) -> Any:
        return None if value is None else self.check(name, value)


def not_blank(problem: str) -> Check:
    """A check that refuses a text of blanks only, with `problem` as the reason."""

    def check(name: str, value: Any) -> Any:
        if not value.strip():
            raise ConfigError(name, problem)
        return value

    return check


def a_bool(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be True or False, got {value!r}")
    return value


def a_log_level(name: str, value: Any) -> Any:
    if value not in logging.getLevelNamesMapping():
        raise ConfigError(name, f"is not a log level: {value!r}")
    return value


def a_node_name(name: str, value: Any) -> Any:
    if not NODE_NAME.fullmatch(value):
        raise ConfigError(name, f"must be 1 to 64 letters, digits and ._-, got {value!r}")
    return value


def a_queue_url(name: str, value: Any) -> Any:
    """A queue URL modelpool can use, with the client library its backend needs installed."""
    if (problem := queue_url_problem(value)) is not None:
        raise ConfigError(name, f"{problem}; got {redact_url(value)!r}")
    if (problem := queue_client_problem(value)) is not None:
        raise ConfigError(name, problem)
    return value


def a_schema(name: str, value: Any) -> Any:
    from modelpool.core.schema import RequestSchema, SchemaError  # jsonschema: when used

    try:
        RequestSchema(value)
    except SchemaError as exc:
        raise ConfigError(name, f"is not a valid JSON Schema: {exc.message}") from None
    return value


def is_words(value: Any) -> bool:
    """Whether `value` is a list (or tuple) of strings: a command's words, or devices."""
    return isinstance(value, list | tuple) and all(isinstance(word, str) for word in value)


def command_words(name: str, value: Any) -> list[str]:
    """model_cmd as the list of words it runs: a string is split as --model-cmd is.

    A list (or tuple) of strings is taken as it is. Anything else fails here, at once,
    instead of as a TypeError when the first model starts: a string is a sequence of
    one-letter strings, so the check for a list of strings alone would pass it.
    """
    if isinstance(value, str):
        try:
            return split_command(value)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
    if not is_words(value):
        raise ConfigError(name, f"must be a command line or a list of strings, got {value!r}")
    if not value or not value[0].strip():
        raise ConfigError(name, "must name a program")
    return list(value)


def device_ids(name: str, value: Any) -> tuple[str, ...] | None:
    """devices as a tuple of checked ids, each one a device variable can carry, once;
    a string is split as --devices is; None (or nothing) is no devices."""
    if value is None:
        return None
    if isinstance(value, str):
        value = split_devices(value)
        if value is None:
            return None
    if not is_words(value):
        problem = f"must be device ids separated by commas or a list of strings, got {value!r}"
        raise ConfigError(name, problem)
    if not value:
        return None
    seen: set[str] = set()
    for device in value:
        if not DEVICE_ID.fullmatch(device):
            problem = (
                f"must be device ids separated by commas (0,1 or GPU-<uuid>,MIG-<uuid>): "
                f"letters, digits and ._:/+@-, at most 128 each; {device!r} is not one"
            )
            raise ConfigError(name, problem)
        if device in seen:
            problem = (
                f"names {device!r} twice; each device once (workers are shared out among "
                "the devices in turn: raise --workers for more models per device)"
            )
            raise ConfigError(name, problem)
        seen.add(device)
    return tuple(value)


def a_device_variable(name: str, value: Any) -> str | None:
    """The variable that carries a model's device; empty (or None) is none.

    MODELPOOL_* variables are the service's own (MODELPOOL_MODEL is a model's
    containment token, MODELPOOL_DEVICE is set anyway): none of them may be chosen.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not VARIABLE_NAME.fullmatch(value):
        problem = (
            "must be an environment variable's name (letters, digits and _, not starting "
            f"with a digit), such as CUDA_VISIBLE_DEVICES, or empty for none; got {value!r}"
        )
        raise ConfigError(name, problem)
    if value.upper().startswith("MODELPOOL_"):
        problem = (
            f"must not be a MODELPOOL_ variable, which are modelpool's own (models get "
            f"MODELPOOL_DEVICE anyway); got {value!r}"
        )
        raise ConfigError(name, problem)
    return value


def an_api_key(name: str, key: Any) -> Any:
    """Refuse a key a client cannot send in an Authorization header.

    A header carries bytes, which servers read as Latin-1, and its ends are trimmed:
    a key with other characters (accented letters, an emoji, an undecodable byte
    from the environment) or a space at either end could never be matched. So the
    key must be printable ASCII, compared byte for byte. The message never shows the
    key: it is a secret, and messages end up in logs.
    """
    if not key.strip():
        raise ConfigError(name, "must not be empty (leave it unset for no key)")
    unusable = [i + 1 for i, char in enumerate(key) if not " " <= char <= "~"]
    if unusable:
        where = ", ".join(map(str, unusable[:5])) + (", ..." if len(unusable) > 5 else "")
        raise ConfigError(
            name,
            "must be printable ASCII (letters, digits, punctuation, spaces), as an HTTP "
            f"header carries it; character(s) {where} of {len(key)} are not "
            "(the key is not shown)",
        )
    if key != key.strip(" "):
        raise ConfigError(
            name, "must not start or end with a space: a client's header cannot carry one"
        )
    return key


def host_names(name: str, value: Any) -> tuple[str, ...] | None:
    """--allowed-hosts as a tuple of host names (or addresses), lower case, without a
    trailing dot or an IPv6 address's brackets; a string is split at its commas; `*` is
    any name; None (or nothing) is none."""
    if isinstance(value, str):
        value = [word for word in value.split(",") if word.strip()]
    if value is None or (is_words(value) and not value):
        return None
    if not is_words(value):
        raise ConfigError(name, f"must be host names separated by commas, got {value!r}")
    kept = []
    for given in value:
        host = given.strip().lower().removesuffix(".")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host != "*" and not HOST_NAME.fullmatch(host) and not _is_address(host):
            problem = (
                "must be host names or addresses separated by commas, without a port "
                f"(modelpool.example, 10.0.0.5, ::1), or * for any; {given!r} is not one"
            )
            raise ConfigError(name, problem)
        kept.append(host)
    return tuple(kept)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost).

    The one rule for where the service may listen without an API key, and for which
    clients may use the admin paths without one.
    """
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
