"""The live view of a server: what the dashboard (GET /dashboard) and `shoal top` show.

One LiveStats per app, built from the server's own state, never from /metrics text. Once a
second `tick()` reads each loaded engine's stats snapshot (tokens per second, prefix-cache
hits and preemptions over the last minute come from differences of its counters) and the
recent latencies (serving/latency_window.py), and appends one point to a five-minute
history. `snapshot()` adds the admission queues, per-key usage (from finished request
records) and the last refusals, as one JSON-ready dict. All of it runs on the event loop;
the engine thread does nothing for it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from shoal.access.principal import PRIORITY_CLASSES
from shoal.core.version import __version__
from shoal.engine.stats import EngineStats
from shoal.serving.generate import GenerationService
from shoal.serving.records import RequestRecord

log = logging.getLogger(__name__)

HISTORY_S = 300         # per-second points kept: the plots' five minutes
RECENT_S = 60           # the headline latencies, prefix-cache hit rates and preemptions
RATE_S = 10             # the headline tokens per second
POINT_S = 10            # each plotted latency point: the quantiles of the trailing 10 s
MAX_REFUSALS = 20
SERIES_FIELDS = ("t", "prompt_tps", "output_tps", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                 "running", "waiting", "kv_usage")
CLIENT_CLOSED_REQUEST = 499


@dataclass(slots=True)
class KeyUsage:
    """One caller key's requests since the server started (key_id None: anonymous callers)."""

    key_id: str | None
    name: str | None
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    rate_limited: int = 0       # 429s
    refused: int = 0            # other 4xx (client disconnects not counted)
    errors: int = 0             # 5xx


class LiveStats:
    """Rolling windows of the server's activity, and the snapshot built from them."""

    def __init__(self, service: GenerationService, *, keys_required: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.service = service
        self.keys_required = keys_required
        self._clock, self._wall = clock, wall
        self.started_at = wall()
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_S)
        # per loaded model, its (time, stats) of the last RECENT_S ticks
        self._samples: dict[str, deque[tuple[float, EngineStats]]] = {}
        self._keys: dict[str | None, KeyUsage] = {}
        self._refusals: deque[dict[str, Any]] = deque(maxlen=MAX_REFUSALS)
        self._ticks = 0
        self._tick_event = asyncio.Event()
        self._latest: tuple[int, bytes] | None = None

    # ---- inputs ------------------------------------------------------------------------------

    def observe_record(self, record: RequestRecord) -> None:
        """Counts a finished or refused model request (a request-record sink, as the access log)."""
        if not record.is_model_request:
            return
        usage = self._keys.get(record.key_id)
        if usage is None:
            usage = self._keys[record.key_id] = KeyUsage(record.key_id, record.principal.name)
        usage.requests += 1
        usage.prompt_tokens += record.prompt_tokens
        usage.output_tokens += record.completion_tokens
        status = record.status or 0
        if status == 429:
            usage.rate_limited += 1
        elif 400 <= status < 500 and status != CLIENT_CLOSED_REQUEST:
            usage.refused += 1
        elif status >= 500:
            usage.errors += 1
        if status >= 400:
            self._refusals.appendleft({
                "time": round(record.started_at, 3), "status": status, "reason": record.reason,
                "key_id": record.key_id, "key_name": record.principal.name,
                "model": record.model or record.requested_model, "path": record.path,
                "request_id": record.request_id})

    def tick(self) -> None:
        """Samples the engines and the latency windows: one point of the history."""
        now = self._clock()
        point: dict[str, Any] = dict.fromkeys(SERIES_FIELDS, 0)
        point["t"] = round(self._wall(), 3)
        loaded = set()
        for model in self.service.residency.loaded():
            loaded.add(model.name)
            stats = model.engine.stats()
            samples = self._samples.setdefault(model.name, deque(maxlen=RECENT_S + 1))
            if samples:
                prompt, output = _rates(samples[-1], (now, stats))
                point["prompt_tps"] += prompt
                point["output_tps"] += output
            samples.append((now, stats))
            point["running"] += stats.running
            point["waiting"] += stats.waiting
            point["kv_usage"] = max(point["kv_usage"], stats.kv_usage)
        for name in [n for n in self._samples if n not in loaded]:
            del self._samples[name]
        recent = self.service.metrics.recent
        point["ttft_p50"], point["ttft_p99"] = recent.ttft.quantiles((0.5, 0.99), POINT_S)
        point["itl_p50"], point["itl_p99"] = recent.itl.quantiles((0.5, 0.99), POINT_S)
        self._history.append({k: _round(v) for k, v in point.items()})
        self._ticks += 1
        event, self._tick_event = self._tick_event, asyncio.Event()
        event.set()

    async def run(self, interval: float = 1.0) -> None:
        """Ticks every `interval` seconds until cancelled (the app's lifespan runs it)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > interval:    # the loop was stalled: no burst of ticks
                next_at = loop.time()
            try:
                self.tick()
            except Exception:
                log.exception("the live dashboard's tick failed")

    async def next_tick(self) -> None:
        await self._tick_event.wait()

    # ---- outputs -----------------------------------------------------------------------------

    def latest_json(self) -> bytes:
        """The snapshot with the newest point only, encoded once per tick however many feeds
        send it."""
        if self._latest is None or self._latest[0] != self._ticks:
            self._latest = (self._ticks, json.dumps(self.snapshot(history=1),
                                                    separators=(",", ":")).encode())
        return self._latest[1]

    def snapshot(self, history: int = HISTORY_S) -> dict[str, Any]:
        """Everything the dashboard shows, with the last `history` points of the series."""
        service = self.service
        recent = service.metrics.recent
        ttft = recent.ttft.quantiles((0.5, 0.99), RECENT_S)
        itl = recent.itl.quantiles((0.5, 0.99), RECENT_S)
        models = [self._model(model) for model in service.residency.loaded()]
        points = list(self._history)[-history:] if history > 0 else []
        concurrent: dict[str | None, int] = {}
        names: dict[str | None, str | None] = {}
        for principal in service.admitted_principals():
            concurrent[principal.key_id] = concurrent.get(principal.key_id, 0) + 1
            names.setdefault(principal.key_id, principal.name)
        keys = [{**asdict(usage), "concurrent": concurrent.get(key_id, 0)}
                for key_id, usage in self._keys.items()]
        keys += [{**asdict(KeyUsage(key_id, names[key_id])), "concurrent": count}
                 for key_id, count in concurrent.items() if key_id not in self._keys]
        keys.sort(key=lambda k: (-k["concurrent"], -k["requests"], k["key_id"] or ""))
        return {
            "version": __version__,
            "state": service.lifecycle.state,
            "time": round(self._wall(), 3),
            "uptime_s": round(self._wall() - self.started_at, 1),
            "keys_required": self.keys_required,
            "windows": {"latency_s": RECENT_S, "rate_s": RATE_S, "point_latency_s": POINT_S,
                        "history_s": HISTORY_S},
            "now": {
                "prompt_tps": _round(sum(m["prompt_tps"] for m in models)),
                "output_tps": _round(sum(m["output_tps"] for m in models)),
                "ttft_p50": _round(ttft[0]), "ttft_p99": _round(ttft[1]),
                "itl_p50": _round(itl[0]), "itl_p99": _round(itl[1]),
                "in_flight": service.num_in_flight(),
                "running": sum(m["running"] for m in models),
                "queued": sum(sum(m["queued"].values()) for m in models),
            },
            "models": models,
            "keys": keys,
            "refusals": list(self._refusals),
            "series": {name: [p[name] for p in points] for name in SERIES_FIELDS},
            "ticks": self._ticks,
        }

    def _model(self, model) -> dict[str, Any]:
        stats = model.engine.stats()
        limits = self.service.admission.limits
        queue = self.service.admission.queue(model.name)
        samples = self._samples.get(model.name) or deque()
        prompt_tps = output_tps = 0.0
        if len(samples) > 1:
            prompt_tps, output_tps = _rates(samples[max(0, len(samples) - 1 - RATE_S)], samples[-1])
        hit_rate = preempted = None
        if samples:
            first = samples[0][1]
            queries = stats.prefix_queries - first.prefix_queries
            hit_rate = (stats.prefix_hits - first.prefix_hits) / queries if queries > 0 else None
            preempted = max(0, stats.preemptions - first.preemptions)
        return {
            "name": model.name,
            "compute": model.info.compute,
            "device": model.info.device,
            "max_num_seqs": model.engine.limits.max_num_seqs,
            "kv_usage": _round(stats.kv_usage),
            "kv_blocks": model.info.num_blocks,
            "prefix_hit_rate": _round(hit_rate),
            "prefix_hit_rate_total": _round(stats.prefix_hits / stats.prefix_queries
                                            if stats.prefix_queries else None),
            "running": stats.running,
            "waiting": stats.waiting,
            "running_by_class": dict(queue.running_by_class),
            "queued": {c: queue.waiting[c] for c in PRIORITY_CLASSES},
            "queued_tokens": sum(queue.waiting_tokens.values()),
            "queue_bounds": {"interactive": limits.max_queue, "batch": limits.max_queue_batch,
                             "tokens": limits.max_queued_tokens},
            "preemptions": stats.preemptions,
            "preemptions_recent": preempted,
            "prompt_tps": _round(prompt_tps),
            "output_tps": _round(output_tps),
        }


def _rates(before: tuple[float, EngineStats], after: tuple[float, EngineStats]) -> tuple[float, float]:
    """Prompt and output tokens per second between two samples of one engine."""
    (t0, s0), (t1, s1) = before, after
    if t1 <= t0:
        return 0.0, 0.0
    return (_grown(s0.prompt_tokens, s1.prompt_tokens) / (t1 - t0),
            _grown(s0.generation_tokens, s1.generation_tokens) / (t1 - t0))


def _grown(before: int, after: int) -> int:
    # NOTE: a model reloaded under the same name starts its counters again from zero.
    return after - before if after >= before else after


def _round(value: float | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return round(value, 4 if abs(value) < 10 else 1)
