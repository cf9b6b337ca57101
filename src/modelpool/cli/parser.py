"""The command line, made from the one table of options (settings/options.py).

Each option comes from its flag, else its MODELPOOL_* variable, else the --config file
(settings/sources.py), else its default. Syntax is checked by each option's parser;
sense once, by the config classes, which raise ConfigError naming a field. `parse()`
turns either kind of mistake into a message that names what the user typed: the flag,
and the variable with its value when the value came from the environment. Every mistake
has one form, `modelpool serve: error: --flag (from WHERE): problem`, and a hint to
`--help`, which lists the options by topic. Options are never abbreviated: `--worker 2`
is refused (with a suggestion), not taken for `--workers 2`; nor is a mistyped command:
`modelpool serv` is refused with the closest command and the list of them.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

from modelpool.queues import backends  # noqa: F401  (registers the --queue URL schemes it checks)
from modelpool.settings.config import ConfigError, ServerConfig, from_options
from modelpool.settings.option import Option
from modelpool.settings.options import OPTIONS, TOPICS, option
from modelpool.settings.parsers import BadValue
from modelpool.settings.sources import OptionValueError, choose, read_config_file

UNSET: Any = object()  # not on the command line (a converted value may well be None)
WITH_FLAG = {each.name: each for each in OPTIONS}  # a ConfigError names a field; we, its flag


@dataclass(frozen=True)
class Settings:
    """Parsed options: `config` for the service, plus the ones outside it."""

    config: ServerConfig
    log_level: str  # --log-level and --log-format: the table's defaults if not given
    log_format: str
    command: str  # "serve", or "worker": models only, for a shared queue


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
        listed = "commands" if self.commands else "options"
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the {listed})\n")

    def with_command(self, argv: Sequence[str]) -> list[str]:
        """`argv` with its command first: `serve` unless it names one (or asks for help or
        the version). A first word that is no command is refused, with the closest one,
        rather than taken for a stray argument of `serve`."""
        if argv and (argv[0] in ("-h", "--help", "--version") or argv[0] in self.commands):
            return list(argv)
        if not argv or argv[0].startswith("-"):
            return ["serve", *argv]
        word = argv[0]
        close = difflib.get_close_matches(word, self.commands, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        self.error(f"{word}: no such command{hint}; the commands are {', '.join(self.commands)}")

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
    for name, sub in parser.commands.items():
        sub.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help='read options from a TOML file, as `workers = 4` or `model-cmd = "..."`; '
            "the command line and then MODELPOOL_* variables win over it "
            "(env MODELPOOL_CONFIG)",
        )
        options = [each for each in OPTIONS if name in each.commands]
        for topic, about in TOPICS.items():
            chosen = [each for each in options if each.topic == topic]
            if chosen:  # a worker has no HTTP options
                _add_options(sub.add_argument_group(topic, about), chosen)
        if unknown := [each.flag for each in options if each.topic not in TOPICS]:
            raise ValueError(f"options with a topic not in TOPICS: {unknown}")
    return parser


def _add_options(group: argparse._ArgumentGroup, options: list[Option]) -> None:
    for each in options:
        default_text = "" if each.default is None else f"; default {each.default}"
        help_text = f"{each.help} (env {each.env}{default_text})"
        if each.convert is None:
            switch = "store_false" if each.default else "store_true"  # --no-...: off
            group.add_argument(
                each.flag, dest=each.name, action=switch, default=UNSET, help=help_text
            )
        elif each.repeated:
            read = _type(each.convert)
            group.add_argument(
                each.flag, dest=each.name, type=read, action=Merge, default=UNSET, help=help_text
            )
        else:
            read = _type(each.convert)
            group.add_argument(each.flag, type=read, default=UNSET, help=help_text)


class Merge(argparse.Action):
    """A flag given many times (`--model a=... --model b=...`): each value is a mapping,
    and the option's value is their union, the later one winning a name given twice."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        earlier = getattr(namespace, self.dest, UNSET)
        setattr(namespace, self.dest, values if earlier is UNSET else {**earlier, **values})


def _type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's parser as argparse calls it: a refusal is its ArgumentTypeError."""

    def read(text: str) -> Any:
        try:
            return convert(text)
        except BadValue as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = convert.__name__  # what argparse names in a message of its own
    return read


def parse(
    argv: Sequence[str], environ: Mapping[str, str] = os.environ
) -> tuple[argparse.ArgumentParser, Settings]:
    """Parse a command and its options (`serve` if argv starts with an option); exits with
    status 2 and a message naming the culprit.

    Each option comes from its flag, else its MODELPOOL_* variable, else the --config
    file, else its default; a mistake is reported with where the value came from.
    """
    top = build_parser()
    args, extras = top.parse_known_args(top.with_command(argv))
    parser = top.commands.get(args.command) or top
    if extras:
        parser.refuse_extras(extras)
    command = args.command or "serve"
    config_file = args.config or environ.get("MODELPOOL_CONFIG") or None
    try:
        from_file = {} if config_file is None else read_config_file(config_file)
    except OptionValueError as exc:
        parser.error(f"{exc.option.flag} ({exc.where}): {exc}")
    except ValueError as exc:
        parser.error(f"--config {config_file}: {exc}")
    options = [each for each in OPTIONS if command in each.commands]
    flags = {each.name: getattr(args, each.name) for each in options}
    given = {name: value for name, value in flags.items() if value is not UNSET}
    try:
        values, source = choose(options, given, environ, from_file, config_file)
    except OptionValueError as exc:
        parser.error(f"{exc.option.flag} ({exc.where}): {exc}")
    if command == "worker":
        if values.get("queue") is None:
            parser.error("--queue is required (the Redis stream to take jobs from)")
        if values.get("workers") == 0:
            parser.error("--workers: must be at least 1 (a worker node runs models)")
    try:
        config = from_options(values)
    except ConfigError as exc:
        culprit = WITH_FLAG.get(exc.field)
        if culprit is None:
            parser.error(str(exc))
        where = f" ({source[culprit.name]})" if culprit.name in source else ""
        problem = exc.problem
        if exc.field == "host":
            problem += " (--api-key or --allow-unauthenticated)"
        parser.error(f"{culprit.flag}{where}: {problem}")
    log_level = values.get("log_level", option("log_level").default)
    log_format = values.get("log_format", option("log_format").default)
    return parser, Settings(config, log_level, log_format, command)


def version() -> str:
    try:
        return metadata.version("modelpool")
    except metadata.PackageNotFoundError:
        return "unknown"
