"""Sampler: turns one row of logits per request into that request's next token."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.core.errors import InvalidParameterError
from shoal.engine.sampling.filters import RandomRowParams, sample_random
from shoal.engine.sampling.processors import (
    apply_logit_bias, apply_min_tokens, apply_penalties, min_tokens_masked_ids, needs_penalties)
from shoal.engine.sampling.rng import random_bits
from shoal.engine.sampling.row import SamplingRow
from shoal.model.kernels.cpu import load_cpu_kernels

# NOTE: below this temperature logits / T overflows float32 for ordinary logits; vLLM
# uses the same cut-off and samples greedily.
GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class RowLogprobs:
    """One row's logprobs as the sampler computed them: the chosen token's and the row's k
    most likely tokens' (descending). EngineCore reports them as outputs.TokenLogprob."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per row, with logprobs for the rows that asked for them."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[RowLogprobs | None] = field(default_factory=list)


def _is_greedy(row: SamplingRow) -> bool:
    return row.params.temperature < GREEDY_TEMPERATURE


def _needs_processing(row: SamplingRow) -> bool:
    """True when the row needs anything beyond argmax of its raw logits."""
    return (not _is_greedy(row) or bool(row.params.logit_bias) or needs_penalties(row)
            or bool(min_tokens_masked_ids(row)) or row.params.logprobs is not None)


class Sampler:
    """Samples one token per row; each row's result depends only on its own logits and
    SamplingRow (never on the rest of the batch), and on (seed, step) for randomness."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise InvalidParameterError(
                "logits", f"expected [{len(rows)}, vocab] logits, got {list(logits.shape)}")
        if not rows:
            return SamplerOutput()
        if not any(_needs_processing(row) for row in rows):
            return SamplerOutput(_argmax(logits).tolist(), [None] * len(rows))

        penalised = [b for b, row in enumerate(rows) if needs_penalties(row)]
        edits = penalised or any(row.params.logit_bias or min_tokens_masked_ids(row)
                                 for row in rows)
        # NOTE: copy only when editing in place; the caller's logits stay raw (logprobs).
        x = logits.to(torch.float32, copy=bool(edits)).contiguous()
        if edits:
            apply_logit_bias(x, rows)
            apply_min_tokens(x, rows)
            apply_penalties(x, rows, penalised)
        random_rows = [b for b, row in enumerate(rows) if not _is_greedy(row)]
        # the random rows' argmax would be overwritten: only greedy rows need one
        tokens = (_argmax(x) if len(random_rows) < len(rows)
                  else torch.empty(len(rows), dtype=torch.long, device=x.device))
        if random_rows:
            idx = torch.tensor(random_rows, dtype=torch.long, device=x.device)
            picked = [rows[b] for b in random_rows]
            subset = x if len(random_rows) == len(rows) else x.index_select(0, idx)
            params = RandomRowParams(
                temperatures=[r.params.temperature for r in picked],
                top_ks=[r.params.top_k for r in picked],
                top_ps=[r.params.top_p for r in picked],
                min_ps=[r.params.min_p for r in picked],
                random_bits=[random_bits(r.seed, len(r.output_token_ids)) for r in picked])
            tokens.index_copy_(0, idx, _draw(subset, params))
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _gather_logprobs(logits, tokens, token_ids, rows))


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the C++ kernel for float32 CPU rows (the same answers as torch's,
    several times faster: sampling.cpp says why), torch elsewhere."""
    kernels = load_cpu_kernels() if logits.device.type == "cpu" else None
    if kernels is None or logits.dtype != torch.float32:
        return logits.argmax(dim=1)
    return kernels.argmax_rows(logits)


def _draw(logits: torch.Tensor, params: RandomRowParams) -> torch.Tensor:
    """The C++ row sampler on CPUs (one pass per row), the PyTorch one elsewhere."""
    kernels = load_cpu_kernels() if logits.device.type == "cpu" else None
    if kernels is None:
        return sample_random(logits, params)
    return kernels.sample_rows(
        logits.to(torch.float32),
        torch.tensor(params.temperatures, dtype=torch.float32),
        torch.tensor(params.top_ks, dtype=torch.int64),
        torch.tensor(params.top_ps, dtype=torch.float64),
        torch.tensor(params.min_ps, dtype=torch.float32),
        torch.tensor(params.random_bits, dtype=torch.int64))


def _gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, token_ids: list[int],
                     rows: list[SamplingRow]) -> list[RowLogprobs | None]:
    """Logprobs of the raw model logits (before bias, penalties and temperature; vLLM's
    default) for the chosen token and the top-k alternatives of each asking row."""
    out: list[RowLogprobs | None] = [None] * len(rows)
    asking = [b for b, row in enumerate(rows) if row.params.logprobs is not None]
    if not asking:
        return out
    idx = torch.tensor(asking, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, idx).to(torch.float32), dim=1)
    chosen = logprobs.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1).tolist()
    k_max = min(max(rows[b].params.logprobs or 0 for b in asking), logprobs.shape[1])
    top_ids: list[list[int]] = [[] for _ in asking]
    top_values: list[list[float]] = [[] for _ in asking]
    if k_max > 0:
        top = logprobs.topk(k_max, dim=1)  # sorted descending
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for i, b in enumerate(asking):
        k = rows[b].params.logprobs or 0
        out[b] = RowLogprobs(token_ids[b], chosen[i], list(zip(top_ids[i][:k], top_values[i][:k])))
    return out
