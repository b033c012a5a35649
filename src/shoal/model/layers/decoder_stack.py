"""A decoder's layers run by one C++ call per forward pass (kernels/csrc/decoder_stack.cpp).

Two variants over the same table: fast mode's packed GGUF blocks, and exact mode's float32
weights. The Python-driven paths in model/decoder.py make ~11 kernel calls per layer; decoding
one sequence, that Python (argument checks, output tensors, the calls themselves) took about
as long as streaming the weights (fast mode), or a fifth of the step (exact mode). This module
describes the layers to the C++ side once: a table of int64 fields per layer (pointers to the
weights, the norm weights, the layer's KV cache and RoPE tables, GGML types, the window).

The table holds raw pointers, so this object keeps every tensor it points to alive, and is
rebuilt when the model is given other KV cache tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.model.layers.linear import ExactLinear
from shoal.model.layers.packed import PackedLinear

_FIELDS = 16   # decoder_stack.cpp's Field enum
_F32 = 0       # GGML's type code for float32: an exact-mode weight in the table
# paged_attention.cpp's kv_type codes (the KV cache element types the stack reads)
_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _linears(layer) -> tuple:
    att, mlp = layer.attention, layer.mlp
    return att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj


def stack_kind(layers: Sequence, config) -> str | None:
    """Which variant of decoder_stack.cpp computes these layers: 'packed' (every linear on
    GGUF blocks), 'f32' (every linear float32 through the C++ kernel), or None: the per-op
    path, for blocks beyond the plain pre-norm one (q/k or sandwich norms: Gemma) and mixes."""
    spec = config.spec
    if spec.qk_norm or spec.sandwich_norms or config.head_dim % 16:
        return None
    linears = [linear for layer in layers for linear in _linears(layer)]
    if all(isinstance(linear, PackedLinear) for linear in linears):
        return "packed"
    if all(isinstance(linear, ExactLinear) and linear.kernels is not None for linear in linears):
        return "f32"
    return None


class DecoderStack:
    """The layers' table for decoder_stack.cpp, built per set of KV cache tensors."""

    def __init__(self, kind: str, layers: Sequence, rope_for, config) -> None:
        self.kind = kind                  # 'packed' or 'f32' (stack_kind)
        self.layers = list(layers)
        self.rope_for = rope_for          # layer -> its RotaryEmbedding
        self.config = config
        self.gelu = config.spec.mlp_activation == "gelu_tanh"
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None
        self._dims: torch.Tensor | None = None
        self._held: list = []

    def run(self, kernels, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
            residual: torch.Tensor, positions, meta) -> torch.Tensor:
        """Every layer on `residual` (the embeddings, updated in place into the stream);
        returns the last layer's MLP output."""
        table, dims = self.tables(kv_caches)
        first = self.layers[0]
        return kernels.decoder_stack(self.kind, table, dims, first.attn_norm.eps,
                                     first.attention.scale, residual, positions, meta.slot_mapping,
                                     meta.block_tables, meta.query_start, meta.first_pos)

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

        def weight(linear) -> tuple[int, int]:
            if self.kind == "packed":
                return linear.ggml_type, p(linear.tiles)
            return _F32, p(linear.weight)

        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            # NOTE: what kernels/cpu.py checks per call on the Python path, checked once here.
            if not (k_cache.dim() == 4 and k_cache.shape[3] == 16 and k_cache.is_contiguous()
                    and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
                    and k_cache.dtype in _KV_TYPES):
                raise ValueError("decoder stack: a blocked float32/bfloat16/float16 KV cache "
                                 "with 16-token blocks expected")
            att, mlp = layer.attention, layer.mlp
            rope = self.rope_for(layer)
            qkv, o, gate_up, down = _linears(layer)
            # NOTE: fast mode's norm weights are folded ones (DecoderLayer.enable_fused_int8).
            attn_norm = layer.attn_weight if self.kind == "packed" else layer.attn_norm.weight
            mlp_norm = layer.mlp_weight if self.kind == "packed" else layer.mlp_norm.weight
            rows.append([p(attn_norm), p(mlp_norm), *weight(qkv), p(qkv.bias), *weight(o),
                         *weight(gate_up), *weight(down), p(k_cache), p(v_cache), p(rope.cos),
                         p(rope.sin), layer.window])
        table = torch.tensor(rows, dtype=torch.int64)
        assert table.shape[1] == _FIELDS
        k0 = kv_caches[0][0]
        c = self.config
        self._dims = torch.tensor([c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                                   c.head_dim, int(self.gelu), _KV_TYPES[k0.dtype],
                                   k0.shape[3]], dtype=torch.int64)
        self._table, self._held = table, held
