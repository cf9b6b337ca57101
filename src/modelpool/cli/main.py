"""`modelpool serve [options]`: run the service until a signal, and say plainly why it stopped.
`modelpool worker --queue URL [options]`: run models only, for a cluster's shared queue.

Exit codes: 0 after a clean stop, 1 if it cannot listen (the port is taken), 2 for a
bad option, 3 if the model command cannot be run at all, or if every model failed
before its ready line while none was ever ready (unless --keep-trying), as gunicorn
halts when its workers cannot boot. That last ERROR line quotes the model's stderr.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial

import trio

from modelpool.cli.parser import parse
from modelpool.core import logs
from modelpool.core.errors import FirstStartFailed, ModelCommandError
from modelpool.pool.fleetrun import open_fleet
from modelpool.pool.pool import Pool
from modelpool.process.reaper import Reaper
from modelpool.service.binding import CannotListen
from modelpool.service.sdnotify import Notifier
from modelpool.service.server import Service
from modelpool.settings.config import ConfigError, PoolConfig, ServerConfig

log = logging.getLogger("modelpool")
EXIT_CANNOT_LISTEN = 1
EXIT_MODEL_COMMAND = 3


async def run_service(config: ServerConfig, argv: Sequence[str] = ()) -> None:
    """Serve until SIGINT/SIGTERM; a second signal stops at once; SIGHUP reloads the models.

    The service owns this process, so it adopts orphans (see reaper.py): whatever a
    model starts dies with it, however it escaped. Under systemd, it tells systemd how
    it is doing (see sdnotify.py).
    """
    notifier = Notifier.from_environment()
    service = Service(config, Reaper(adopt_orphans=True), notifier, partial(reread, argv))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.watchdog)
            nursery.start_soon(_on_signals, signals, service, nursery, notifier)
            await service.run()
            nursery.cancel_scope.cancel()
    notifier.close()


async def run_worker(config: PoolConfig) -> None:
    """Models only, taking jobs from the shared queue, until SIGINT/SIGTERM (as `serve`).

    A graceful stop takes no new job and finishes the ones its models compute; the jobs
    still waiting stay in the stream for the other nodes.
    """
    notifier = Notifier.from_environment()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_fleet(config, Reaper(adopt_orphans=True)) as fleet:
            pool = fleet.default  # a node of a cluster runs one model (PoolConfig checks)
            log.info("worker node %s: %d model(s) taking jobs", pool.node, len(pool.workers))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.watchdog)
                nursery.start_soon(notifier.follow, fleet)
                nursery.start_soon(_on_signals, signals, PoolNode(pool), nursery, notifier)
                await pool.stopped.wait()
                nursery.cancel_scope.cancel()
    notifier.close()
    log.info("stopped")


class PoolNode:
    """A pool without HTTP, stopped and reloaded by signals as the service is."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def shutdown(self) -> None:
        self.pool.shutdown()

    def kill(self) -> None:
        self.pool.kill()

    async def reload(self) -> None:
        await self.pool.operations.signalled_reload()


async def _on_signals(
    signals: AsyncIterator[int],
    node: Service | PoolNode,
    nursery: trio.Nursery,
    notifier: Notifier,
) -> None:
    """SIGHUP: a rolling reload (with several models, the config file read again).
    SIGTERM/SIGINT: a graceful stop; a second one: kill."""

    async def reload() -> None:
        with notifier.reloading():
            await node.reload()

    received = 0
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP: rolling reload of every model")
            nursery.start_soon(reload)
            continue
        received += 1
        if received == 1:
            log.info("%s: shutting down gracefully (send it again to stop at once)", name)
            notifier.stopping()
            node.shutdown()
        else:
            log.warning("%s again: killing every model now", name)
            node.kill()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _, settings = parse(argv)  # `serve` unless argv names another command
    logs.configure(settings.log_level, settings.log_format)
    code = 0
    try:
        if settings.command == "worker":
            trio.run(run_worker, settings.config.pool)
        else:
            trio.run(run_service, settings.config, argv)
    except* CannotListen as group:
        code = EXIT_CANNOT_LISTEN
        for error in _leaves(group.exceptions):
            log.error("cannot serve: %s", error)
    except* ModelCommandError as group:
        code = EXIT_MODEL_COMMAND
        for error in _leaves(group.exceptions)[:1]:
            _log_model_command_error(error)
    except* OSError as group:
        code = EXIT_CANNOT_LISTEN
        for error in _leaves(group.exceptions):
            log.error("cannot serve: %s", error)
    return code


def reread(argv: Sequence[str]) -> ServerConfig:
    """The config as the command line, the environment and the config file say now (a
    SIGHUP reads the file again); ConfigError saying what is wrong, if anything is."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            _, settings = parse(argv)
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if "error:" in line]
        raise ConfigError(
            "config", lines[-1].split("error:", 1)[1].strip() if lines else ""
        ) from None
    return settings.config


def _log_model_command_error(error: BaseException) -> None:
    """The one ERROR record of a model command that cannot start. A first start's
    stderr lines are its `quoted` field: one to a line, escaped and indented, under
    the message in a text log (see logs.TextFormatter); a list in a JSON one."""
    if isinstance(error, FirstStartFailed) and error.stderr:
        log.error(
            "cannot start any model, so not serving: %s; its last stderr lines:",
            error.verdict,
            extra={"quoted": error.stderr},
        )
    else:
        log.error("cannot start any model, so not serving: %s", error)


def _leaves(errors: Sequence[BaseException]) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    found: list[BaseException] = []
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error.exceptions))
        else:
            found.append(error)
    return found
