"""What an option is: one record from which the command line, the environment, the config
file, the config classes' defaults and checks, and the configuration reference are made.

As gunicorn's `Setting`: an option is defined once, by its name, and everything else
follows from it: its flag (`--max-queue`), its variable (`MODELPOOL_MAX_QUEUE`), its
config-file key (`max_queue`, or `max-queue`), its field in PoolConfig or ServerConfig
(`max_queue`), and which commands take it. The table itself is options.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelpool.settings.checks import Check

# Whose setting an option is: where its value goes.
POOL = "pool"  # a field of PoolConfig: `serve` and `worker` take it
SERVER = "server"  # a field of ServerConfig, the HTTP front: `serve` only
COMMAND = "command"  # the command's own (how it logs): in neither config class
# The topics `serve --help` groups its options by, in its order, each with what it covers.
MODELS = "models"
REQUESTS = "requests and queue"
HTTP = "HTTP"
OPERATIONS = "operations"
CLUSTER = "cluster"
LOGGING = "logging and metrics"
TOPICS = {
    MODELS: "how models are started, restarted and retired",
    REQUESTS: "what a request may hold, and how long it may wait and compute",
    HTTP: "where the service listens, whom it serves and what it accepts",
    OPERATIONS: "first start, health and shutdown",
    CLUSTER: "a job stream shared by the nodes of a cluster (pip install 'modelpool[redis]')",
    LOGGING: "what is logged, and how",
}
LIBRARY = "library"  # not a topic of --help: a setting of the Python API only, no flag


@dataclass(frozen=True)
class Option:
    """One setting, defined once.

    `convert` reads its text (flag, variable, a string in the config file); `check`
    judges its value wherever it comes from (the config classes run it, and so does
    the HTTP admin API), returning the value to keep. None is checked as any value is:
    an option that may be unset wraps its check in `checks.OrNone`.
    """

    name: str  # its field, config-file key and argparse dest; whence flag and variable
    convert: Callable[[str], Any] | None  # None: an on/off switch (or no command's setting)
    default: Any  # as --help and the reference show it (None: unset)
    help: str
    owner: str  # POOL, SERVER or COMMAND
    topic: str = field(kw_only=True)  # one of TOPICS (its group in --help), or LIBRARY
    check: Check | None = field(default=None, kw_only=True)
    factory: Callable[[], Any] | None = field(default=None, kw_only=True)  # made per config
    lists: Callable[[list[Any]], Any] | None = field(default=None, kw_only=True)  # a TOML list
    secret: bool = field(default=False, kw_only=True)  # never shown in a message
    shown: Callable[[str], str] = field(default=str, kw_only=True)  # its text in a message
    per_model: bool = field(default=False, kw_only=True)  # may be set in a [models.NAME] table
    flag_name: str | None = field(default=None, kw_only=True)  # its flag's, if not its name
    repeated: bool = field(default=False, kw_only=True)  # its flag may be given many times

    @property
    def flag(self) -> str:
        """`--max-queue`; a switch that is on unless turned off: `--no-fast-predict`."""
        off = "no-" if self.convert is None and self.default else ""
        return "--" + off + (self.flag_name or self.name).replace("_", "-")

    @property
    def env(self) -> str:
        return "MODELPOOL_" + self.name.upper()

    @property
    def key(self) -> str:
        """Its key in a config file (the flag without dashes, `max-queue`, is read too)."""
        return self.name

    @property
    def commands(self) -> tuple[str, ...]:
        """The commands that take it: a worker node listens nowhere, so it takes no
        HTTP front's option; a setting of the library only is no command's."""
        if self.topic == LIBRARY:
            return ()
        return ("serve",) if self.owner == SERVER else ("serve", "worker")

    def validate(self, value: Any) -> Any:
        """The value to keep, as the config classes keep it; ConfigError if it makes no
        sense, naming this option's field."""
        return value if self.check is None else self.check(self.name, value)


def field_of(option: Option) -> Any:
    """A dataclass field for `option`, its default taken from the table (see config.py)."""
    if option.factory is not None:
        return field(default_factory=option.factory, metadata={"option": option})
    return field(default=option.default, metadata={"option": option})
