"""Server-side figures: /metrics scraped before and after each level, as deltas.

shoal and vLLM expose the same names under their own prefix (`shoal:`, `vllm:`); llama.cpp's
server (`--metrics`) has token counters only. Series are summed over their labels (one
server may serve several models; a run measures one at a time). The deltas sit beside the
client's figures: token counts should agree exactly, and the server's mean TTFT should be
below the client's by the HTTP and queueing cost outside the server's clock.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class MetricNames:
    prompt_tokens: str
    generation_tokens: str
    ttft: str | None = None              # histogram base name (…_sum / …_count)
    e2e: str | None = None
    preemptions: str | None = None
    cache_queries: str | None = None
    cache_hits: str | None = None
    finished: str | None = None          # finished-request counter: tells when a scrape is settled


def _vllm_style(prefix: str) -> MetricNames:
    return MetricNames(
        prompt_tokens=f"{prefix}prompt_tokens_total", generation_tokens=f"{prefix}generation_tokens_total",
        ttft=f"{prefix}time_to_first_token_seconds", e2e=f"{prefix}e2e_request_latency_seconds",
        preemptions=f"{prefix}num_preemptions_total", cache_queries=f"{prefix}prefix_cache_queries_total",
        cache_hits=f"{prefix}prefix_cache_hits_total", finished=f"{prefix}request_success_total")


METRIC_NAMES: dict[str, MetricNames] = {
    "shoal": _vllm_style("shoal:"),
    "vllm": _vllm_style("vllm:"),
    "llamacpp": MetricNames(prompt_tokens="llamacpp:prompt_tokens_total",
                            generation_tokens="llamacpp:tokens_predicted_total"),
}

Snapshot = dict[str, float]


def parse_metrics(text: str) -> Snapshot:
    """Every sample's value summed over its labels, by sample name."""
    totals: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


class MetricsScraper:
    """Scrapes one target's /metrics; a failed scrape gives None, never an error."""

    def __init__(self, url: str, headers: dict[str, str], source: str) -> None:
        self.source = source
        self.names = METRIC_NAMES[source]
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=10.0)

    async def scrape(self) -> Snapshot | None:
        try:
            response = await self._http.get("/metrics")
            response.raise_for_status()
            return parse_metrics(response.text)
        except (httpx.HTTPError, ValueError):
            return None

    async def scrape_settled(self, before: Snapshot | None, finished: int, wait_s: float = 2.0) -> Snapshot | None:
        """A scrape taken once the server has counted `finished` more finished requests.

        NOTE: a server records a request's end after the last byte is on its way, so a scrape
        right after the client's last answer can miss it; wait briefly for the counter.
        """
        deadline = time.monotonic() + wait_s
        while True:
            after = await self.scrape()
            key = self.names.finished
            if (after is None or before is None or key is None
                    or after.get(key, 0.0) - before.get(key, 0.0) >= finished or time.monotonic() >= deadline):
                return after
            await asyncio.sleep(0.05)

    def deltas(self, before: Snapshot | None, after: Snapshot | None) -> dict | None:
        """The schema's `server` object for one level."""
        if before is None or after is None:
            return None
        names = self.names

        def delta(name: str | None) -> float | None:
            if name is None or name not in after:
                return None
            value = after[name] - before.get(name, 0.0)
            return value if value >= 0 else None      # a counter reset: the server restarted

        def mean(histogram: str | None) -> float | None:
            if histogram is None:
                return None
            total, count = delta(f"{histogram}_sum"), delta(f"{histogram}_count")
            return total / count if total is not None and count else None

        def whole(value: float | None) -> int | None:
            return None if value is None else int(round(value))

        queries, hits = delta(names.cache_queries), delta(names.cache_hits)
        return {"source": self.source,
                "prompt_tokens": whole(delta(names.prompt_tokens)),
                "generation_tokens": whole(delta(names.generation_tokens)),
                "ttft_mean": mean(names.ttft), "e2e_mean": mean(names.e2e),
                "preemptions": whole(delta(names.preemptions)),
                "prefix_cache_hit_rate": hits / queries if queries and hits is not None else None}

    async def aclose(self) -> None:
        await self._http.aclose()
