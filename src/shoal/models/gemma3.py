"""The Gemma 3 text decoder (gemma3:270m and the text part of the larger Gemma 3 models).

What differs from the Llama family (models/llama.py), checked against transformers'
Gemma3ForCausalLM and llama.cpp's gemma3 graph:
- embeddings are multiplied by sqrt(hidden_size) (in the model dtype); the head is tied;
- RMSNorm scales by (1 + w); four norms per layer: before and after attention, before and
  after the MLP, each sublayer's output normalised before it joins the residual stream;
- q and k are RMS-normalised over head_dim (q_norm, k_norm) before RoPE;
- attention scores are scaled by query_pre_attn_scalar ** -0.5;
- the MLP is GELU(tanh)-gated: down(gelu_tanh(gate) * up);
- local layers attend to a sliding window (config.sliding_window keys) with their own RoPE
  base (rope_local_theta, no scaling); every Nth layer is global, with rope_theta and the
  config's rope_scaling.
Q/K/V and gate/up are fused into one matmul each, as in Llama.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import CorruptModelError
from shoal.layers.linear import Int8Linear, int8_matmul, make_linear
from shoal.layers.norm import RMSNorm
from shoal.layers.rotary import RotaryEmbedding
from shoal.models.config import ModelConfig
from shoal.models.llama import _checked
from shoal.worker.attention import AttentionMetadata, paged_attention

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm")
_LAYER_TENSORS = frozenset({
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    *(f"{name}.weight" for name in _NORMS),
})


class Gemma3DecoderLayer(nn.Module):
    """One block: normed attention and normed GELU MLP, each sandwiched between two norms."""

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.intermediate = config.intermediate_size
        self.scale = config.attention_scale
        self.window = config.layer_window(index)
        eps = config.rms_norm_eps
        qkv = torch.cat([weights.pop("self_attn.q_proj.weight"), weights.pop("self_attn.k_proj.weight"),
                         weights.pop("self_attn.v_proj.weight")])
        self.qkv_proj = make_linear(qkv, None, dtype)
        self.o_proj = make_linear(weights.pop("self_attn.o_proj.weight"), None, dtype)
        gate_up = torch.cat([weights.pop("mlp.gate_proj.weight"), weights.pop("mlp.up_proj.weight")])
        self.gate_up_proj = make_linear(gate_up, None, dtype)
        self.down_proj = make_linear(weights.pop("mlp.down_proj.weight"), None, dtype)
        self.q_norm = RMSNorm(weights.pop("self_attn.q_norm.weight"), eps, unit_offset=True)
        self.k_norm = RMSNorm(weights.pop("self_attn.k_norm.weight"), eps, unit_offset=True)
        for name in _NORMS:
            setattr(self, name, RMSNorm(weights.pop(f"{name}.weight"), eps, unit_offset=True))

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
        self.pre_feedforward_weight = folded(self.pre_feedforward_layernorm, self.gate_up_proj)
        self.o_inv_smooth = inv_smooth(self.o_proj)
        self.down_inv_smooth = inv_smooth(self.down_proj)
        self.empty = torch.empty(0)

    def forward_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                      pending_norm: torch.Tensor | None, positions: torch.Tensor,
                      rope: RotaryEmbedding, kv_cache: tuple[torch.Tensor, torch.Tensor],
                      meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast mode on CPU. The stream is residual + RMSNorm(hidden) * pending_norm (the
        previous layer's post-feedforward norm, added here); on the first layer residual is
        None and hidden is the embeddings. Returns (MLP output before its post-norm, residual)."""
        ops = self.kernels
        eps = self.input_layernorm.eps
        if residual is None:
            residual = hidden   # the embeddings: a fresh tensor, safe to update in place
            xq, xs = ops.rms_norm_quant(hidden, residual, self.input_weight, eps, False)
        else:
            xq, xs = ops.rms_norm_add_norm_quant(hidden, residual, pending_norm,
                                                 self.input_weight, eps)
        qkv = ops.dequant_rows(int8_matmul(xq, self.qkv_proj.qweight, ops), xs,
                               self.qkv_proj.scale, self.empty)
        q, k, v = ops.qk_norm_rope_split(qkv, positions, rope.cos, rope.sin, self.q_norm.weight,
                                         self.k_norm.weight, self.q_norm.eps, self.num_heads,
                                         self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        xq, xs = ops.quant_rows(attn, self.o_inv_smooth)
        hidden = ops.dequant_rows(int8_matmul(xq, self.o_proj.qweight, ops), xs,
                                  self.o_proj.scale, self.empty)
        xq, xs = ops.rms_norm_add_norm_quant(hidden, residual, self.post_attention_layernorm.weight,
                                             self.pre_feedforward_weight, eps)
        gate_up = ops.dequant_rows(int8_matmul(xq, self.gate_up_proj.qweight, ops), xs,
                                   self.gate_up_proj.scale, self.empty)
        xq, xs = ops.gelu_tanh_mul_quant(gate_up, self.down_inv_smooth)
        hidden = ops.dequant_rows(int8_matmul(xq, self.down_proj.qweight, ops), xs,
                                  self.down_proj.scale, self.empty)
        return hidden, residual

    def forward(self, hidden: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """hidden: the residual stream [T, hidden]; returns the stream after this layer."""
        t = hidden.shape[0]
        x = self.input_layernorm(hidden)
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        q = rope.apply(self.q_norm(q), cos, sin)
        k = rope.apply(self.k_norm(k), cos, sin)
        attn = paged_attention(q, k, v.contiguous(), kv_cache[0], kv_cache[1], meta, self.scale,
                               self.window)
        hidden = hidden + self.post_attention_layernorm(self.o_proj(attn))
        gate_up = self.gate_up_proj(self.pre_feedforward_layernorm(hidden))
        x = self.down_proj(F.gelu(gate_up[:, : self.intermediate], approximate="tanh")
                           * gate_up[:, self.intermediate:])
        return hidden + self.post_feedforward_layernorm(x)


class Gemma3ForCausalLM(nn.Module):
    """Scaled embeddings, Gemma 3 decoder layers, final norm and the tied LM head.

    Same interface as LlamaForCausalLM (forward, compute_logits, enable_fused_int8, tied /
    embed_weight for fast-mode conversion).
    """

    def __init__(self, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = "model") -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        layer_parts: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
        layers: list[Gemma3DecoderLayer | None] = [None] * config.num_layers
        top: dict[str, torch.Tensor] = {}
        for name, tensor in _checked(weights, source):
            tensor = tensor.to(self.device)
            if name.startswith("model.layers."):
                index_str, _, rest = name[len("model.layers."):].partition(".")
                index = int(index_str)
                if rest not in _LAYER_TENSORS:
                    continue
                if index >= config.num_layers:
                    raise CorruptModelError(source, f"unexpected tensor {name}")
                layer_parts[index][rest] = tensor
                # NOTE: build each layer as soon as its tensors are in (as Llama does).
                if len(layer_parts[index]) == len(_LAYER_TENSORS):
                    layers[index] = Gemma3DecoderLayer(config, index, layer_parts[index], dtype)
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
        self.norm = RMSNorm(top.pop("model.norm.weight"), config.rms_norm_eps, unit_offset=True)
        self.tied = head is None
        if head is None:
            self.lm_head = make_linear(embed, None, dtype)
            self.embed_weight = self.lm_head.weight
        else:
            self.lm_head = make_linear(head, None, dtype)
            self.embed_weight = nn.Parameter(embed.to(dtype), requires_grad=False)
        del embed, head
        # NOTE: as transformers: sqrt(hidden) rounded to the model dtype, then multiplied in.
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device)
        self.fused = False
        self.rope_global = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                           config.rope_theta, config.rope_scaling, self.device,
                                           config.rope_freq_factors)
        if any(layer.window for layer in self.layers):
            local_theta = config.rope_local_theta or config.rope_theta
            self.rope_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                              local_theta, None, self.device)
        else:
            self.rope_local = self.rope_global

    def rope_for(self, layer: Gemma3DecoderLayer) -> RotaryEmbedding:
        return self.rope_local if layer.window else self.rope_global

    def enable_fused_int8(self, kernels) -> None:
        """Routes fast-mode forward passes through the fused C++ ops (when the runner has them)."""
        for layer in self.layers:
            layer.enable_fused_int8(kernels)
        if isinstance(self.lm_head, Int8Linear):
            self.lm_head.kernels = kernels
        self.fused = True

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_weight is None:
            # a tied int8 head doubles as the embedding table (fast mode)
            assert isinstance(self.lm_head, Int8Linear)
            rows = self.lm_head.dequantized_rows(token_ids).to(self.dtype)
        else:
            rows = F.embedding(token_ids, self.embed_weight)
        return rows * self.embed_scale

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata
                ) -> torch.Tensor:
        """token_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        hidden = self.embed(token_ids)
        if self.fused and meta.kernels is not None:
            residual: torch.Tensor | None = None
            pending: torch.Tensor | None = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward_fused(hidden, residual, pending, positions,
                                                       self.rope_for(layer), kv_cache, meta)
                pending = layer.post_feedforward_layernorm.weight
            assert residual is not None
            residual.add_(self.layers[-1].post_feedforward_layernorm(hidden))
            return self.norm(residual)
        tables = {id(self.rope_global): self.rope_global.tables(positions)}
        if self.rope_local is not self.rope_global:
            tables[id(self.rope_local)] = self.rope_local.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            rope = self.rope_for(layer)
            cos, sin = tables[id(rope)]
            hidden = layer(hidden, rope, cos, sin, kv_cache, meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, hidden] -> float32 logits [R, vocab]."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
