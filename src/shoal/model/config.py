"""ModelConfig: a model's architecture hyper-parameters, from GGUF metadata or HF config.json."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.core.errors import CorruptModelError, UnsupportedModelError


@dataclass(frozen=True, slots=True)
class ArchitectureSpec:
    """What shoal knows about one supported architecture family."""

    name: str
    # transformers class that computes the same function (reference tests, HF configs)
    hf_class: str
    # NOTE: llama.cpp's converter permutes Q/K rows of llama-style models so that its
    # interleaved ("normal") RoPE matches HF's half-split RoPE; qwen2 uses NEOX RoPE and
    # is stored unpermuted.
    gguf_qk_permuted: bool
    # q/k/v projections carry a bias (Qwen2); o_proj never does for these families.
    qkv_bias: bool
    # NOTE: llama.cpp's converter stores Gemma's RMSNorm weights w (applied as 1 + w) as
    # 1 + w; the GGUF loader subtracts this offset so weights come out in HF terms.
    gguf_norm_offset: float = 0.0
    # The decoder's form (model/decoder.py); the defaults are Llama's.
    # the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GELU(tanh)-gated)
    mlp_activation: str = "silu"
    # RMSNorm scales by (1 + w) instead of w
    norm_unit_offset: bool = False
    # each sublayer's output is RMS-normalised before it joins the residual stream, and the
    # MLP has its own input norm (four norms per layer instead of two)
    sandwich_norms: bool = False
    # q and k are RMS-normalised over head_dim before RoPE
    qk_norm: bool = False
    # the embeddings are multiplied by sqrt(hidden_size)
    scale_embeddings: bool = False


# NOTE: adding a family = one ArchitectureSpec here (its decoder switches included) plus its
# GGUF / HF names below and its tensor names in loaders/gguf_loader.py. Per-model facts
# (sliding windows, attention scalar, soft-capping, bias, tied head) are ModelConfig fields.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama", "LlamaForCausalLM", gguf_qk_permuted=True, qkv_bias=False),
    "mistral": ArchitectureSpec("mistral", "MistralForCausalLM", gguf_qk_permuted=True,
                                qkv_bias=False),
    "qwen2": ArchitectureSpec("qwen2", "Qwen2ForCausalLM", gguf_qk_permuted=False, qkv_bias=True),
    # Gemma 3 (text): NEOX RoPE, stored unpermuted; norms stored as 1 + w.
    "gemma3": ArchitectureSpec("gemma3", "Gemma3ForCausalLM", gguf_qk_permuted=False,
                               qkv_bias=False, gguf_norm_offset=1.0, mlp_activation="gelu_tanh",
                               norm_unit_offset=True, sandwich_norms=True, qk_norm=True,
                               scale_embeddings=True),
}
# HF config spellings of each mlp_activation
_HF_ACTIVATIONS: dict[str, tuple[str, ...]] = {"silu": ("silu", "swish"),
                                              "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
                                      "gemma3": "gemma3"}
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}

SLIDING_ATTENTION = "sliding_attention"
FULL_ATTENTION = "full_attention"
# Gemma 3: every 6th layer is global unless the file says otherwise (llama.cpp and
# transformers both default to this pattern), and local layers use RoPE base 10 000.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


@dataclass(slots=True)
class ModelConfig:
    """Hyper-parameters of one decoder-only transformer (model/decoder.py), in HF terms."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # HF-style: {"rope_type": "linear"|"llama3"|"dynamic"|"yarn"|..., "factor": ..., ...}
    rope_scaling: dict[str, Any] | None = None
    # NOTE: llama.cpp stores Llama 3.x RoPE scaling as a precomputed per-frequency divisor
    # tensor (rope_freqs.weight) instead of parameters; each inverse frequency i is
    # divided by rope_freq_factors[i]. None when absent.
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # every token id that ends generation (eos first); HF configs may list several
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3 and other interleaved local/global attention models:
    # keys a sliding-window layer sees (query at p attends to p - window + 1 .. p); 0 = none
    sliding_window: int = 0
    # per layer SLIDING_ATTENTION or FULL_ATTENTION; empty = every layer full
    layer_types: tuple[str, ...] = ()
    # RoPE base of the sliding layers (they use no rope_scaling); None = rope_theta
    rope_local_theta: float | None = None
    # attention scores are scaled by query_pre_attn_scalar ** -0.5; None = head_dim
    query_pre_attn_scalar: float | None = None
    # logits -> tanh(logits / c) * c when set
    final_logit_softcapping: float | None = None

    @property
    def spec(self) -> ArchitectureSpec:
        return ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, layer: int) -> int:
        """Sliding window of `layer` (0 = it attends to the whole context)."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return 0

    @property
    def attention_scale(self) -> float:
        scalar = self.query_pre_attn_scalar
        return (self.head_dim if scalar is None else scalar) ** -0.5

    def layer_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """One decoder layer's HF-named weights (after "model.layers.N.") and their shapes."""
        h, i = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "self_attn.q_proj.weight": (self.q_size, h),
            "self_attn.k_proj.weight": (self.kv_size, h),
            "self_attn.v_proj.weight": (self.kv_size, h),
            "self_attn.o_proj.weight": (h, self.q_size),
        }
        if self.attention_bias:
            shapes["self_attn.q_proj.bias"] = (self.q_size,)
            shapes["self_attn.k_proj.bias"] = (self.kv_size,)
            shapes["self_attn.v_proj.bias"] = (self.kv_size,)
        shapes["mlp.gate_proj.weight"] = (i, h)
        shapes["mlp.up_proj.weight"] = (i, h)
        shapes["mlp.down_proj.weight"] = (h, i)
        shapes["input_layernorm.weight"] = (h,)
        shapes["post_attention_layernorm.weight"] = (h,)
        if self.spec.sandwich_norms:
            shapes["pre_feedforward_layernorm.weight"] = (h,)
            shapes["post_feedforward_layernorm.weight"] = (h,)
        if self.spec.qk_norm:
            shapes["self_attn.q_norm.weight"] = (self.head_dim,)
            shapes["self_attn.k_norm.weight"] = (self.head_dim,)
        return shapes

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The expected HF-named weights and their shapes ([out, in] for projections)."""
        h, v = self.hidden_size, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        layer_shapes = self.layer_weight_shapes()
        for layer in range(self.num_layers):
            shapes.update((f"model.layers.{layer}.{name}", shape)
                          for name, shape in layer_shapes.items())
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def validate(self, source: str) -> None:
        """Raises CorruptModelError naming `source` when the numbers are inconsistent."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CorruptModelError(source, f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise CorruptModelError(
                source, f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads "
                        f"({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise CorruptModelError(source, f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CorruptModelError(source, f"{name} must be a positive number, got {value!r}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise CorruptModelError(
                source, f"rope_freqs has {len(self.rope_freq_factors)} entries, expected "
                        f"head_dim/2 = {self.head_dim // 2}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise CorruptModelError(
                    source, f"{len(self.layer_types)} layer types for {self.num_layers} layers")
            bad = set(self.layer_types) - {SLIDING_ATTENTION, FULL_ATTENTION}
            if bad:
                raise UnsupportedModelError(source, f"unsupported layer types {sorted(bad)}")
            if SLIDING_ATTENTION in self.layer_types and self.sliding_window <= 0:
                raise CorruptModelError(source, "sliding-window layers without a window size")
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or
                                      not math.isfinite(value) or value <= 0):
                raise CorruptModelError(source, f"{name} must be a positive number, got {value!r}")
        for token_id in (self.bos_token_id, *self.eos_token_ids):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise CorruptModelError(
                    source, f"special token id {token_id} is outside the vocabulary "
                            f"(size {self.vocab_size})")

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str,
                           tensor_shapes: Mapping[str, Sequence[int]] | None = None,
                           rope_freq_factors: Sequence[float] | None = None) -> ModelConfig:
        """Builds the config from GGUF key/values.

        `tensor_shapes` (GGUF tensor name -> shape in ggml order) decides what the metadata
        cannot: tied embeddings (no output.weight), q/k/v bias, and a missing vocab_size.
        Without it the head is taken as tied. `rope_freq_factors` is the content of
        rope_freqs.weight when the file has one.
        """
        gguf_arch = metadata.get("general.architecture")
        if not isinstance(gguf_arch, str):
            raise CorruptModelError(source, "GGUF metadata lacks general.architecture")
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                source, f"unsupported architecture {gguf_arch!r} (supported GGUF architectures: "
                        f"{', '.join(sorted(GGUF_ARCHITECTURES))})")
        arch = ARCHITECTURES[GGUF_ARCHITECTURES[gguf_arch]]
        shapes = dict(tensor_shapes or {})

        def get(key: str, default: Any = None, *, required: bool = False) -> Any:
            full = f"{gguf_arch}.{key}"
            if full in metadata:
                return metadata[full]
            if required:
                raise CorruptModelError(source, f"GGUF metadata lacks {full}")
            return default

        hidden = _int(get("embedding_length", required=True), "embedding_length", source)
        raw_heads = get("attention.head_count", required=True)
        raw_kv_heads = get("attention.head_count_kv", raw_heads)
        if isinstance(raw_heads, list) or isinstance(raw_kv_heads, list):
            raise UnsupportedModelError(source, "per-layer head counts are not supported")
        num_heads = _int(raw_heads, "attention.head_count", source)
        num_kv_heads = _int(raw_kv_heads, "attention.head_count_kv", source)
        if num_heads <= 0:
            raise CorruptModelError(
                source, f"attention.head_count must be positive, got {num_heads}")
        head_dim = _int(get("attention.key_length", hidden // num_heads),
                        "attention.key_length", source)
        value_dim = get("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise UnsupportedModelError(
                source, f"key_length {head_dim} != value_length {value_dim} is not supported")
        rope_dims = get("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise UnsupportedModelError(
                source, f"partial rotary embeddings (rope.dimension_count {rope_dims} of "
                        f"head_dim {head_dim}) are not supported")

        vocab = get("vocab_size")
        if vocab is None and "token_embd.weight" in shapes:
            vocab = int(shapes["token_embd.weight"][-1])
        if vocab is None and isinstance(metadata.get("tokenizer.ggml.tokens"), list):
            vocab = len(metadata["tokenizer.ggml.tokens"])
        if vocab is None:
            raise CorruptModelError(source, f"GGUF metadata lacks {gguf_arch}.vocab_size")

        context = _int(get("context_length", required=True), "context_length", source)
        num_layers = _int(get("block_count", required=True), "block_count", source)
        sliding = get("attention.sliding_window")
        gemma: dict[str, Any] = {}
        if arch.name == "gemma3":
            gemma = _gguf_gemma3_fields(get, source, num_layers=num_layers, hidden=hidden,
                                        num_heads=num_heads, head_dim=head_dim)
        elif sliding is not None and 0 < _int(sliding, "attention.sliding_window", source) < context:
            raise UnsupportedModelError(
                source, f"sliding-window attention (window {sliding} < context {context}) "
                        "is not supported")

        if shapes:
            tied = "output.weight" not in shapes
            bias = "blk.0.attn_q.bias" in shapes
        else:
            tied, bias = True, arch.qkv_bias

        bos = _opt_int(metadata.get("tokenizer.ggml.bos_token_id"), "bos_token_id", source)
        eos = _opt_int(metadata.get("tokenizer.ggml.eos_token_id"), "eos_token_id", source)
        eos_ids = [t for t in (eos,
                               _opt_int(metadata.get("tokenizer.ggml.eot_token_id"),
                                        "eot_token_id", source),
                               _opt_int(metadata.get("tokenizer.ggml.eom_token_id"),
                                        "eom_token_id", source)) if t is not None]

        config = cls(
            architecture=arch.name,
            vocab_size=_int(vocab, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_int(get("feed_forward_length", required=True),
                                   "feed_forward_length", source),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-5),
                                "attention.layer_norm_rms_epsilon", source),
            rope_theta=_float(get("rope.freq_base", 10000.0), "rope.freq_base", source),
            max_position_embeddings=context,
            tie_word_embeddings=tied,
            attention_bias=bias,
            rope_scaling=_gguf_rope_scaling(get, source),
            rope_freq_factors=(tuple(float(x) for x in rope_freq_factors)
                               if rope_freq_factors is not None else None),
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            **gemma,
        )
        config.validate(source)
        return config

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any], source: str) -> ModelConfig:
        """Builds the config from a parsed Hugging Face config.json."""
        architectures = hf_config.get("architectures") or []
        if not isinstance(architectures, list) or not architectures:
            model_type = hf_config.get("model_type")
            raise UnsupportedModelError(
                source, f"config.json names no architecture (model_type {model_type!r}); "
                        f"supported: {', '.join(sorted(HF_ARCHITECTURES))}")
        hf_arch = architectures[0]
        if hf_arch not in HF_ARCHITECTURES:
            raise UnsupportedModelError(
                source, f"unsupported architecture {hf_arch!r} (supported: "
                        f"{', '.join(sorted(HF_ARCHITECTURES))})")
        arch = ARCHITECTURES[HF_ARCHITECTURES[hf_arch]]

        def req(key: str) -> Any:
            if key not in hf_config or hf_config[key] is None:
                raise CorruptModelError(source, f"config.json lacks {key!r}")
            return hf_config[key]

        hidden = _int(req("hidden_size"), "hidden_size", source)
        num_heads = _int(req("num_attention_heads"), "num_attention_heads", source)
        num_kv_heads = hf_config.get("num_key_value_heads") or num_heads
        head_dim = hf_config.get("head_dim") or (hidden // num_heads if num_heads > 0 else 0)
        context = _int(hf_config.get("max_position_embeddings", 2048), "max_position_embeddings",
                       source)

        sliding = hf_config.get("sliding_window")
        if arch.name == "qwen2" and not hf_config.get("use_sliding_window", False):
            sliding = None
        gemma: dict[str, Any] = {}
        if arch.name == "gemma3":
            num_layers = _int(req("num_hidden_layers"), "num_hidden_layers", source)
            gemma = _hf_gemma3_fields(hf_config, source, num_layers)
        elif sliding is not None and 0 < _int(sliding, "sliding_window", source) < context:
            raise UnsupportedModelError(
                source, f"sliding-window attention (window {sliding} < context {context}) "
                        "is not supported")
        if hf_config.get("mlp_bias"):
            raise UnsupportedModelError(source, "mlp_bias is not supported")
        partial = hf_config.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise UnsupportedModelError(source, f"partial_rotary_factor {partial} is not supported")
        # NOTE: Gemma 3 names it hidden_activation; absent means the family's own.
        act = hf_config.get("hidden_activation") or hf_config.get("hidden_act")
        if act is not None and act not in _HF_ACTIVATIONS[arch.mlp_activation]:
            raise UnsupportedModelError(source, f"activation {act!r} is not supported")

        if arch.name == "gemma3":
            rope_theta, rope_scaling, local_theta = _hf_gemma3_rope(hf_config, source)
            gemma["rope_local_theta"] = local_theta
        else:
            rope_theta, rope_scaling = _hf_rope(hf_config, source)
        bias = arch.qkv_bias or bool(hf_config.get("attention_bias", False))
        if bias and not arch.qkv_bias:
            # NOTE: HF Llama's attention_bias also adds an o_proj bias, which the weight
            # naming here (q/k/v bias only) does not carry.
            raise UnsupportedModelError(source, f"attention_bias on {hf_arch} is not supported")

        eos = hf_config.get("eos_token_id")
        eos_ids = [_int(t, "eos_token_id", source)
                   for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
        bos = _opt_int(hf_config.get("bos_token_id"), "bos_token_id", source)

        config = cls(
            architecture=arch.name,
            vocab_size=_int(req("vocab_size"), "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_int(req("intermediate_size"), "intermediate_size", source),
            num_layers=_int(req("num_hidden_layers"), "num_hidden_layers", source),
            num_heads=num_heads,
            num_kv_heads=_int(num_kv_heads, "num_key_value_heads", source),
            head_dim=_int(head_dim, "head_dim", source),
            rms_norm_eps=_float(hf_config.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=rope_theta,
            max_position_embeddings=context,
            # NOTE: Gemma3TextConfig ties by default, and its config.json may omit the key.
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", arch.name == "gemma3")),
            attention_bias=bias,
            rope_scaling=rope_scaling,
            bos_token_id=bos,
            eos_token_id=eos_ids[0] if eos_ids else None,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            **gemma,
        )
        config.validate(source)
        return config


def _int(value: Any, name: str, source: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or int(value) != value):
        raise CorruptModelError(source, f"{name} must be an integer, got {value!r}")
    return int(value)


def _opt_int(value: Any, name: str, source: str) -> int | None:
    return None if value is None else _int(value, name, source)


def _float(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptModelError(source, f"{name} must be a number, got {value!r}")
    return float(value)


def _gguf_gemma3_fields(get: Any, source: str, *, num_layers: int, hidden: int, num_heads: int,
                        head_dim: int) -> dict[str, Any]:
    """Gemma 3's local/global attention facts from GGUF metadata (llama.cpp's defaults)."""
    if get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(source, "attention logit soft-capping is not supported")
    window = _int(get("attention.sliding_window", required=True), "attention.sliding_window",
                  source)
    if window <= 0:
        raise CorruptModelError(source, f"attention.sliding_window must be positive, got {window}")
    pattern = get("attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        # per layer, True = sliding (llama.cpp's swa_layers array)
        if len(pattern) != num_layers:
            raise CorruptModelError(
                source, f"attention.sliding_window_pattern has {len(pattern)} entries for "
                        f"{num_layers} layers")
        sliding_layers = [bool(x) for x in pattern]
    else:
        every = _int(pattern, "attention.sliding_window_pattern", source)
        if every <= 0:
            raise CorruptModelError(source, f"attention.sliding_window_pattern must be positive, "
                                            f"got {every}")
        sliding_layers = [(i + 1) % every != 0 for i in range(num_layers)]
    scale = get("attention.scale")
    if scale is not None:
        scalar = _float(scale, "attention.scale", source) ** -2
    elif num_layers == 62:
        # NOTE: as llama.cpp: the 27B model scales by hidden / heads (168), not head_dim.
        scalar = float(hidden // num_heads)
    else:
        scalar = float(head_dim)
    softcap = get("final_logit_softcapping")
    return {
        "sliding_window": window,
        "layer_types": tuple(SLIDING_ATTENTION if s else FULL_ATTENTION for s in sliding_layers),
        "rope_local_theta": _float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA),
                                   "rope.freq_base_swa", source),
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": (None if softcap in (None, 0, 0.0)
                                    else _float(softcap, "final_logit_softcapping", source)),
    }


def _gguf_rope_scaling(get: Any, source: str) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(factor, "rope.scaling.factor", source)}
    if kind == "yarn":
        scaling: dict[str, Any] = {
            "rope_type": "yarn", "factor": _float(factor or 1.0, "rope.scaling.factor", source)}
        original = get("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = _int(
                original, "rope.scaling.original_context_length", source)
        for key, hf_key in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                            ("rope.scaling.yarn_beta_slow", "beta_slow"),
                            ("rope.scaling.attn_factor", "attention_factor")):
            value = get(key)
            if value is not None:
                scaling[hf_key] = _float(value, key, source)
        return scaling
    raise UnsupportedModelError(source, f"unsupported RoPE scaling type {kind!r}")


def _hf_gemma3_fields(hf_config: Mapping[str, Any], source: str, num_layers: int) -> dict[str, Any]:
    """Gemma3TextConfig's local/global attention facts (its defaults where a key is absent)."""
    if hf_config.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(source, "attention logit soft-capping is not supported")
    if hf_config.get("use_bidirectional_attention"):
        raise UnsupportedModelError(source, "bidirectional attention is not supported")
    window = _int(hf_config.get("sliding_window") or 4096, "sliding_window", source)
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        every = _int(hf_config.get("sliding_window_pattern") or GEMMA3_SLIDING_WINDOW_PATTERN,
                     "sliding_window_pattern", source)
        layer_types = [SLIDING_ATTENTION if (i + 1) % every else FULL_ATTENTION
                       for i in range(num_layers)]
    if not isinstance(layer_types, list):
        raise CorruptModelError(source, f"layer_types must be a list, got {layer_types!r}")
    softcap = hf_config.get("final_logit_softcapping")
    return {
        "sliding_window": window,
        "layer_types": tuple(str(t) for t in layer_types),
        "query_pre_attn_scalar": _float(hf_config.get("query_pre_attn_scalar", 256),
                                        "query_pre_attn_scalar", source),
        "final_logit_softcapping": (None if softcap is None
                                    else _float(softcap, "final_logit_softcapping", source)),
    }


def _hf_gemma3_rope(hf_config: Mapping[str, Any], source: str
                    ) -> tuple[float, dict[str, Any] | None, float]:
    """(global theta, global rope_scaling, local theta) of a Gemma 3 text config.

    transformers >= 5 writes rope_parameters per layer type; older configs have rope_theta,
    rope_local_base_freq and rope_scaling (which applies to the global layers only).
    """
    params = hf_config.get("rope_parameters")
    if isinstance(params, Mapping) and FULL_ATTENTION in params:
        full = dict(params.get(FULL_ATTENTION) or {})
        local = dict(params.get(SLIDING_ATTENTION) or {})
        flat = {**hf_config, "rope_parameters": full, "rope_scaling": None}
        theta, scaling = _hf_rope({**flat, "rope_theta": full.get("rope_theta", 1_000_000.0)},
                                  source)
        if local.get("rope_type", "default") not in ("default", None):
            raise UnsupportedModelError(source, "RoPE scaling on sliding layers is not supported")
        local_theta = local.get("rope_theta", GEMMA3_LOCAL_ROPE_THETA)
    else:
        theta, scaling = _hf_rope({**hf_config,
                                   "rope_theta": hf_config.get("rope_theta", 1_000_000.0)}, source)
        local_theta = hf_config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)
    return theta, scaling, _float(local_theta, "rope_local_base_freq", source)


def _hf_rope(hf_config: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    # NOTE: transformers >= 5 writes "rope_parameters" (theta included); older configs
    # have top-level "rope_theta" and "rope_scaling" (sometimes with "type" for "rope_type").
    params = hf_config.get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else None
    theta = hf_config.get("rope_theta")
    if scaling is not None:
        theta = scaling.pop("rope_theta", theta)
    if isinstance(hf_config.get("rope_scaling"), Mapping):
        scaling = {**(scaling or {}), **hf_config["rope_scaling"]}
    if scaling is not None:
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    theta = 10000.0 if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise CorruptModelError(source, f"rope_theta must be a number, got {theta!r}")
    return float(theta), scaling
