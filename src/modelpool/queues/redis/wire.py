"""The wire format: every key, field and encoding that nodes of a cluster share.

Nodes of different versions may share one server, and a person may write into its
keys; so what goes into the server and what is read back out is written and checked
here, in one place, and everything else speaks in Python values. An entry this
version cannot read raises `BadEntry`: it is skipped and logged, and never stops a node.
The requeue script (scripts.py) writes one notice itself, in the same format as
`read_reply` reads (`key`, `kind` "requeued", `entry`).
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from coredis.response.types import StreamEntry
from coredis.typing import ValueT

from modelpool.core.errors import (
    BadRequest,
    ModelFailed,
    ModelTimeout,
    PoolError,
    QueueTimeout,
    ShuttingDown,
)
from modelpool.core.job import Job
from modelpool.core.kinds import FailureKind
from modelpool.queues.base import NodeStatus

PREFIX = "modelpool"
STREAM = f"{PREFIX}:jobs"  # the jobs, in arrival order
GROUP = "models"  # the one consumer group every node's workers read the jobs through
NODES = f"{PREFIX}:nodes"  # a hash: each node's heartbeat, under its name
REPLY_TTL_SECONDS = 300  # a dead front's replies stream expires this long after its last reply
REPLY_MAXLEN = 10_000
# How often every node beats, and refreshes its pending entries: other nodes count on
# it (a caller gives a worker that took its job time for a reclaim of a dead node's).
BEAT_SECONDS = 1.0
ERRORS: dict[str, type[PoolError]] = {
    cls.outcome: cls for cls in (ModelTimeout, ModelFailed, QueueTimeout, ShuttingDown, BadRequest)
}

Fields = Mapping[bytes, bytes]


class BadEntry(ValueError):
    """Data in a shared key that this version cannot read: another node's version, or a
    person, wrote it. It is skipped and logged; it must never stop a node."""


def replies_stream(node: str) -> str:
    """The stream a node reads the replies to its callers' jobs from."""
    return f"{PREFIX}:replies:{node}"


def raw(entry: StreamEntry) -> tuple[bytes, Fields]:
    """A stream entry as this node's client reads them (`decode_responses=False`): bytes."""
    return cast(bytes, entry.identifier), cast(Fields, entry.field_values)


def flat(fields: Mapping[Any, ValueT]) -> list[ValueT]:
    """Fields as the arguments of XADD (or of a script that runs it): name, value, ..."""
    return [value for pair in fields.items() for value in pair]


# -- a job in the stream ----------------------------------------------------------------


def job_entry(job: Job, key: bytes, reply_to: str) -> list[ValueT]:
    """A new job as the fields of its entry, flat: its deadline in wall-clock time."""
    take_by = "" if job.take_by is None else repr(time.time() + job.take_by - job.enqueued_at)
    fields: dict[str, ValueT] = {
        "key": key,
        "reply": reply_to,
        "line": job.line,
        "rid": job.request_id,
        "wid": job.wire_id or "",
        "by": take_by,
        "at": repr(time.time()),
        "n": "0",
    }
    return flat(fields)


def requeued_entry(fields: Fields, attempts: int) -> list[ValueT]:
    """A job's entry once more, flat, with how many times it was taken now."""
    return flat({**fields, b"n": str(attempts).encode()})


@dataclass(frozen=True)
class JobEntry:
    """A job as read from the stream, checked."""

    entry_id: bytes
    fields: Fields  # as read, to queue it again unchanged
    line: bytes
    request_id: str
    wire_id: str | None
    key: bytes  # its name among its caller's node's jobs
    reply_to: bytes  # its caller's node's replies stream
    attempts: int
    enqueued_wall: float
    take_by_wall: float | None


def read_job(entry_id: bytes, fields: Fields) -> JobEntry:
    """The job an entry holds; BadEntry if it is not a job as this version writes them:
    one JSON line for the model, where its answer goes, and numbers where numbers belong.
    """
    try:
        line, request_id = fields[b"line"], fields[b"rid"].decode()
        wire_id = fields[b"wid"].decode() or None
        key, reply_to = fields[b"key"], fields[b"reply"]
        attempts, enqueued_wall = int(fields[b"n"]), float(fields[b"at"])
        take_by_wall = float(fields[b"by"]) if fields[b"by"] else None
    except (KeyError, ValueError, AttributeError) as exc:
        raise BadEntry(f"not a job: {exc!r}") from None
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise BadEntry("its line for the model is not one line")  # it would shift answers
    if not (request_id.isprintable() and key and reply_to):
        raise BadEntry("its request id, key or reply stream is not readable")
    if wire_id is not None and not wire_id.isprintable():
        raise BadEntry("its wire id is not readable")
    if attempts < 0 or not math.isfinite(enqueued_wall):
        raise BadEntry("its attempts or its time is not a count or a time")
    if take_by_wall is not None and not math.isfinite(take_by_wall):
        raise BadEntry("its deadline is not a time")
    return JobEntry(
        entry_id,
        fields,
        line,
        request_id,
        wire_id,
        key,
        reply_to,
        attempts,
        enqueued_wall,
        take_by_wall,
    )


# -- replies: a worker's notices and answers, to the caller's node ----------------------


def taken_fields(node: str, timeout: float) -> dict[str, Any]:
    """A worker of `node` took the job, and answers within `timeout` seconds."""
    return {"kind": "taken", "worker": node, "timeout": repr(timeout)}


def answer_fields(job: Job, node: str) -> dict[str, Any]:
    """An answer as a reply entry: the value, or the error with what its payload needs."""
    timing = job.timing
    fields: dict[str, Any] = {
        "worker": f"{node}/{timing.worker}" if timing.worker is not None else "",
        "pid": "" if timing.pid is None else str(timing.pid),
        "compute": "" if timing.compute is None else repr(timing.compute),
    }
    error = job.error
    if error is None:
        fields["kind"] = "ok"
        fields["value"] = json.dumps(job.result(), separators=(",", ":"))
        return fields
    fields["kind"] = "error"
    fields["error"] = error.outcome
    if isinstance(error, ModelFailed):
        fields["detail"] = error.detail
        fields["exit_code"] = "" if error.exit_code is None else str(error.exit_code)
        fields["stderr"] = json.dumps(error.stderr)
        fields["failure"] = error.kind
    elif isinstance(error, BadRequest | ModelTimeout):
        fields["detail"] = str(error)
    return fields


def reply_key(fields: Fields) -> bytes:
    """The key of the job a reply is about (b"" if it names none)."""
    return fields.get(b"key", b"")


@dataclass(frozen=True)
class TakenReply:
    """A worker took the job; it answers within `timeout` seconds, its node alive."""

    timeout: float


@dataclass(frozen=True)
class RequeuedReply:
    """The job is back in the stream, under a new entry (its model died before reading it)."""

    entry_id: bytes


@dataclass(frozen=True)
class AnswerReply:
    """The job's answer: `value`, or else `error`; and where and how long it ran."""

    worker: str | None
    pid: int | None
    compute: float | None
    value: dict[str, Any] | None
    error: PoolError | None


Reply = TakenReply | RequeuedReply | AnswerReply


def read_reply(fields: Fields, default_timeout: float) -> Reply:
    """What a reply entry says; BadEntry (or KeyError, ValueError, RecursionError) if this
    version cannot read it. A "taken" notice without a timeout means `default_timeout`."""
    kind = fields.get(b"kind")
    if kind == b"taken":
        timeout = float(fields.get(b"timeout") or default_timeout)
        if not 0 < timeout < math.inf:
            raise BadEntry(f"a worker's timeout that is no time: {timeout!r}")
        return TakenReply(timeout)
    if kind == b"requeued":
        if not fields.get(b"entry"):
            raise BadEntry("a requeue notice without its new entry")
        return RequeuedReply(fields[b"entry"])
    if kind in (b"ok", b"error"):
        worker = fields.get(b"worker", b"").decode() or None
        pid = int(fields[b"pid"]) if fields.get(b"pid") else None
        compute = float(fields[b"compute"]) if fields.get(b"compute") else None
        if compute is not None and not 0 <= compute < math.inf:
            raise BadEntry(f"a compute time that is no time: {compute!r}")
        if kind == b"ok":
            value = json.loads(fields[b"value"])
            if not isinstance(value, dict):
                raise BadEntry("a value that is not a JSON object")
            return AnswerReply(worker, pid, compute, value, None)
        return AnswerReply(worker, pid, compute, None, error_from(fields))
    raise BadEntry(f"a reply of an unknown kind: {kind!r}")


def _failure_kind(text: str) -> FailureKind:
    """A failure's kind as a node wrote it; one this version does not know counts as a crash
    (what the caller is told is the same 502 and detail either way)."""
    try:
        return FailureKind(text)
    except ValueError:
        return FailureKind.CRASHED


def error_from(fields: Fields) -> PoolError:
    """The PoolError a reply entry stands for; ValueError (BadEntry) if it is unreadable."""
    cls = ERRORS.get(fields.get(b"error", b"").decode(), ModelFailed)
    detail = fields.get(b"detail", b"").decode()
    if cls is ModelFailed:
        exit_code = fields.get(b"exit_code", b"")
        stderr = json.loads(fields.get(b"stderr", b"[]"))
        if not (isinstance(stderr, list) and all(isinstance(line, str) for line in stderr)):
            raise BadEntry("a model's stderr that is not a list of lines")
        return ModelFailed(
            detail or "the model failed",
            exit_code=int(exit_code) if exit_code else None,
            stderr=stderr,
            kind=_failure_kind(fields.get(b"failure", b"crashed").decode()),
        )
    if cls is BadRequest:
        return BadRequest(detail)
    if cls is ModelTimeout:
        return ModelTimeout(detail)
    return cls()


# -- heartbeats: each node's state, in the nodes hash -----------------------------------


def heartbeat(node: str, node_status: NodeStatus) -> str:
    """This node's heartbeat: its name, host and time, and what it tells of itself."""
    status = {"node": node, "host": socket.gethostname(), "at": time.time(), **node_status()}
    return json.dumps(status)


def read_heartbeat(name: bytes, text: bytes) -> dict[str, Any] | None:
    """A node's heartbeat, if `text` is one as this version writes them; else None.

    What /status, /metrics and /readyz read of it is checked: its name (the hash's
    key), its time, its ready count and its workers' states.
    """
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past reason
        return None
    if not isinstance(entry, dict) or entry.get("node") != name.decode(errors="replace"):
        return None
    at, ready, workers = entry.get("at"), entry.get("ready", 0), entry.get("workers", [])
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    if isinstance(ready, bool) or not isinstance(ready, int) or ready < 0:
        return None
    if not isinstance(workers, list):
        return None
    if not all(isinstance(w, dict) and isinstance(w.get("state"), str) for w in workers):
        return None
    return entry
