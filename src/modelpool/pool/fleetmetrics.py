"""The numbers of several models in one `GET /metrics`: each pool's, with a `model` label,
and the slots they share.

Each model's pool keeps its own registry (metrics.py), so the library reads one model's
numbers as it always did. The service's /metrics, with several models, is made from
them at scrape time: every family of every pool once, each sample with its model's
name in a `model` label, plus `modelpool_slot_moves_total{from,to}` (slots moved by
demand, slots.py) and `modelpool_model_slots{model}` (each model's slots now). With one
model (none declared), /metrics is that pool's, without a `model` label, as it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector


class RegistryOwner(Protocol):
    """A model's pool, as far as its numbers go (pool.py's Pool is one)."""

    @property
    def metrics(self) -> HasRegistry: ...


class HasRegistry(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...


class FleetMetrics:
    """The registry /metrics shows for several models; `count_slot_move` is the arbiter's."""

    def __init__(
        self, pools: Mapping[str, RegistryOwner], shares: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ModelsCollector(pools, shares))
        self.slot_moves = Counter(
            "modelpool_slot_moves",
            "Slots moved from one model to another by demand",
            ["from", "to"],
            registry=self.registry,
        )

    def count_slot_move(self, source: str, target: str) -> None:
        self.slot_moves.labels(source, target).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value, by its exposition name, with its `model` label if it has one."""
        return self.registry.get_sample_value(name, labels)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """What `GET /metrics` answers, and its content type (as PoolMetrics.exposition)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _ModelsCollector(Collector):
    """Every pool's families, merged by name, each sample labelled with its model."""

    def __init__(
        self, pools: Mapping[str, RegistryOwner], shares: Callable[[], Mapping[str, int]]
    ) -> None:
        self._pools = pools
        self._shares = shares

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for model, pool in self._pools.items():
            for family in pool.metrics.registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = Metric(family.name, family.documentation, family.type, family.unit)
                    merged[family.name] = into
                for sample in family.samples:
                    labels = {**sample.labels, "model": model}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()
        slots = GaugeMetricFamily(
            "modelpool_model_slots", "Slots each model has now", labels=["model"]
        )
        for model, count in self._shares().items():
            slots.add_metric([model], count)
        yield slots
