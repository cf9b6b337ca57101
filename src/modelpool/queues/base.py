"""What the pool sees of a queue: the `JobQueue` interface, and what a queue needs of it.

The pool and its workers see only `JobQueue`. Callers `put` a job and `wait` for its
answer; idle workers `get` the oldest job, `claim` it, and settle it through the job
itself (`Job.succeed` / `Job.fail`). `LocalQueue` (local.py), the default, is one trio
memory channel in this process. `RedisQueue` (redis/) is a Redis stream shared by every
node of a cluster, so the first free model on any machine takes the oldest job.
`open_queue` (open.py) picks one from the configuration; nothing else branches on it.

The queues sit below the pool, so what they use of it is declared here as protocols
(`QueueMetrics`, `NodeStatus`): the pool's own types match them without being imported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from modelpool.core.job import Job

#: what this node tells other nodes about itself (its workers' states), asked at each heartbeat
NodeStatus = Callable[[], dict[str, Any]]


class Observer(Protocol):
    """A histogram, as a queue feeds it."""

    def observe(self, amount: float, /) -> None: ...


class QueueMetrics(Protocol):
    """The pool's metrics, as far as a queue feeds them."""

    @property
    def queue_wait(self) -> Observer:
        """Seconds a request waited before a model took it (observed once per request)."""
        ...


class JobQueue(ABC):
    """The FIFO between callers and workers, and how an answer gets back to its caller."""

    #: whether a job whose model died before reading it can be queued again while stopping
    requeue_while_closing = False

    @property
    @abstractmethod
    def length(self) -> int:
        """Jobs waiting for a model (for the whole cluster, where there is one)."""

    def remote_ready(self) -> int:
        """Models ready elsewhere that take this queue's jobs (0 for a local queue)."""
        return 0

    def status(self) -> dict[str, Any]:
        """What /status adds for this kind of queue (the cluster's nodes, for Redis)."""
        return {}

    def waiting_by_priority(self) -> dict[str, int]:
        """Jobs waiting, by class (X-Request-Priority); {} where classes are not kept
        (a Redis stream is one FIFO)."""
        return {}

    def problem(self) -> str | None:
        """Why the queue cannot serve now, if it cannot (for /healthz)."""
        return None

    @property
    def unavailable(self) -> str | None:
        """Why a job put now would be refused, or None while the queue takes jobs.

        /readyz says 503 with it, at once (a local queue is always there), so a load
        balancer stops sending requests that could only fail; `problem` waits longer.
        """
        return None

    def metrics(self) -> Iterator[Metric]:
        """Gauges this kind of queue adds to /metrics (the cluster's, for Redis)."""
        return iter(())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work the queue needs while the pool runs (a local queue needs none)."""
        task_status.started()

    @abstractmethod
    async def put(self, job: Job) -> None:
        """Queue a new job, or raise QueueFull (or another PoolError) at once."""

    @abstractmethod
    async def wait(self, job: Job) -> None:
        """Return once `job` is settled; QueueTimeout if no model takes it by `job.take_by`.

        Cancellation (the caller went away) leaves the job to `abandon`.
        """

    @abstractmethod
    def abandon(self, job: Job) -> None:
        """Its caller stopped waiting: drop the job if it still waits, forget its answer."""

    @abstractmethod
    async def get(self) -> Job:
        """The oldest job, for an idle worker; cancel-safe. EndOfChannel once closed and empty."""

    @abstractmethod
    def claim(self, job: Job) -> bool:
        """A worker takes `job`; False if it must be skipped (its caller is gone, or too late)."""

    @abstractmethod
    def requeue(self, job: Job) -> None:
        """Queue a claimed job once more (its model died before it could have read it).

        It should be the next job taken: the local queue puts it at the head; a Redis
        stream adds it as a new entry, at its end."""

    @abstractmethod
    def close(self) -> None:
        """Take no new jobs; `get` ends once the jobs this node must still serve are served."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether this node's workers may still get a job (False once closed and drained)."""

    @abstractmethod
    def waiting_callers(self) -> list[Job]:
        """Jobs of this node's callers that no worker of this node will settle (hard stop)."""

    @abstractmethod
    def take_unclaimed(self) -> list[Job]:
        """Remove and return every job still waiting for a worker of this node (hard stop)."""

    async def drained(self) -> None:
        """Return once no caller of this node waits for an answer any more."""
        return

    async def flush(self) -> None:
        """Return once what the workers left to send is sent (their answers, for Redis)."""
        return
