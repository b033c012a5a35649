"""Tests of the sampler: filters, distribution, determinism, batch invariance, penalties."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.sampling import filters
from shoal.engine.sampling.processors import apply_penalties
from shoal.engine.sampling.row import SamplingRow
from shoal.engine.sampling.sampler import GREEDY_TEMPERATURE, Sampler

EOS = 7


def row(params: SamplingParams | None = None, *, seed: int = 0, prompt: list[int] | None = None,
        output: list[int] | None = None, eos: frozenset[int] = frozenset({EOS})) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), list(prompt or [1, 2, 3]), list(output or []),
                       seed, eos)


def sample_many(logits: torch.Tensor, params: SamplingParams, seeds: range,
                output: list[int] | None = None) -> list[int]:
    """Samples one token per seed from the same logits row (one batched call)."""
    batch = logits.unsqueeze(0).expand(len(seeds), -1)
    return Sampler()(batch, [row(params, seed=s, output=output) for s in seeds]).token_ids


def logits_for_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def chi_square(observed: Counter, expected: torch.Tensor, n: int) -> float:
    return sum((observed.get(t, 0) - n * p) ** 2 / (n * p) for t, p in enumerate(expected.tolist()))


# ---------------------------------------------------------------- greedy

def test_greedy_is_argmax_on_fast_and_slow_paths() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 300)
    expected = logits.argmax(dim=1).tolist()
    fast = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(16)])
    # logprobs forces the general path; it must agree with the fast one.
    slow = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=1)) for _ in range(16)])
    assert fast.token_ids == expected
    assert slow.token_ids == expected
    assert fast.logprobs == [None] * 16


def test_caller_logits_are_not_modified() -> None:
    logits = torch.randn(2, 50)
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.5,
                            logit_bias={3: 5.0}, min_tokens=2)
    Sampler()(logits, [row(params, output=[3]), row(params, seed=1)])
    assert torch.equal(logits, before)
    # Without in-place edits the sampler works on the caller's tensor directly.
    plain = SamplingParams(temperature=0.8, top_k=5, top_p=0.7, min_p=0.1)
    Sampler()(logits, [row(plain), row(plain, seed=1)])
    assert torch.equal(logits, before)


def test_bad_logits_shape_is_a_typed_error() -> None:
    with pytest.raises(InvalidParameterError):
        Sampler()(torch.zeros(3, 10), [row()])


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []


# ---------------------------------------------------------------- filters

def test_top_k_samples_exactly_the_k_most_likely() -> None:
    torch.manual_seed(1)
    logits = torch.randn(12)
    kept = set(logits.topk(4).indices.tolist())
    seen = set(sample_many(logits, SamplingParams(top_k=4), range(2000)))
    assert seen == kept


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = logits_for_probs([0.1, 0.4, 0.05, 0.3, 0.15])
    # Sorted: 0.4, 0.3, 0.15 | 0.1, 0.05. Mass before 0.1 is 0.85 >= 0.8: dropped.
    seen = set(sample_many(logits, SamplingParams(top_p=0.8), range(3000)))
    assert seen == {1, 3, 4}
    # A tiny top_p still keeps the most likely token.
    assert set(sample_many(logits, SamplingParams(top_p=1e-6), range(200))) == {1}


def test_top_p_keeps_tokens_tied_with_the_last_kept_one() -> None:
    logits = logits_for_probs([0.1, 0.3, 0.2, 0.3, 0.1])
    # Nucleus 0.7 ends inside a 0.1/0.2 boundary: 0.3 + 0.3 = 0.6 < 0.7 keeps one 0.2;
    # the next token (0.1) starts at 0.8 and goes. With top_p 0.85 the first 0.1 is
    # needed, and its tie stays too.
    assert set(sample_many(logits, SamplingParams(top_p=0.7), range(2000))) == {1, 2, 3}
    assert set(sample_many(logits, SamplingParams(top_p=0.85), range(2000))) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("prefix", [2, 16, 4096])
def test_top_p_prefix_shortcut_matches_full_sort(monkeypatch: pytest.MonkeyPatch,
                                                 prefix: int) -> None:
    torch.manual_seed(9)
    logits = torch.randn(8, 300) * torch.tensor([0.3, 1, 2, 4, 6, 8, 10, 0.1]).unsqueeze(1)
    rows = [row(SamplingParams(temperature=1.0, top_p=p), seed=i)
            for i, p in enumerate([0.9, 0.5, 0.95, 0.2, 0.99, 0.7, 0.3, 0.6])]
    monkeypatch.setattr(filters, "NUCLEUS_PREFIX", 10**6)  # always the full sort
    full = Sampler()(logits, rows).token_ids
    monkeypatch.setattr(filters, "NUCLEUS_PREFIX", prefix)
    assert Sampler()(logits, rows).token_ids == full
    # And the kept set itself: every token a wide sample sees lies in the hand nucleus.
    probs = torch.softmax(logits[3], dim=0).tolist()
    ranked = sorted(range(300), key=lambda t: -probs[t])
    nucleus, mass = set(), 0.0
    for t in ranked:
        if mass >= 0.2:
            break
        nucleus.add(t)
        mass += probs[t]
    assert set(sample_many(logits[3], SamplingParams(top_p=0.2), range(500))) <= nucleus


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    logits = logits_for_probs([0.5, 0.25, 0.15, 0.1])
    # threshold 0.3 * 0.5 = 0.15: tokens 0, 1, 2 stay (0.15 is not below it).
    seen = set(sample_many(logits, SamplingParams(min_p=0.3), range(3000)))
    assert seen == {0, 1, 2}


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    logits = logits_for_probs([0.4, 0.3, 0.2, 0.1])
    # After top_k=2: [0.571, 0.429]; mass before token 1 is 0.571 >= 0.5, so only token 0
    # remains. (top_p on the full distribution would have kept token 1 too.)
    seen = set(sample_many(logits, SamplingParams(top_k=2, top_p=0.5), range(500)))
    assert seen == {0}


def test_filters_never_pick_excluded_tokens_on_a_large_vocab() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5000) * 3
    params = SamplingParams(temperature=1.3, top_k=50, top_p=0.9, min_p=0.05)
    allowed = set(logits.topk(50).indices.tolist())
    probs = torch.softmax(logits / 1.3, dim=0)
    allowed &= {t for t in allowed if probs[t] >= 0.05 * probs.max()}
    seen = set(sample_many(logits, params, range(1000)))
    assert seen <= allowed and len(seen) > 1


# ---------------------------------------------------------------- distribution

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    n = 6000
    counts = Counter(sample_many(logits, SamplingParams(temperature=temperature), range(n)))
    expected = torch.softmax(logits / temperature, dim=0)
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001.
    assert chi_square(counts, expected, n) < 20.5


def test_low_temperature_tends_to_greedy_and_high_temperature_spreads() -> None:
    torch.manual_seed(3)
    logits = torch.randn(20)
    best = int(logits.argmax())
    assert set(sample_many(logits, SamplingParams(temperature=1e-3), range(300))) == {best}
    assert set(sample_many(logits, SamplingParams(temperature=GREEDY_TEMPERATURE / 2),
                           range(50))) == {best}
    n = 4000
    counts = Counter(sample_many(logits, SamplingParams(temperature=1000.0), range(n)))
    assert set(counts) == set(range(20))
    # At T=1000 the distribution is uniform within ~0.5%: chi-square against uniform.
    assert chi_square(counts, torch.full((20,), 1 / 20), n) < 43.8  # 19 dof, p = 0.001


# ---------------------------------------------------------------- determinism

def test_same_seed_and_step_give_same_token() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0)
    for seed in (0, 17, -5, 2**70):
        first = sample_many(logits, params, range(seed, seed + 1), output=[5, 6])
        again = sample_many(logits, params, range(seed, seed + 1), output=[9, 9])
        assert first == again  # only the step (len(output)) matters, not its content


def test_different_seeds_and_steps_differ() -> None:
    logits = torch.zeros(1000)  # uniform: collisions are rare
    params = SamplingParams(temperature=1.0)
    by_seed = sample_many(logits, params, range(100))
    assert len(set(by_seed)) > 90
    by_step = [sample_many(logits, params, range(3, 4), output=[0] * step)[0] for step in range(100)]
    assert len(set(by_step)) > 90


def mixed_rows(vocab: int) -> list[SamplingRow]:
    """32 rows mixing greedy/random, filters, penalties, bias, min_tokens and logprobs."""
    gen = torch.Generator().manual_seed(5)
    rows = []
    for i in range(32):
        kind = i % 8
        params = {
            0: SamplingParams(temperature=0.0),
            1: SamplingParams(temperature=0.9, top_p=0.9),
            2: SamplingParams(temperature=1.1, top_k=20, min_p=0.02),
            3: SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
            4: SamplingParams(temperature=0.8, presence_penalty=1.0, repetition_window=4,
                              logprobs=3),
            5: SamplingParams(temperature=1.0, logit_bias={11: 2.0, 12: -3.0}, min_tokens=5,
                              stop_token_ids=[13]),
            6: SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=0.8),
            7: SamplingParams(temperature=1.5, top_k=5, top_p=0.5, frequency_penalty=-0.5),
        }[kind]
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=gen)),),
                               generator=gen).tolist()
        output = torch.randint(0, vocab, (i % 7,), generator=gen).tolist()
        rows.append(SamplingRow(params, prompt, output, seed=1000 + i, eos_token_ids=frozenset({7})))
    return rows


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_invariance_alone_vs_batch_of_32_and_permuted(device: str) -> None:
    vocab = 500
    torch.manual_seed(6)
    logits = (torch.randn(32, vocab) * 2).to(device)
    rows = mixed_rows(vocab)
    sampler = Sampler()
    batched = sampler(logits, rows)
    perm = torch.randperm(32).tolist()
    permuted = sampler(logits[perm], [rows[i] for i in perm])
    for i in range(32):
        alone = sampler(logits[i:i + 1], [rows[i]])
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.logprobs[0] == batched.logprobs[i]
        j = perm.index(i)
        assert permuted.token_ids[j] == batched.token_ids[i]
        assert permuted.logprobs[j] == batched.logprobs[i]
    assert len(set(batched.token_ids)) > 10


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 31), min_size=1, max_size=12, unique=True))
def test_any_sub_batch_gives_each_row_its_own_result(members: list[int]) -> None:
    vocab = 200
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(10)) * 2
    rows = mixed_rows(vocab)
    full = Sampler()(logits, rows)
    part = Sampler()(logits[members], [rows[i] for i in members])
    assert part.token_ids == [full.token_ids[i] for i in members]
    assert part.logprobs == [full.logprobs[i] for i in members]


# ---------------------------------------------------------------- penalties

def hand_penalties(logits: list[float], prompt: list[int], output: list[int],
                   rep: float, freq: float, pres: float, window: int | None) -> list[float]:
    seq = prompt + output
    recent_start = 0 if window is None else max(0, len(seq) - window)
    recent_output = [t for pos, t in enumerate(seq) if pos >= recent_start and pos >= len(prompt)]
    recent_all = set(seq[recent_start:]) if window != 0 else set()
    if window == 0:
        recent_output = []
    result = []
    for t, value in enumerate(logits):
        if t in recent_all:
            value = value / rep if value > 0 else value * rep
        count = recent_output.count(t)
        value -= freq * count + pres * (1 if count else 0)
        result.append(value)
    return result


@pytest.mark.parametrize("window", [None, 0, 1, 2, 4, 100])
def test_penalty_math_matches_hand_computation(window: int | None) -> None:
    logits = [2.0, -1.0, 0.5, -0.25, 3.0, 1.0]
    prompt, output = [0, 1, 5], [1, 2, 2, 3]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3,
                            repetition_window=window)
    x = torch.tensor([logits, logits])
    # Row 0 penalised, row 1 left alone: only the listed rows are touched.
    apply_penalties(x, [row(params, prompt=prompt, output=output), row()], [0])
    expected = hand_penalties(logits, prompt, output, 2.0, 0.5, 0.3, window)
    assert x[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert x[1].tolist() == logits


def test_repetition_window_limits_penalty_to_recent_tokens() -> None:
    # Token 4 was repeated long ago, token 5 recently; both start as the top logits.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 2.9, 0.0, -9.0]])
    output = [4, 4, 4, 1, 2, 5]
    params = dict(temperature=0.0, frequency_penalty=1.0)
    everything = Sampler()(logits, [row(SamplingParams(**params), output=output)])
    recent = Sampler()(logits, [row(SamplingParams(repetition_window=3, **params), output=output)])
    assert everything.token_ids == [5]   # 4 pays 3.0, 5 pays 1.0
    assert recent.token_ids == [4]       # only [1, 2, 5] count


def test_repetition_penalty_counts_prompt_tokens_but_presence_does_not() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]])
    rep = Sampler()(logits, [row(SamplingParams(temperature=0.0, repetition_penalty=1.5),
                                 prompt=[1])])
    pres = Sampler()(logits, [row(SamplingParams(temperature=0.0, presence_penalty=2.0),
                                  prompt=[1])])
    assert rep.token_ids == [2]
    assert pres.token_ids == [1]


# ---------------------------------------------------------------- logit_bias, min_tokens

def test_logit_bias_forces_and_bans_tokens() -> None:
    torch.manual_seed(7)
    logits = torch.randn(100) * 2
    forced = sample_many(logits, SamplingParams(logit_bias={42: 100.0}), range(300))
    assert set(forced) == {42}
    best = int(logits.argmax())
    banned = sample_many(logits, SamplingParams(logit_bias={best: -100.0}), range(1000))
    assert best not in banned
    greedy = sample_many(logits, SamplingParams(temperature=0.0, logit_bias={best: -100.0}),
                         range(1))
    assert greedy == [int(logits.topk(2).indices[1])]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    logits = torch.zeros(10)
    logits[EOS], logits[3], logits[5] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3],
                            ignore_eos=ignore_eos)
    for step in range(3):
        assert sample_many(logits, params, range(1), output=[0] * step) == [5]
    assert sample_many(logits, params, range(1), output=[0] * 3) == [EOS]
    # Random sampling never picks the masked ids either.
    random_params = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[3])
    picked = sample_many(logits, random_params, range(500), output=[0])
    assert EOS not in picked and 3 not in picked


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax_with_sorted_alternatives() -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, 64)
    params = [SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5,
                             logit_bias={0: 3.0}),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logprobs=20, top_k=3)]
    out = Sampler()(logits, [row(p, seed=i, output=[0, 1]) for i, p in enumerate(params)])
    reference = torch.log_softmax(logits, dim=1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(reference[i, lp.token_id].item(), abs=1e-6)
        k = params[i].logprobs
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        top_ref = reference[i].topk(k) if k else None
        if top_ref is not None:
            assert [t for t, _ in lp.top] == top_ref.indices.tolist()
            assert values == pytest.approx(top_ref.values.tolist(), abs=1e-6)
