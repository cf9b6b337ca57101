"""What a model prints, as the service reads it: within a budget, logged at a bounded rate.

A model is an adversary here too: it may print floods, endless lines, or users' data.
`StampedStream` is its stdout or stderr as the pumps read it (modelprocess.py): it notes
when bytes last came and whether a line is half-written, and waits for the budget
before each read; it reads eagerly (core/eagerio.py), as a model prints a few times a
request. `OutputBudget` is what it may print while none of its results is
awaited; `OutputLog` how much of it reaches the log; `PlainLines` what it printed
that was no result, to quote in a failure message.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from modelpool.core.eagerio import EagerReader

RESULT_PREFIX = b"result: "  # what a result line starts with
LOGGED_CHARS = 2000
QUOTED_LINES = 5  # lines of its stdout a failure message quotes
QUOTED_CHARS = 200  # and characters of each
OUTPUT_BURST_LINES = 20_000  # lines a model may print at once while no result is awaited
OUTPUT_RATE_LINES = 20_000  # and then lines a second
OUTPUT_BURST_BYTES = 4 * 1024 * 1024  # bytes, likewise
OUTPUT_RATE_BYTES = 4 * 1024 * 1024
LOG_BURST = 100  # lines a model may have logged at once (a start-up, a traceback)
DROPPED_REPORT_SECONDS = 10.0  # how often the count of lines left out is logged
READ_SIZE = 64 * 1024  # bytes a pump reads at most at a time

log = logging.getLogger("modelpool.model")


class StampedStream(trio.abc.ReceiveStream):
    """A model's output that notes when bytes last came and whether a line is unfinished,
    and is read within the model's budget.

    What came last ends with a newline exactly when the line reader holds no partial
    line: so `mid_line` tells that the model is half-way through printing one.
    `within_budget` is awaited before each read, and `charge` given what was read.
    """

    def __init__(
        self,
        stream: trio.lowlevel.FdStream,
        within_budget: Callable[[], Awaitable[None]],
        charge: Callable[[bytes | bytearray], None],
    ) -> None:
        self._stream = stream
        self._reader = EagerReader(stream.fileno, READ_SIZE)
        self._within_budget = within_budget
        self._charge = charge
        self.last_data = trio.current_time()
        self.mid_line = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._within_budget()
        data = await self._reader.receive_some(max_bytes)
        if data:
            self.last_data = trio.current_time()
            self.mid_line = not data.endswith(b"\n")
            self._charge(data)
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


class PlainLines:
    """Lines a model printed on stdout that were no result: the hint for a protocol mistake.

    Before its ready line, they are what it printed instead of it; after, what it
    printed since the last request was sent (`restart`). The count is kept, and the
    last QUOTED_LINES lines, each cut to QUOTED_CHARS.
    """

    def __init__(self) -> None:
        self.count = 0
        self._last: deque[bytes] = deque(maxlen=QUOTED_LINES)

    def restart(self) -> None:
        self.count = 0
        self._last.clear()

    def add(self, line: bytes) -> None:
        """Note a line: it costs a slice, decoded only if a failure quotes it."""
        self.count += 1
        self._last.append(line[: QUOTED_CHARS * 4 + 1])  # 4 bytes the longest character

    def last(self) -> list[str]:
        """The last lines, each decoded and cut to QUOTED_CHARS characters."""
        texts = (raw.decode("utf-8", errors="replace") for raw in self._last)
        return [
            text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..." for text in texts
        ]

    def ready_hint(self, ready_line: str) -> str:
        """What to check when no ready line came: the line waited for, and what came instead."""
        wanted = f"it must print a line that starts with {ready_line!r} (--ready-line)"
        if not self.count:
            buffered = "a model that buffers its output must flush each line"
            return f"{wanted}, and printed nothing on stdout ({buffered})"
        return f"{wanted}, and printed {self.describe()}"

    def instead_of_result(self, quote: bool) -> str:
        """For a request with no result: what the model printed on stdout instead, if anything.

        The usual mistake is a model that prints its answer as plain JSON. With `quote`,
        the last such line is quoted: for the answer to the client whose request it was,
        and /status. The log's ERROR line goes without it, since a model's output may
        hold users' data and is logged only at --model-stdout-level.
        """
        if not self.count:
            return ""
        prefix = RESULT_PREFIX.decode()
        lines = "1 line" if self.count == 1 else f"{self.count} lines"
        said = f"; the model printed {lines} but none started with {prefix!r}"
        if quote:
            return f"{said} (the last: {self.last()[-1]!r})"
        return f"{said} (its lines are logged at --model-stdout-level)"

    def describe(self) -> str:
        """'3 lines on stdout, the last: 'a', 'b', 'c'' (the count, then the last lines)."""
        lines = "1 line" if self.count == 1 else f"{self.count} lines"
        return f"{lines} on stdout, the last: " + ", ".join(repr(text) for text in self.last())


class OutputBudget:
    """What a model may print while none of its results is awaited: two token buckets.

    Lines (each costs the pump some Python) and bytes (a long line costs copying), a
    burst of each and then a rate. Reading that costs well under a tenth of a core; past
    it, the pumps pause (`pause`) until the buckets refill. A debt is bounded by one
    burst, so even a chunk of one-byte lines holds the pumps back for a bounded time.
    """

    def __init__(self) -> None:
        self._lines = float(OUTPUT_BURST_LINES)
        self._bytes = float(OUTPUT_BURST_BYTES)
        self._refilled_at = time.monotonic()
        self.charged = (0, 0)  # lines and bytes charged so far

    def charge(self, size: int, lines: int) -> None:
        self.charged = (self.charged[0] + lines, self.charged[1] + size)
        self._refill()
        self._lines = max(self._lines - lines, -OUTPUT_BURST_LINES)
        self._bytes = max(self._bytes - size, -OUTPUT_BURST_BYTES)

    def over_rate(self, since: tuple[int, int], seconds: float) -> bool:
        """Whether what was charged after `since` (a `charged`) is more than the rates
        allow in `seconds`: the model prints faster than it may for long."""
        lines, size = self.charged[0] - since[0], self.charged[1] - since[1]
        return lines > OUTPUT_RATE_LINES * seconds or size > OUTPUT_RATE_BYTES * seconds

    def pause(self) -> float:
        """Seconds until both buckets are out of debt; 0 if they are."""
        self._refill()
        return max(-self._lines / OUTPUT_RATE_LINES, -self._bytes / OUTPUT_RATE_BYTES, 0.0)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self._refilled_at = now - self._refilled_at, now
        self._lines = min(self._lines + elapsed * OUTPUT_RATE_LINES, OUTPUT_BURST_LINES)
        self._bytes = min(self._bytes + elapsed * OUTPUT_RATE_BYTES, OUTPUT_BURST_BYTES)


class OutputLog:
    """What a model prints is its business: logged at its stream's level, at a bounded rate.

    Its stdout (start-up lines, the lines around its results) often echoes what it was
    asked, users' data, so it is logged at --model-stdout-level, DEBUG by default; its
    stderr (warnings, tracebacks: why it failed) at --model-log-level, INFO by default.

    Each line a model prints would otherwise cost a log record: under a flood of quick
    requests to a chatty model (model3.py prints three lines per request), logging
    them was the service's largest single cost. So each model may have LOG_BURST lines
    logged at once (its start-up, a traceback), and then `rate` a second on average
    (a token bucket). Lines past that are counted, not logged; the count is logged
    every DROPPED_REPORT_SECONDS while lines are being left out, and when the model
    ends. `rate` None logs every line. A model's last stderr lines are kept for failure
    reports whatever is logged.
    """

    def __init__(self, name: str, levels: dict[str, str], rate: int | None) -> None:
        self._name = name
        names = logging.getLevelNamesMapping()
        self._levels = {stream: names[level] for stream, level in levels.items()}
        self._rate = rate
        self._tokens = float(LOG_BURST)
        self._refilled_at = time.monotonic()
        self._dropped = 0  # lines left out since the last report
        self._dropped_since = 0.0  # when the first of them was
        self._dropped_level = logging.DEBUG  # the highest level of a line left out

    def rename(self, name: str) -> None:
        """Its model goes by another name (a --preload template adopted by a worker)."""
        self._name = name

    def admits(self, stream: str) -> bool:
        """Whether the next line on `stream` is to be logged; one that is not is counted.

        A line its stream's level keeps out of the log costs nothing, and is not counted.
        """
        level = self._levels[stream]
        if not log.isEnabledFor(level):
            return False
        if self._rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(LOG_BURST, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        if self._dropped and now - self._dropped_since >= DROPPED_REPORT_SECONDS:
            self.report_dropped()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if not self._dropped:
            self._dropped_since = now
            self._dropped_level = level
        self._dropped += 1
        self._dropped_level = max(self._dropped_level, level)
        return False

    def write(self, stream: str, text: str, request_id: str | None) -> None:
        """Log one line that was admitted."""
        extra = {"stream": stream}
        if request_id is not None:
            extra["request_id"] = request_id
        log.log(self._levels[stream], "%s %s: %s", self._name, stream, text, extra=extra)

    def report_dropped(self) -> None:
        """Log how many lines were left out since the last report, if any were: at the
        highest level of those lines, so the count is seen wherever one of them would be."""
        if self._dropped:
            log.log(
                self._dropped_level,
                "%s: %d lines it printed in %.0f s were not logged (over --model-log-rate %s)",
                self._name,
                self._dropped,
                time.monotonic() - self._dropped_since,
                self._rate,
            )
            self._dropped = 0


def last_state(line: bytes) -> bytes:
    """A line of carriage-return updates, as a progress bar prints it (tqdm's "Loading
    weights: 0%|...\r...100%|..."), as its last state: what a terminal shows of it. The
    log then holds the bar once, finished, not every update (cut to LOGGED_CHARS, at
    its first ones). A line without a carriage return is itself; one whose updates end
    in a blank (a bar that cleared itself) is its last state that was not blank."""
    if b"\r" not in line:
        return line
    for state in reversed(line.split(b"\r")):
        if state.strip():
            return state
    return b""


def text(line: bytes) -> str:
    """A line as the log quotes it: decoded, and cut to LOGGED_CHARS characters."""
    decoded = line.decode("utf-8", errors="replace")
    if len(decoded) > LOGGED_CHARS:
        return f"{decoded[:LOGGED_CHARS]}... ({len(line)} bytes)"
    return decoded
