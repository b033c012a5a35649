"""Random sampling of rows: temperature, top_k, top_p, min_p, then inverse-CDF draw."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.engine.sampling.rng import RANDOM_BITS

# NOTE: probabilities become integers in units of 2**-PROB_BITS. Integer sums are exact
# in any order, so a row's CDF and top_p cut are bit-identical whatever the batch size
# and however the device's cumsum kernel splits the work (CUDA may pick another scan
# for a single row). Tokens below 2**-31 become unsampleable; the mass lost is < V/2**31.
PROB_BITS = 31
_PROB_ONE = 1 << PROB_BITS
# How many of the most likely tokens a CPU examines for top_p before a full sort.
NUCLEUS_PREFIX = 1024


@dataclass(slots=True)
class RandomRowParams:
    """Per-row settings of the random rows handed to `sample_random`, in row order."""

    temperatures: list[float]
    top_ks: list[int]
    top_ps: list[float]
    min_ps: list[float]
    random_bits: list[int]  # RANDOM_BITS uniform bits per row


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _apply_top_k(scaled: torch.Tensor, top_ks: list[int]) -> None:
    """Sets logits below each row's k-th largest to -inf (ties with it are kept)."""
    vocab = scaled.shape[1]
    rows = [i for i, k in enumerate(top_ks) if 0 < k < vocab]
    if not rows:
        return
    ks = [top_ks[i] for i in rows]
    idx = torch.tensor(rows, dtype=torch.long, device=scaled.device)
    sub = scaled.index_select(0, idx)
    # topk's values are copies of elements, so the k-th value is exact in any batch.
    kth = sub.topk(max(ks), dim=1).values.gather(
        1, _column([k - 1 for k in ks], torch.long, scaled.device))
    scaled.index_copy_(0, idx, sub.masked_fill(sub < kth, float("-inf")))


def _nucleus_cut(q: torch.Tensor, tp: torch.Tensor, total: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest kept probability, whether the nucleus fits in the top k) per row."""
    top = q.topk(k, dim=1, sorted=True).values  # exact values: no tie-order question
    cdf = top.cumsum(dim=1)
    # Position j stays while the mass before it is below top_p of the total; compared in
    # exact integers (both sides stay below 2**63).
    kept = ((cdf - top) * _PROB_ONE < tp * total).sum(dim=1, keepdim=True)
    fits = cdf[:, -1:] * _PROB_ONE >= tp * total
    return top.gather(1, (kept - 1).clamp_(min=0)), fits


def _apply_top_p(q: torch.Tensor, top_ps: list[float]) -> None:
    """Zeroes tokens outside each row's nucleus: those whose more likely tokens already
    hold top_p of the mass. The most likely token always stays, and so do tokens tied
    with the last one kept (as with top_k), which makes the cut independent of how a
    sort orders ties."""
    rows = [i for i, p in enumerate(top_ps) if p < 1.0]
    if not rows:
        return
    device, vocab = q.device, q.shape[1]
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    sub = q.index_select(0, idx)
    total = sub.sum(dim=1, keepdim=True)
    # top_p in the same fixed point; at least 1 so the first token is always kept.
    tp = _column([max(1, int(top_ps[i] * _PROB_ONE)) for i in rows], torch.long, device)
    if device.type == "cpu" and vocab > NUCLEUS_PREFIX:
        # NOTE: on a CPU a full sort of the vocabulary dominates the step; the nucleus
        # nearly always lies in the top few hundred tokens, so try that prefix first.
        # The host check is free on a CPU; a GPU sorts everything without syncing.
        cut, fits = _nucleus_cut(sub, tp, total, NUCLEUS_PREFIX)
        if not bool(fits.all()):
            cut, _ = _nucleus_cut(sub, tp, total, vocab)
    else:
        cut, _ = _nucleus_cut(sub, tp, total, vocab)
    q.index_copy_(0, idx, sub.masked_fill(sub < cut, 0))


def sample_random(logits: torch.Tensor, params: RandomRowParams) -> torch.Tensor:
    """Samples one token id per row of logits [R, V] (already biased and penalised).

    Order: logits / temperature -> top_k -> top_p -> min_p -> draw by inverse CDF in
    vocabulary order with the row's own random bits. Returns an int64 tensor [R].
    """
    device, vocab = logits.device, logits.shape[1]
    scaled = logits / _column(params.temperatures, torch.float32, device)
    _apply_top_k(scaled, params.top_ks)
    probs = torch.softmax(scaled, dim=1)
    # NOTE: a row with every logit at -inf gives NaN; it draws nothing and ends at V - 1.
    probs.nan_to_num_(nan=0.0)
    q = (probs * _PROB_ONE).to(torch.int64)
    _apply_top_p(q, params.top_ps)
    if any(m > 0.0 for m in params.min_ps):
        # NOTE: min_p compares against the largest probability; renormalising after
        # top_p does not change that ratio and top_p never drops the top token, so the
        # unnormalised probabilities give the same cut. min_p = 0 rows keep everything.
        min_p = _column(params.min_ps, torch.float32, device)
        q.masked_fill_(probs < min_p * probs.amax(dim=1, keepdim=True), 0)
    cdf = q.cumsum(dim=1)
    total = cdf[:, -1:]
    bits = _column(params.random_bits, torch.long, device)
    # target = floor(u * total) with u = bits / 2**RANDOM_BITS < 1, so target < total and
    # the first CDF entry above it belongs to a token with non-zero probability.
    target = (bits * total) >> RANDOM_BITS
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)
