"""What a model prints on stderr: read to its end by a pump of its own, each line logged
at --model-log-level within the model's output budget, and the last --stderr-tail lines
kept, for /status and the failures that quote them.

A progress bar (states separated by carriage returns) counts as its last state. A line
longer than MAX_STDERR_LINE is dropped, with a note in its place, and the pump goes on
with the next: a model cannot stop its stderr from being read.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from modelpool.process.lines import LineReader, LineTooLong
from modelpool.process.output import StampedStream, last_state, text

MAX_STDERR_LINE = 64 * 1024

log = logging.getLogger("modelpool.model")


class StderrPump:
    """The stderr of the model `name`; `log_output(stream, line)` logs one of its lines."""

    def __init__(self, name: str, tail: int, log_output: Callable[[str, str], None]) -> None:
        self.ended = trio.Event()  # its stderr came to its end (or could not be read)
        self._name = name
        self._tail: deque[str] = deque(maxlen=tail)
        self._log_output = log_output

    def rename(self, name: str) -> None:
        """Its model goes by another name (a --preload template adopted by a worker)."""
        self._name = name

    def tail(self) -> list[str]:
        """Its last lines, oldest first."""
        return list(self._tail)

    def note(self) -> str:
        """For a failure's ERROR line: where the model's last stderr lines are.

        They may carry users' data, so they are not part of that line, and they are not
        logged again either: the pump logged each of them once already, at
        --model-log-level (within the model's budget). /status keeps the last ones
        (last_failure.stderr). "" if the model printed nothing to stderr.
        """
        return "; its stderr is in /status" if self._tail else ""

    async def run(self, stream: StampedStream) -> None:
        """Read `stream` to its end."""
        reader = LineReader(stream, MAX_STDERR_LINE)
        try:
            while True:
                try:
                    line = await reader.readline()
                except LineTooLong:
                    said = f"<a stderr line over {MAX_STDERR_LINE} bytes was dropped>"
                    self._tail.append(said)
                    log.warning("%s stderr: %s", self._name, said)
                    if not await reader.skip_line():
                        return
                    continue
                if line is None:
                    return
                said = text(last_state(line))  # a progress bar: its last state
                self._tail.append(said)
                self._log_output("stderr", said)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()
