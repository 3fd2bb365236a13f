"""Every replica's Prometheus metrics in one exposition, each sample labelled ``replica``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["merge_metrics"]


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_metrics(per_replica: Iterable[tuple[str, bytes]]) -> bytes:
    """One text exposition of `per_replica` ((replica id, its exposition) pairs)."""
    merged: dict[str, Metric] = {}
    for replica, text in per_replica:
        for family in text_string_to_metric_families(text.decode()):
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            target.samples.extend(
                Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    registry = CollectorRegistry()
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)
