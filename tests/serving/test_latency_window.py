"""The dashboard's rolling latency windows: quantiles close to the samples' own, and old
seconds forgotten."""
from __future__ import annotations

import math
import random

from shoal.serving.latency_window import LatencyWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _nearest_rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_quantiles_are_within_a_bin_of_the_exact_ones() -> None:
    rng = random.Random(7)
    clock = Clock()
    window = LatencyWindow(60, clock)
    samples = []
    for second in range(30):
        clock.now = 1000.0 + second + 0.5
        for _ in range(200):
            value = rng.lognormvariate(math.log(0.03), 0.8)      # ITL-like: tens of ms, a long tail
            samples.append(value)
            window.add(value)
    p50, p99 = window.quantiles((0.5, 0.99), 60)
    assert abs(p50 / _nearest_rank(samples, 0.5) - 1) < 0.045     # a bin is 4.4% wide
    assert abs(p99 / _nearest_rank(samples, 0.99) - 1) < 0.045
    assert window.count(60) == len(samples)


def test_only_the_asked_span_counts_and_old_seconds_are_forgotten() -> None:
    clock = Clock()
    window = LatencyWindow(60, clock)
    for _ in range(10):
        window.add(2.0)           # second 1000: slow
    clock.now = 1030.2
    for _ in range(10):
        window.add(0.010)         # second 1030: fast
    assert window.quantiles((0.5,), 10) == [window.quantiles((0.01,), 10)[0]]
    assert window.quantiles((0.5,), 10)[0] < 0.011
    assert window.quantiles((0.99,), 60)[0] > 1.9      # the slow second is still within a minute
    clock.now = 1061.0                                 # ... and no longer
    assert window.quantiles((0.99,), 60)[0] < 0.011
    clock.now = 1100.0
    assert window.quantiles((0.5, 0.99), 60) == [None, None]
    assert window.count(60) == 0


def test_zero_and_tiny_samples_do_not_break_the_bins() -> None:
    window = LatencyWindow(60, Clock())
    for value in (0.0, -1.0, 1e-9):
        window.add(value)
    assert window.quantiles((0.5,), 60)[0] < 2e-6
