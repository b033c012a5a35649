"""One whole sequence through a model without the engine: calibration and reference checks.

The serving path batches many sequences over the paged KV cache (shoal.engine.model_runner);
this runs a single sequence with a throwaway flat cache, which is what fast-mode calibration
and the tests that compare every position's logits need.
"""
from __future__ import annotations

import torch

from shoal.model.layers.attention import AttentionMetadata, PrefillChunk


@torch.inference_mode()
def forward_single_sequence(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Hidden states [n, hidden] of one whole sequence, with a throwaway flat KV cache.

    Used outside serving: fast-mode calibration and tests that need every position's logits.
    """
    n = len(token_ids)
    config = model.config
    device = next(model.parameters()).device
    shape = (n, config.num_kv_heads, config.head_dim)
    caches = [(torch.empty(shape, dtype=model.dtype, device=device),
               torch.empty(shape, dtype=model.dtype, device=device)) for _ in range(config.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n, device=device), block_size=n)
    meta.prefills.append(PrefillChunk(0, n, n, None))
    return model(torch.tensor(token_ids, device=device), torch.arange(n, device=device), caches, meta)
