"""Listening sockets and hypercorn's trio connection loop, run with our own limits.

hypercorn's `serve()` binds, accepts and shuts down in one call. The service needs three
things it does not offer, so this module runs hypercorn's own trio `TCPServer` per
connection the way `hypercorn.trio.run.worker_serve` does, with these differences:

- Sockets are bound first (`bind()`), before any model starts, so a port in use is an
  error at once and not after the models have loaded.
- At most `max_connections` connections are open at a time. Past that, the service
  stops accepting: new connections wait in the kernel's backlog, and get their turn as
  others close (idle keep-alive connections close after `keep_alive_timeout`, and so
  does a connection whose request headers have not all arrived by then). A flood of
  idle connections thus cannot use up the file descriptors that model restarts need.
- Shutdown has two steps. `stop_accepting` closes the listeners but keeps open
  connections, so a request that arrives on one while the pool drains is answered
  (503, with `Connection: close`) rather than cut off. `close_connections` then closes
  idle connections, and gives responses still being written `graceful_timeout`.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

log = logging.getLogger("modelpool.listener")

BACKLOG = 2048  # connections the kernel holds for us while we are at max_connections
FD_RESERVE = 64  # descriptors kept free for logs, pipes of restarting models and the like
FDS_PER_MODEL = 8  # three pipes, a pidfd, and slack


class CannotListen(OSError):
    """The address cannot be bound: in use, not available, or not permitted."""


def bind(config: HypercornConfig) -> Sockets:
    """Create and bind the listening sockets now; CannotListen names the address."""
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        where = ", ".join(config.bind)
        raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}") from None
    for sock in sockets.insecure_sockets:
        sock.listen(BACKLOG)
    return sockets


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (up to the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit to %d: %s", target, exc)
    return soft


def connection_budget(max_connections: int, models: int) -> int:
    """How many connections may be open without starving models of file descriptors."""
    wanted = max_connections + models * FDS_PER_MODEL + FD_RESERVE
    limit = raise_fd_limit(wanted)
    budget = limit - models * FDS_PER_MODEL - FD_RESERVE
    if budget < max_connections:
        budget = max(budget, 1)
        log.warning(
            "the open-files limit is %d: at most %d connections, not %d, leave room for models",
            limit,
            budget,
            max_connections,
        )
        return budget
    return max_connections


class LimitedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts only while fewer than the limit are open; the handler releases the slot."""

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots = slots

    async def accept(self) -> trio.SocketStream:
        await self._slots.acquire()
        try:
            return await self._inner.accept()
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class Connections:
    """Counts open connections; what /status reports."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.slots = trio.Semaphore(limit)


async def serve(
    app: ASGIFramework,
    config: HypercornConfig,
    sockets: Sockets,
    connections: Connections,
    *,
    stop_accepting: Callable[[], Awaitable[object]],
    close_connections: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on bound `sockets` until both shutdown steps have come and gone."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        connections.open += 1
        try:
            state = ConnectionState(lifespan_state.copy())
            await TCPServer(wrapped, config, context, state, stream)
        finally:
            connections.open -= 1
            connections.slots.release()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connection_nursery:
            listeners = [
                LimitedListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)), connections.slots
                )
                for sock in sockets.insecure_sockets
            ]
            binds = [
                f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
                for sock in sockets.insecure_sockets
            ]
            async with trio.open_nursery() as accept_nursery:
                accept = partial(trio.serve_listeners, handler_nursery=connection_nursery)
                accept_nursery.start_soon(accept, handle, listeners)
                task_status.started(binds)
                await stop_accepting()
                accept_nursery.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await close_connections()
            await context.terminated.set()  # idle connections close; busy ones after answering
            connection_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
