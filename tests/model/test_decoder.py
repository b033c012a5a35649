"""The one decoder (shoal.model.decoder): every architecture is built from its spec and config.

The numerics are checked against transformers elsewhere (test_gemma3.py, the engine reference
tests); these check the wiring the architecture table drives: which HF weights a layer takes,
where each norm goes, and that nothing a config names is left out.
"""
from __future__ import annotations

import math

import pytest
import torch

from shoal.core.errors import CorruptModelError
from shoal.model.config import ARCHITECTURES, FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from shoal.model.decoder import CausalLM
from shoal.model.full_sequence import forward_single_sequence
from shoal.model.loader import model_class_for


def _config(architecture: str) -> ModelConfig:
    spec = ARCHITECTURES[architecture]
    local: dict = {}
    if architecture == "gemma3":
        local = dict(sliding_window=4, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION),
                     rope_local_theta=1_000.0, query_pre_attn_scalar=12.0,
                     final_logit_softcapping=30.0)
    config = ModelConfig(architecture=architecture, vocab_size=50, hidden_size=32,
                         intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, rms_norm_eps=1e-6, rope_theta=10_000.0,
                         max_position_embeddings=64, tie_word_embeddings=not spec.qkv_bias,
                         attention_bias=spec.qkv_bias, **local)
    config.validate(architecture)
    return config


def _weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=g)
            for name, shape in config.hf_weight_shapes().items()}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_runs_on_the_decoder_with_every_weight_its_config_names(
        architecture: str) -> None:
    config = _config(architecture)
    assert model_class_for(architecture) is CausalLM
    weights = _weights(config)
    model = CausalLM(config, weights.items())
    # each named weight is held once (q/k/v and gate/up fused, a tied head shared)
    assert sum(p.numel() for p in model.parameters()) == sum(
        math.prod(shape) for shape in config.hf_weight_shapes().values())
    hidden = forward_single_sequence(model, [1, 7, 3, 9, 4, 4, 2, 8])
    logits = model.compute_logits(hidden)
    assert logits.shape == (8, 50) and torch.isfinite(logits).all()
    if config.final_logit_softcapping:
        assert logits.abs().max() < config.final_logit_softcapping


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_layer_missing_a_weight_is_refused(architecture: str) -> None:
    config = _config(architecture)
    weights = _weights(config)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CorruptModelError, match="layer 1 is missing tensors"):
        CausalLM(config, weights.items())


def test_norms_go_where_the_family_applies_them() -> None:
    """Llama's post_attention_layernorm feeds the MLP; Gemma's normalises the attention output
    (its MLP input norm is pre_feedforward_layernorm), and Gemma's norms scale by 1 + w."""
    llama = _config("llama")
    weights = _weights(llama)
    layer = CausalLM(llama, weights.items()).layers[0]
    assert torch.equal(layer.mlp_norm.weight,
                       weights["model.layers.0.post_attention_layernorm.weight"])
    assert layer.attn_out_norm is None and layer.mlp_out_norm is None
    assert layer.attention.q_norm is None

    gemma = _config("gemma3")
    weights = _weights(gemma)
    model = CausalLM(gemma, weights.items())
    layer = model.layers[0]
    p = "model.layers.0."
    for norm, name in ((layer.attn_norm, "input_layernorm"),
                       (layer.attn_out_norm, "post_attention_layernorm"),
                       (layer.mlp_norm, "pre_feedforward_layernorm"),
                       (layer.mlp_out_norm, "post_feedforward_layernorm"),
                       (layer.attention.q_norm, "self_attn.q_norm")):
        assert torch.equal(norm.weight, 1.0 + weights[f"{p}{name}.weight"]), name
    assert [layer.window for layer in model.layers] == [4, 0]
    assert model.rope_local is not model.rope_global


def test_unknown_architecture_has_no_decoder() -> None:
    with pytest.raises(ValueError, match="gpt2"):
        model_class_for("gpt2")
