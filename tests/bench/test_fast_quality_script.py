"""benchmarks/fast_quality.py: the top-N + one-bucket KL that puts llama.cpp (which returns only
its top N) and shoal's modes in one comparable column."""
from __future__ import annotations

import math

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def fq():
    return load_benchmark("fast_quality.py", "fast_quality_script")


def test_bucketed_kl_on_a_crafted_distribution(fq):
    exact = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # The peer's top 2 are tokens 1 and 0; its remaining mass (0.2) is one bucket against
    # exact's remaining 0.15 + 0.05.
    kl = fq.bucketed_kl(exact, [1, 0], [math.log(0.4), math.log(0.4)])
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert kl == pytest.approx(want, abs=1e-7)


def test_bucketed_kl_is_the_full_kl_when_n_covers_the_vocabulary_and_a_lower_bound_otherwise(fq):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.randn(50, generator=gen).mul(3).log_softmax(-1).double()
        q = (p + torch.randn(50, generator=gen, dtype=torch.float64)).log_softmax(-1)
        full = (p.exp() * (p - q)).sum().item()
        ids, lps = fq.top_n(q, 50)
        assert fq.bucketed_kl(p, ids, lps) == pytest.approx(full, rel=1e-5, abs=1e-9)
        for n in (1, 5, 20):
            ids, lps = fq.top_n(q, n)
            assert 0 <= fq.bucketed_kl(p, ids, lps) <= full + 1e-9


def test_bucketed_kl_stays_finite_when_the_peers_top_n_sums_over_one(fq):
    exact = torch.tensor([0.6, 0.3, 0.1]).log()
    # float32 logprobs from a server can sum to a hair over 1: the bucket is floored, not NaN.
    kl = fq.bucketed_kl(exact, [0, 1], [math.log(0.7), math.log(0.30001)])
    assert math.isfinite(kl) and kl > 1.0


def test_identical_answers_ignore_only_the_trailing_eos(fq):
    eos = frozenset({2})
    assert fq.strip_eos([5, 6, 2], eos) == fq.strip_eos([5, 6], eos) == [5, 6]
    assert fq.strip_eos([2, 5, 6], eos) == [2, 5, 6]
