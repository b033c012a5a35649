"""EncoderConfig: a BERT-family encoder's hyper-parameters and how its outputs are pooled.

Read from a sentence-transformers directory (config.json, modules.json, the Pooling module's
config.json, sentence_bert_config.json) or from a GGUF file's `bert.*` metadata. Pooling and
normalisation come from the model's own files (a `Pooling` module's mode, a `Normalize` module;
GGUF `pooling_type`), never from a default chosen here.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.core.errors import CorruptModelError, UnsupportedModelError

POOLING_MODES = ("mean", "cls", "last", "max")
# llama.cpp's enum llama_pooling_type: NONE 0, MEAN 1, CLS 2, LAST 3, RANK 4
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}
HF_ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
# sentence-transformers module types that shoal runs (and must therefore understand)
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# the order sentence-transformers tries its pooling flags in
_ST_POOLING_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                     ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_lasttoken", "last"))


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """A BERT encoder (post-LayerNorm, absolute positions, GELU) and its sentence pooling."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    pooling: str                     # one of POOLING_MODES
    normalize: bool                  # the model ends with an L2 normalisation
    max_seq_length: int              # the longest input the model was trained to take
    # Matryoshka models may be cut to these sizes (largest first); () = only the full size
    matryoshka_dimensions: tuple[int, ...] = ()
    architecture: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "max_seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CorruptModelError(source, f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise CorruptModelError(source, f"hidden_size {self.hidden_size} is not divisible by "
                                            f"{self.num_heads} heads")
        if self.pooling not in POOLING_MODES:
            raise UnsupportedModelError(source, f"pooling {self.pooling!r} is not supported")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(str(path), f"cannot read JSON: {exc}") from None


def module_file(directory: Path, module_path: str, name: str) -> Path:
    """A sentence-transformers module's file: `<module>/<name>` in the original directory, or
    `<module>.<name>` where the store keeps it flat (its layers have no folders)."""
    nested = directory / module_path / name
    return nested if nested.is_file() else directory / f"{module_path}.{name}"


def is_encoder_config(hf_config: Mapping[str, Any]) -> bool:
    """Whether an HF config.json describes a BERT encoder (not a causal LM)."""
    archs = hf_config.get("architectures") or []
    return hf_config.get("model_type") == "bert" or any(a in HF_ENCODER_ARCHITECTURES for a in archs)


def st_pooling(directory: Path) -> tuple[str, bool] | None:
    """(pooling mode, normalize) from a sentence-transformers modules.json; None without one."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None
    source = str(modules_path)
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CorruptModelError(source, "modules.json is not a list of modules")
    pooling: str | None = None
    normalize = False
    for module in modules:
        kind = module.get("type")
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_NORMALIZE:
            normalize = True
        elif kind == _ST_POOLING:
            path = module.get("path")
            if not isinstance(path, str) or "/" in path or ".." in path or not path:
                raise CorruptModelError(source, f"pooling module path {path!r} is not a folder name")
            config = _read_json(module_file(directory, path, "config.json"))
            modes = [mode for flag, mode in _ST_POOLING_FLAGS
                     if isinstance(config, dict) and config.get(flag)]
            if len(modes) != 1:
                raise UnsupportedModelError(source, f"pooling {modes or 'none'}: shoal pools with "
                                                    "exactly one mode")
            pooling = modes[0]
        else:
            raise UnsupportedModelError(source, f"sentence-transformers module {kind!r} is not "
                                                "supported")
    if pooling is None:
        raise UnsupportedModelError(source, "modules.json has no Pooling module")
    return pooling, normalize


def encoder_config_from_hf(directory: Path) -> EncoderConfig:
    """The encoder of a sentence-transformers (or plain BERT) directory. A plain BERT
    directory has no pooling of its own: it is taken as CLS without normalisation, what
    transformers' BertModel pooler input is."""
    source = str(directory / "config.json")
    hf = _read_json(directory / "config.json")
    if not isinstance(hf, dict) or not is_encoder_config(hf):
        raise UnsupportedModelError(source, "not a BERT encoder config")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(source, "only absolute position embeddings are supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError(source, f"activation {hf.get('hidden_act')!r} is not supported")
    pooling, normalize = st_pooling(directory) or ("cls", False)
    max_positions = int(hf.get("max_position_embeddings", 512))
    max_seq = max_positions
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read_json(st_config)
        if isinstance(value, dict) and isinstance(value.get("max_seq_length"), int):
            max_seq = min(max_positions, value["max_seq_length"])
    dims = hf.get("matryoshka_dimensions") or ()
    config = EncoderConfig(
        vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"),
        intermediate_size=hf.get("intermediate_size"), num_layers=hf.get("num_hidden_layers"),
        num_heads=hf.get("num_attention_heads"), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=max_positions, type_vocab_size=int(hf.get("type_vocab_size", 2)),
        pooling=pooling, normalize=normalize, max_seq_length=max_seq,
        matryoshka_dimensions=tuple(sorted((int(d) for d in dims), reverse=True)))
    config.validate(source)
    return config


def encoder_config_from_gguf(meta: Mapping[str, Any], source: str) -> EncoderConfig:
    """The encoder of a llama.cpp `bert` GGUF; pooling from `bert.pooling_type`. llama.cpp's
    converter writes it from the sentence-transformers Pooling module; the normalisation is
    not stored, and llama.cpp's embedding examples normalise (as Ollama's /api/embed does)."""
    def key(name: str) -> Any:
        return meta.get(f"bert.{name}")
    pooling = GGUF_POOLING.get(key("pooling_type") if isinstance(key("pooling_type"), int) else -1)
    if pooling is None:
        raise UnsupportedModelError(source, f"bert.pooling_type {key('pooling_type')!r}: shoal "
                                            "needs mean, cls or last pooling")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    context = key("context_length")
    config = EncoderConfig(
        vocab_size=len(tokens), hidden_size=key("embedding_length"),
        intermediate_size=key("feed_forward_length"), num_layers=key("block_count"),
        num_heads=key("attention.head_count"),
        layer_norm_eps=float(key("attention.layer_norm_epsilon") or 1e-12),
        max_position_embeddings=context, type_vocab_size=2, pooling=pooling, normalize=True,
        max_seq_length=context)
    config.validate(source)
    return config
