"""Reference forward passes: plain transformers models built from a ModelSource's weights.

Engine tests compare their logits with these. Everything runs in float32 with eager
attention, so differences come from shoal's kernels, not from the reference.
"""
from __future__ import annotations

from typing import Any

import torch

from shoal.model.loaders import ModelSource


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def reference_hf_config(source: ModelSource) -> Any:
    """The transformers config equivalent to source.config (float32, eager attention)."""
    from transformers import LlamaConfig, Qwen2Config

    cfg = source.config
    if cfg.rope_freq_factors is not None:
        raise NotImplementedError("transformers has no RoPE mode for llama.cpp rope_freqs")
    rope: dict[str, Any] = {"rope_type": "default", **(cfg.rope_scaling or {}),
                            "rope_theta": cfg.rope_theta}
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, hidden_act="silu",
    )
    if cfg.architecture == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    else:
        # NOTE: Mistral without a sliding window computes exactly what Llama does.
        config = LlamaConfig(**common, attention_bias=False)
    config._attn_implementation = "eager"
    return config


def build_reference_model(source: ModelSource) -> torch.nn.Module:
    """A LlamaForCausalLM / Qwen2ForCausalLM holding source's dequantized weights (eval mode)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = reference_hf_config(source)
    model_cls = Qwen2ForCausalLM if source.config.architecture == "qwen2" else LlamaForCausalLM
    # NOTE: random init of a 135M model costs seconds; every parameter is overwritten below
    # (buffers such as RoPE's inv_freq are still computed).
    with _no_init_weights():
        model = model_cls(config).to(torch.float32).eval()
    if source.config.tie_word_embeddings:
        model.tie_weights()
    params = model.state_dict()
    loaded = set()
    with torch.no_grad():
        # NOTE: copy weight by weight so only one dequantized tensor exists besides the model.
        for name, weight in source.iter_weights():
            if name not in params:
                raise KeyError(f"reference model has no parameter {name!r}")
            if params[name].shape != weight.shape:
                raise ValueError(f"{name}: shape {tuple(weight.shape)} != "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(weight)
            loaded.add(name)
    missing = set(params) - loaded
    if source.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("reference model did not tie lm_head to embed_tokens")
    missing = {n for n in missing if "rotary_emb" not in n}
    if missing:
        raise KeyError(f"weights missing from the source: {sorted(missing)}")
    return model


@torch.no_grad()
def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one sequence."""
    out = model(input_ids=torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, token_ids: list[int], max_new_tokens: int,
                        stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy generation with full re-computation each step (no cache: simple and exact)."""
    ids = list(token_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(reference_logits(model, ids)[-1].argmax())
        new.append(next_id)
        ids.append(next_id)
        if next_id in stop_ids:
            break
    return new


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Any:
    """A minimal `tokenizers` BPE tokenizer from gpt2-style GGUF vocab (test scaffolding only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])
    return tokenizer
