"""The command line's options: each from its flag, else its MODELPOOL_* variable, else a default.

Syntax is checked here (is it a number at all); sense is checked once, by the config
classes, which raise ConfigError naming a field. `parse()` turns either kind of
mistake into a message that names what the user typed: the flag, and the variable
with its value when the value came from the environment. Every mistake has one form,
`modelpool serve: error: --flag (from WHERE): problem`, and a hint to `--help`, which
lists the options by topic. Options are never abbreviated: `--worker 2` is refused
(with a suggestion), not taken for `--workers 2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

from modelpool.core.logs import FORMATS
from modelpool.settings.config import (
    ConfigError,
    MiB,
    PoolConfig,
    ServerConfig,
    redact_url,
    split_command,
    split_devices,
)

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
UNSET: Any = object()  # not on the command line (a converted value may well be None)
MAX_CONFIG_FILE = 1 * MiB  # a file of options is a few lines
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


def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def number(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def seconds_or_none(text: str) -> float | None:
    """A number of seconds, where 0 means no limit."""
    value = number(text)
    if math.isnan(value) or value < 0:
        problem = f"must be 0 (no limit) or a number of seconds, got {text!r}"
        raise argparse.ArgumentTypeError(problem)
    return None if value == 0 else value


def count_or_none(text: str) -> int | None:
    """A whole number, where 0 means off."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a whole number, got {text!r}")
    return None if value == 0 else value


def mib_or_none(text: str) -> float | None:
    """A size in MiB, where 0 means no limit."""
    value = number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a number of MiB, got {text!r}")
    return None if value == 0 else value


def command(text: str) -> list[str]:
    try:
        return split_command(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def schema_file(text: str) -> dict[str, Any]:
    from modelpool.core.schema import load_schema  # jsonschema only for those who use it

    try:
        return load_schema(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


def log_format(text: str) -> str:
    if text.lower() not in FORMATS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(FORMATS)}, got {text!r}")
    return text.lower()


def text_value(text: str) -> str:
    return text


@dataclass(frozen=True)
class Option:
    flag: str
    convert: Callable[[str], Any] | None  # None: an on/off switch
    default: Any
    help: str
    field: str | None = None  # "pool.<name>" or "<name>" in the config; None: not config
    secret: bool = False  # never shown in a message, even when refused
    topic: str = dataclasses.field(kw_only=True)  # one of TOPICS: its group in --help

    @property
    def for_worker(self) -> bool:
        """Whether `modelpool worker` (models only, no HTTP) takes this option."""
        return self.field is None or self.field.startswith("pool.")

    @property
    def env(self) -> str:
        return "MODELPOOL_" + self.dest.upper()

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS = [
    Option("--host", text_value, "127.0.0.1", "address to listen on", "host", topic=HTTP),
    Option(
        "--port",
        integer,
        8080,
        "port to listen on; 0 picks a free one (the log names it)",
        "port",
        topic=HTTP,
    ),
    Option(
        "--workers",
        integer,
        4,
        "model processes kept warm, started in parallel",
        "pool.workers",
        topic=MODELS,
    ),
    Option(
        "--model-cmd",
        command,
        None,
        "command that starts one model, quoted as in a shell (no shell runs it); "
        "default: the bundled model3.py, run unbuffered by this Python",
        "pool.model_cmd",
        topic=MODELS,
    ),
    Option(
        "--ready-line",
        text_value,
        "ready: Model-initialized",
        "a model is ready once it prints a line that starts with this",
        "pool.ready_line",
        topic=MODELS,
    ),
    Option(
        "--timeout",
        number,
        10.0,
        "seconds a model may compute one request; past it the model is killed and "
        "replaced, and the request gets 504",
        "pool.timeout",
        topic=REQUESTS,
    ),
    Option(
        "--init-timeout",
        number,
        60.0,
        "seconds a model may take to print its ready line before it is killed and started again",
        "pool.init_timeout",
        topic=MODELS,
    ),
    Option(
        "--keep-trying",
        None,
        False,
        "keep restarting models that fail before any model was ever ready; without it, the "
        "service stops with exit code 3 and the model's last stderr lines once every "
        "model's first start failed (exited, or no ready line within --init-timeout)",
        "pool.keep_trying",
        topic=OPERATIONS,
    ),
    Option(
        "--max-queue",
        integer,
        256,
        "requests that may wait for a model; more get 503",
        "pool.max_queue",
        topic=REQUESTS,
    ),
    Option(
        "--queue-timeout",
        seconds_or_none,
        120.0,
        "seconds a request may wait for a free model before it gets 503; 0 waits forever",
        "pool.queue_timeout",
        topic=REQUESTS,
    ),
    Option(
        "--max-body",
        integer,
        MiB,
        "largest request body in bytes; larger ones get 413",
        "max_body",
        topic=HTTP,
    ),
    Option(
        "--body-timeout",
        number,
        60.0,
        "seconds a client may take to send its request body; slower ones get 408",
        "body_timeout",
        topic=HTTP,
    ),
    Option(
        "--keep-alive-timeout",
        number,
        75.0,
        "seconds an idle keep-alive connection stays open, and a connection may take to send "
        "its request headers; clients must not keep idle connections longer (httpx: 5 s), and "
        "a load balancer's idle timeout must be shorter. At --max-connections, the longest-"
        "idle connection is closed early for a new one",
        "keep_alive_timeout",
        topic=HTTP,
    ),
    Option(
        "--max-connections",
        integer,
        1000,
        "open client connections at most; at the limit the longest-idle one is closed for a "
        "newcomer, and only when every one has a request in progress do newcomers wait",
        "max_connections",
        topic=HTTP,
    ),
    Option(
        "--max-line",
        integer,
        16 * MiB,
        "longest line in bytes a model may print; a longer one is a model failure",
        "pool.max_line",
        topic=MODELS,
    ),
    Option(
        "--id-field",
        text_value,
        None,
        "for models that echo a field: send a unique id under this name in every request "
        "and accept a result only if it carries the same id (off by default)",
        "pool.id_field",
        topic=REQUESTS,
    ),
    Option(
        "--request-schema",
        schema_file,
        None,
        "JSON Schema file every request must match; others get 400 before a model sees them",
        "pool.request_schema",
        topic=REQUESTS,
    ),
    Option(
        "--backoff-initial",
        number,
        0.5,
        "seconds before restarting a model that failed on its own; doubles each time",
        "pool.backoff_initial",
        topic=MODELS,
    ),
    Option(
        "--backoff-max",
        number,
        30.0,
        "longest delay between such restarts",
        "pool.backoff_max",
        topic=MODELS,
    ),
    Option(
        "--unhealthy-after",
        seconds_or_none,
        60.0,
        "/healthz answers 503 once every model has kept failing on its own for this many "
        "seconds, so an orchestrator restarts the service; 0 never",
        "pool.unhealthy_after",
        topic=OPERATIONS,
    ),
    Option(
        "--drain-timeout",
        number,
        None,
        "on SIGTERM/SIGINT, seconds queued and in-flight requests still get; "
        "default: --timeout plus one second",
        "pool.drain_timeout",
        topic=OPERATIONS,
    ),
    Option(
        "--exit-grace",
        number,
        5.0,
        "seconds a model gets to exit after its stdin is closed before it is killed",
        "pool.exit_grace",
        topic=OPERATIONS,
    ),
    Option(
        "--max-requests",
        count_or_none,
        None,
        "retire a model after this many answers, starting its replacement first so the "
        "pool never runs short (as gunicorn's max_requests); 0 never",
        "pool.max_requests",
        topic=MODELS,
    ),
    Option(
        "--max-requests-jitter",
        integer,
        0,
        "add a random 0..N to each model's --max-requests, so models are not all retired at once",
        "pool.max_requests_jitter",
        topic=MODELS,
    ),
    Option(
        "--model-max-rss",
        mib_or_none,
        None,
        "MiB of resident memory a model may use with the processes below it, checked every "
        "second: past it an idle model is replaced (its replacement first), and a computing "
        "one that passes it by more than 20 %% is killed and its request gets 502; 0 no limit",
        "pool.model_max_rss",
        topic=MODELS,
    ),
    Option(
        "--queue",
        text_value,
        None,
        "redis://HOST:PORT/DB (Redis or Valkey): take jobs from, and queue them in, one "
        "stream shared by every node of a cluster, so the first free model on any machine "
        "takes the oldest request; default: the in-process queue. With it, --workers 0 "
        "makes an HTTP front only",
        "pool.queue",
        topic=CLUSTER,
    ),
    Option(
        "--reclaim-after",
        number,
        10.0,
        "with --queue: seconds a job may stay with a node that stopped refreshing it (it died) "
        "before another node takes it back; it runs once more if still within its deadline",
        "pool.reclaim_after",
        topic=CLUSTER,
    ),
    Option(
        "--node-name",
        text_value,
        None,
        "with --queue: this node's name in /status and /metrics; default host-pid-random",
        "pool.node_name",
        topic=CLUSTER,
    ),
    Option(
        "--preload",
        None,
        False,
        "load the model once, then fork every model from that warm template at its first "
        "read of stdin (as gunicorn's --preload): one load's time and memory for all of "
        "them, and replacements in milliseconds. Python models only (python [flags] "
        "script.py or -m module); one that is not safe to fork (threads, sockets, devices "
        "at that point) falls back to plain starts with a warning",
        "pool.preload",
        topic=MODELS,
    ),
    Option(
        "--devices",
        split_devices,  # each id is checked by PoolConfig
        None,
        "device ids separated by commas (0,1 or GPU-<uuid>,MIG-<uuid>): each worker gets "
        "one, in turn (as TorchServe does; a new worker the one with the fewest), and its "
        "models get it as MODELPOOL_DEVICE and as --device-env; a worker keeps its device "
        "across restarts, and its replacements (reload, recycling) take it over. With "
        "--preload the template sees no device: a model must touch its device at its "
        "first request, not while it loads",
        "pool.devices",
        topic=MODELS,
    ),
    Option(
        "--device-env",
        text_value,
        "CUDA_VISIBLE_DEVICES",
        "with --devices: the variable that also carries a model's device "
        "(HIP_VISIBLE_DEVICES for ROCm, ...); empty: MODELPOOL_DEVICE only",
        "pool.device_env",
        topic=MODELS,
    ),
    Option(
        "--api-key",
        text_value,
        None,
        "require 'Authorization: Bearer KEY' on every path but /healthz and /readyz; "
        "prefer the variable, which other users cannot see in the process list",
        "api_key",
        secret=True,
        topic=HTTP,
    ),
    Option(
        "--allow-unauthenticated",
        None,
        False,
        "listen on a non-loopback address without --api-key",
        "allow_unauthenticated",
        topic=HTTP,
    ),
    Option(
        "--expose-model-stderr",
        None,
        False,
        "put the model's last stderr lines into 502 answers (they may hold paths and data)",
        "expose_model_stderr",
        topic=HTTP,
    ),
    Option("--log-level", log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", topic=LOGGING),
    Option(
        "--log-format",
        log_format,
        "text",
        "text, or json: one JSON object per line with timestamp, level, logger, message, "
        "and request_id, worker and pid where they apply",
        topic=LOGGING,
    ),
    Option(
        "--model-log-level",
        log_level,
        "INFO",
        "level at which the lines models print on stderr are logged: their warnings and "
        "tracebacks, which say why a model failed (they may hold users' data too: DEBUG "
        "keeps them out of an INFO log; /status keeps the last ones either way)",
        "pool.model_log_level",
        topic=LOGGING,
    ),
    Option(
        "--model-stdout-level",
        log_level,
        "DEBUG",
        "level at which the lines models print on stdout, other than results, are logged: "
        "their start-up and chatter, which often echoes requests' data (model3 prints each "
        "input), so by default only a DEBUG log has them; INFO logs them",
        "pool.model_stdout_level",
        topic=LOGGING,
    ),
    Option(
        "--model-log-rate",
        count_or_none,
        10,
        "lines a second each model may have logged, after a burst of 100 (its start-up, a "
        "traceback); past it lines are counted, and the count is logged every 10 s; "
        "0 logs every line",
        "pool.model_log_rate",
        topic=LOGGING,
    ),
    Option(
        "--access-log",
        None,
        False,
        "log one line per HTTP request: request id, status, queue wait, compute and total time",
        "access_log",
        topic=LOGGING,
    ),
]
BY_FIELD = {option.field: option for option in OPTIONS if option.field}


@dataclass(frozen=True)
class Settings:
    """Parsed options: `config` for the service, plus the ones outside it."""

    config: ServerConfig
    log_level: str
    log_format: str = "text"
    command: str = "serve"  # or "worker": models only, for a shared queue


class Parser(argparse.ArgumentParser):
    """argparse with modelpool's habits: no abbreviations, and errors in one short form.

    argparse's own `error()` prints the whole usage block, and `argument --flag: ...`;
    this prints `modelpool serve: error: --flag: ...` and a line that points to --help.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--worker 2` must not mean `--workers 2`
        super().__init__(*args, **kwargs)
        self.commands: dict[str, Parser] = {}  # the subcommands, by name

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --flag: problem" for a value its type refused
        message = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")

    def refuse_extras(self, extras: Sequence[str]) -> NoReturn:
        """Refuse what no option took: an unknown (or abbreviated) option, or a stray word."""
        word = extras[0]
        if not word.startswith("-"):
            self.error(f"unexpected argument {word!r} (an option's value must follow it)")
        flag = word.partition("=")[0]
        known = [text for action in self._actions for text in action.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        self.error(f"{flag}: no such option{hint}")


def build_parser() -> Parser:
    parser = Parser(
        prog="modelpool",
        description="Keep a pool of warm model processes behind POST /predict.",
    )
    parser.add_argument("--version", action="version", version=f"modelpool {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        usage="%(prog)s [OPTIONS]",
        help="start the HTTP service (the default command)",
        description="Start the pool and serve POST /predict, GET /, /healthz, /readyz, "
        "/status, /metrics. "
        "Every option can also be set by the environment variable named in its help; "
        "a command-line option wins over the variable.",
    )
    worker = commands.add_parser(
        "worker",
        usage="%(prog)s --queue URL [OPTIONS]",
        help="run models only, taking jobs from a shared --queue (no HTTP)",
        description="Run models that take jobs from the Redis stream named by --queue, "
        "for the HTTP fronts (`modelpool serve --queue URL`) of a cluster. SIGTERM stops "
        "taking jobs and finishes those in progress; SIGHUP reloads the models. "
        "Needs the Redis client: pip install 'modelpool[redis]'.",
    )
    parser.commands = {"serve": serve, "worker": worker}
    for sub in (serve, worker):
        sub.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help='read options from a TOML file, as `workers = 4` or `model-cmd = "..."`; '
            "the command line and then MODELPOOL_* variables win over it "
            "(env MODELPOOL_CONFIG)",
        )
        options = [o for o in OPTIONS if o.for_worker or sub is serve]
        for topic, about in TOPICS.items():
            chosen = [option for option in options if option.topic == topic]
            if chosen:  # a worker has no HTTP options
                _add_options(sub.add_argument_group(topic, about), chosen)
        if unknown := [option.flag for option in options if option.topic not in TOPICS]:
            raise ValueError(f"options with a topic not in TOPICS: {unknown}")
    return parser


def _add_options(group: argparse._ArgumentGroup, options: list[Option]) -> None:
    for option in options:
        default_text = "" if option.default is None else f"; default {option.default}"
        help_text = f"{option.help} (env {option.env}{default_text})"
        if option.convert is None:
            group.add_argument(option.flag, action="store_true", default=UNSET, help=help_text)
        else:
            group.add_argument(option.flag, type=option.convert, default=UNSET, help=help_text)


def parse(
    argv: Sequence[str], environ: Mapping[str, str] = os.environ
) -> tuple[argparse.ArgumentParser, Settings]:
    """Parse `serve` options; exits with status 2 and a message naming the culprit.

    Each option comes from its flag, else its MODELPOOL_* variable, else the --config
    file, else its default; a mistake is reported with where the value came from.
    """
    top = build_parser()
    args, extras = top.parse_known_args(argv)
    parser = top.commands.get(args.command) or top
    if extras:
        parser.refuse_extras(extras)
    config_file = args.config or environ.get("MODELPOOL_CONFIG") or None
    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = read_config_file(config_file)
        except OptionValueError as exc:
            parser.error(f"{exc.option.flag} (from {config_file}): {exc}")
        except ValueError as exc:
            parser.error(f"--config {config_file}: {exc}")
    values: dict[str, Any] = {}
    source: dict[str, str] = {}  # where a value that did not come from its flag came from
    worker = args.command == "worker"
    for option in OPTIONS:
        if worker and not option.for_worker:
            values[option.dest] = option.default  # a worker listens nowhere
            continue
        value = getattr(args, option.dest)
        if value is UNSET and option.env in environ:
            raw = environ[option.env]
            shown = redact_url(raw) if option.dest == "queue" else raw  # its password: never
            where = option.env if option.secret else f"{option.env}={shown!r}"
            source[option.dest] = f"from {where}"
            try:
                value = _from_env(option, raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{option.flag} (from {where}): {exc}")
        if value is UNSET and option.dest in from_file:
            source[option.dest] = f"from {config_file}"
            value = from_file[option.dest]
        values[option.dest] = option.default if value is UNSET else value
    if args.command == "worker":
        if values["queue"] is None:
            parser.error("--queue is required (the Redis stream to take jobs from)")
        if values["workers"] == 0:
            parser.error("--workers: must be at least 1 (a worker node runs models)")
    try:
        config = _build_config(values)
    except ConfigError as exc:
        option = BY_FIELD.get(exc.field) or BY_FIELD.get(f"pool.{exc.field}")
        if option is None:
            parser.error(str(exc))
        where = f" ({source[option.dest]})" if option.dest in source else ""
        problem = exc.problem
        if exc.field == "host":
            problem += " (--api-key or --allow-unauthenticated)"
        parser.error(f"{option.flag}{where}: {problem}")
    command = args.command or "serve"
    return parser, Settings(config, values["log_level"], values["log_format"], command)


class OptionValueError(ValueError):
    """A value in a file of options that its option refuses; `option` is which."""

    def __init__(self, option: Option, problem: str) -> None:
        super().__init__(problem)
        self.option = option


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a TOML file, by dest: `max-queue = 64` (or `max_queue`) sets --max-queue.

    A string is read as on the command line; a number or a boolean as itself, and a
    list of strings as a command (`model-cmd = ["python3", "-u", "model.py"]`).
    A regular file or a pipe (`--config <(...)`) of at most MAX_CONFIG_FILE bytes.
    """
    try:
        with open(path, "rb") as file:
            kind = os.fstat(file.fileno()).st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
                raise ValueError("not a file (a device, a directory or a socket)")
            data = file.read(MAX_CONFIG_FILE + 1)  # no further: /dev/zero would never end
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if len(data) > MAX_CONFIG_FILE:
        raise ValueError(f"larger than {MAX_CONFIG_FILE // MiB} MiB: not a file of options")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start + 1} is not)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    by_dest = {option.dest: option for option in OPTIONS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        dest = key.replace("-", "_")
        option = by_dest.get(dest)
        if option is None:
            close = difflib.get_close_matches(dest, list(by_dest), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ValueError(f"{key}: no such option{hint}")
        try:
            values[dest] = _from_toml(option, raw)
        except argparse.ArgumentTypeError as exc:
            raise OptionValueError(option, str(exc)) from None
    return values


def _from_toml(option: Option, raw: Any) -> Any:
    if option.convert is None:
        if not isinstance(raw, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {raw!r}")
        return raw
    if option.convert is command and isinstance(raw, list):
        if not raw or not all(isinstance(word, str) for word in raw):
            raise argparse.ArgumentTypeError("must be a list of strings naming a program")
        return raw
    if option.convert is split_devices and isinstance(raw, list):
        if not all(isinstance(word, str | int) and not isinstance(word, bool) for word in raw):
            raise argparse.ArgumentTypeError("must be a list of device ids, as [0, 1]")
        return tuple(str(word) for word in raw) or None
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise argparse.ArgumentTypeError(f"must be a string or a number, got {raw!r}")
    return option.convert(str(raw))


def version() -> str:
    try:
        return metadata.version("modelpool")
    except metadata.PackageNotFoundError:
        return "unknown"


def _from_env(option: Option, raw: str) -> Any:
    if option.convert is not None:
        return option.convert(raw)
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError("must be one of 1/0, true/false, yes/no, on/off")


def _build_config(values: dict[str, Any]) -> ServerConfig:
    pool: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for option in OPTIONS:
        if option.field is None:
            continue
        value = values[option.dest]
        if value is None and option.field == "pool.model_cmd":
            continue  # the bundled model
        if option.field.startswith("pool."):
            pool[option.field.removeprefix("pool.")] = value
        else:
            server[option.field] = value
    return ServerConfig(pool=PoolConfig(**pool), **server)
