"""The Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2).

RMSNorm, rotary positions, grouped-query attention over the paged KV cache, SwiGLU,
tied or untied embeddings, optional q/k/v bias (Qwen2). Q/K/V and gate/up are fused
into one matmul each, so one activation pass feeds three (or two) projections.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import CorruptModelError
from shoal.layers.linear import Int8Linear, int8_matmul, make_linear
from shoal.layers.norm import RMSNorm
from shoal.layers.rotary import RotaryEmbedding
from shoal.models.config import ModelConfig
from shoal.worker.attention import AttentionMetadata, paged_attention


class LlamaDecoderLayer(nn.Module):
    """One transformer block: attention then SwiGLU MLP, each behind an RMSNorm."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        qkv = torch.cat([weights.pop("self_attn.q_proj.weight"), weights.pop("self_attn.k_proj.weight"),
                         weights.pop("self_attn.v_proj.weight")])
        qkv_bias = None
        if "self_attn.q_proj.bias" in weights:
            qkv_bias = torch.cat([weights.pop("self_attn.q_proj.bias"),
                                  weights.pop("self_attn.k_proj.bias"),
                                  weights.pop("self_attn.v_proj.bias")])
        self.qkv_proj = make_linear(qkv, qkv_bias, dtype)
        self.o_proj = make_linear(weights.pop("self_attn.o_proj.weight"), None, dtype)
        gate_up = torch.cat([weights.pop("mlp.gate_proj.weight"), weights.pop("mlp.up_proj.weight")])
        self.intermediate = config.intermediate_size
        self.gate_up_proj = make_linear(gate_up, None, dtype)
        self.down_proj = make_linear(weights.pop("mlp.down_proj.weight"), None, dtype)
        self.input_layernorm = RMSNorm(weights.pop("input_layernorm.weight"), config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(weights.pop("post_attention_layernorm.weight"),
                                                config.rms_norm_eps)

    def enable_fused_int8(self, kernels) -> None:
        """Switches to the fused C++ path; call after the linears became Int8Linear."""
        def folded(norm: RMSNorm, linear: Int8Linear) -> torch.Tensor:
            inv = linear.inv_smooth if linear.inv_smooth is not None else torch.ones_like(norm.weight)
            return (norm.weight * inv).contiguous()

        def inv_smooth(linear: Int8Linear) -> torch.Tensor:
            if linear.inv_smooth is not None:
                return linear.inv_smooth
            return torch.ones(linear.qweight.shape[1], device=linear.qweight.device)

        self.kernels = kernels
        self.input_weight = folded(self.input_layernorm, self.qkv_proj)
        self.post_attention_weight = folded(self.post_attention_layernorm, self.gate_up_proj)
        self.o_inv_smooth = inv_smooth(self.o_proj)
        self.down_inv_smooth = inv_smooth(self.down_proj)
        self.empty = torch.empty(0)

    def forward_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                      positions: torch.Tensor, rope: RotaryEmbedding,
                      kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast mode on CPU: the same block in ~14 ops (fused norm/quantize/RoPE kernels)."""
        ops = self.kernels
        eps = self.input_layernorm.eps
        if residual is None:
            residual = hidden   # the embeddings: a fresh tensor, safe to update in place
            xq, xs = ops.rms_norm_quant(hidden, residual, self.input_weight, eps, False)
        else:
            xq, xs = ops.rms_norm_quant(hidden, residual, self.input_weight, eps, True)
        qkv_proj = self.qkv_proj
        qkv = ops.dequant_rows(int8_matmul(xq, qkv_proj.qweight, ops), xs, qkv_proj.scale,
                               qkv_proj.bias if qkv_proj.bias is not None else self.empty)
        q, k, v = ops.rope_split(qkv, positions, rope.cos, rope.sin, self.num_heads,
                                 self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        xq, xs = ops.quant_rows(attn, self.o_inv_smooth)
        hidden = ops.dequant_rows(int8_matmul(xq, self.o_proj.qweight, ops), xs,
                                  self.o_proj.scale, self.empty)
        xq, xs = ops.rms_norm_quant(hidden, residual, self.post_attention_weight, eps, True)
        gate_up = ops.dequant_rows(int8_matmul(xq, self.gate_up_proj.qweight, ops), xs,
                                   self.gate_up_proj.scale, self.empty)
        xq, xs = ops.silu_mul_quant(gate_up, self.down_inv_smooth)
        hidden = ops.dequant_rows(int8_matmul(xq, self.down_proj.qweight, ops), xs,
                                  self.down_proj.scale, self.empty)
        return hidden, residual

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryEmbedding,
                cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        attn = paged_attention(q, k, v.contiguous(), kv_cache[0], kv_cache[1], meta, self.scale)
        hidden = self.o_proj(attn)
        hidden, residual = self.post_attention_layernorm.forward_with_residual(hidden, residual)
        gate_up = self.gate_up_proj(hidden)
        hidden = self.down_proj(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate:])
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head, built from a weight stream.

    Built with float weights; fast mode converts the linears to int8 afterwards
    (shoal.layers.quantize), once activations have been calibrated.
    """

    def __init__(self, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = "model") -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        layer_parts: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
        layers: list[LlamaDecoderLayer | None] = [None] * config.num_layers
        top: dict[str, torch.Tensor] = {}
        for name, tensor in _checked(weights, source):
            tensor = tensor.to(self.device)
            if name.startswith("model.layers."):
                index_str, _, rest = name[len("model.layers."):].partition(".")
                index = int(index_str)
                if rest not in _LAYER_TENSORS:
                    continue  # e.g. rotary_emb.inv_freq in old checkpoints: recomputed here
                if index >= config.num_layers:
                    raise CorruptModelError(source, f"unexpected tensor {name}")
                layer_parts[index][rest] = tensor
                # NOTE: build each layer as soon as its tensors are in, so at most one
                # layer's float weights exist beside the compact ones.
                if len(layer_parts[index]) == _layer_tensor_count(config):
                    layers[index] = LlamaDecoderLayer(config, layer_parts[index], dtype)
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
        self.norm = RMSNorm(top.pop("model.norm.weight"), config.rms_norm_eps)
        self.tied = head is None
        if head is None:
            self.lm_head = make_linear(embed, None, dtype)
            self.embed_weight = self.lm_head.weight
        else:
            self.lm_head = make_linear(head, None, dtype)
            self.embed_weight = nn.Parameter(embed.to(dtype), requires_grad=False)
        del embed, head
        self.fused = False   # set by enable_fused_int8 (fast mode with CPU kernels)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                    config.rope_theta, config.rope_scaling, self.device,
                                    config.rope_freq_factors)

    def enable_fused_int8(self, kernels) -> None:
        """Routes fast-mode forward passes through the fused C++ ops (when the runner has them)."""
        for layer in self.layers:
            layer.enable_fused_int8(kernels)
        if isinstance(self.lm_head, Int8Linear):
            self.lm_head.kernels = kernels
        self.fused = True

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_weight is None:
            # NOTE: a tied int8 head doubles as the embedding table, so the big vocab
            # matrix is held once.
            assert isinstance(self.lm_head, Int8Linear)
            return self.lm_head.dequantized_rows(token_ids)
        return F.embedding(token_ids, self.embed_weight)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata
                ) -> torch.Tensor:
        """token_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        hidden = self.embed(token_ids)
        residual = None
        if self.fused and meta.kernels is not None:
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward_fused(hidden, residual, positions, self.rope,
                                                       kv_cache, meta)
        else:
            cos, sin = self.rope.tables(positions)
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer(hidden, residual, self.rope, cos, sin, kv_cache, meta)
        hidden, _ = self.norm.forward_with_residual(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, hidden] -> float32 logits [R, vocab]."""
        return self.lm_head(hidden).float()


_LAYER_TENSORS = frozenset({
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
    "self_attn.v_proj.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
})


def _layer_tensor_count(config: ModelConfig) -> int:
    return 9 + (3 if config.attention_bias else 0)


def _checked(weights: Iterable[tuple[str, torch.Tensor]], source: str
             ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if not torch.is_floating_point(tensor):
            raise CorruptModelError(source, f"tensor {name} is not floating point")
        yield name, tensor
