"""SamplingRow: what the sampler and the logits processors know about one request."""
from __future__ import annotations

from dataclasses import dataclass

from shoal.core.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """One request's row of a sampling batch: its parameters and its tokens so far."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int  # params.seed, or a seed the engine drew once when the request arrived
    eos_token_ids: frozenset[int] = frozenset()
