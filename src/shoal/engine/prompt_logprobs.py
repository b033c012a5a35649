"""vLLM's prompt_logprobs: each prompt token's log-probability under the model given the
tokens before it, its rank, and the k most likely alternatives at that position.

Computed from the raw logits (no temperature, penalties or bias), as vLLM reports them.
"""
from __future__ import annotations

import torch

from shoal.engine.outputs import PromptLogprob


class PromptLogprobs:
    """One request's prompt log-probs, filled position by position as prefill chunks run
    (a recompute after preemption overwrites the same positions)."""

    __slots__ = ("_k", "_entries", "_missing")

    def __init__(self, num_prompt_tokens: int, k: int) -> None:
        self._k = k
        # position 0 has no context: None, as vLLM reports it
        self._entries: list[PromptLogprob | None] = [None] * num_prompt_tokens
        self._missing = set(range(1, num_prompt_tokens))

    @property
    def complete(self) -> bool:
        return not self._missing

    @property
    def entries(self) -> list[PromptLogprob | None]:
        return list(self._entries)

    def add(self, first: int, logits: torch.Tensor, prompt_token_ids: list[int]) -> None:
        """Rows of `logits` are positions first, first + 1, ...; each predicts the next token."""
        count = logits.shape[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(prompt_token_ids[first + 1:first + 1 + count], dtype=torch.long,
                               device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
        top_values = top_ids = None
        if self._k > 0:
            top_values, top_ids = logprobs.topk(self._k, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for i, (token, value, rank) in enumerate(zip(targets.tolist(), chosen.tolist(), ranks.tolist())):
            top = list(zip(top_ids[i], top_values[i])) if top_ids is not None else []
            position = first + 1 + i
            self._entries[position] = PromptLogprob(token, value, int(rank), top)
            self._missing.discard(position)
