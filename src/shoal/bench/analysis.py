"""Where a target stops scaling: the knee, saturation and oversaturation, in plain words.

Definitions (docs/benchmarks.md):
- knee: the last level before the first step where P99 TTFT (P99 e2e for long answers)
  grows by a larger factor than output throughput — past it, waiting grows faster than work;
- saturation: the first level where output throughput grows < 10% over the previous level;
- oversaturation: the first level where throughput falls > 10% below the peak so far, or more
  than 1% of requests fail.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal.bench.stats import error_rate

SATURATION_GROWTH = 0.10
OVERSATURATION_DROP = 0.10
OVERSATURATION_ERROR_RATE = 0.01


@dataclass(frozen=True, slots=True)
class Knee:
    level: float
    latency_growth: float | None     # None: nothing completed at the next level
    throughput_growth: float


def find_knee(levels: Sequence[float], throughput: Sequence[float | None],
              latency: Sequence[float | None]) -> Knee | None:
    for i in range(1, len(levels)):
        prev_lat, prev_tp = latency[i - 1], throughput[i - 1]
        if not prev_lat or not prev_tp:
            continue                 # nothing to grow from
        tp_growth = (throughput[i] or 0.0) / prev_tp
        if latency[i] is None:
            return Knee(levels[i - 1], None, tp_growth)
        lat_growth = latency[i] / prev_lat
        if lat_growth > tp_growth:
            return Knee(levels[i - 1], lat_growth, tp_growth)
    return None


def find_saturation(levels: Sequence[float], throughput: Sequence[float | None]) -> float | None:
    for i in range(1, len(levels)):
        prev = throughput[i - 1] or 0.0
        if prev > 0 and (throughput[i] or 0.0) < prev * (1 + SATURATION_GROWTH):
            return levels[i]
    return None


def find_oversaturation(levels: Sequence[float], throughput: Sequence[float | None],
                        error_rates: Sequence[float]) -> tuple[float, str] | None:
    """(level, "errors" | "drop"), or None when the server held up at every level."""
    peak = 0.0
    for level, tp, errors in zip(levels, throughput, error_rates):
        if errors > OVERSATURATION_ERROR_RATE:
            return level, "errors"
        tp = tp or 0.0
        if peak > 0 and tp < peak * (1 - OVERSATURATION_DROP):
            return level, "drop"
        peak = max(peak, tp)
    return None


def level_words(level: float, mode: str) -> str:
    if mode == "closed":
        n = int(level)
        return f"{n} stream" if n == 1 else f"{n} streams"
    return f"{level:g} req/s"


def analyse_target(rows: Sequence[dict], *, mode: str, long_answers: bool) -> dict:
    """The schema's `analysis[target]` from the target's level rows (in level order)."""
    levels = [row["level"] for row in rows]
    throughput = [row["output_throughput"] for row in rows]
    metric = "e2e" if long_answers else "ttft"
    latency = [row[metric]["p99"] for row in rows]
    rates = [error_rate(row) for row in rows]
    knee = find_knee(levels, throughput, latency)
    saturation = find_saturation(levels, throughput)
    over = find_oversaturation(levels, throughput, rates)
    measured = [(tp, lv) for tp, lv in zip(throughput, levels) if tp]
    peak, peak_level = max(measured) if measured else (None, None)
    return {"knee": knee.level if knee else None, "saturation": saturation,
            "oversaturation": over[0] if over else None,
            "peak_output_throughput": peak, "peak_level": peak_level,
            "knee_metric": f"{metric}_p99",
            "summary": verdict(levels, mode=mode, metric=metric.upper(), knee=knee, saturation=saturation,
                               over=over, rates=rates, peak=peak, peak_level=peak_level)}


def verdict(levels: Sequence[float], *, mode: str, metric: str, knee: Knee | None, saturation: float | None,
            over: tuple[float, str] | None, rates: Sequence[float], peak: float | None,
            peak_level: float | None) -> str:
    """One plain-words sentence: how far it scales, where it saturates, how it degrades."""
    if peak is None:
        return "no request completed at any level."
    words = lambda level: level_words(level, mode)  # noqa: E731 - a local shorthand
    parts = []
    if len(levels) == 1:
        parts.append(f"one level measured ({words(levels[0])}): no knee to find")
    elif knee is None:
        parts.append(f"scales to {words(levels[-1])} with no knee (P99 {metric} never grows faster than throughput)")
    elif knee.latency_growth is None:
        parts.append(f"scales to {words(knee.level)}; past {knee.level:g}, requests stop completing (the knee)")
    else:
        parts.append(f"scales to {words(knee.level)}; past {knee.level:g}, P99 {metric} grows "
                     f"{knee.latency_growth:.1f}x for {knee.throughput_growth:.1f}x throughput (the knee)")
    if saturation is not None:
        parts.append(f"throughput flat from {saturation:g} (saturated)")
    elif len(levels) > 1:
        parts.append(f"throughput still growing at {words(levels[-1])}")
    if over is not None:
        level, why = over
        if why == "errors":
            parts.append(f"errors from {level:g} ({rates[list(levels).index(level)]:.0%} of requests)")
        else:
            parts.append(f"throughput falls over {OVERSATURATION_DROP:.0%} below its peak from {level:g}")
    elif saturation is not None:
        parts.append("degrades gracefully past it (no errors, throughput within 10% of its peak)")
    parts.append(f"peak {peak:.1f} output tok/s at {words(peak_level)}")
    return "; ".join(parts) + "."
