"""Immortal template objects, as the pool sees them: one template process's walk, and the
replacement of the children forked before it ended.

A template's children share its pages until they write them, and reading a Python
object writes its reference count: with --preload-immortal (on by default), the
launcher marks the template's objects immortal once it is ready (_immortal.py says how,
and where it is refused: Python 3.11 and older, free-threaded and debug builds). The
walk takes seconds for millions of objects. The first models do not wait for it: they
are forked from the template as it is, so the service answers while the walk runs, as
many as leave the walk a core of its own when they compute (`forks_before_walk`: all
of them on a machine with cores to spare, one where the models' thread budgets take
every core). The others wait for it (`before_fork`, WALK_WAIT at most): forked before,
each would take the walk's core, copy the pages of every object it reads, and be thrown
away after. Once the walk is done (`immortal`), each child forked before is replaced by
surge (`replace_mortal`), by a fork of the immortal template, under the restart reason
`immortal`.

`Immortality` is one template process's: a template loaded again walks again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from modelpool.process import control
from modelpool.process.control import Message

log = logging.getLogger("modelpool.preload")

REPLACE_EVERY = 1.0  # seconds between two asks to replace the children forked before
WALK_WAIT = 60.0  # seconds a later fork waits for the walk, at most
Replace = Callable[[set[int]], None]  # the pool's: replace the models of these pids by surge


def forks_before_walk(cores: int, threads: int | None) -> int:
    """How many children are forked before the walk ends: as many as leave the walk a
    core of its own while they compute, each taking `threads` cores (its thread budget;
    None, --model-threads 0: as many as the machine has), and at least one, so that the
    service answers while the template walks.

    A child beyond those would take the walk's core: the walk then lasts several times
    longer, meanwhile every child copies the pages of the objects it reads, and all of
    them are replaced after. Measured on 2 cores with 4 single-thread models of
    2,000,000 keys (benchmarks/preload.py): all 4 forked at once were 4/4 ready in 2.6 s
    but served 0.85 of plain models' requests a second over their first 2,000 requests;
    one forked at once, the others after the walk, 5.6 s and 1.00.
    """
    per_child = cores if threads is None else max(1, threads)
    return max(1, (cores - 1) // per_child)


class Immortality:
    """Whether one template's objects are immortal (its process's: reset when it loads
    again), and which of its children were forked before they were."""

    def __init__(self, name: str, wanted: bool, early: int) -> None:
        """`wanted`: --preload-immortal; `early`: the forks that do not wait for the walk
        (`forks_before_walk`)."""
        self.name = name
        self._wanted = wanted
        self.early = early
        self._on_immortal: Callable[[], None] | None = None
        self._process = 0  # how many template processes it has seen, for replace_mortal
        self._settled = trio.Event()
        self.reset(ready=False)

    def when_immortal(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time a template process's objects have become immortal:
        the pool's, which starts `replace_mortal`."""
        self._on_immortal = callback

    def reset(self, ready: bool) -> None:
        """A template process reached its fork point (`ready`: it is asked to walk its
        objects), or the last one ended (a new one loads)."""
        self._settled.set()  # the forks waiting for the last one's walk go on
        self._process += 1
        self.immortal = False
        self.objects: int | None = None
        self.seconds: float | None = None
        self.why_not: str | None = "turned off (--no-preload-immortal)"
        if self._wanted:
            self.why_not = "being made immortal" if ready else "the template is not ready"
        self.walking = self._wanted and ready
        self.mortal: set[int] = set()  # its live children forked before the walk ended
        self._forks_while_walking = 0
        self._settled = trio.Event()  # the walk ended (or failed, or the template did)
        if not self.walking:
            self._settled.set()

    async def before_fork(self) -> None:
        """Called before each fork request: the first `early` go at once, the others
        wait for the walk to end (WALK_WAIT seconds at most)."""
        if self.walking and self._forks_while_walking >= self.early:
            with trio.move_on_after(WALK_WAIT):
                await self._settled.wait()
        if self.walking:
            self._forks_while_walking += 1

    async def ask(self, sock: trio.socket.SocketType, sending: trio.Lock) -> None:
        """With --preload-immortal, ask the template (now ready) to walk its objects;
        the first forks do not wait for it (see before_fork)."""
        if not self.walking:
            return
        try:
            async with sending:
                await control.send_immortalize(sock)
        except OSError:
            pass  # it is gone: the template's socket is seen to close

    def on_message(self, message: Message) -> None:
        """Take note of one message of the template's (see `when_immortal`). KeyError,
        TypeError or ValueError if the message makes no sense."""
        event = message.get("event")
        if event == "forked":  # its pid is checked by Requests
            pid = message.get("pid")
            if self.walking and not message.get("immortal") and isinstance(pid, int):
                self.mortal.add(pid)
        elif event == "exited":
            self.mortal.discard(int(message["pid"]))
        elif event == "immortal" and self.walking:
            self.walking, self.immortal, self.why_not = False, True, None
            self._settled.set()
            self.objects = int(message["objects"])
            self.seconds = float(message["seconds"])
            log.info(
                "%s: %d objects made immortal in %.1f s; %d model(s) forked before it are replaced",
                self.name,
                self.objects,
                self.seconds,
                len(self.mortal),
            )
            if self._on_immortal is not None:
                self._on_immortal()
        elif event == "not_immortal" and self.walking:
            self.walking, self.mortal = False, set()
            self._settled.set()
            self.why_not = str(message["reason"])
            log.info("%s: its objects are not made immortal: %s", self.name, self.why_not)

    async def replace_mortal(self, replace: Replace) -> None:
        """Until none is left: ask, every REPLACE_EVERY seconds, for the children forked
        before the walk ended to be replaced (`replace` is the pool's, and asks once per
        model; a model whose worker is just taking it is found the next time). It ends
        within REPLACE_EVERY once the template ends (`reset`)."""
        process = self._process
        while self.mortal and self._process == process:
            replace(set(self.mortal))
            await trio.sleep(REPLACE_EVERY)

    def snapshot(self, fallen_back: bool) -> dict[str, Any]:
        """For /status: whether its objects are immortal, and why not."""
        why_not = "its models start plainly (see fallback_reason)" if fallen_back else self.why_not
        return {
            "immortal": self.immortal,
            "why_not_immortal": why_not,
            "immortal_objects": self.objects,
            "immortal_seconds": self.seconds,
            # how many go before the walk ends; None where there is no walk
            "forks_before_walk": self.early if self.walking or self.immortal else None,
        }
