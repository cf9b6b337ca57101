"""`modelpool serve [options]`: every option can also come from a MODELPOOL_* variable."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .config import MiB, PoolConfig, ServerConfig
from .server import Service

log = logging.getLogger("modelpool")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TRUE_WORDS = {"1", "true", "yes", "on"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _seconds_or_none(text: str) -> float | None:
    """A number of seconds, where 0 means no limit."""
    value = float(text)
    return None if value == 0 else value


@dataclass(frozen=True)
class Option:
    flag: str
    convert: Callable[[str], Any] | None  # None: an on/off switch
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "MODELPOOL_" + self.flag.lstrip("-").upper().replace("-", "_")


OPTIONS = [
    Option("--host", str, "127.0.0.1", "address to listen on"),
    Option("--port", int, 8080, "port to listen on; 0 picks a free one (the log names it)"),
    Option("--workers", int, 4, "model processes kept warm, started in parallel"),
    Option(
        "--model-cmd",
        str,
        None,
        "command that starts one model, quoted as in a shell; "
        "default: the bundled model3.py, run unbuffered by this Python",
    ),
    Option(
        "--ready-line",
        str,
        "ready: Model-initialized",
        "a model is ready once it prints a line that starts with this",
    ),
    Option(
        "--timeout",
        float,
        10.0,
        "seconds a model may compute one request; past it the model is killed and "
        "replaced, and the request gets 504",
    ),
    Option(
        "--init-timeout",
        float,
        60.0,
        "seconds a model may take to print its ready line before it is killed and started again",
    ),
    Option("--max-queue", int, 256, "requests that may wait for a model; more get 503"),
    Option(
        "--queue-timeout",
        _seconds_or_none,
        120.0,
        "seconds a request may wait for a free model before it gets 503; 0 waits forever",
    ),
    Option("--max-body", int, MiB, "largest request body in bytes; larger ones get 413"),
    Option(
        "--keep-alive-timeout",
        float,
        5.0,
        "seconds an idle keep-alive connection stays open; behind a load balancer, "
        "make it longer than the balancer's idle timeout",
    ),
    Option(
        "--max-line",
        int,
        16 * MiB,
        "longest line in bytes a model may print; a longer one is a model failure",
    ),
    Option(
        "--backoff-initial",
        float,
        0.5,
        "seconds before restarting a model that failed on its own; doubles each time",
    ),
    Option("--backoff-max", float, 30.0, "longest delay between such restarts"),
    Option(
        "--drain-timeout",
        float,
        None,
        "on SIGTERM/SIGINT, seconds queued and in-flight requests still get; "
        "default: --timeout plus one second",
    ),
    Option(
        "--exit-grace",
        float,
        5.0,
        "seconds a model gets to exit after its stdin is closed before it is killed",
    ),
    Option("--log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Option("--access-log", None, False, "log every HTTP request"),
]


def build_parser(
    environ: dict[str, str] | os._Environ[str] = os.environ,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpool",
        description="Keep a pool of warm model processes behind POST /predict.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the HTTP service (the default command)",
        description="Start the pool and serve POST /predict, GET /healthz, /readyz, /status. "
        "Every option can also be set by the environment variable named in its help; "
        "a command-line option wins over the variable.",
    )
    for option in OPTIONS:
        env_value = environ.get(option.env)
        default_text = "" if option.default is None else f"; default {option.default}"
        help_text = f"{option.help} (env {option.env}{default_text})"
        if option.convert is None:
            default = option.default if env_value is None else env_value.lower() in TRUE_WORDS
            serve.add_argument(option.flag, action="store_true", default=default, help=help_text)
        else:
            default = option.default if env_value is None else env_value
            serve.add_argument(option.flag, type=option.convert, default=default, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    pool_options: dict[str, Any] = {
        "workers": args.workers,
        "ready_line": args.ready_line,
        "timeout": args.timeout,
        "init_timeout": args.init_timeout,
        "max_queue": args.max_queue,
        "queue_timeout": args.queue_timeout,
        "max_line": args.max_line,
        "backoff_initial": args.backoff_initial,
        "backoff_max": args.backoff_max,
        "drain_timeout": args.drain_timeout,
        "exit_grace": args.exit_grace,
    }
    if args.model_cmd:
        pool_options["model_cmd"] = shlex.split(args.model_cmd)
    return ServerConfig(
        pool=PoolConfig(**pool_options),
        host=args.host,
        port=args.port,
        max_body=args.max_body,
        keep_alive_timeout=args.keep_alive_timeout,
        access_log=args.access_log,
    )


async def run_service(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; a second signal stops at once."""
    service = Service(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, service)
            await service.run()
            nursery.cancel_scope.cancel()


async def _on_signals(signals: AsyncIterator[int], service: Service) -> None:
    received = 0
    async for signum in signals:
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            log.info("%s: shutting down gracefully (send it again to stop at once)", name)
            service.shutdown()
        else:
            log.warning("%s again: killing every model now", name)
            service.kill()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "-h", "--help"):
        argv.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    failed = False
    try:
        trio.run(run_service, config)
    except* OSError as group:  # such as the port being in use
        failed = True
        for error in _leaves(group.exceptions):
            log.error("cannot serve: %s", error)
    return 1 if failed else 0


def _leaves(errors: Sequence[BaseException]) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    found: list[BaseException] = []
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error.exceptions))
        else:
            found.append(error)
    return found
