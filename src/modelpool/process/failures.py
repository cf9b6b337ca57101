"""How a model fails: to start (the errors a `ModelStarter` and `open_model` raise), or
once it runs (`failure_of`: the `ModelFailed` its worker reports)."""

from __future__ import annotations

import shlex
import signal

from modelpool.core.errors import ModelFailed
from modelpool.core.kinds import FailureKind

QUOTED_STDERR_CHARS = 500  # of each stderr line the first-start verdict quotes


class StartFailed(Exception):
    """The model exited, could not be run, or printed no ready line in time.

    str() is the whole story, for the log and /status; it may quote what the model
    printed before it was ready (no request has reached it then, so no user's data).
    `summary` leaves that out: it is what /healthz, open to anyone, may show.
    `stderr`: the last stderr lines of the process that failed, when that process is
    not the worker's own model (a --preload template), for the same reports.
    """

    def __init__(
        self, message: str, summary: str | None = None, stderr: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.summary = message if summary is None else summary
        self.stderr = stderr or []


class CommandNotRunnable(StartFailed):
    """The model command could not be executed at all (missing, not executable)."""


def failure_of(
    code: int | None, running: bool, overflowed: bool, max_line: int, stderr: list[str]
) -> ModelFailed:
    """Why a model stopped answering, once its exit is known (or it is known to be alive):
    one line, its exit code and `stderr`, its last stderr lines. `code`: its exit status
    (None: not known); `running`: whether it is still alive. `overflowed`: it printed a
    line longer than `max_line`."""
    if overflowed:
        detail = f"model printed a line longer than {max_line} bytes"
        kind = FailureKind.PROTOCOL
    elif code is None and not running:
        detail = "model exited; its exit status is unknown (its template ended first)"
        kind = FailureKind.CRASHED
    elif code is None:
        detail = "model closed its output but did not exit"
        kind = FailureKind.PROTOCOL
    elif code < 0:
        detail = f"model was killed by signal {_signal_name(-code)}"
        kind = FailureKind.CRASHED
    else:
        detail = f"model exited with code {code}"
        kind = FailureKind.CRASHED
    return ModelFailed(detail, exit_code=code, stderr=stderr, kind=kind)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def first_start_verdict(
    exc: Exception, command: list[str], stderr: list[str]
) -> tuple[str, list[str]]:
    """Why the service gives up at first start: the failure, the command, its stderr.

    Elsewhere a model's stderr stays out of ERROR lines (it may hold users' data, see
    ModelProcess.stderr_note). Here it belongs in: no request ever reached the model,
    and a user whose service stops at once must see why without knowing where to look
    (the typo's "can't open file", the ImportError).
    """
    verdict = (
        f"{exc}; every model failed to start and none was ever ready "
        f"(--keep-trying keeps restarting them); command: {shlex.join(command)}"
    )
    lines = [
        line if len(line) <= QUOTED_STDERR_CHARS else line[:QUOTED_STDERR_CHARS] + "..."
        for line in stderr
    ]
    return verdict, lines
