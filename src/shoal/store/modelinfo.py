"""Cheap facts about model files: format, family, parameter count, quantization.

Everything here reads headers only (a GGUF's metadata and tensor table, a safetensors file's
JSON header), never tensor data. The results go into a model's config blob, so listing
models never opens a weights file.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.core.errors import CorruptModelError, ModelLoadError

GGUF_MAGIC = b"GGUF"
# safetensors dtype -> the name Ollama shows as quantization_level
_ST_DTYPES = {"F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16", "I8": "I8", "U8": "U8",
              "F8_E4M3": "F8_E4M3", "F8_E5M2": "F8_E5M2"}
_MAX_ST_HEADER = 100 << 20


@dataclass(slots=True)
class ModelDetails:
    """Ollama's `details` object (plus the raw parameter count)."""

    format: str = ""                  # "gguf" | "safetensors"
    family: str = ""
    families: list[str] = field(default_factory=list)
    parameter_size: str = ""          # "134.52M"
    quantization_level: str = ""      # "Q4_1", "BF16", ...
    parameter_count: int = 0
    parent_model: str = ""            # the model a Modelfile's FROM named (Ollama's field)

    def to_json(self) -> dict[str, Any]:
        return {"parent_model": self.parent_model, "format": self.format, "family": self.family,
                "families": list(self.families), "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level}

    def to_config(self, layer_digests: list[str]) -> dict[str, Any]:
        """The model's config blob, in the keys Ollama's ConfigV2 uses."""
        return {"model_format": self.format, "model_family": self.family,
                "model_families": list(self.families), "model_type": self.parameter_size,
                "file_type": self.quantization_level, "parameter_count": self.parameter_count,
                **({"parent_model": self.parent_model} if self.parent_model else {}),
                "rootfs": {"type": "layers", "diff_ids": list(layer_digests)}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDetails:
        def text(key: str) -> str:
            value = config.get(key)
            return value if isinstance(value, str) else ""
        families = config.get("model_families")
        count = config.get("parameter_count")
        return cls(format=text("model_format"), family=text("model_family"),
                   families=[f for f in families if isinstance(f, str)]
                   if isinstance(families, list) else [],
                   parameter_size=text("model_type"), quantization_level=text("file_type"),
                   parameter_count=count if isinstance(count, int) else 0,
                   parent_model=text("parent_model"))


def human_parameter_count(n: int) -> str:
    """134_515_008 -> "134.52M", 8_030_261_248 -> "8.0B" (Ollama's style)."""
    for scale, suffix, digits in ((1e12, "T", 1), (1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 2)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return str(n)


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: Path) -> Any:
    """The parsed GGUF header (metadata + tensor table) of `path`."""
    from shoal.model.loaders.gguf_loader import read_gguf_header

    size = path.stat().st_size
    if size < 24:
        raise CorruptModelError(str(path), f"file too small to be a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return read_gguf_header(mm, size, str(path))


def _file_type_name(value: Any) -> str:
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(value)).name
    except (ImportError, ValueError, TypeError):
        return ""
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def gguf_details(path: Path) -> ModelDetails:
    header = read_gguf(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    count = sum(math.prod(info.dims) for info in header.tensors.values())
    quant = _file_type_name(meta.get("general.file_type")) if "general.file_type" in meta else ""
    if not quant and header.tensors:
        by_bytes: Counter[str] = Counter()
        for info in header.tensors.values():
            by_bytes[info.type_name] += info.nbytes
        quant = by_bytes.most_common(1)[0][0]
    return ModelDetails(format="gguf", family=arch, families=[arch] if arch else [],
                        parameter_size=human_parameter_count(count), quantization_level=quant,
                        parameter_count=count)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file ({tensor: {dtype, shape, data_offsets}, ...})."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptModelError(str(path), "file too small to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_ST_HEADER or length > path.stat().st_size - 8:
                raise CorruptModelError(str(path), f"not a safetensors file (header length {length})")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(str(path), f"not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptModelError(str(path), "safetensors header is not a JSON object")
    return header


def _safetensors_tensors(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def hf_dir_details(directory: Path) -> ModelDetails:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(str(directory / "config.json"), f"cannot read: {exc}") from None
    family = config.get("model_type") if isinstance(config, dict) else None
    family = family if isinstance(family, str) else ""
    count = 0
    dtypes: Counter[str] = Counter()
    for file in sorted(directory.glob("*.safetensors")):
        for info in _safetensors_tensors(read_safetensors_header(file)).values():
            shape = info.get("shape") or []
            n = math.prod(shape) if all(isinstance(d, int) for d in shape) else 0
            count += n
            dtypes[_ST_DTYPES.get(str(info.get("dtype")), str(info.get("dtype")))] += n
    quant = dtypes.most_common(1)[0][0] if dtypes else ""
    return ModelDetails(format="safetensors", family=family, families=[family] if family else [],
                        parameter_size=human_parameter_count(count) if count else "",
                        quantization_level=quant, parameter_count=count)


def model_info(path: Path, max_array: int = 64) -> dict[str, Any]:
    """A GGUF's metadata for /api/show's model_info (long arrays such as the vocabulary are
    replaced by None, as Ollama does without `verbose`); {} for other formats."""
    if not path.is_file() or not is_gguf(path):
        return {}
    try:
        header = read_gguf(path)
    except ModelLoadError:
        return {}
    return {k: (None if isinstance(v, list) and len(v) > max_array else v)
            for k, v in header.metadata.items()}
