"""EngineLimits.validate: the one check of a request against an engine (no model needed)."""
from __future__ import annotations

import pytest

from shoal.core.errors import ContextLengthExceededError, InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.limits import EngineLimits

LIMITS = EngineLimits(max_model_len=64, max_num_seqs=4, vocab_size=50, kv_cache_tokens=40)


def test_max_tokens_resolves_to_what_is_asked_or_the_room_left() -> None:
    assert LIMITS.validate([1] * 10, SamplingParams(max_tokens=5)) == 5
    roomy = EngineLimits(max_model_len=64, max_num_seqs=4, vocab_size=50, kv_cache_tokens=64)
    assert roomy.validate([1] * 10, SamplingParams(max_tokens=None)) == 54


def test_the_prompt_must_hold_known_token_ids() -> None:
    with pytest.raises(InvalidParameterError) as empty:
        LIMITS.validate([], SamplingParams())
    assert (empty.value.field, empty.value.message) == ("prompt", "the prompt is empty")
    for bad in (50, -1, True, "3"):
        with pytest.raises(InvalidParameterError) as outside:
            LIMITS.validate([1, bad, 2], SamplingParams())          # type: ignore[list-item]
        assert outside.value.field == "prompt"
        assert outside.value.message == f"token id {bad!r} is outside the vocabulary (0..49)"


def test_a_dialect_names_its_own_field() -> None:
    LIMITS.check_token_ids([0, 49], "context")
    with pytest.raises(InvalidParameterError) as outside:
        LIMITS.check_token_ids([7, 10**9], "context")
    assert outside.value.field == "context"


def test_params_are_checked_against_the_vocabulary() -> None:
    params = SamplingParams(top_k=10**30)
    LIMITS.validate([1, 2], params)
    assert params.top_k == 0                                # at or above the vocabulary: no filter
    with pytest.raises(InvalidParameterError) as stop:
        LIMITS.validate([1, 2], SamplingParams(stop_token_ids=[50]))
    assert stop.value.field == "stop_token_ids"


def test_the_context_window_bounds_prompt_and_output() -> None:
    with pytest.raises(ContextLengthExceededError) as asked:
        LIMITS.validate([1] * 10, SamplingParams(max_tokens=55))
    assert asked.value.field == "max_tokens" and "maximum context length is 64" in asked.value.message
    with pytest.raises(ContextLengthExceededError) as full:
        LIMITS.validate([1] * 64, SamplingParams(max_tokens=None))
    assert full.value.field == "prompt"


def test_a_sequence_must_fit_the_whole_kv_cache() -> None:
    # the last sampled token's KV is never computed: 10 + 31 tokens need 40 slots
    assert LIMITS.validate([1] * 10, SamplingParams(max_tokens=31)) == 31
    with pytest.raises(InvalidParameterError) as kv:
        LIMITS.validate([1] * 10, SamplingParams(max_tokens=32))
    assert kv.value.field == "max_tokens"
    assert kv.value.message == "the request may need 41 tokens of KV cache but it holds only 40"
