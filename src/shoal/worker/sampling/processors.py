"""Logits processors applied before sampling: logit_bias, min_tokens, penalties."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shoal.worker.sampler import SamplingRow


def needs_penalties(row: SamplingRow) -> bool:
    """True when any repetition/presence/frequency penalty would change the row."""
    p = row.params
    if p.repetition_window == 0:
        return False
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def min_tokens_masked_ids(row: SamplingRow) -> set[int]:
    """Token ids banned this step because the row has not reached min_tokens yet."""
    p = row.params
    if len(row.output_token_ids) >= p.min_tokens:
        return set()
    # NOTE: EOS is masked even with ignore_eos: min_tokens promises at least that many
    # tokens, and EOS would otherwise be sampled (and shown) before it.
    return set(row.eos_token_ids) | set(p.stop_token_ids)


def apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Adds each row's logit_bias to x [B, V] in place."""
    vocab = x.shape[1]
    flat: list[int] = []
    values: list[float] = []
    for b, row in enumerate(rows):
        for token, bias in (row.params.logit_bias or {}).items():
            if token < vocab:  # NOTE: ids were validated against the tokenizer's vocab
                flat.append(b * vocab + token)
                values.append(bias)
    if flat:
        # Each (row, token) appears once (dict keys), so index_add_ is exact.
        x.view(-1).index_add_(0, torch.tensor(flat, device=x.device),
                              torch.tensor(values, dtype=x.dtype, device=x.device))


def apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Sets EOS and stop-token logits to -inf for rows still short of min_tokens."""
    vocab = x.shape[1]
    flat = [b * vocab + t for b, row in enumerate(rows)
            for t in sorted(min_tokens_masked_ids(row)) if t < vocab]
    if flat:
        x.view(-1).index_fill_(0, torch.tensor(flat, device=x.device), float("-inf"))


def _window(row: SamplingRow) -> tuple[list[int], list[int]]:
    """The (prompt, output) tokens inside the row's repetition window."""
    prompt, output = row.prompt_token_ids, row.output_token_ids
    window = row.params.repetition_window
    if window is None:
        return prompt, output
    out_tail = output[-window:] if window > 0 else []
    room = window - len(out_tail)
    return (prompt[-room:] if room > 0 else []), out_tail


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token per list."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_lists]
    if sum(lengths) == 0:
        return counts
    tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.long, device=device)
    row_ids = torch.repeat_interleave(
        torch.arange(len(token_lists), device=device),
        torch.tensor(lengths, dtype=torch.long, device=device))
    # NOTE: ids outside the logits' width (never produced by the tokenizer) add weight 0
    # instead of being filtered out, which would need a host sync on a GPU.
    weights = (tokens < vocab).to(torch.float32)
    flat = row_ids * vocab + tokens.clamp(max=vocab - 1)
    # Adding 1.0s is exact in any order, so atomics on a GPU stay deterministic.
    counts.view(-1).index_add_(0, flat, weights)
    return counts


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow], indices: list[int]) -> None:
    """Applies repetition, presence and frequency penalties in place to rows `indices` of x.

    repetition_penalty (HF/vLLM): a logit of a token seen in prompt or output is divided
    by the penalty when positive and multiplied when negative. presence/frequency
    (OpenAI): logit -= frequency * count + presence * (count > 0), counting output
    tokens. With repetition_window N all three only look at the last N tokens of
    prompt + output.
    """
    if not indices:
        return
    device, vocab = x.device, x.shape[1]
    prompt_lists: list[list[int]] = []
    output_lists: list[list[int]] = []
    for b in indices:
        prompt_tail, output_tail = _window(rows[b])
        # NOTE: the prompt only matters to repetition_penalty; skip the copy otherwise.
        prompt_lists.append(prompt_tail if rows[b].params.repetition_penalty != 1.0 else [])
        output_lists.append(output_tail)
    out_counts = _token_counts(output_lists, vocab, device)
    seen = (_token_counts(prompt_lists, vocab, device) > 0) | (out_counts > 0)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    params = [rows[b].params for b in indices]
    rep = column([p.repetition_penalty for p in params])
    freq = column([p.frequency_penalty for p in params])
    pres = column([p.presence_penalty for p in params])
    idx = torch.tensor(indices, dtype=torch.long, device=device)
    sub = x.index_select(0, idx)
    # NOTE: rows with a penalty of 1 (or 0) go through the same ops unchanged (x / 1,
    # x * 1 and x - 0 are exact), so one batched pass serves every row in the group.
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    sub = sub - (freq * out_counts + pres * (out_counts > 0).to(torch.float32))
    x.index_copy_(0, idx, sub)
