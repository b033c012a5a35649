"""The one decoder of every supported family (Llama 2/3, SmolLM, Mistral, Qwen2, Gemma 3).

A pre-norm transformer over the paged KV cache: RMSNorm, grouped-query attention with rotary
positions, a gated MLP, embeddings and an LM head (tied or not). Q/K/V and gate/up are fused
into one matmul each, so one activation pass feeds three (or two) projections.

What differs between families is data, not code: the ArchitectureSpec switches (config.py:
MLP activation, RMSNorm's (1 + w) weight, sandwich norms, q/k norms, scaled embeddings) and
the ModelConfig fields (q/k/v bias, sliding-window layers and their RoPE base, the attention
scalar, final logit soft-capping, tied embeddings). Gemma 3's facts were checked against
transformers' Gemma3ForCausalLM and llama.cpp's gemma3 graph.

Each layer returns its MLP output before it joins the residual stream; the next layer (or
the final norm) adds it, through the layer's output norm where the family has one. That is
the order the fused kernels of fast mode compute in: one kernel adds a sublayer's output,
normalises the stream and quantizes it for the next matmul.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from shoal.core.errors import CorruptModelError
from shoal.model.config import ModelConfig
from shoal.model.layers.attention import AttentionMetadata, paged_attention
from shoal.model.layers.linear import (
    ExactLinear,
    Int8Linear,
    int8_linear_fused,
    make_linear,
)
from shoal.model.layers.norm import RMSNorm
from shoal.model.layers.packed import PackedLinear, PackedWeight
from shoal.model.layers.decoder_stack import DecoderStack, stack_kind
from shoal.model.layers.rotary import RotaryEmbedding

# ArchitectureSpec.mlp_activation -> (the PyTorch function, the fused act * up -> int8 kernel)
_ACTIVATIONS = {
    "silu": (F.silu, "silu_mul_quant"),
    "gelu_tanh": (partial(F.gelu, approximate="tanh"), "gelu_tanh_mul_quant"),
}

# HF names of a layer's norm weights, by their place in the block. NOTE: the one mapping
# between the two: Llama's "post_attention_layernorm" is the MLP's input norm, while with
# sandwich norms (Gemma) it normalises the attention output and "pre_feedforward_layernorm"
# is the MLP's input norm.
_NORMS = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
_SANDWICH_NORMS = {"attn_norm": "input_layernorm.weight",
                   "attn_out_norm": "post_attention_layernorm.weight",
                   "mlp_norm": "pre_feedforward_layernorm.weight",
                   "mlp_out_norm": "post_feedforward_layernorm.weight"}


class Attention(nn.Module):
    """Grouped-query attention: fused QKV (optional bias), optional q/k RMSNorm, RoPE, O."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.attention_scale
        qkv = _cat([weights.pop("self_attn.q_proj.weight"), weights.pop("self_attn.k_proj.weight"),
                    weights.pop("self_attn.v_proj.weight")])
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = torch.cat([weights.pop("self_attn.q_proj.bias"),
                                  weights.pop("self_attn.k_proj.bias"),
                                  weights.pop("self_attn.v_proj.bias")])
        self.qkv_proj = _linear(qkv, qkv_bias, dtype)
        self.o_proj = _linear(weights.pop("self_attn.o_proj.weight"), None, dtype)
        qk_norm = config.spec.qk_norm
        self.q_norm = _norm(weights.pop("self_attn.q_norm.weight"), config) if qk_norm else None
        self.k_norm = _norm(weights.pop("self_attn.k_norm.weight"), config) if qk_norm else None

    def enable_fused_int8(self) -> None:
        qkv = self.qkv_proj
        self.qkv_bias = qkv.bias if qkv.bias is not None else torch.empty(0)
        self.packed = isinstance(qkv, PackedLinear)
        self.o_inv_smooth = None if self.packed else _inv_smooth(self.o_proj)
        self.empty = torch.empty(0)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor,
                sin: torch.Tensor, window: int, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """x: the normed stream [T, hidden] -> the attention output after o_proj."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        attn = paged_attention(q, k, v.contiguous(), kv_cache[0], kv_cache[1], meta, self.scale,
                               window)
        return self.o_proj(attn)

    def forward_fused(self, xq: torch.Tensor, xs: torch.Tensor, positions: torch.Tensor,
                      rope: RotaryEmbedding, window: int,
                      kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                      ops) -> torch.Tensor:
        """The same from the int8 stream (xq, row scales xs; or per-block q, d, s for packed
        weights), with the fused C++ ops."""
        if self.packed:
            qkv = self.qkv_proj.forward_quantized(*xq)
        else:
            qkv = int8_linear_fused(xq, xs, self.qkv_proj.qweight, self.qkv_proj.scale,
                                    self.qkv_bias, ops)
        if self.q_norm is None:
            q, k, v = ops.rope_split(qkv, positions, rope.cos, rope.sin, self.num_heads,
                                     self.num_kv_heads, self.head_dim)
        else:
            q, k, v = ops.qk_norm_rope_split(qkv, positions, rope.cos, rope.sin,
                                             self.q_norm.weight, self.k_norm.weight,
                                             self.q_norm.eps, self.num_heads, self.num_kv_heads,
                                             self.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, window)
        if self.packed:
            return self.o_proj.forward_quantized(*ops.quant_blocks(attn.reshape(attn.shape[0], -1)))
        xq, xs = ops.quant_rows(attn, self.o_inv_smooth)
        return int8_linear_fused(xq, xs, self.o_proj.qweight, self.o_proj.scale, self.empty, ops)


class MLP(nn.Module):
    """The gated feed-forward block: down(act(gate) * up), gate and up in one matmul."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        gate_up = _cat([weights.pop("mlp.gate_proj.weight"), weights.pop("mlp.up_proj.weight")])
        self.gate_up_proj = _linear(gate_up, None, dtype)
        self.down_proj = _linear(weights.pop("mlp.down_proj.weight"), None, dtype)
        self.activation, self.fused_activation = _ACTIVATIONS[config.spec.mlp_activation]

    def enable_fused_int8(self, kernels) -> None:
        self.packed = isinstance(self.down_proj, PackedLinear)
        if self.packed:
            self.activation_mul_quant = partial(kernels.act_mul_quant_blocks,
                                                gelu=self.fused_activation != "silu_mul_quant")
            return
        self.activation_mul_quant = getattr(kernels, self.fused_activation)
        self.down_inv_smooth = _inv_smooth(self.down_proj)
        self.empty = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.activation(gate_up[:, : self.intermediate])
                              * gate_up[:, self.intermediate:])

    def forward_fused(self, xq: torch.Tensor, xs: torch.Tensor, ops) -> torch.Tensor:
        if self.packed:
            gate_up = self.gate_up_proj.forward_quantized(*xq)
            return self.down_proj.forward_quantized(*self.activation_mul_quant(gate_up))
        gate_up = int8_linear_fused(xq, xs, self.gate_up_proj.qweight, self.gate_up_proj.scale,
                                    self.empty, ops)
        xq, xs = self.activation_mul_quant(gate_up, self.down_inv_smooth)
        return int8_linear_fused(xq, xs, self.down_proj.qweight, self.down_proj.scale,
                                 self.empty, ops)


class DecoderLayer(nn.Module):
    """Attention then the MLP, each behind an input RMSNorm; with sandwich norms each
    sublayer's output is normalised too before it joins the residual stream."""

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        names = _SANDWICH_NORMS if config.spec.sandwich_norms else _NORMS
        self.window = config.layer_window(index)   # 0: the layer sees the whole context
        self.attn_norm = _norm(weights.pop(names["attn_norm"]), config)
        self.attention = Attention(config, weights, dtype)
        self.attn_out_norm = (_norm(weights.pop(names["attn_out_norm"]), config)
                              if "attn_out_norm" in names else None)
        self.mlp_norm = _norm(weights.pop(names["mlp_norm"]), config)
        self.mlp = MLP(config, weights, dtype)
        self.mlp_out_norm = (_norm(weights.pop(names["mlp_out_norm"]), config)
                             if "mlp_out_norm" in names else None)

    def enable_fused_int8(self, kernels) -> None:
        """Switches to the fused C++ path; call once the linears are Int8Linear (after
        calibration) or PackedLinear (GGUF blocks, per-block activation quantizers)."""
        self.kernels = kernels
        self.packed = isinstance(self.attention.qkv_proj, PackedLinear)
        # NOTE: each input norm's weight is divided by the smoothing factors of the linear it
        # feeds, so one kernel normalises, smooths and quantizes (packed weights: no smoothing).
        self.attn_weight = _folded(self.attn_norm, self.attention.qkv_proj)
        self.mlp_weight = _folded(self.mlp_norm, self.mlp.gate_up_proj)
        for linear in self.modules():
            if isinstance(linear, PackedLinear):
                linear.kernels = kernels
        self.attention.enable_fused_int8()
        self.mlp.enable_fused_int8(kernels)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                hidden_norm: RMSNorm | None, rope: RotaryEmbedding, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output, joining the stream through hidden_norm
        (its output norm, if any); on the first layer residual is None and hidden is the
        embeddings. Returns (this layer's MLP output, the residual stream)."""
        residual = _join(hidden, residual, hidden_norm)
        out = self.attention(self.attn_norm(residual), rope, cos, sin, self.window, kv_cache,
                             meta)
        residual = _join(out, residual, self.attn_out_norm)
        return self.mlp(self.mlp_norm(residual)), residual

    def forward_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                      hidden_norm: RMSNorm | None, positions: torch.Tensor,
                      rope: RotaryEmbedding, kv_cache: tuple[torch.Tensor, torch.Tensor],
                      meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast mode on CPU: the same block in ~14 ops (fused norm/quantize/RoPE kernels)."""
        ops = self.kernels
        eps = self.attn_norm.eps
        if residual is None:
            residual = hidden   # the embeddings: a fresh tensor, safe to update in place
            if self.packed:
                xq, xs = ops.rms_norm_quant_blocks(hidden, residual, self.attn_weight, eps, False), None
            else:
                xq, xs = ops.rms_norm_quant(hidden, residual, self.attn_weight, eps, False)
        else:
            xq, xs = _join_norm_quant(ops, hidden, residual, hidden_norm, self.attn_weight, eps,
                                      self.packed)
        out = self.attention.forward_fused(xq, xs, positions, rope, self.window, kv_cache, meta,
                                           ops)
        xq, xs = _join_norm_quant(ops, out, residual, self.attn_out_norm, self.mlp_weight, eps,
                                  self.packed)
        return self.mlp.forward_fused(xq, xs, ops), residual


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head, built from a weight stream.

    Built with float weights, and fast mode converts the linears to int8 afterwards
    (shoal.model.layers.quantize), once activations have been calibrated; or, with fast
    mode's packed recipe, built directly from GGUF blocks (PackedWeight -> PackedLinear).
    """

    def __init__(self, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = "model") -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        layer_tensors = frozenset(config.layer_weight_shapes())
        layer_parts: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
        layers: list[DecoderLayer | None] = [None] * config.num_layers
        top: dict[str, torch.Tensor] = {}
        for name, tensor in _checked(weights, source):
            if not isinstance(tensor, PackedWeight):
                tensor = tensor.to(self.device)
            if name.startswith("model.layers."):
                index_str, _, rest = name[len("model.layers."):].partition(".")
                index = int(index_str)
                if rest not in layer_tensors:
                    continue  # e.g. rotary_emb.inv_freq in old checkpoints: recomputed here
                if index >= config.num_layers:
                    raise CorruptModelError(source, f"unexpected tensor {name}")
                layer_parts[index][rest] = tensor
                # NOTE: build each layer as soon as its tensors are in, so at most one
                # layer's float weights exist beside the compact ones.
                if len(layer_parts[index]) == len(layer_tensors):
                    layers[index] = DecoderLayer(config, index, layer_parts[index], dtype)
                    layer_parts[index] = {}
            else:
                top[name] = tensor
        missing = [i for i, layer in enumerate(layers) if layer is None]
        if missing:
            raise CorruptModelError(source, f"layer {missing[0]} is missing tensors "
                                    f"(have {sorted(layer_parts[missing[0]])})")
        self.layers = nn.ModuleList(layers)  # type: ignore[arg-type]
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            if name not in top:
                raise CorruptModelError(source, f"missing tensor {name}")
        embed = top.pop("model.embed_tokens.weight")
        head = top.pop("lm_head.weight", None)
        if head is None and not config.tie_word_embeddings:
            raise CorruptModelError(source, "missing tensor lm_head.weight (embeddings are not tied)")
        self.norm = _norm(top.pop("model.norm.weight"), config)
        self.tied = head is None
        if head is None:
            self.lm_head = _linear(embed, None, dtype)
            # NOTE: a packed tied head serves the embedding lookups from its blocks.
            self.embed_weight = None if isinstance(embed, PackedWeight) else self.lm_head.weight
        else:
            self.lm_head = _linear(head, None, dtype)
            self.embed_weight = nn.Parameter(embed.to(dtype), requires_grad=False)
        del embed, head
        # NOTE: as transformers: sqrt(hidden) rounded to the model dtype, then multiplied in.
        self.embed_scale = (torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device)
                            if config.spec.scale_embeddings else None)
        self.fused = False   # set by enable_fused_int8 (fast mode with CPU kernels)
        # the layers run by one C++ call per forward (set by enable_fused_int8 or
        # enable_f32_kernel; None: the per-op path, which the benchmarks can force)
        self.stack: DecoderStack | None = None
        self.rope_global = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                           config.rope_theta, config.rope_scaling, self.device,
                                           config.rope_freq_factors)
        if any(layer.window for layer in self.layers):
            # NOTE: sliding-window layers have their own base and no scaling (Gemma 3).
            local_theta = config.rope_local_theta or config.rope_theta
            self.rope_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                              local_theta, None, self.device)
        else:
            self.rope_local = self.rope_global

    def enable_fused_int8(self, kernels) -> None:
        """Routes fast-mode forward passes through the fused C++ ops (when the runner has them)."""
        for layer in self.layers:
            layer.enable_fused_int8(kernels)
        if isinstance(self.lm_head, (Int8Linear, PackedLinear)):
            self.lm_head.kernels = kernels
        self.fused = True
        self._use_stack()

    def enable_f32_kernel(self, kernels) -> None:
        """Exact mode on the CPU: every float32 linear (the head included) through the C++
        kernel, batch-invariant and faster at decoding sizes (layers/linear.py)."""
        for module in self.modules():
            if isinstance(module, ExactLinear):
                module.enable_f32_kernel(kernels)
        self._use_stack()

    def _use_stack(self) -> None:
        kind = stack_kind(self.layers, self.config)
        if kind is not None:
            self.stack = DecoderStack(
                kind, self.layers, lambda layer: self.rope_local if layer.window else self.rope_global,
                self.config)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_weight is None:
            # NOTE: a tied int8 head doubles as the embedding table, so the big vocab
            # matrix is held once.
            assert isinstance(self.lm_head, (Int8Linear, PackedLinear))
            rows = self.lm_head.dequantized_rows(token_ids)
        else:
            rows = F.embedding(token_ids, self.embed_weight)
        if self.embed_scale is None:
            return rows
        return rows.to(self.dtype) * self.embed_scale

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata
                ) -> torch.Tensor:
        """token_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        hidden = self.embed(token_ids)
        residual: torch.Tensor | None = None
        hidden_norm: RMSNorm | None = None
        if self.stack is not None and meta.kernels is not None:
            residual = hidden.to(torch.float32).contiguous()
            hidden = self.stack.run(meta.kernels, kv_caches, residual, positions, meta)
            hidden_norm = self.layers[-1].mlp_out_norm
        elif self.fused and meta.kernels is not None:
            for layer, kv_cache in zip(self.layers, kv_caches):
                rope = self.rope_local if layer.window else self.rope_global
                hidden, residual = layer.forward_fused(hidden, residual, hidden_norm, positions,
                                                       rope, kv_cache, meta)
                hidden_norm = layer.mlp_out_norm
        else:
            global_tables = self.rope_global.tables(positions)
            local_tables = (global_tables if self.rope_local is self.rope_global
                            else self.rope_local.tables(positions))
            for layer, kv_cache in zip(self.layers, kv_caches):
                rope, (cos, sin) = ((self.rope_local, local_tables) if layer.window
                                    else (self.rope_global, global_tables))
                hidden, residual = layer(hidden, residual, hidden_norm, rope, cos, sin, kv_cache,
                                         meta)
                hidden_norm = layer.mlp_out_norm
        return self.norm(_join(hidden, residual, hidden_norm))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, hidden] -> float32 logits [R, vocab]."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _norm(weight: torch.Tensor, config: ModelConfig) -> RMSNorm:
    return RMSNorm(weight, config.rms_norm_eps, unit_offset=config.spec.norm_unit_offset)


def _join(out: torch.Tensor, residual: torch.Tensor | None, out_norm: RMSNorm | None
          ) -> torch.Tensor:
    """A sublayer's output joins the residual stream (in place), through its output norm if
    any; with no stream yet, `out` (the embeddings, a fresh tensor) starts it."""
    if residual is None:
        return out
    return residual.add_(out if out_norm is None else out_norm(out))


def _join_norm_quant(ops, out: torch.Tensor, residual: torch.Tensor, out_norm: RMSNorm | None,
                     weight: torch.Tensor, eps: float, blocks: bool = False):
    """_join, then the stream RMS-normalised by `weight` and quantized per row (or, for
    packed weights, per 32-element block: ((q, d, s), None)): one kernel."""
    if blocks:
        if out_norm is None:
            return ops.rms_norm_quant_blocks(out, residual, weight, eps, True), None
        return ops.rms_norm_add_norm_quant_blocks(out, residual, out_norm.weight, weight, eps), None
    if out_norm is None:
        return ops.rms_norm_quant(out, residual, weight, eps, True)
    return ops.rms_norm_add_norm_quant(out, residual, out_norm.weight, weight, eps)


def _folded(norm: RMSNorm, linear: Int8Linear | PackedLinear) -> torch.Tensor:
    inv = getattr(linear, "inv_smooth", None)
    return (norm.weight if inv is None else norm.weight * inv).contiguous()


def _cat(parts: list) -> torch.Tensor | PackedWeight:
    """Fused projections: float weights concatenated, or packed blocks row after row."""
    if isinstance(parts[0], PackedWeight):
        return PackedWeight.cat(parts)
    return torch.cat(parts)


def _linear(weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
    """A packed layer for GGUF blocks (fast mode's packed recipe), else a float layer."""
    if isinstance(weight, PackedWeight):
        return PackedLinear(weight, bias)
    return make_linear(weight, bias, dtype)


def _inv_smooth(linear: Int8Linear) -> torch.Tensor:
    if linear.inv_smooth is not None:
        return linear.inv_smooth
    return torch.ones(linear.qweight.shape[1], device=linear.qweight.device)


def _checked(weights: Iterable[tuple[str, torch.Tensor]], source: str
             ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if not isinstance(tensor, PackedWeight) and not torch.is_floating_point(tensor):
            raise CorruptModelError(source, f"tensor {name} is not floating point")
        yield name, tensor
