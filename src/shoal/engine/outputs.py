"""What the engine reports to its callers after each step."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shoal.engine.request import FinishReason, RequestTimings


@dataclass(slots=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogprob:
    """One prompt token's log-probability, its rank among all tokens (1 = most likely), and
    the most likely alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """An incremental update for one sample (`index`) of one request.

    `text` and `token_ids` hold only what is new since the previous update; the
    last update of a sample has `finished` set and a `finish_reason`.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    timings: RequestTimings | None = None
    produced_at: float = 0.0            # time.monotonic() when the engine made this update
    # prompt_logprobs: on sample 0's first update only; None for the first prompt token
    prompt_logprobs: list[PromptLogprob | None] | None = None
    # an embedding request's pooled vector, float32: kept as an array to the HTTP layer, which
    # writes it straight to JSON or base64 (a list of Python floats cost more than the pass)
    embedding: np.ndarray | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of the n samples of an offline generation: its whole text and tokens."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class GenerationResult:
    """The offline result for one prompt: its tokens and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text
