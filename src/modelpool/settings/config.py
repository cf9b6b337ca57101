"""Settings of the pool and of the HTTP service, with the defaults the README documents.

Every field is an option of the one table (options.py): its default is the table's, and
its value is judged by the table's check, here, once, for the library and the command
line alike. A bad value raises `ConfigError`, which names the field, so the CLI can name
the flag and the environment variable it came from instead. What one field's sense
depends on another's (a node of a shared queue may run no models; the longest backoff is
at least the first; only a Python model can be preloaded; only a key opens a public
address) is judged here too, after every field on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelpool.settings import models
from modelpool.settings.checks import (
    MAX_WORKERS,
    Check,
    ConfigError,
    MiB,
    Range,
    is_loopback,
)
from modelpool.settings.option import POOL, SERVER, Option, field_of
from modelpool.settings.options import option
from modelpool.settings.pool_options import WORKERS
from modelpool.settings.queueurl import redact_url

__all__ = [
    "MAX_WORKERS",
    "ConfigError",
    "MiB",
    "PoolConfig",
    "ServerConfig",
    "from_options",
    "is_loopback",
    "redact_url",
]


def setting(name: str) -> Any:
    """The dataclass field of the option `name`: its default is the table's."""
    return field_of(option(name))


@dataclass(frozen=True)
class PoolConfig:
    """How many models to keep warm, how to start them, and what to accept from them."""

    model_cmd: list[str] = setting("model_cmd")  # or a string, split
    workers: int = setting("workers")
    ready_line: str = setting("ready_line")
    timeout: float = setting("timeout")
    init_timeout: float = setting("init_timeout")
    max_queue: int = setting("max_queue")
    queue_timeout: float | None = setting("queue_timeout")
    max_line: int = setting("max_line")
    backoff_initial: float = setting("backoff_initial")
    backoff_max: float = setting("backoff_max")
    drain_timeout: float | None = setting("drain_timeout")
    exit_grace: float = setting("exit_grace")
    unhealthy_after: float | None = setting("unhealthy_after")
    id_field: str | None = setting("id_field")
    request_schema: Mapping[str, Any] | None = setting("request_schema")
    stderr_tail: int = setting("stderr_tail")
    env: dict[str, str] | None = setting("env")
    model_log_level: str = setting("model_log_level")  # of the lines models print on stderr
    model_stdout_level: str = setting("model_stdout_level")  # on stdout: they echo data
    model_log_rate: int | None = setting("model_log_rate")  # lines a second per model; None: all
    max_requests: int | None = setting("max_requests")  # retire a model after this many answers
    max_requests_jitter: int = setting("max_requests_jitter")
    model_max_rss: float | None = setting("model_max_rss")  # MiB, a model with its descendants
    preload: bool = setting("preload")  # fork every model from one loaded template (Python only)
    preload_immortal: bool = setting("preload_immortal")  # its objects immortal (3.12, 3.13)
    preload_max_private: float = setting("preload_max_private")  # % of the template's; 0 off
    model_threads: int | None = setting("model_threads")  # C threads per model; None auto, 0 off
    queue: str | None = setting("queue")  # redis://host:port/db: a stream shared by many nodes
    reclaim_after: float = setting("reclaim_after")  # seconds before a silent node's jobs return
    node_name: str | None = setting("node_name")  # this node's name in a cluster
    keep_trying: bool = setting("keep_trying")  # keep restarting models never once ready
    devices: tuple[str, ...] | None = setting("devices")  # one per worker, in turn (or "0,1")
    device_env: str | None = setting("device_env")  # also set to the device; None: only ours
    models: Mapping[str, Mapping[str, Any]] = setting("models")  # name: its own options
    default_model: str | None = setting("default_model")  # POST /predict's; None: the first
    priority_aging: float | None = setting("priority_aging")  # s until a class counts one up
    cancel_computing: str = setting("cancel_computing")  # auto, always, never
    min_workers: int = setting("min_workers")  # with models: slots a model keeps
    max_workers: int | None = setting("max_workers")  # ... and may take; None: `workers`

    def __post_init__(self) -> None:
        check_fields(self, self._related)
        object.__setattr__(self, "_model_configs", models.configs_of(self))
        if self.preload:
            from modelpool.settings.pycommand import NotPythonCommand, parse_python_command

            try:
                parse_python_command(self.model_cmd)
            except NotPythonCommand as exc:
                raise ConfigError("model_cmd", f"cannot be preloaded: {exc}") from None

    @property
    def model_configs(self) -> dict[str, PoolConfig]:
        """Each model's own config, by name, in the order declared: its table's options
        over these, and `workers` its first share of the slots. One model, named
        `default`, when `models` declares none: this config."""
        configs: dict[str, PoolConfig] = self._model_configs  # type: ignore[attr-defined]
        return configs

    @property
    def default_model_name(self) -> str:
        """The model POST /predict asks."""
        return self.default_model or next(iter(self.model_configs))

    def _related(self, option: Option) -> Check | None:
        """The check of a field whose bounds are another field's."""
        if option.name == "workers" and (self.queue or self.min_workers == 0):
            return dataclasses.replace(WORKERS, minimum=0)  # an HTTP front only, maybe
        if option.name == "backoff_max":
            return Range(self.backoff_initial)
        return option.check

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


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front: where it listens, whom it serves and what it accepts."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    """The pool behind it: its models, its queue and what it accepts from them."""
    host: str = setting("host")
    port: int = setting("port")
    max_body: int = setting("max_body")
    body_timeout: float = setting("body_timeout")
    keep_alive_timeout: float = setting("keep_alive_timeout")
    max_connections: int = setting("max_connections")
    min_body_rate: float = setting("min_body_rate")  # bytes/s, at the limit; 0 off
    min_body_rate_grace: float = setting("min_body_rate_grace")  # seconds before it applies
    access_log: bool = setting("access_log")
    api_key: str | None = setting("api_key")
    allow_unauthenticated: bool = setting("allow_unauthenticated")
    allowed_hosts: tuple[str, ...] | None = setting("allowed_hosts")  # Host names, keyless
    expose_model_stderr: bool = setting("expose_model_stderr")
    fast_predict: bool = setting("fast_predict")  # POST /predict without quart (fastpath.py)

    def __post_init__(self) -> None:
        check_fields(self, lambda option: option.check)
        if self.api_key is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ConfigError(
                "host",
                f"{self.host} is not a loopback address and no API key is set: anyone who "
                "can reach it could use the models; set an API key, or allow "
                "unauthenticated access explicitly",
            )


def from_options(values: Mapping[str, Any]) -> ServerConfig:
    """The config of the options given by name (as the command line gives them); each
    option given nowhere takes its default."""
    pool = {name: value for name, value in values.items() if option(name).owner == POOL}
    server = {name: value for name, value in values.items() if option(name).owner == SERVER}
    return ServerConfig(pool=PoolConfig(**pool), **server)


def check_fields(config: Any, check_of: Callable[[Option], Check | None]) -> None:
    """Run every field of `config` through its option's check (`check_of(option)`), in
    the order of the fields, keeping the value each check returns."""
    for each in dataclasses.fields(config):
        if (known := each.metadata.get("option")) is None:
            continue  # ServerConfig.pool: a config of its own, checked when it was made
        check = check_of(known)
        if check is None:
            continue
        value = getattr(config, each.name)
        kept = check(each.name, value)
        if kept is not value:
            object.__setattr__(config, each.name, kept)
