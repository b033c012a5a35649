"""prompt_logprobs: the engine's log-probs of prompt tokens, computed during (chunked)
prefill, against transformers on the same weights (exact mode) and against a whole-sequence
forward of the same int8 model (fast mode). A request that wants them never takes its prompt
from the prefix cache."""
from __future__ import annotations

import pytest
import torch

from reference import build_reference_model, reference_logits
from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core

TEXT = ("The lighthouse keeper climbed the stairs each evening to light the lamp. Ships passing "
        "the rocky coast relied on its beam to find the harbour safely. One stormy night the "
        "power failed, and he lit the old oil lamp by hand, as his father had done.")
K = 3


def _run(core, request_id: str, ids: list[int], params: SamplingParams) -> list:
    core.add_request(request_id, ids, params)
    outputs = []
    while core.has_unfinished_requests():
        outputs += [o for o in core.step() if o.request_id == request_id]
    return outputs


def _engine(smollm2_path, compute: str):
    # a 16-token step budget: the prompt is prefilled in chunks
    core, _ = build_engine_core(EngineConfig(model=str(smollm2_path), compute=compute,
                                             kv_cache_bytes=32 << 20, max_num_batched_tokens=16))
    return core


def _prompt_logprobs(core, ids: list[int], request_id: str):
    outputs = _run(core, request_id, ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K))
    first = outputs[0]
    assert first.num_cached_tokens == 0          # computed, not taken from the prefix cache
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    return first.prompt_logprobs


def _check_against(entries, ids: list[int], logits: torch.Tensor, atol: float) -> None:
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert entries[0] is None and len(entries) == len(ids)
    for position in range(1, len(ids)):
        entry, row = entries[position], expected[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(row[ids[position]].item(), abs=atol)
        assert entry.rank == int((row > row[ids[position]] + atol).sum()) + 1 or \
            abs(entry.rank - (int((row > row[ids[position]]).sum()) + 1)) <= 2     # near-ties
        assert len(entry.top) == K
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        best = row.max().item()
        assert values[0] == pytest.approx(best, abs=atol)
        if entry.rank == 1:
            assert entry.logprob == pytest.approx(values[0], abs=atol)


def test_exact_mode_matches_transformers_even_after_a_prefix_cache_fill(smollm2_path, smollm2_source):
    core = _engine(smollm2_path, "exact")
    ids = core.tokenizer.encode(TEXT)
    assert len(ids) > 32                              # at least three chunks of 16
    # the same prompt without prompt_logprobs first: its blocks are now in the prefix cache
    warm = _run(core, "warm", ids, SamplingParams(max_tokens=1, temperature=0))
    assert warm[0].prompt_logprobs is None
    again = _run(core, "again", ids, SamplingParams(max_tokens=1, temperature=0))
    assert again[0].num_cached_tokens > 0
    entries = _prompt_logprobs(core, ids, "wanted")
    reference = build_reference_model(smollm2_source)
    _check_against(entries, ids, reference_logits(reference, ids), atol=2e-3)
    # afterwards the cache serves plain requests again
    assert _run(core, "after", ids, SamplingParams(max_tokens=1, temperature=0))[0].num_cached_tokens > 0


def test_fast_mode_is_chunk_invariant_and_close_to_transformers(smollm2_path, smollm2_source):
    core = _engine(smollm2_path, "fast")
    ids = core.tokenizer.encode(TEXT)
    chunked = _prompt_logprobs(core, ids, "chunked")
    whole_core, _ = build_engine_core(EngineConfig(model=str(smollm2_path), compute="fast",
                                                   kv_cache_bytes=32 << 20))
    whole = _prompt_logprobs(whole_core, ids, "whole")
    # fast mode's int8 path is row-invariant: chunking the prompt changes nothing
    for a, b in zip(chunked[1:], whole[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.rank == b.rank
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # int8 noise against float transformers (observed: mean 0.13, max 0.4 nats)
    ref = torch.log_softmax(reference_logits(build_reference_model(smollm2_source), ids).float(), -1)
    diffs = [abs(e.logprob - ref[i - 1, ids[i]].item()) for i, e in enumerate(chunked) if e is not None]
    assert sum(diffs) / len(diffs) < 0.25 and max(diffs) < 1.0
    agree = sum(e.top[0][0] == int(ref[i - 1].argmax()) for i, e in enumerate(chunked) if e is not None)
    assert agree >= 0.8 * (len(ids) - 1)


def test_one_token_prompt_and_bad_values() -> None:
    from shoal.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(prompt_logprobs=21)
    assert err.value.field == "prompt_logprobs"
    with pytest.raises(InvalidParameterError):
        SamplingParams(prompt_logprobs=-1)
