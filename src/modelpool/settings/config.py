"""Settings of the pool and of the HTTP service, with the defaults the README documents.

Every value is checked here, once, for the library and the command line alike. A bad
value raises `ConfigError`, which names the field, so the CLI can name the flag and the
environment variable it came from instead.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

MiB = 1024 * 1024
MIN_MAX_LINE = 64  # room for "result: " and a small object
MAX_WORKERS = 1024  # models in one pool: past it, a typo rather than a plan (fds, memory)
QUEUE_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")
MIN_RECLAIM_AFTER = 3.0  # nodes refresh their jobs every second: a few beats, at least
SENTINEL_URL = re.compile(
    r"redis\+sentinel://(?:[^@/]*@)?(?P<hosts>[^:,/]+:\d+(?:,[^:,/]+:\d+)*)/[^/?#]+(?:/\d+)?"
)
DB_PATH = re.compile(r"/?(\d+)?")
HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>.*))?")
TRUTH_WORDS = frozenset({"0", "1", "t", "f", "true", "false", "y", "n", "yes", "no"})
# The query options of a redis:// or rediss:// URL that modelpool passes on to coredis,
# and what each must be; the rest (stream_timeout, max_connections, noreply, ...) are
# modelpool's to set, or would break it.
QUEUE_OPTIONS: dict[str, str] = {
    "db": "a database number",
    "client_name": "a name",
    "connect_timeout": "a number of seconds",
}
TLS_OPTIONS: dict[str, str] = {
    "ssl_cert_reqs": "one of none, optional, required",
    "ssl_check_hostname": "one of true/false, yes/no, 1/0",
    "ssl_ca_certs": "a CA file or directory",
    "ssl_certfile": "a certificate file",
    "ssl_keyfile": "a key file",
}
NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A device as CUDA_VISIBLE_DEVICES and its kin name one: 0, GPU-<uuid>, MIG-<uuid>,
# MIG-GPU-<uuid>/1/0, 0.1 (a sub-device): printable ASCII, no comma (the list's
# separator), no space, no quote or other character a shell or a list would split on.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+@-]{0,127}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


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
    PoolConfig(devices="0,1"); each id is checked by PoolConfig (see check_devices).
    """
    if not text.strip():
        return None
    return tuple(word.strip() for word in text.split(","))


def check_devices(devices: tuple[str, ...]) -> None:
    """Raise ConfigError unless every device id is one a device variable can carry, once."""
    seen: set[str] = set()
    for device in devices:
        if not DEVICE_ID.fullmatch(device):
            problem = (
                f"must be device ids separated by commas (0,1 or GPU-<uuid>,MIG-<uuid>): "
                f"letters, digits and ._:/+@-, at most 128 each; {device!r} is not one"
            )
            raise ConfigError("devices", problem)
        if device in seen:
            problem = (
                f"names {device!r} twice; each device once (workers are shared out among "
                "the devices in turn: raise --workers for more models per device)"
            )
            raise ConfigError("devices", problem)
        seen.add(device)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float,
    above: bool = False,
    integer: bool = False,
    maximum: float | None = None,
) -> None:
    """Raise ConfigError unless `value` is a finite number within the bounds.

    NaN compares false with everything, so a plain `value <= 0` lets it through; it is
    refused here first, along with infinities.
    """
    kind = "a whole number" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be {kind}, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(name, f"must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(name, f"must be {kind}, got {value!r}")
    if above and value <= minimum:
        raise ConfigError(name, f"must be greater than {minimum:g}, got {value:g}")
    if not above and value < minimum:
        raise ConfigError(name, f"must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value:g}")


@dataclass(frozen=True)
class PoolConfig:
    """How many models to keep warm, how to start them, and what to accept from them."""

    model_cmd: list[str] = field(default_factory=default_model_cmd)  # or one string, split
    workers: int = 4
    ready_line: str = "ready: Model-initialized"
    timeout: float = 10.0
    init_timeout: float = 60.0
    max_queue: int = 256
    queue_timeout: float | None = 120.0
    max_line: int = 16 * MiB
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    drain_timeout: float | None = None
    exit_grace: float = 5.0
    unhealthy_after: float | None = 60.0
    id_field: str | None = None
    request_schema: Mapping[str, Any] | None = None
    stderr_tail: int = 20
    env: dict[str, str] | None = None
    model_log_level: str = "INFO"  # level of the lines models print on stderr
    model_stdout_level: str = "DEBUG"  # and on stdout: they often echo requests' data
    model_log_rate: int | None = 10  # lines a second per model that are logged; None: all
    max_requests: int | None = None  # retire a model after this many answers (and jitter)
    max_requests_jitter: int = 0
    model_max_rss: float | None = None  # MiB, a model with its descendants
    preload: bool = False  # fork every model from one loaded template (Python models only)
    queue: str | None = None  # redis://host:port/db: a job stream shared by many nodes
    reclaim_after: float = 10.0  # seconds before a silent node's jobs are taken back
    node_name: str | None = None  # this node's name in a cluster (default host-pid-random)
    keep_trying: bool = False  # keep restarting models that fail before any was ever ready
    devices: tuple[str, ...] | None = None  # one per worker, in turn (or "0,1"); None: none
    device_env: str | None = "CUDA_VISIBLE_DEVICES"  # also set to the device; None: only ours

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_cmd", _command_words(self.model_cmd))
        object.__setattr__(self, "devices", _device_ids(self.devices))
        if self.device_env == "":
            object.__setattr__(self, "device_env", None)
        if self.device_env is not None:
            check_device_env(self.device_env)
        if not self.ready_line.strip():
            raise ConfigError("ready_line", "must not be empty")
        # With a shared queue, a node may run no models at all: an HTTP front only.
        minimum = 0 if self.queue else 1
        check_number("workers", self.workers, minimum=minimum, maximum=MAX_WORKERS, integer=True)
        if self.queue is not None and (problem := queue_url_problem(self.queue)) is not None:
            raise ConfigError("queue", f"{problem}; got {redact_url(self.queue)!r}")
        if self.queue is not None and (problem := queue_client_problem()) is not None:
            raise ConfigError("queue", problem)
        check_number("reclaim_after", self.reclaim_after, minimum=MIN_RECLAIM_AFTER)
        if not isinstance(self.keep_trying, bool):
            raise ConfigError("keep_trying", f"must be True or False, got {self.keep_trying!r}")
        if self.node_name is not None and not NODE_NAME.fullmatch(self.node_name):
            problem = f"must be 1 to 64 letters, digits and ._-, got {self.node_name!r}"
            raise ConfigError("node_name", problem)
        check_number("timeout", self.timeout, minimum=0, above=True)
        check_number("init_timeout", self.init_timeout, minimum=0, above=True)
        check_number("max_queue", self.max_queue, minimum=1, integer=True)
        check_number("max_line", self.max_line, minimum=MIN_MAX_LINE, integer=True)
        check_number("backoff_initial", self.backoff_initial, minimum=0, above=True)
        check_number("backoff_max", self.backoff_max, minimum=self.backoff_initial)
        check_number("exit_grace", self.exit_grace, minimum=0)
        check_number("stderr_tail", self.stderr_tail, minimum=1, integer=True)
        for name in ("queue_timeout", "drain_timeout", "unhealthy_after"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, minimum=0, above=True)
        if self.max_requests is not None:
            check_number("max_requests", self.max_requests, minimum=1, integer=True)
        check_number("max_requests_jitter", self.max_requests_jitter, minimum=0, integer=True)
        if self.model_max_rss is not None:
            check_number("model_max_rss", self.model_max_rss, minimum=0, above=True)
        if self.preload:
            from modelpool.settings.pycommand import NotPythonCommand, parse_python_command

            try:
                parse_python_command(self.model_cmd)
            except NotPythonCommand as exc:
                raise ConfigError("model_cmd", f"cannot be preloaded: {exc}") from None
        if self.model_log_rate is not None:
            check_number("model_log_rate", self.model_log_rate, minimum=1, integer=True)
        for name in ("model_log_level", "model_stdout_level"):
            level = getattr(self, name)
            if level not in logging.getLevelNamesMapping():
                raise ConfigError(name, f"is not a log level: {level!r}")
        if self.id_field is not None and not self.id_field.strip():
            raise ConfigError("id_field", "must be a non-empty field name")
        if self.request_schema is not None:
            from modelpool.core.schema import RequestSchema, SchemaError

            try:
                RequestSchema(self.request_schema)
            except SchemaError as exc:
                problem = f"is not a valid JSON Schema: {exc.message}"
                raise ConfigError("request_schema", problem) from None

    @property
    def effective_drain_timeout(self) -> float:
        """How long in-flight and queued requests may run once shutdown starts.

        The default, one second past the request timeout, lets every request that was
        already computing finish or time out on its own.
        """
        if self.drain_timeout is not None:
            return self.drain_timeout
        return self.timeout + 1.0

    def backoff(self, failures: int) -> float:
        """Delay before the next start after `failures` start-up failures in a row.

        It doubles from `backoff_initial` up to `backoff_max`, for any number of
        failures. `ldexp` scales by a power of two without computing the power (2 **
        1024 is too big for a float, and a model that keeps failing gets that far in
        hours on the defaults); past a float's range the cap is the answer anyway.
        """
        if failures <= 0:
            return 0.0
        cap = float(self.backoff_max)
        try:
            return min(math.ldexp(self.backoff_initial, failures - 1), cap)
        except OverflowError:
            return cap


def check_device_env(name: Any) -> None:
    """Raise ConfigError unless `name` can be the variable that carries a model's device.

    MODELPOOL_* variables are the service's own (MODELPOOL_MODEL is a model's
    containment token, MODELPOOL_DEVICE is set anyway): none of them may be chosen.
    """
    if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name):
        problem = (
            "must be an environment variable's name (letters, digits and _, not starting "
            f"with a digit), such as CUDA_VISIBLE_DEVICES, or empty for none; got {name!r}"
        )
        raise ConfigError("device_env", problem)
    if name.upper().startswith("MODELPOOL_"):
        problem = (
            f"must not be a MODELPOOL_ variable, which are modelpool's own (models get "
            f"MODELPOOL_DEVICE anyway); got {name!r}"
        )
        raise ConfigError("device_env", problem)


def _device_ids(value: Any) -> tuple[str, ...] | None:
    """devices as a tuple of checked ids: a string is split as --devices is."""
    if value is None:
        return None
    if isinstance(value, str):
        value = split_devices(value)
        if value is None:
            return None
    if not isinstance(value, list | tuple) or not all(isinstance(d, str) for d in value):
        problem = f"must be device ids separated by commas or a list of strings, got {value!r}"
        raise ConfigError("devices", problem)
    if not value:
        return None
    devices = tuple(value)
    check_devices(devices)
    return devices


def _command_words(value: Any) -> list[str]:
    """model_cmd as the list of words it runs: a string is split as --model-cmd is.

    A list (or tuple) of strings is taken as it is. Anything else fails here, at once,
    instead of as a TypeError when the first model starts: a string is a sequence of
    one-letter strings, so the check for a list of strings alone would pass it.
    """
    if isinstance(value, str):
        try:
            return split_command(value)
        except ValueError as exc:
            raise ConfigError("model_cmd", str(exc)) from None
    if not isinstance(value, list | tuple) or not all(isinstance(arg, str) for arg in value):
        problem = f"must be a command line or a list of strings, got {value!r}"
        raise ConfigError("model_cmd", problem)
    if not value or not value[0].strip():
        raise ConfigError("model_cmd", "must name a program")
    return list(value)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front: where it listens, whom it serves and what it accepts."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = 1 * MiB
    body_timeout: float = 60.0
    keep_alive_timeout: float = 75.0
    max_connections: int = 1000
    access_log: bool = False
    api_key: str | None = None
    allow_unauthenticated: bool = False
    expose_model_stderr: bool = False

    def __post_init__(self) -> None:
        check_number("port", self.port, minimum=0, maximum=65535, integer=True)
        check_number("max_body", self.max_body, minimum=1, integer=True)
        check_number("body_timeout", self.body_timeout, minimum=0, above=True)
        check_number("keep_alive_timeout", self.keep_alive_timeout, minimum=0, above=True)
        check_number("max_connections", self.max_connections, minimum=1, integer=True)
        if not self.host.strip():
            raise ConfigError("host", "must not be empty")
        if self.api_key is not None:
            check_api_key(self.api_key)
        if self.api_key is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ConfigError(
                "host",
                f"{self.host} is not a loopback address and no API key is set: anyone who "
                "can reach it could use the models; set an API key, or allow "
                "unauthenticated access explicitly",
            )


def redact_url(url: str) -> str:
    """`url` without its password (`user:PW@host` becomes `user:***@host`), for every
    message and log line that shows it.

    It reads no more of the URL than it must, so a malformed one (`rediss//:PW@h`) is
    redacted too; anything before the last `@` may hold a password.
    """
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    start = head.find("//")
    start = 0 if start < 0 else start + 2
    user, colon, secret = head[start:].partition(":")
    if colon:
        return f"{head[:start]}{user}:***@{tail}" if secret else url
    # No colon: the whole of it may be a password (redis://PW@host), or a user name only.
    return f"{head[:start]}***@{tail}" if user else url


def queue_url_problem(url: str) -> str | None:
    """What is wrong with a queue URL, in words for its user; None if nothing is.

    Checked here so a mistake stops the command at once, with its flag's name, rather
    than after the models started; no message holds the URL's password.
    """
    if not url.startswith(QUEUE_SCHEMES):
        return "must be a redis://, rediss:// or redis+sentinel:// URL"
    if url.startswith("redis+sentinel://"):
        match = SENTINEL_URL.fullmatch(url)
        if match is None:
            return "must be redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
        for host in match["hosts"].split(","):
            if not 1 <= int(host.rpartition(":")[2]) <= 65535:
                return f"has a port out of 1..65535 in {host!r}"
        return None
    parts = urlsplit(url)
    where = HOST_PORT.fullmatch(parts.netloc.rpartition("@")[2])
    if where is None:
        return "must name a host: redis://HOST:PORT/DB"
    port = where["port"]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"must have a port from 1 to 65535, not {port!r}"
    if parts.fragment:
        return "must have no #fragment"
    if DB_PATH.fullmatch(parts.path) is None:
        return f"must end in /DB, a database number, not {parts.path!r}"
    tls = url.startswith("rediss://")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        return f"has a query that is not NAME=VALUE&...: {parts.query!r}"
    known = {**QUEUE_OPTIONS, **TLS_OPTIONS} if tls else QUEUE_OPTIONS
    for name, values in query.items():
        if name not in known:
            hint = " (it needs rediss://)" if name in TLS_OPTIONS else ""
            return f"has an unknown option {name!r}{hint}; known: {', '.join(sorted(known))}"
        value = values[-1]
        if not _option_valid(name, value):
            return f"option {name} must be {known[name]}, not {value!r}"
    if ("ssl_certfile" in query) != ("ssl_keyfile" in query):
        return "options ssl_certfile and ssl_keyfile go together"
    return None


def queue_client_problem() -> str | None:
    """What is missing to use a queue, in words for its user; None if nothing is.

    The Redis client is an extra (`modelpool[redis]`), so a pool without a shared queue
    installs nothing it does not use. It is imported here, as the queue would import it,
    so that a missing or broken client stops the command before any model starts.
    """
    try:
        import coredis  # noqa: F401
    except ImportError as exc:
        return (
            f"needs the Redis client, which is not installed ({exc}): "
            "pip install 'modelpool[redis]'"
        )
    return None


def _option_valid(name: str, value: str) -> bool:
    if name == "db":
        return value.isdigit()
    if name == "client_name":
        return bool(value) and not any(c.isspace() for c in value)
    if name == "connect_timeout":
        try:
            return math.isfinite(float(value)) and float(value) > 0
        except ValueError:
            return False
    if name == "ssl_cert_reqs":
        return value in ("none", "optional", "required")
    if name == "ssl_check_hostname":
        return value.lower() in TRUTH_WORDS
    if name == "ssl_ca_certs":
        return os.path.exists(value)
    return os.path.isfile(value)  # ssl_certfile, ssl_keyfile


def check_api_key(key: str) -> None:
    """Raise ConfigError unless a client can send `key` in an Authorization header.

    A header carries bytes, which servers read as Latin-1, and its ends are trimmed:
    a key with other characters (accented letters, an emoji, an undecodable byte
    from the environment) or a space at either end could never be matched. So the
    key must be printable ASCII, compared byte for byte. The message never shows the
    key: it is a secret, and messages end up in logs.
    """
    if not key.strip():
        raise ConfigError("api_key", "must not be empty (leave it unset for no key)")
    unusable = [i + 1 for i, char in enumerate(key) if not " " <= char <= "~"]
    if unusable:
        where = ", ".join(map(str, unusable[:5])) + (", ..." if len(unusable) > 5 else "")
        raise ConfigError(
            "api_key",
            "must be printable ASCII (letters, digits, punctuation, spaces), as an HTTP "
            f"header carries it; character(s) {where} of {len(key)} are not "
            "(the key is not shown)",
        )
    if key != key.strip(" "):
        raise ConfigError(
            "api_key", "must not start or end with a space: a client's header cannot carry one"
        )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
