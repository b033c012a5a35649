"""One level's figures from its request records (the schema's `levels[]` row, less `server`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.bench.client import TimedRequest


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives; a request meets them when every one given holds."""

    ttft_s: float | None = None
    itl_s: float | None = None       # the request's mean gap between tokens (its TPOT)
    e2e_s: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.itl_s, self.e2e_s))

    def as_dict(self) -> dict:
        return {"ttft_s": self.ttft_s, "itl_s": self.itl_s, "e2e_s": self.e2e_s}


def distribution(values: Sequence[float], *, spread: bool = False) -> dict:
    """mean and P50/P90/P99 (linear interpolation, as numpy and vLLM's benchmark); with
    `spread`, also max and standard deviation. All None when there are no values."""
    keys = ["mean", "p50", "p90", "p99"] + (["max", "stdev"] if spread else [])
    if not values:
        return dict.fromkeys(keys)
    data = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    out = {"mean": float(data.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}
    if spread:
        out |= {"max": float(data.max()), "stdev": float(data.std())}
    return out


def tpot(record: TimedRequest) -> float | None:
    """Time per output token after the first."""
    if record.e2e is None or record.ttft is None or not record.output_tokens or record.output_tokens < 2:
        return None
    return (record.e2e - record.ttft) / (record.output_tokens - 1)


def meets_slo(record: TimedRequest, slo: Slo) -> bool:
    if not record.ok:
        return False
    checks = ((slo.ttft_s, record.ttft), (slo.itl_s, tpot(record)), (slo.e2e_s, record.e2e))
    return all(limit is None or (value is not None and value <= limit) for limit, value in checks)


def error_counts(records: Sequence[TimedRequest]) -> dict[str, int]:
    counts = Counter(str(r.status) for r in records if not r.ok)
    # timeouts and connection failures always appear (as 0), status codes when they occurred
    return {"timeout": counts.pop("timeout", 0), "connection": counts.pop("connection", 0),
            **dict(sorted(counts.items()))}


def level_figures(records: Sequence[TimedRequest], duration_s: float, *, stall_threshold_s: float,
                  slo: Slo) -> dict:
    """Throughput, latency distributions, errors, stalls and goodput of one level."""
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    gaps = [g for r in done for g in r.itls]
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    met = sum(meets_slo(r, slo) for r in records) if slo.given else None
    return {
        "duration_s": duration_s,
        "completed": len(done),
        "errors": error_counts(records),
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(prompt_tokens + output_tokens),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft": distribution([r.ttft for r in done if r.ttft is not None]),
        "itl": distribution(gaps, spread=True),
        "tpot": distribution([t for r in done if (t := tpot(r)) is not None]),
        "e2e": distribution([r.e2e for r in done if r.e2e is not None]),
        "stalls": sum(g > stall_threshold_s for g in gaps),
        "goodput": None if met is None else per_s(met),
        "slo_attainment": None if met is None or not records else met / len(records),
    }


def error_rate(row: dict) -> float:
    failed = sum(row["errors"].values())
    total = failed + row["completed"]
    return failed / total if total else 0.0
