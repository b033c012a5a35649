"""Prometheus metrics, named as vLLM names them under shoal's own prefix.

A vLLM dashboard works after replacing `vllm:` with `shoal:`. Per-request histograms
and the finished-request counter are observed as a request streams and when it ends
(GenerationService); engine state (running/waiting, KV usage, token, prefix-cache and
preemption counters) is read from the engines' stats snapshots at scrape time by a
collector, so the engine thread does no metrics work at all.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.engine.outputs import RequestOutput
from shoal.engine.stats import EngineStats
from shoal.serving.latency_window import RecentLatencies
from shoal.serving.records import RequestRecord

# Each loaded model's name, its replica's name (None: an in-process engine) and that engine's
# stats now (read at scrape time).
EngineStatsSource = Callable[[], Iterable[tuple[str, str | None, EngineStats]]]

PREFIX = "shoal:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds follow vLLM's, so their dashboards' quantile panels read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, engines: EngineStatsSource) -> None:
        self._engines = engines

    def collect(self) -> Iterable[Metric]:
        label = ["model_name"]
        running = GaugeMetricFamily(PREFIX + "num_requests_running",
                                    "Requests in the running batch.", labels=label)
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                    "Requests waiting to be scheduled.", labels=label)
        kv = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                               "Fraction of KV cache blocks in use (1 = full).", labels=label)
        prompt = CounterMetricFamily(PREFIX + "prompt_tokens",
                                     "Prompt tokens processed (prefill finished).", labels=label)
        generation = CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.",
                                         labels=label)
        queries = CounterMetricFamily(PREFIX + "prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", labels=label)
        hits = CounterMetricFamily(PREFIX + "prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.", labels=label)
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions",
                                          "Requests preempted (KV blocks reclaimed, recomputed later).",
                                          labels=label)
        for name, replica, stats in self._engines():
            # NOTE: an engine replica's series add a `replica` label (sum by model_name for the
            # model's total); an in-process engine's have model_name alone.
            labels = {"model_name": name} if replica is None else {"model_name": name, "replica": replica}
            for family, value in ((running, stats.running), (waiting, stats.waiting), (kv, stats.kv_usage)):
                family.add_sample(family.name, labels, value)
            for family, value in ((prompt, stats.prompt_tokens), (generation, stats.generation_tokens),
                                  (queries, stats.prefix_queries), (hits, stats.prefix_hits),
                                  (preemptions, stats.preemptions)):
                family.add_sample(family.name + "_total", labels, value)
        return [running, waiting, kv, prompt, generation, queries, hits, preemptions]


class ServerMetrics:
    """The server's metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self, engines: EngineStatsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        label = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between successive tokens of a request.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Time waiting before first scheduled.", _LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "Time from first scheduled to first token.", _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds",
                                "Time from first token to the last.", _LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens",
                                       "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Generated tokens per request (all samples).", _TOKEN_BUCKETS)
        self.finished = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.rejected = Counter(PREFIX + "requests_rejected",
                                "Requests refused before reaching the engine, by reason.",
                                ["model_name", "reason"], registry=self.registry)
        # Per caller: keys are created by admins, so the key and class labels stay few.
        caller = ["model_name", "key", "class"]
        self.requests = Counter(PREFIX + "requests", "Model requests by caller key, priority "
                                "class and HTTP status (refused ones included).",
                                [*caller, "status"], registry=self.registry)
        self.tokens = Counter(PREFIX + "tokens", "Prompt and generated tokens by caller key and "
                              "priority class.", [*caller, "kind"], registry=self.registry)
        self.registry.register(_EngineCollector(engines))
        # The last minute's TTFT and ITL, for the live dashboard (serving/live.py).
        self.recent = RecentLatencies()
        # Sum and count of end-to-end latency per model, for Retry-After estimates.
        self._e2e_sum: dict[str, float] = {}
        self._e2e_count: dict[str, int] = {}

    def register_model(self, model: str) -> None:
        """Creates the model's series at zero, so dashboards see them before any traffic."""
        for histogram in (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode,
                          self.prompt_tokens, self.generation_tokens):
            histogram.labels(model)
        for reason in ("stop", "length", "abort"):
            self.finished.labels(model, reason)

    def observe_token_gap(self, model: str, seconds: float) -> None:
        self.itl.labels(model).observe(seconds)
        self.recent.itl.add(seconds)

    def observe_finished(self, model: str, final: RequestOutput, arrival: float,
                         generated_tokens: int) -> None:
        """Records one finished request from its last output and its arrival time."""
        t = final.timings
        self.finished.labels(model, final.finish_reason or "abort").inc()
        self.prompt_tokens.labels(model).observe(final.num_prompt_tokens)
        self.generation_tokens.labels(model).observe(generated_tokens)
        if t is None:
            return
        end = t.finished if t.finished is not None else final.produced_at
        self.e2e.labels(model).observe(max(0.0, end - arrival))
        self._e2e_sum[model] = self._e2e_sum.get(model, 0.0) + max(0.0, end - arrival)
        self._e2e_count[model] = self._e2e_count.get(model, 0) + 1
        if t.scheduled is not None:
            self.queue.labels(model).observe(max(0.0, t.scheduled - arrival))
            if t.first_token is not None:
                self.prefill.labels(model).observe(max(0.0, t.first_token - t.scheduled))
        if t.first_token is not None:
            self.decode.labels(model).observe(max(0.0, end - t.first_token))

    def observe_request(self, record: RequestRecord) -> None:
        """Counts one finished or refused model request (a request-record sink)."""
        if not record.is_model_request:
            return
        # NOTE: only served model names become labels: a refused request may name anything.
        labels = (record.model or "", record.key_id or "anonymous", record.priority_class)
        self.requests.labels(*labels, str(record.status)).inc()
        if record.prompt_tokens:
            self.tokens.labels(*labels, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self.tokens.labels(*labels, "generation").inc(record.completion_tokens)

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)
        self.recent.ttft.add(seconds)

    def mean_latency(self, model: str) -> float | None:
        count = self._e2e_count.get(model, 0)
        return self._e2e_sum[model] / count if count else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMeter:
    """One request's latencies as its outputs arrive: time to its first token, and the
    gaps between each sample's successive tokens."""

    __slots__ = ("_metrics", "_model", "_arrival", "_first_token_seen", "_last_produced")

    def __init__(self, metrics: ServerMetrics, model: str, arrival: float) -> None:
        self._metrics, self._model, self._arrival = metrics, model, arrival
        self._first_token_seen = False
        self._last_produced: dict[int, float] = {}      # sample index -> its last token's time

    def observe(self, out: RequestOutput) -> None:
        if not out.token_ids:
            return
        if not self._first_token_seen:
            self._first_token_seen = True
            self._metrics.observe_first_token(self._model, out.produced_at - self._arrival)
        prev = self._last_produced.get(out.index)
        if prev is not None:
            self._metrics.observe_token_gap(self._model, out.produced_at - prev)
        self._last_produced[out.index] = out.produced_at
