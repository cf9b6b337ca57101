"""A model's start, from its spawn to its ready line: the wait within --init-timeout,
notices of a slow load now and then, and the StartFailed that says why the line never
came.

What a model prints while it loads is logged only at --model-stdout-level (DEBUG by
default) and --model-log-level: without the notices, a model that never prints its
ready line would be a silence of --init-timeout. So LOADING_NOTICE seconds into its
start, and then at gaps that double up to LOADING_NOTICE_MAX, the log says it is still
loading, with the last line it printed.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from modelpool.core.errors import ModelFailed
from modelpool.process.failures import StartFailed
from modelpool.process.output import QUOTED_CHARS, PlainLines
from modelpool.settings.config import PoolConfig

LOADING_NOTICE = 5.0  # seconds into a start before the log says the model is still loading
LOADING_NOTICE_MAX = 60.0  # the longest gap between two such notices (they double up to it)

log = logging.getLogger("modelpool.model")


class LoadingModel(Protocol):
    """What the wait reads of the model (modelprocess.py's ModelProcess is one)."""

    @property
    def name(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ready(self) -> bool: ...
    @property
    def init_done(self) -> trio.Event:
        """Set once its ready line came, or its stdout ended first."""

    async def describe_failure(self) -> ModelFailed: ...


class Loading:
    """The start of one model: `saw` is told of each line it prints while it loads;
    `plain` holds its stdout lines that were no result (for the hints of a failure)."""

    def __init__(self, config: PoolConfig, plain: PlainLines) -> None:
        self._config = config
        self._plain = plain
        self._last_line: tuple[str, str] | None = None  # its stream, and what it said there

    def saw(self, stream: str, line: str) -> None:
        self._last_line = (stream, line)

    async def wait_ready(self, model: LoadingModel) -> None:
        """Return once the model printed its ready line; raise StartFailed otherwise."""
        timeout = self._config.init_timeout
        with trio.move_on_after(timeout):
            await self._wait_init_done(model)
        if model.ready:
            return
        if not model.init_done.is_set():
            summary = f"{model.name} failed to start: no ready line within {timeout:g} s"
            hint = self._plain.ready_hint(self._config.ready_line)
            raise StartFailed(f"{summary}; {hint}", summary=summary)
        # No stderr in the message: it ends up in /healthz, which anyone may read. The
        # tail is in last_failure.stderr (/status) and, at --model-log-level, the log.
        failure = await model.describe_failure()
        summary = f"{model.name} failed to start: {failure.detail}"
        if not self._plain.count:
            raise StartFailed(summary)
        # What it printed on stdout is often why (a model that reports its errors there),
        # and is logged only at --model-stdout-level, DEBUG by default. No request was
        # sent to it yet, so it holds no user's data: the log's line quotes it (the
        # summary, for /healthz, does not).
        raise StartFailed(f"{summary}; it printed {self._plain.describe()}", summary=summary)

    async def _wait_init_done(self, model: LoadingModel) -> None:
        """Wait for its ready line (or the end of its stdout), with a notice now and then."""
        gap = LOADING_NOTICE
        while True:
            with trio.move_on_after(gap):
                await model.init_done.wait()
                return
            last = "it printed nothing yet"
            if self._last_line is not None:
                stream, said = self._last_line
                if len(said) > QUOTED_CHARS:
                    said = said[:QUOTED_CHARS] + "..."
                last = f"its last line, on {stream}: {said}"
            log.info(
                "%s still loading after %.0f s of its --init-timeout %g s: no line "
                "starting with %r yet; %s",
                model.name,
                trio.current_time() - model.started_at,
                self._config.init_timeout,
                self._config.ready_line,
                last,
            )
            gap = min(2 * gap, LOADING_NOTICE_MAX)
