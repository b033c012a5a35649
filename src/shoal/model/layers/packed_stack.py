"""Fast mode's decoder layers on packed GGUF blocks, run by one C++ call per forward pass.

The fused path in model/decoder.py drives ~11 kernel calls per layer from Python; decoding one
sequence, that Python (argument checks, output tensors, the calls themselves) took about as
long as streaming the weights. kernels/csrc/decoder_stack.cpp runs the same calls in the same
order from C++, so the results are the same bits, and this module describes the layers to it
once: a table of int64 fields per layer (pointers to the packed tiles, the norm weights, the
layer's KV cache and RoPE tables, GGML types, the sliding window).

The table holds raw pointers, so this object keeps every tensor it points to alive, and is
rebuilt when the model is given other KV cache tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.model.layers.packed import PackedLinear

_FIELDS = 16   # decoder_stack.cpp's Field enum


def stack_supported(layers: Sequence, config) -> bool:
    """Whether decoder_stack.cpp computes these layers: the plain pre-norm block (no q/k or
    sandwich norms: Gemma keeps the per-op path), every linear packed (the int8 recipe too)."""
    spec = config.spec
    if spec.qk_norm or spec.sandwich_norms or config.head_dim % 16:
        return False
    return all(
        isinstance(linear, PackedLinear)
        for layer in layers
        for linear in (layer.attention.qkv_proj, layer.attention.o_proj, layer.mlp.gate_up_proj,
                       layer.mlp.down_proj))


class PackedDecoderStack:
    """The layers' table for decoder_stack.cpp, built per set of KV cache tensors."""

    def __init__(self, layers: Sequence, rope_for, config) -> None:
        self.layers = list(layers)
        self.rope_for = rope_for          # layer -> its RotaryEmbedding
        self.config = config
        self.gelu = config.spec.mlp_activation == "gelu_tanh"
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None
        self._dims: torch.Tensor | None = None
        self._held: list = []

    def tables(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(kv_caches), kv_caches[0][0].data_ptr(), kv_caches[-1][1].data_ptr())
        if key != self._key:
            self._build(kv_caches)
            self._key = key
        return self._table, self._dims   # type: ignore[return-value]

    def _build(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        held: list = [kv_caches]
        rows = []

        def p(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            t = t.contiguous()
            held.append(t)
            return t.data_ptr()

        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            # NOTE: what kernels/cpu.py checks per call on the Python path, checked once here.
            if not (k_cache.dim() == 4 and k_cache.shape[3] == 16 and k_cache.is_contiguous()
                    and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
                    and k_cache.dtype in (torch.float32, torch.bfloat16)):
                raise ValueError("packed decoder stack: a blocked float32/bfloat16 KV cache "
                                 "with 16-token blocks expected")
            att, mlp = layer.attention, layer.mlp
            rope = self.rope_for(layer)
            rows.append([
                p(layer.attn_weight), p(layer.mlp_weight),
                att.qkv_proj.ggml_type, p(att.qkv_proj.tiles), p(att.qkv_proj.bias),
                att.o_proj.ggml_type, p(att.o_proj.tiles),
                mlp.gate_up_proj.ggml_type, p(mlp.gate_up_proj.tiles),
                mlp.down_proj.ggml_type, p(mlp.down_proj.tiles),
                p(k_cache), p(v_cache), p(rope.cos), p(rope.sin), layer.window])
        table = torch.tensor(rows, dtype=torch.int64)
        assert table.shape[1] == _FIELDS
        k0 = kv_caches[0][0]
        c = self.config
        self._dims = torch.tensor([c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                                   c.head_dim, int(self.gelu), int(k0.dtype == torch.bfloat16),
                                   k0.shape[3]], dtype=torch.int64)
        self._table, self._held = table, held
