"""A --preload template's first word: it reached its fork point, or it cannot be forked.

The launcher (_launcher.py) says so on the control socket: at the model's first read of
stdin, after its ready line (`fork_point`, or `unsafe` with the reason), or while the
model still loads, when it sees a thread pool started in C (`unsafe`, `early`). A model
that prints its ready line but never reads sys.stdin (it reads fd 0 directly, or waits
in select()) never lets the launcher speak: `no_fork_point` after FORK_POINT_WAIT.
"""

from __future__ import annotations

import os

import trio

from modelpool.process import control
from modelpool.process.control import BadMessage, Message
from modelpool.process.failures import StartFailed
from modelpool.process.modelprocess import ModelProcess

FORK_POINT_WAIT = 10.0  # seconds from the ready line to the model's first read of stdin


async def first_word(sock: trio.socket.SocketType, model: ModelProcess, name: str) -> Message:
    """The launcher's first word: it reached the fork point (after its ready line), or
    it is not safe to fork, which it may say while the model still loads (a thread
    pool started in C, see _launcher.py): then the models start plainly at once,
    and the template, a plain model from then on, becomes one of them (lending.py)."""
    heard: list[Message | None] = []
    failures: list[StartFailed] = []  # raised after the nursery: not in a group
    got = trio.Event()
    async with trio.open_nursery() as nursery:

        async def listen() -> None:
            try:
                message, fds = await control.receive(sock)
            except BadMessage as exc:
                problem = f"a message on its control socket makes no sense: {exc}"
                failures.append(StartFailed(f"{name} failed to start: {problem}"))
                nursery.cancel_scope.cancel()
                return
            for fd in fds:
                os.close(fd)
            heard.append(message)
            got.set()
            if message is not None and message.get("event") != "fork_point":
                nursery.cancel_scope.cancel()  # unsafe: its ready line is not needed

        nursery.start_soon(listen)
        try:
            await model.wait_ready()
        except StartFailed as exc:
            failures.append(exc)
        else:
            with trio.move_on_after(FORK_POINT_WAIT):
                await got.wait()
        nursery.cancel_scope.cancel()
    first = heard[0] if heard else None
    if first is not None and first.get("event") != "fork_point":
        return first  # unsafe, whatever else went wrong
    if failures:
        raise failures[0]
    if heard:
        if first is None:
            failure = await model.describe_failure()
            raise StartFailed(f"{name} ended before its fork point: {failure.detail}")
        return first
    return {
        "event": "no_fork_point",  # a launcher that never got control: not lent
        "reason": f"it printed its ready line but did not read sys.stdin within "
        f"{FORK_POINT_WAIT:g} s (a model that reads fd 0 directly, or waits with "
        "select(), never reaches the fork point)",
    }
