"""Logits processors applied before sampling: logit_bias, min_tokens, penalties."""
from __future__ import annotations

import torch

from shoal.engine.sampling.row import SamplingRow


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


def _flat_ids(token_lists: list[list[int]], rows: list[int], vocab: int,
              device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of every list (ids >= vocab dropped)."""
    flat = [b * vocab + t for b, tokens in zip(rows, token_lists) for t in tokens if t < vocab]
    return torch.tensor(flat, dtype=torch.long, device=device)


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow], indices: list[int]) -> None:
    """Applies repetition, presence and frequency penalties in place to rows `indices` of x.

    repetition_penalty (HF/vLLM): a logit of a token seen in prompt or output is divided
    by the penalty when positive and multiplied when negative. presence/frequency
    (OpenAI): logit -= frequency * count + presence * (count > 0), counting output
    tokens. With repetition_window N all three only look at the last N tokens of
    prompt + output.

    NOTE: only the (row, token) pairs that occur are touched (a few hundred per row)
    instead of full [rows, vocab] tensors, which cost tens of ms per step on a CPU.
    """
    if not indices:
        return
    device, vocab = x.device, x.shape[1]
    prompt_lists: list[list[int]] = []
    output_lists: list[list[int]] = []
    for b in indices:
        prompt_tail, output_tail = _window(rows[b])
        # NOTE: the prompt only matters to repetition_penalty; skip it otherwise.
        prompt_lists.append(prompt_tail if rows[b].params.repetition_penalty != 1.0 else [])
        output_lists.append(output_tail)
    flat_x = x.view(-1)
    out_ids, out_counts = torch.unique(_flat_ids(output_lists, indices, vocab, device),
                                       return_counts=True)
    seen = torch.unique(torch.cat([out_ids, _flat_ids(prompt_lists, indices, vocab, device)]))
    if seen.numel() == 0:
        return

    def per_row(values: list[float]) -> torch.Tensor:
        table = torch.ones(x.shape[0], dtype=torch.float32, device=device)
        table[torch.tensor(indices, dtype=torch.long, device=device)] = torch.tensor(
            values, dtype=torch.float32, device=device)
        return table

    params = [rows[b].params for b in indices]
    rep = per_row([p.repetition_penalty for p in params])[seen // vocab]
    logits = flat_x[seen]
    flat_x[seen] = torch.where(logits > 0, logits / rep, logits * rep)
    if out_ids.numel():
        freq = per_row([p.frequency_penalty for p in params])[out_ids // vocab]
        pres = per_row([p.presence_penalty for p in params])[out_ids // vocab]
        counts = out_counts.to(torch.float32)
        # NOTE: rows without these penalties subtract 0 * count: exact, no branch needed.
        flat_x[out_ids] = flat_x[out_ids] - (freq * counts + pres * (counts > 0).to(torch.float32))
