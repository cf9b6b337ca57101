"""The service's vocabularies, each an enum, so a misspelt value is an error and not a new label.

Each is a `StrEnum`: its members are the very strings users see in metrics labels, JSON
bodies and logs, so a dashboard's queries keep working. `metrics.py` declares its label
values from these, so a counter exists (at 0) before the first time it happens (all but
`Outcome.ERROR`, which no request of this version ends with).
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How a request ended: `modelpool_requests_total{outcome}`."""

    OK = "ok"
    TIMEOUT = "timeout"
    MODEL_FAILED = "model_failed"
    BAD_REQUEST = "bad_request"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTTING_DOWN = "shutting_down"
    CLIENT_GONE = "client_gone"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"  # its X-Request-Timeout passed while it waited
    DEADLINE_UNMET = "deadline_unmet"  # refused at once: its deadline could not be met
    CANCELLED = "cancelled"  # its caller went away while it computed: the model was killed
    ERROR = "error"  # a PoolError of no more precise kind


class Priority(enum.StrEnum):
    """A request's class (X-Request-Priority): a free model takes the highest waiting."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """2 for high, 1 for normal, 0 for low."""
        return {Priority.HIGH: 2, Priority.NORMAL: 1, Priority.LOW: 0}[self]


class FailureKind(enum.StrEnum):
    """Why a model failed its request (`ModelFailed.kind`)."""

    CRASHED = "crashed"  # it exited, or closed its stdout
    PROTOCOL = "protocol"  # it printed something that is not a result
    MEMORY = "memory"  # it was killed for using more than --max-memory-mib


class RestartReason(enum.StrEnum):
    """Why a worker replaced its model: `modelpool_restarts_total{reason}`."""

    TIMEOUT = "timeout"
    CRASHED = "crashed"
    PROTOCOL = "protocol"
    DIED_IDLE = "died_idle"
    START_FAILED = "start_failed"
    RECYCLED = "recycled"
    MEMORY = "memory"
    REFRESH = "refresh"  # a forked model's private memory passed --preload-max-private
    IMMORTAL = "immortal"  # forked before its template's objects were made immortal
    RELOAD = "reload"
    CANCELLED = "cancelled"  # its request's caller went away (--cancel-computing)


class WorkerState(enum.StrEnum):
    """Where a worker is in its life: `modelpool_workers{state}` and /status."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class StartMethod(enum.StrEnum):
    """How a model process came to be: `modelpool_model_start_seconds{method}`."""

    SPAWN = "spawn"  # a new program, which loads its model
    FORK = "fork"  # forked from the warm template (--preload)
