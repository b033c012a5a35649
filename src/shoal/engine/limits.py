"""EngineLimits: what one built engine can take, and the one check of a request against it.

The limits are fixed once the engine is built, so any thread may read them and validate
against them: the serving layer does so to refuse a request before admitting it, and the
engine core again where the request enters the engine thread (offline callers included).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal.core.errors import ContextLengthExceededError, InvalidParameterError
from shoal.core.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The bounds a request must fit in one engine."""

    max_model_len: int      # prompt plus output tokens of one sequence
    max_num_seqs: int       # sequences in the running batch
    vocab_size: int
    kv_cache_tokens: int    # tokens the whole KV cache holds

    def check_token_ids(self, token_ids: Sequence[int], field: str = "prompt") -> None:
        """InvalidParameterError naming `field` for an id outside the vocabulary."""
        bad = next((t for t in token_ids
                    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size),
                   None)
        if bad is not None:
            raise InvalidParameterError(field, f"token id {bad!r} is outside the vocabulary "
                                        f"(0..{self.vocab_size - 1})")

    def validate_embedding(self, token_ids: Sequence[int]) -> None:
        """Checks one input of an embedding request (nothing is generated after it)."""
        if not token_ids:
            raise InvalidParameterError("input", "an input is empty")
        self.check_token_ids(token_ids, "input")
        if len(token_ids) > self.max_model_len:
            raise InvalidParameterError("input", f"an input of {len(token_ids)} tokens is longer "
                                                 f"than this model's context of {self.max_model_len}")
        if len(token_ids) > self.kv_cache_tokens:
            raise InvalidParameterError("input", f"an input of {len(token_ids)} tokens needs more "
                                                 f"KV cache than the {self.kv_cache_tokens} it holds")

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Checks a request against the engine; returns its max_tokens resolved (unset: the
        room the context has left). Raises InvalidParameterError or ContextLengthExceededError
        naming the field at fault. A top_k at or above the vocabulary becomes 0 (no filter)."""
        if not prompt_token_ids:
            raise InvalidParameterError("prompt", "the prompt is empty")
        self.check_token_ids(prompt_token_ids)
        params.validate_for_vocab(self.vocab_size)
        num_prompt = len(prompt_token_ids)
        if params.max_tokens is None:
            if num_prompt >= self.max_model_len:
                raise ContextLengthExceededError(num_prompt, 1, self.max_model_len)
            max_tokens = self.max_model_len - num_prompt
        else:
            if num_prompt + params.max_tokens > self.max_model_len:
                raise ContextLengthExceededError(num_prompt, params.max_tokens, self.max_model_len)
            max_tokens = params.max_tokens
        kv_tokens = kv_tokens_needed(num_prompt, max_tokens)
        if kv_tokens > self.kv_cache_tokens:
            raise InvalidParameterError(
                "max_tokens", f"the request may need {kv_tokens} tokens of KV cache but it "
                f"holds only {self.kv_cache_tokens}")
        return max_tokens


def kv_tokens_needed(num_prompt: int, max_tokens: int) -> int:
    """The most KV cache one sequence may fill: its prompt and its output but the last token,
    whose KV is never computed."""
    return max(num_prompt, num_prompt + max_tokens - 1)
