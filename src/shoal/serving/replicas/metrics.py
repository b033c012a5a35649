"""/metrics series of engine replicas and their router, read at scrape time.

A replicated model's engine families (`shoal:num_requests_running`, `shoal:prefix_cache_hits`,
...) carry one series per replica with a `replica` label (engine_stats feeds them to the
engine collector); an in-process model keeps its one series per model. The router's own
view of each replica and its decisions are the `shoal:replica_*` / `shoal:router_*`
families here. Imports no Ray: the collector is registered always and finds nothing to
report on a server without replicas.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.engine.stats import EngineStats
from shoal.serving.served import ServedModel


def engine_stats(models: Iterable[ServedModel]) -> Iterator[tuple[str, str | None, EngineStats]]:
    """(model, replica or None, stats) of every engine: each replica of a replicated model
    that is up (a down one's last stats would be stale), else the in-process engine."""
    for model in models:
        per_replica = getattr(model.engine, "replica_stats", None)
        if per_replica is None:
            yield model.name, None, model.engine.stats()
            continue
        for replica, stats in per_replica():
            yield model.name, replica, stats


class ReplicaCollector(Collector):
    def __init__(self, models: Callable[[], Iterable[ServedModel]], prefix: str) -> None:
        self._models = models
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        p, labels = self._prefix, ["model_name", "replica"]
        families = {
            "up": GaugeMetricFamily(p + "replica_up", "1 while the replica answers its polls.", labels=labels),
            "in_flight": GaugeMetricFamily(p + "replica_requests_in_flight",
                                           "Requests the front routed to the replica, not yet ended.", labels=labels),
            "cached_blocks": GaugeMetricFamily(p + "replica_prefix_blocks_indexed",
                                               "Prefix blocks the router believes the replica holds.", labels=labels),
            "routed": CounterMetricFamily(p + "replica_routed_requests", "Requests routed to the replica.",
                                          labels=labels),
            "hung": CounterMetricFamily(p + "replica_hangs", "Times the replica's engine loop stalled past "
                                        "SHOAL_REPLICA_HANG_TIMEOUT and it was killed.", labels=labels),
        }
        decisions = CounterMetricFamily(p + "router_decisions", "Requests routed, by the router's reason.",
                                        labels=["model_name", "decision"])
        retries = CounterMetricFamily(p + "router_retries",
                                      "Requests sent to another replica after theirs died before a token.",
                                      labels=["model_name"])
        for model in self._models():
            describe = getattr(model.engine, "describe_replicas", None)
            if describe is None:
                continue
            for row in describe():
                for key, family in families.items():
                    family.add_metric([model.name, row["replica"]], float(row[key]))
            for reason, count in model.engine.decisions.items():
                decisions.add_metric([model.name, reason], count)
            retries.add_metric([model.name], model.engine.retries)
        yield from families.values()
        yield decisions
        yield retries
