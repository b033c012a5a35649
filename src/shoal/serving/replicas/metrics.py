"""/metrics series of engine replicas and their router, read at scrape time.

Separate `shoal:replica_*` / `shoal:router_*` families (not a `replica` label on the engine
families): those stay one series per model, summed over its replicas, so existing dashboards
read the same. Imports no Ray: the collector is registered always and finds nothing to report
on a server without replicas.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.serving.served import ServedModel


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
            "running": GaugeMetricFamily(p + "replica_num_requests_running", "The replica's running batch.",
                                         labels=labels),
            "waiting": GaugeMetricFamily(p + "replica_num_requests_waiting", "Requests waiting in the replica.",
                                         labels=labels),
            "kv_usage": GaugeMetricFamily(p + "replica_kv_cache_usage_perc", "The replica's KV cache in use.",
                                          labels=labels),
            "cached_blocks": GaugeMetricFamily(p + "replica_prefix_blocks_indexed",
                                               "Prefix blocks the router believes the replica holds.", labels=labels),
            "routed": CounterMetricFamily(p + "replica_routed_requests", "Requests routed to the replica.",
                                          labels=labels),
            "prefix_cache_hits": CounterMetricFamily(p + "replica_prefix_cache_hits",
                                                     "Prompt tokens the replica found in its prefix cache.",
                                                     labels=labels),
            "prefix_cache_queries": CounterMetricFamily(p + "replica_prefix_cache_queries",
                                                        "Prompt tokens the replica looked up.", labels=labels),
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
