"""Opens an encoder model (a sentence-transformers / BERT directory, or a llama.cpp `bert` GGUF)
and builds the SentenceEncoder and tokenizer that run it."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shoal.core.errors import (
    CorruptModelError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from shoal.model.encoder import SentenceEncoder
from shoal.model.encoder_config import (
    EncoderConfig,
    encoder_config_from_gguf,
    encoder_config_from_hf,
    is_encoder_config,
)
from shoal.model.layers.quantize import CALIBRATION_TEXT
from shoal.model.loaders.gguf_bert import (
    gguf_architecture,
    gguf_metadata,
    open_bert_gguf,
)
from shoal.model.loaders.gguf_loader import GGUF_MAGIC
from shoal.text.tokenizer import Tokenizer

GGUF_ENCODER_ARCHITECTURES = ("bert",)


@dataclass(slots=True)
class LoadedEncoder:
    path: Path
    format: str                   # "hf" | "gguf"
    config: EncoderConfig
    tokenizer: Tokenizer
    model: SentenceEncoder
    num_parameters: int
    quantization: str


def is_encoder_model(path: str | Path) -> bool:
    """Whether `path` is an encoder this module loads (checked cheaply: config or header)."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(config, dict) and is_encoder_config(config)
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return False
    except OSError:
        return False
    return gguf_architecture(path) in GGUF_ENCODER_ARCHITECTURES


def _safetensors_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CorruptModelError(str(directory), "no *.safetensors weights in the directory")
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not dicts
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise CorruptModelError(str(file), f"cannot read safetensors: {exc}") from None


def check_encoder(path: str | Path) -> EncoderConfig:
    """The encoder's config, read and checked without loading weights (the store's create)."""
    path = Path(path).expanduser()
    if path.is_dir():
        config = encoder_config_from_hf(path)
        if not any(path.glob("*.safetensors")):
            raise CorruptModelError(str(path), "no *.safetensors weights in the directory")
        return config
    return encoder_config_from_gguf(gguf_metadata(path), str(path))


def load_encoder(path: str | Path, compute: str = "exact",
                 device: torch.device | str = "cpu") -> LoadedEncoder:
    """Builds the encoder; fast mode on the CPU calibrates and packs its linears as int8."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(str(path), "no such file or directory")
    if path.is_dir():
        config = encoder_config_from_hf(path)
        tokenizer = Tokenizer.from_hf_dir(path)
        model = SentenceEncoder(config, _safetensors_weights(path), source=str(path))
        fmt, quantization = "hf", "F32"
    else:
        meta, weights, quantization = open_bert_gguf(path)
        config = encoder_config_from_gguf(meta, str(path))
        tokenizer = Tokenizer.from_gguf_metadata(meta, str(path))
        model = SentenceEncoder(config, weights, source=str(path))
        fmt = "gguf"
    if tokenizer.vocab_size < config.vocab_size - 1 or tokenizer.vocab_size > config.vocab_size + 64:
        raise UnsupportedModelError(str(path), f"the tokenizer has {tokenizer.vocab_size} tokens, "
                                               f"the model {config.vocab_size}")
    model = model.to(device).eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    if compute == "fast" and torch.device(device).type == "cpu":
        # NOTE: whole inputs as the model sees them ([CLS] ... [SEP], whatever its specials
        # are), and the shortest ones too: their special-token rows carry the largest values.
        text = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)
        empty = tokenizer.encode("")
        head = tokenizer.special_affixes()[0]
        window = max(8, config.max_seq_length - len(empty))
        model.quantize_int8([empty[:head] + text[i:i + window] + empty[head:]
                             for i in range(0, len(text), window)]
                            + [empty, tokenizer.encode("a")])
    return LoadedEncoder(path=path, format=fmt, config=config, tokenizer=tokenizer, model=model,
                         num_parameters=num_parameters, quantization=quantization)
