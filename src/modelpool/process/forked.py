"""A child forked from a --preload template, as its worker sees it: a `ModelHandle`.

The child is not this process's child but the template's (see preload.py), so trio
cannot wait for it. It comes with a pidfd, which becomes readable the moment it exits;
its exit status comes from the template, which reaps its children and reports each
(`ExitReport`), or from waitid if this process adopted it as a subreaper after the
template died. If neither can tell, the status is unknown (None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from modelpool.core.kinds import StartMethod
from modelpool.process.procfs import tree_private_mib

REPORT_WAIT = 2.0  # seconds the template gets to report how a child of its ended


@dataclass
class ExitReport:
    """How a child ended, as its template reports it; `done` once known or never to be."""

    status: int | None = None
    done: trio.Event = field(default_factory=trio.Event)


class ForkedProcess:
    """A child forked from a template, as a `ModelHandle` (see starter.py)."""

    method = StartMethod.FORK
    ready_at_start = True

    def __init__(
        self,
        pid: int,
        pidfd: int,
        pipes: tuple[int, int, int],
        report: ExitReport,
        started_at: float,
    ) -> None:
        self.pid = pid
        self.started_at = started_at
        self.stdin = trio.lowlevel.FdStream(pipes[0])
        self.stdout = trio.lowlevel.FdStream(pipes[1])
        self.stderr = trio.lowlevel.FdStream(pipes[2])
        self._pidfd = pidfd
        self._report = report
        self._exited = False
        self._code: int | None = None
        self._waiting = trio.Lock()  # one task waits on the pidfd; the others on the lock

    @property
    def returncode(self) -> int | None:
        return self._code if self._exited else None

    @property
    def running(self) -> bool:
        return not self._exited

    async def wait(self) -> int | None:
        async with self._waiting:
            if not self._exited:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._code = await self._exit_status()
                self._exited = True
                os.close(self._pidfd)
                self._pidfd = -1
        return self._code

    async def _exit_status(self) -> int | None:
        """It has exited: its status from whoever is its parent now, if anyone can tell."""
        code = self._reap_adopted()
        if code is not None:
            return code
        with trio.move_on_after(REPORT_WAIT):
            await self._report.done.wait()
        if self._report.status is not None:
            return self._report.status
        return self._reap_adopted()

    def _reap_adopted(self) -> int | None:
        """Its status, if this process is its parent (adopted after the template died)."""
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return None
        if result is None:
            return None
        if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -result.si_status
        return result.si_status

    async def aclose(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            await stream.aclose()

    def memory_mib(self) -> float:
        """What it holds of its own: the private pages of its tree, not the template's."""
        return tree_private_mib(self.pid)
