"""What the memory watch last saw of a worker's model: the pages it shares with other
processes (its template's, under --preload) and the pages of its own.

refresh.py measures each ready model's tree in a thread (once a second, and at once when
its page faults say it may have passed --preload-max-private); the worker's slot keeps
the last look, so that /status and modelpool_model_private_bytes show it without a read
of /proc on the event loop. A module of its own because the figure is the watch's, kept
beside a worker, not part of what a worker does.
"""

from __future__ import annotations


class MemorySeen:
    """The last look at a worker's model, for the model it was taken of only."""

    def __init__(self) -> None:
        self._seen: tuple[int, int, int] | None = None  # pid, shared and private KiB

    def note(self, pid: int, shared_kib: int, private_kib: int) -> None:
        """Model `pid` held `shared_kib` and `private_kib` (its tree's), just now."""
        self._seen = (pid, shared_kib, private_kib)

    def of(self, pid: int | None) -> tuple[int, int] | None:
        """Shared and private KiB of model `pid` at the last look; None if not looked at
        (a look at an earlier model of the slot does not count)."""
        seen = self._seen
        if seen is None or seen[0] != pid:
            return None
        return seen[1], seen[2]

    def for_status(self, pid: int | None) -> dict[str, float] | None:
        """The same in MiB, as /status shows it."""
        seen = self.of(pid)
        if seen is None:
            return None
        return {"shared_mib": round(seen[0] / 1024, 1), "private_mib": round(seen[1] / 1024, 1)}
