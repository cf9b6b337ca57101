"""Telling systemd how the service is doing (sd_notify(3)); nothing at all when not run by it.

systemd passes the address of its notification socket in $NOTIFY_SOCKET (a path, or a
name in the abstract namespace when it starts with '@'); every message is one datagram
of `NAME=value` lines. The protocol is that small, so it is spoken here with the
standard library: python-systemd is a C extension that needs libsystemd's headers to
build, and the `sdnotify` package is unmaintained.

What is sent, for a `Type=notify` unit:

- `EXTEND_TIMEOUT_USEC` every EXTEND_EVERY seconds while models start (at start-up and
  during a reload), as long as the pool is healthy: a slow load never trips
  `TimeoutStartSec`, while a pool whose every model keeps failing (past
  --unhealthy-after) stops asking for more time, so systemd's limit applies again.
- `READY=1` once every model is ready; or, once some model has failed on its own, as
  soon as one is (a model that cannot start must not hold start-up forever).
- `STATUS=` with the pool's state ("4/4 models ready, 0 queued") whenever it changes,
  at most once every STATUS_EVERY seconds.
- `RELOADING=1` with `MONOTONIC_USEC` (which systemd 253+ needs to match the reload
  to its request) when a SIGHUP reload starts, and `READY=1` once it is over.
- `STOPPING=1` on the first SIGTERM/SIGINT.
- `WATCHDOG=1` every half of $WATCHDOG_USEC, from a trio task: it stops when the
  event loop does.

The variables are read once and removed from the environment, so that no model (an
untrusted program) can speak to systemd in the service's name.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from modelpool.pool.fleet import Fleet

log = logging.getLogger("modelpool.systemd")

EXTEND_EVERY = 5.0  # seconds between two EXTEND_TIMEOUT_USEC while models start
EXTEND_BY = 3 * EXTEND_EVERY  # how long each one lets systemd wait for the next
STATUS_EVERY = 0.25  # seconds: at most four STATUS= updates a second
STATUS_POLL = 0.25  # and the queue's length this often (it signals no change of its own)


class Notifier:
    """Messages to the service manager at `address`; every method is a no-op without one."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.phase = "starting"  # then "ready", "reloading", "stopping"
        self._socket: socket.socket | None = None
        self._warned = False
        self._status: str | None = None
        self._extended_at: float | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier systemd asked for, read from (and removed from) the environment."""
        address = os.environ.pop("NOTIFY_SOCKET", "") or None
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", address)
            address = None
        watchdog = None
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog = int(usec)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)
            else:
                watchdog = watchdog if watchdog > 0 else None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        """One datagram of `NAME=value` lines; a failure is logged once and otherwise ignored."""
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- what the service tells ---------------------------------------------------------

    def stopping(self) -> None:
        if self.phase != "stopping":
            self.phase = "stopping"
            self.send("STOPPING=1", "STATUS=shutting down")

    @contextmanager
    def reloading(self) -> Iterator[None]:
        """Around a reload: RELOADING=1 before, READY=1 after (if nothing else came first)."""
        if self.phase != "ready":
            yield  # still starting, stopping, or another reload runs: nothing to tell
            return
        self.phase = "reloading"
        self._extended_at = None
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading")
        try:
            yield
        finally:
            if self.phase == "reloading":
                self.phase = "ready"
                self._status = None  # the next STATUS= replaces "reloading"
                self.send("READY=1")

    async def watchdog(self) -> None:
        """WATCHDOG=1 every half of WATCHDOG_USEC, for as long as this task runs."""
        if self.address is None or self.watchdog_usec is None:
            return
        interval = self.watchdog_usec / 1e6 / 2
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval)

    async def follow(self, pool: Fleet) -> None:
        """Tell the pool's state until it has stopped: READY=1, STATUS=, extensions."""
        if self.address is None:
            return
        async with trio.open_nursery() as nursery:

            async def until_stopped() -> None:
                await pool.wait_stopped()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_stopped)
            while True:
                self._tell(pool)
                await trio.sleep(STATUS_EVERY)
                with trio.move_on_after(STATUS_POLL):
                    await pool.wait_changed()

    def _tell(self, pool: Fleet) -> None:
        now = time.monotonic()
        lines = []
        if self.phase == "starting" and _ready(pool):
            self.phase = "ready"
            lines.append("READY=1")
        elif self.phase in ("starting", "reloading") and self._extend_due(now, pool):
            self._extended_at = now
            lines.append(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}")
        status = _status_text(pool, self.phase)
        if status != self._status:
            self._status = status
            lines.append(f"STATUS={status}")
        if lines:
            self.send(*lines)

    def _extend_due(self, now: float, pool: Fleet) -> bool:
        """Time for another extension, and the pool is not failing as a whole."""
        due = self._extended_at is None or now - self._extended_at >= EXTEND_EVERY
        return due and pool.health()[0]


def _ready(pool: Fleet) -> bool:
    """Every model ready; or one, once some model has failed on its own."""
    ready = pool.local_ready
    if ready == len(pool.workers):
        return True
    return ready > 0 and any(w.failing_since is not None for w in pool.workers)


def _status_text(pool: Fleet, phase: str) -> str:
    text = f"{pool.local_ready}/{len(pool.workers)} models ready, {pool.queue_length} queued"
    if (others := pool.ready_count - pool.local_ready) > 0:
        text += f", {others} ready on other nodes"
    healthy, problem = pool.health()
    if not healthy:
        text += f"; failing: {problem}"
    if phase in ("reloading", "stopping"):
        text += f"; {'reloading' if phase == 'reloading' else 'shutting down'}"
    return text
