"""A --preload template's control socket, as the pool sees it (the launcher's side is
_launcher.py, whose docstring lists the messages).

The model runs in the template process and could write to the socket too, so what
comes on it is checked (`receive`): one JSON object, whole, or `BadMessage`. Each fork
request waits for its reply, and each child forked for its exit report (`Requests`).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from modelpool.process.forked import ExitReport

MAX_MESSAGE = 64 * 1024

Message = dict[str, Any]


@dataclass
class Reply:
    """The template's answer to one fork request."""

    done: trio.Event = field(default_factory=trio.Event)
    pid: int | None = None
    pidfd: int | None = None
    report: ExitReport | None = None
    error: str | None = None


class Requests:
    """One template's fork requests awaiting replies, and its children awaiting reports."""

    def __init__(self) -> None:
        self._ids = 0
        self._pending: dict[int, Reply] = {}
        self._exits: dict[int, ExitReport] = {}  # pid -> report, for this template's children

    def open(self) -> tuple[int, Reply]:
        """A new request's id, and the reply it will get."""
        self._ids += 1
        reply = self._pending[self._ids] = Reply()
        return self._ids, reply

    def close(self, ident: int) -> None:
        """The request is over: a reply that comes later has nobody to go to."""
        self._pending.pop(ident, None)

    def on_message(self, message: Message, fds: list[int]) -> str | None:
        """Act on one message, owning its descriptors; why, once the template is unsafe.

        KeyError, TypeError or ValueError if the message makes no sense.
        """
        event = message.get("event")
        if event == "forked":
            self._on_forked(message, fds)
            return None
        for fd in fds:
            os.close(fd)
        if event == "exited":
            report = self._exits.pop(int(message["pid"]), None)
            if report is not None:
                report.status = int(message["status"])
                report.done.set()
        elif event == "fork_failed":
            reply = self._pending.get(message.get("id", 0))
            if reply is not None:
                reply.error = str(message.get("error"))
                reply.done.set()
            if message.get("unsafe"):  # it became unsafe to fork since its fork point
                return str(message.get("error"))
        return None

    def _on_forked(self, message: Message, fds: list[int]) -> None:
        pid = message.get("pid")
        reply = self._pending.get(message.get("id", 0))
        if not isinstance(pid, int) or pid <= 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"a fork reported with pid {pid!r} and {len(fds)} descriptor(s)")
        report = self._exits[pid] = ExitReport()
        if reply is None:  # its start was cancelled meanwhile: nobody owns the child
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fds[0], signal.SIGKILL)
            os.close(fds[0])
            return
        reply.pid, reply.pidfd, reply.report = pid, fds[0], report
        reply.done.set()

    def template_gone(self) -> None:
        """No more reports will come: children that end from now on are waited for alone."""
        for report in self._exits.values():
            report.done.set()
        self._exits.clear()
        for reply in self._pending.values():
            if reply.error is None and reply.pidfd is None:
                reply.error = "the template ended"
            reply.done.set()


class BadMessage(Exception):
    """What came on a template's control socket is not a message of the launcher's."""


async def receive(sock: trio.socket.SocketType) -> tuple[Message | None, list[int]]:
    """One message from the launcher and the descriptors it carried; None at its end.

    BadMessage (its descriptors closed) if it is not one JSON object, whole.
    """
    fds: list[int] = []
    try:
        data, ancillary, flags, _ = await sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    except OSError:
        return None, fds
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
            fds.extend(numbers)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    problem = _message_problem(data, flags)
    if problem is not None:
        for fd in fds:
            os.close(fd)
        raise BadMessage(f"{data[:80]!r}: {problem}")
    message: Message = json.loads(data)
    return message, fds


async def send_fork(
    sock: trio.socket.SocketType, ident: int, token: str, env: dict[str, str | None], fds: list[int]
) -> None:
    """Ask for one child: its request id, token and environment changes, and its stdin,
    stdout and stderr (`fds`, sent along: SCM_RIGHTS). OSError if the template is gone."""
    request = json.dumps({"op": "fork", "id": ident, "token": token, "env": env}).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    await sock.sendmsg([request], ancillary)


async def send_immortalize(sock: trio.socket.SocketType) -> None:
    """Ask the template to make its objects immortal (see immortal.py). OSError if it
    is gone."""
    await sock.send(json.dumps({"op": "immortalize"}).encode())


def _message_problem(data: bytes, flags: int) -> str | None:
    """Why `data` is not one whole JSON object, or None."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return "cut short"
    try:
        message = json.loads(data)
    except ValueError as exc:
        return str(exc)
    return None if isinstance(message, dict) else "not an object"
