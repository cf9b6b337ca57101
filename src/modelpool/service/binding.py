"""The listening socket, bound first: before any model starts, and before the HTTP stack
is even imported.

A port in use must be an error at once, not after the models have loaded; and the
models, which take seconds to load, should start as early as they can, while the rest
of the service (quart, hypercorn) is still being imported. So binding needs nothing
but the standard library. The socket is set up as hypercorn's own `create_sockets`
sets up a TCP bind (TCP_NODELAY, SO_REUSEADDR, non-blocking).

Under socket activation (a systemd `.socket` unit, or `systemd-socket-activate`), the
socket is not bound here but inherited, as sd_listen_fds(3) describes: $LISTEN_PID names
this process, $LISTEN_FDS counts the sockets, the first is fd 3. systemd keeps its own
copy open while the service restarts, so connections made meanwhile wait in the
socket's backlog instead of being refused.
"""

from __future__ import annotations

import os
import socket

BACKLOG = 2048  # connections the kernel holds for us while we are at max_connections
SD_LISTEN_FDS_START = 3  # the first file descriptor systemd passes
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


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


def inherited_socket() -> socket.socket | None:
    """The listening TCP socket systemd passed this process, or None if it passed none.

    The variables are removed from the environment whatever they say (no model inherits
    them), and the descriptor is made close-on-exec (no model inherits it either).
    Raises CannotListen if what was passed is not one listening TCP socket.
    """
    pid, count, _names = (os.environ.pop(name, None) for name in LISTEN_VARIABLES)
    if count is None or pid is None or pid.strip() != str(os.getpid()):
        return None  # none passed, or passed to another process (our parent)
    try:
        passed = int(count)
    except ValueError:
        raise CannotListen(f"LISTEN_FDS={count!r} is not a number of sockets") from None
    if passed == 0:
        return None
    if passed != 1:
        raise CannotListen(
            f"systemd passed {passed} sockets (LISTEN_FDS={passed}); modelpool serves one: "
            "give its .socket unit a single ListenStream="
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise CannotListen(
            f"fd {SD_LISTEN_FDS_START}, passed by systemd, is not a socket: {exc.strerror or exc}"
        ) from None
    os.set_inheritable(sock.fileno(), False)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise CannotListen(
            "the socket systemd passed is not a TCP socket: use ListenStream=PORT or ADDRESS:PORT"
        )
    if not listening:
        sock.close()
        raise CannotListen("the socket systemd passed is not listening")
    sock.setblocking(False)
    return sock
