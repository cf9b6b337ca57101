"""The service: a pool and an HTTP listener on top of it, with graceful and hard stops.

Start-up binds the port first, then starts the models, then serves. `shutdown()` (first
SIGINT/SIGTERM): the listener closes, requests on connections already open get 503,
queued and in-flight requests get until the drain deadline; once the pool has stopped,
idle connections are closed and every model's stdin is closed, and whatever has not
exited after `exit_grace` is killed. Responses still being written then get
RESPONSE_SLACK seconds, after which their connections are closed, whether their clients
read or not. `kill()` (a second signal): every model is SIGKILLed at once, waiting
requests get 503, and HARD_STOP_SLACK seconds after the pool has stopped every
connection is closed, whatever it is doing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING

import trio

from modelpool.http.origins import guard_for
from modelpool.pool.changes import reconfigure
from modelpool.pool.fleet import Fleet
from modelpool.pool.fleetrun import open_fleet
from modelpool.pool.operations import NOT_SERVING
from modelpool.pool.pool import Pool
from modelpool.process.reaper import Reaper
from modelpool.service.binding import CannotListen, bind, inherited_socket
from modelpool.service.sdnotify import Notifier
from modelpool.settings.config import ConfigError, ServerConfig, is_loopback

if TYPE_CHECKING:
    from modelpool.http._hypercorn import ASGIFramework
    from modelpool.http._hypercorn import Config as HypercornConfig
    from modelpool.http.connections import Connections

log = logging.getLogger("modelpool.server")

RESPONSE_SLACK = 2.0  # seconds responses still get once the pool has stopped
HARD_STOP_SLACK = 0.5  # ... once a hard stop has come (time to write its 503s), at most


def import_http_stack() -> None:
    """Import what serving HTTP needs (quart, hypercorn): run in a thread, see Service.run."""
    import_module("modelpool.http.app")
    import_module("modelpool.http.fastpath")
    import_module("modelpool.http.listener")


class Service:
    """The whole service in one trio task; `reaper` as for `open_pool`; `notifier` tells
    systemd how it is doing (see sdnotify.py)."""

    def __init__(
        self,
        config: ServerConfig,
        reaper: Reaper | None = None,
        notifier: Notifier | None = None,
        reread: Callable[[], ServerConfig] | None = None,
    ) -> None:
        self.config = config
        self._reread = reread  # the config as its sources say now (SIGHUP, several models)
        self.notifier = notifier or Notifier()
        self.connections: Connections | None = None
        self._reaper = reaper
        self._stop = trio.Event()
        self._killed = trio.Event()
        self._fleet: Fleet | None = None

    @property
    def fleet(self) -> Fleet | None:
        """The running models, once `run()` has started them."""
        return self._fleet

    @property
    def pool(self) -> Pool | None:
        """The default model's pool (the only one, unless several are declared)."""
        return None if self._fleet is None else self._fleet.default

    def shutdown(self) -> None:
        self._stop.set()
        if self._fleet is not None:
            self._fleet.shutdown()

    def kill(self) -> None:
        self._stop.set()
        self._killed.set()
        if self._fleet is not None:
            self._fleet.kill()

    async def reload(self) -> None:
        """SIGHUP: with several models, the config is read again and the models changed
        to match (pool/changes.py); else a rolling reload of the model with the same
        command. Its outcome goes to the log."""
        if self._fleet is None:
            log.warning(NOT_SERVING)
            return
        if self._fleet.several and self._reread is not None:
            try:
                new = self._reread().pool
                await reconfigure(self._fleet, new)
            except (ConfigError, ValueError) as exc:
                log.error("SIGHUP: the models are left as they were: %s", exc)
            return
        async with trio.open_nursery() as nursery:
            for pool in self._fleet.pools.values():
                nursery.start_soon(pool.operations.signalled_reload)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown()`; reports the URL it listens on through task_status.

        Raises binding.CannotListen before any model starts if the port cannot be
        bound, and errors.ModelCommandError if the model command cannot be run.
        """
        sock, names = self._listening_socket()
        origins = guard_for(self.config, names)
        try:
            async with open_fleet(self.config.pool, self._reaper) as fleet:
                # The models are starting (each takes seconds): the HTTP stack, a fifth
                # of a second to import, is imported meanwhile rather than before, in a
                # thread, so that this one goes on starting models.
                await trio.to_thread.run_sync(import_http_stack)
                from modelpool.http.app import create_app
                from modelpool.http.bodyrate import MinBodyRate
                from modelpool.http.connections import Connections, connection_budget
                from modelpool.http.listener import serve, sockets

                self._fleet = fleet
                fleet.mark_serving_http()
                if self._killed.is_set():
                    fleet.kill()
                elif self._stop.is_set():
                    fleet.shutdown()
                limit = connection_budget(self.config.max_connections, self.config.pool.workers)
                # A client that reads nothing of its answer is given as long as an idle one.
                rate = MinBodyRate(self.config.min_body_rate, self.config.min_body_rate_grace)
                self.connections = Connections(limit, self.config.keep_alive_timeout, rate)
                app: ASGIFramework = create_app(
                    fleet, self.config, self.connections, origins=origins
                )
                from modelpool.http.fastpath import Predictions

                # POST /predict answered on the connection, without ASGI: see fastpath.py
                fast = self.config.fast_predict
                predictions = Predictions(fleet, self.config, origins) if fast else None
                hypercorn_config = self._hypercorn_config()
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(
                        partial(
                            serve,
                            app,
                            hypercorn_config,
                            sockets(sock),
                            self.connections,
                            stop_accepting=self._stop.wait,
                            close_connections=fleet.wait_stopped,
                            hard_stop=self._killed.wait,
                            hard_stop_slack=HARD_STOP_SLACK,
                            predictions=predictions,
                        )
                    )
                    url = binds[0]
                    log.info("listening on %s with %d model(s)", url, len(fleet.workers))
                    task_status.started(url)
                    nursery.start_soon(self.notifier.follow, fleet)
        finally:
            sock.close()
        log.info("stopped")

    def _listening_socket(self) -> tuple[socket.socket, list[str]]:
        """The socket systemd passed, if it passed one; else one bound to --host/--port;
        and the names it listens on, for `Host` (see origins.py): its address, and the
        --host it was bound to (a name, perhaps)."""
        sock = inherited_socket()
        if sock is None:
            sock = bind(self.config.host, self.config.port)
            return sock, [sock.getsockname()[0], self.config.host]
        host, port = sock.getsockname()[:2]
        log.info(
            "serving on the socket systemd passed (%s port %d); --host, --port ignored", host, port
        )
        open_to_all = self.config.api_key is None and not self.config.allow_unauthenticated
        if open_to_all and not is_loopback(host):
            sock.close()
            raise CannotListen(
                f"the socket systemd passed listens on {host}, not a loopback address, and "
                "no API key is set: set MODELPOOL_API_KEY, or pass --allow-unauthenticated"
            )
        return sock, [host]

    def _hypercorn_config(self) -> HypercornConfig:
        from modelpool.http._hypercorn import Config as HypercornConfig

        config = HypercornConfig()
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        config.bind = [f"{host}:{self.config.port}"]
        config.graceful_timeout = RESPONSE_SLACK
        config.keep_alive_timeout = self.config.keep_alive_timeout
        config.errorlog = logging.getLogger("hypercorn.error")
        config.accesslog = None  # app.py writes one line per request, with its timings
        return config
