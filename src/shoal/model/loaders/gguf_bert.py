"""Reads a llama.cpp `bert` GGUF (an encoder such as all-MiniLM converted by convert_hf_to_gguf)
into HF-named float32 tensors for model/encoder.py."""
from __future__ import annotations

import mmap
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.core.errors import CorruptModelError
from shoal.model.loaders.dequant import check_supported, dequantize
from shoal.model.loaders.gguf_loader import read_gguf_header

# llama.cpp's names for a BERT block's tensors -> transformers' (inside encoder.layer.N.)
_BLOCK_NAMES = {
    "attn_q": "attention.self.query", "attn_k": "attention.self.key",
    "attn_v": "attention.self.value", "attn_output": "attention.output.dense",
    "attn_output_norm": "attention.output.LayerNorm", "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm",
}
_TOP_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    return f"encoder.layer.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


def _read_header(path: Path):
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return mm, read_gguf_header(mm, path.stat().st_size, str(path))


def gguf_architecture(path: Path) -> str | None:
    try:
        mm, header = _read_header(path)
    except (OSError, ValueError, CorruptModelError):
        return None
    mm.close()
    arch = header.metadata.get("general.architecture")
    return arch if isinstance(arch, str) else None


def gguf_metadata(path: Path) -> dict[str, Any]:
    mm, header = _read_header(path)
    mm.close()
    return header.metadata


def open_bert_gguf(path: Path) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]], str]:
    """(metadata, the weights in HF naming, the most common stored type)."""
    mm, header = _read_header(path)
    source = str(path)
    index = {}
    for name, info in header.tensors.items():
        target = hf_name(name)
        if target is None:
            continue      # e.g. a classifier head the encoder does not use
        check_supported(info.ggml_type, name, source)
        index[target] = info

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for target, info in index.items():
            # NOTE: copied out of the map (a small encoder), so no view keeps the file open
            raw = torch.from_numpy(np.frombuffer(mm, np.uint8, info.nbytes, info.offset).copy())
            yield target, dequantize(raw, info.ggml_type, info.shape, tensor_name=info.name,
                                     source=source).clone()
        del raw
        try:
            mm.close()
        except BufferError:
            pass        # a view is still referenced; the map closes when it is collected

    types = Counter(info.type_name for info in index.values())
    return header.metadata, weights(), types.most_common(1)[0][0] if types else "F32"
