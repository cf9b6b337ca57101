"""`modelpool serve [options]`: run the service until a signal, and say plainly why it stopped.

Exit codes: 0 after a clean stop, 1 if it cannot listen (the port is taken), 2 for a
bad option, 3 if the model command cannot be run at all (as gunicorn does when its
workers cannot boot).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from . import logs
from .config import ServerConfig
from .errors import ModelCommandError
from .listener import CannotListen
from .options import parse
from .reaper import Reaper
from .server import Service

log = logging.getLogger("modelpool")
EXIT_CANNOT_LISTEN = 1
EXIT_MODEL_COMMAND = 3


async def run_service(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; a second signal stops at once; SIGHUP reloads the models.

    The service owns this process, so it adopts orphans (see reaper.py): whatever a
    model starts dies with it, however it escaped.
    """
    service = Service(config, Reaper(adopt_orphans=True))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, service, nursery)
            await service.run()
            nursery.cancel_scope.cancel()


async def _on_signals(signals: AsyncIterator[int], service: Service, nursery: trio.Nursery) -> None:
    """SIGHUP: a rolling reload. SIGTERM/SIGINT: a graceful stop; a second one: kill."""
    received = 0
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP: rolling reload of every model")
            nursery.start_soon(service.reload)
            continue
        received += 1
        if received == 1:
            log.info("%s: shutting down gracefully (send it again to stop at once)", name)
            service.shutdown()
        else:
            log.warning("%s again: killing every model now", name)
            service.kill()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "-h", "--help", "--version"):
        argv.insert(0, "serve")
    _, settings = parse(argv)
    logs.configure(settings.log_level, settings.log_format)
    code = 0
    try:
        trio.run(run_service, settings.config)
    except* CannotListen as group:
        code = EXIT_CANNOT_LISTEN
        for error in _leaves(group.exceptions):
            log.error("cannot serve: %s", error)
    except* ModelCommandError as group:
        code = EXIT_MODEL_COMMAND
        for error in _leaves(group.exceptions)[:1]:
            log.error("cannot start any model, so not serving: %s", error)
    except* OSError as group:
        code = EXIT_CANNOT_LISTEN
        for error in _leaves(group.exceptions):
            log.error("cannot serve: %s", error)
    return code


def _leaves(errors: Sequence[BaseException]) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    found: list[BaseException] = []
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error.exceptions))
        else:
            found.append(error)
    return found
