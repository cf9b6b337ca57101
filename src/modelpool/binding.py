"""The listening socket, bound first: before any model starts, and before the HTTP stack
is even imported.

A port in use must be an error at once, not after the models have loaded; and the
models, which take seconds to load, should start as early as they can, while the rest
of the service (quart, hypercorn) is still being imported. So binding needs nothing
but the standard library. The socket is set up as hypercorn's own `create_sockets`
sets up a TCP bind (TCP_NODELAY, SO_REUSEADDR, non-blocking).
"""

from __future__ import annotations

import socket

BACKLOG = 2048  # connections the kernel holds for us while we are at max_connections


class CannotListen(OSError):
    """The address cannot be bound: in use, not available, or not permitted."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; CannotListen names the address."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock
