"""The pool's numbers, in Prometheus form (`prometheus-client`) and for the status page.

Each pool has its own registry, so two pools in one program never mix their counts,
and an embedder reads the same numbers `GET /metrics` shows: `pool.metrics.value(name,
**labels)`, or the registry itself. Counters and histograms are updated as things
happen; the gauges (queue length, workers by state, busy time) are read from the pool
at scrape time, so they cannot drift from what `/status` says.

`Recent` keeps the last minute of outcomes and latencies per second, for the live
status page: a chart needs a series, which a Prometheus counter does not keep.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from modelpool.core.kinds import Outcome, Priority, RestartReason, StartMethod, WorkerState
from modelpool.process.template import TemplateState

if TYPE_CHECKING:
    from modelpool.pool.modelmemory import MemorySeen
    from modelpool.process.preload import Preloader
    from modelpool.queues.base import JobQueue
    from modelpool.settings.config import PoolConfig

# Declared ahead, so each counter shows 0 before the first time it happens. "error" (a
# PoolError of no more precise kind) is not: no request ends so, and /metrics never showed it.
OUTCOMES = tuple(outcome for outcome in Outcome if outcome is not Outcome.ERROR)
RESTART_REASONS = tuple(RestartReason)
WORKER_STATES = tuple(WorkerState)
START_METHODS = tuple(StartMethod)
TEMPLATE_STATES = tuple(TemplateState)
# From a pipe round trip (about a millisecond) to past the default 10 s timeout.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
)  # fmt: skip
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
RECENT_SECONDS = 60


class MeteredWorker(Protocol):
    """What the gauges read of each worker (worker.py's Worker is one)."""

    @property
    def index(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def device(self) -> str | None: ...
    @property
    def state(self) -> WorkerState: ...
    @property
    def config(self) -> PoolConfig: ...
    def busy_seconds(self) -> float: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def memory_seen(self) -> MemorySeen: ...


class MeteredPool(Protocol):
    """What the gauges read of the pool when scraped (pool.py's Pool is one)."""

    @property
    def config(self) -> PoolConfig: ...
    @property
    def workers(self) -> Sequence[MeteredWorker]: ...
    @property
    def queue(self) -> JobQueue: ...
    @property
    def queue_length(self) -> int: ...
    @property
    def retired_busy_seconds(self) -> float: ...
    @property
    def preloader(self) -> Preloader | None: ...
    @property
    def generation(self) -> int: ...


class PoolMetrics:
    """Every number the pool counts; one instance per pool."""

    def __init__(self, pool: MeteredPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelpool_requests",
            "Requests answered, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        # Looked up once: finding a labelled child costs more than counting with it.
        self._requests_by_outcome: dict[Outcome, Counter] = {
            o: self.requests.labels(outcome=o) for o in OUTCOMES
        }
        self.queue_wait = Histogram(
            "modelpool_queue_wait_seconds",
            "Time a request waited in the queue before a model took it",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.by_priority = Counter(
            "modelpool_requests_by_priority",
            "Requests answered, by class (X-Request-Priority) and outcome",
            ["priority", "outcome"],
            registry=self.registry,
        )
        # Declared ahead, as the outcomes are; looked up once each.
        self._by_class: dict[tuple[Priority, Outcome], Counter] = {
            (p, o): self.by_priority.labels(p, o) for p in Priority for o in OUTCOMES
        }
        self._computed = 0
        self._compute_total = 0.0
        self.compute = Histogram(
            "modelpool_compute_seconds",
            "Time from writing a request to a model to its result or failure",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.request_time = Histogram(
            "modelpool_request_seconds",
            "Whole round trip of a request through the pool, whatever its outcome",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.restarts = Counter(
            "modelpool_model_restarts",
            "Models replaced, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in RESTART_REASONS:
            self.restarts.labels(reason=reason)
        self.stale_results = Counter(
            "modelpool_stale_results",
            "Results dropped because they carried an earlier request's id (--id-field)",
            registry=self.registry,
        )
        self.model_start = Histogram(
            "modelpool_model_start_seconds",
            "Time from starting a model to its ready line, by how it started (a fork is "
            "ready when forked)",
            ["method"],
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        for method in START_METHODS:
            self.model_start.labels(method=method)
        self.registry.register(_PoolGauges(pool))
        self.recent = Recent()

    def request_done(
        self, outcome: Outcome, seconds: float, priority: Priority = Priority.NORMAL
    ) -> None:
        counter = self._requests_by_outcome.get(outcome) or self.requests.labels(outcome=outcome)
        counter.inc()
        key = (priority, outcome)
        if (by_class := self._by_class.get(key)) is None:
            by_class = self._by_class[key] = self.by_priority.labels(priority, outcome)
        by_class.inc()
        self.request_time.observe(seconds)
        self.recent.add(outcome, seconds)

    def count_restart(self, reason: RestartReason) -> None:
        """A model was replaced (a worker's or an operation's restart)."""
        self.restarts.labels(reason=reason).inc()

    def count_model_start(self, method: StartMethod, seconds: float) -> None:
        self.model_start.labels(method=method).observe(seconds)

    def count_stale_result(self) -> None:
        self.stale_results.inc()

    def count_compute(self, seconds: float) -> None:
        self.compute.observe(seconds)
        self._computed += 1
        self._compute_total += seconds

    def mean_compute(self) -> float | None:
        """Mean seconds a model took per request (None before the first): the slots'
        arbiter asks it a hundred times a second, so it is kept, not collected."""
        return self._compute_total / self._computed if self._computed else None

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value, by its exposition name: `modelpool_requests_total`, ..."""
        return self.registry.get_sample_value(name, labels)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """What `GET /metrics` answers, and its content type, for the scraper's Accept header.

        Prometheus's classic text format unless the scraper asks for OpenMetrics;
        prometheus-client does the negotiation.
        """
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _PoolGauges(Collector):
    """Queue length, workers by state and busy time, read from the pool when scraped."""

    def __init__(self, pool: MeteredPool) -> None:
        self._pool = pool

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; names are unique by construction

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        queue = GaugeMetricFamily(
            "modelpool_queue_length", "Requests waiting for a model", value=pool.queue_length
        )
        yield queue
        by_class = GaugeMetricFamily(
            "modelpool_queue_length_by_priority",
            "Requests waiting for a model, by class (X-Request-Priority)",
            labels=["priority"],
        )
        for priority, waiting in pool.queue.waiting_by_priority().items():
            by_class.add_metric([priority], waiting)
        yield by_class
        workers = GaugeMetricFamily("modelpool_workers", "Workers by state", labels=["state"])
        counts = collections.Counter(w.state for w in pool.workers)
        for state in WORKER_STATES:
            workers.add_metric([state.value], counts[state])
        yield workers
        busy = CounterMetricFamily(
            "modelpool_model_busy_seconds",
            "Time models spent computing requests, summed over workers",
            value=pool.retired_busy_seconds + sum(w.busy_seconds() for w in pool.workers),
        )
        yield busy
        # With --devices, each worker's device as a label too; without, the labels stay
        # as they were (an empty label is no label to Prometheus anyway).
        with_device = bool(pool.config.devices)
        info = GaugeMetricFamily(
            "modelpool_worker_info",
            "Each worker's model generation and command, and device with --devices (always 1)",
            labels=["worker", "generation", "model_cmd", *(["device"] if with_device else [])],
        )
        for w in pool.workers:
            labels = [str(w.index), str(w.generation), " ".join(w.config.model_cmd)]
            info.add_metric([*labels, w.device or ""] if with_device else labels, 1)
        yield info
        private = GaugeMetricFamily(
            "modelpool_model_private_bytes",
            "Memory each worker's model holds of its own, with the processes below it: the "
            "pages it shares with no other process (with --preload, measured every second)",
            labels=["worker"],
        )
        for w in pool.workers:
            memory = w.memory_seen.of(w.pid)  # measured in a thread, see refresh.py
            if memory is not None:
                private.add_metric([str(w.index)], memory[1] * 1024)
        yield private
        if pool.preloader is not None:
            template = pool.preloader.current()
            template_state = GaugeMetricFamily(
                "modelpool_template_state",
                "The --preload template of the current generation: 1 for its state",
                labels=["state"],
            )
            for name in TEMPLATE_STATES:
                current = template is not None and template.state == name
                template_state.add_metric([name], int(current))
            yield template_state
        yield GaugeMetricFamily(
            "modelpool_generation",
            "The model generation new workers start (a reload raises it)",
            value=pool.generation,
        )
        yield from pool.queue.metrics()


class Recent:
    """Per-second counts by outcome and latencies over the last RECENT_SECONDS."""

    def __init__(self) -> None:
        self._seconds: collections.deque[tuple[int, collections.Counter[str], list[float]]] = (
            collections.deque()
        )

    def add(self, outcome: Outcome, seconds: float) -> None:
        now = int(time.time())
        if not self._seconds or self._seconds[-1][0] != now:
            self._seconds.append((now, collections.Counter(), []))
            self._trim(now)
        _, outcomes, latencies = self._seconds[-1]
        outcomes[outcome] += 1
        latencies.append(seconds)

    @staticmethod
    def merged(recents: Sequence[Recent]) -> dict[str, Any]:
        """The summary of several pools' last minute together (several models)."""
        together = Recent()
        by_second: dict[int, tuple[collections.Counter[str], list[float]]] = {}
        for recent in recents:
            for second, outcomes, latencies in recent._seconds:
                counts, times = by_second.setdefault(second, (collections.Counter(), []))
                counts.update(outcomes)
                times.extend(latencies)
        together._seconds.extend((second, *by_second[second]) for second in sorted(by_second))
        return together.summary()

    def summary(self) -> dict[str, Any]:
        """Outcomes over the window, and one point per second: time, answers, p50, p99."""
        now = int(time.time())
        self._trim(now)
        totals: collections.Counter[str] = collections.Counter()
        series = []
        for second, outcomes, latencies in self._seconds:
            totals.update(outcomes)
            ordered = sorted(latencies)
            series.append(
                {
                    "t": second,
                    "answered": len(ordered),
                    "errors": sum(n for o, n in outcomes.items() if o != Outcome.OK),
                    "p50": _percentile(ordered, 50),
                    "p99": _percentile(ordered, 99),
                }
            )
        return {"window_seconds": RECENT_SECONDS, "outcomes": dict(totals), "series": series}

    def _trim(self, now: int) -> None:
        while self._seconds and self._seconds[0][0] <= now - RECENT_SECONDS:
            self._seconds.popleft()


def _percentile(ordered: list[float], pct: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]
