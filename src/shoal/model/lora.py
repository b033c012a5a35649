"""LoRA adapters, merged into the base weights as they stream in: W' = W + scale * B @ A.

Two formats, each read into pairs named by the HF weight they change:

* PEFT: `adapter_config.json` (r, lora_alpha, use_rslora, ...) beside
  `adapter_model.safetensors`, whose tensors are `base_model.model.<module>.lora_A.weight`
  [r, in] and `...lora_B.weight` [out, r]; scale = lora_alpha / r (lora_alpha / sqrt(r) with
  use_rslora). The model store keeps the config inside the safetensors header
  (CONFIG_METADATA_KEY), so that one file is the whole adapter.
* GGUF, as llama.cpp's convert_lora_to_gguf writes it: `general.type = adapter`,
  `adapter.type = lora`, `adapter.lora.alpha`, tensors `<GGUF weight name>.lora_a` [r, in] and
  `.lora_b` [out, r]; scale = alpha / r, or 1 when alpha is 0 (llama.cpp's rule). The Q/K
  `lora_b` rows carry llama.cpp's RoPE row permutation, undone as for the base weights.

NOTE: merging before the model is built (instead of adding B(Ax) at run time) means exact and
fast mode, the int8 calibration and the C++ kernels all see ordinary weights, so an adapted
model serves at the base model's speed. The price: an adapter is part of a loaded model;
another adapter is another model (and another load).
"""
from __future__ import annotations

import json
import math
import mmap
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from shoal.core.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from shoal.model.config import GGUF_ARCHITECTURES, ModelConfig
from shoal.model.loaders.dequant import check_supported, dequantize
from shoal.model.loaders.gguf_loader import (GGUF_MAGIC, GGUFHeader, gguf_to_hf_name,
                                              read_gguf_header, unpermute_qk)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# safetensors header metadata key holding the PEFT config (JSON) in a self-contained adapter
CONFIG_METADATA_KEY = "shoal.adapter_config"

# `.default` appears when an adapter was saved with its PEFT adapter name left in the keys.
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<half>[AB])"
                       r"(?:\.[A-Za-z0-9_-]+)?\.weight")
_GGUF_KEY = re.compile(r"(?P<target>.+)\.lora_(?P<half>[ab])")
# NOTE: llama.cpp converts Mistral checkpoints as "llama"; both use the same names and layout.
_SAME_LAYOUT = ({"llama", "mistral"},)


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """Where an adapter's tensors are and what configures them (see `locate_adapter`)."""

    format: str                          # "gguf" | "safetensors" (PEFT)
    weights: Path                        # the GGUF or safetensors file
    peft_config: dict[str, Any] | None   # adapter_config.json's content (PEFT only)
    config_embedded: bool = False        # the config came from the safetensors header


@dataclass(frozen=True, slots=True)
class LoraPair:
    """One weight's low-rank update: scale * b @ a."""

    a: torch.Tensor   # [r, in], float32
    b: torch.Tensor   # [out, r], float32
    scale: float

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a).mul_(self.scale)


@dataclass(slots=True)
class LoraAdapter:
    """An adapter read for one base model: HF weight name (or, for a GGUF name no weight of
    this architecture has, that name) -> its update."""

    source: str
    pairs: dict[str, LoraPair]

    def check_fits(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raises UnsupportedModelError unless every update has a weight of its shape."""
        missing = sorted(name for name in self.pairs if name not in shapes)
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more"
                                              if len(missing) > 4 else "")
            raise UnsupportedModelError(
                self.source, f"the adapter changes weights this model does not have: {shown}")
        for name, pair in self.pairs.items():
            update = (pair.b.shape[0], pair.a.shape[1])
            if shapes[name] != update:
                have = "x".join(map(str, shapes[name]))
                raise UnsupportedModelError(
                    self.source, f"{name} is {have} in this model but the adapter's update is "
                                 f"{update[0]}x{update[1]}: the adapter was made for another "
                                 "base model")


def locate_adapter(path: str | Path) -> AdapterFiles:
    """Finds an adapter's files and checks their format (headers only):
    a PEFT directory, a PEFT safetensors file (its config embedded or beside it), or a GGUF."""
    path = Path(path).expanduser()
    source = str(path)
    if path.is_dir():
        weights = path / PEFT_WEIGHTS_FILE
        if not weights.is_file():
            hint = (" (adapter_model.bin is pickled and not read: save the adapter with "
                    "safetensors)" if (path / "adapter_model.bin").exists() else "")
            raise UnsupportedModelError(
                source, f"not a PEFT adapter directory: it has no {PEFT_WEIGHTS_FILE}{hint}")
        _check_lora_tensors(weights)
        return AdapterFiles("safetensors", weights, _read_peft_config(path / PEFT_CONFIG_FILE))
    if not path.is_file():
        raise ModelNotFoundError(source, "no such file or directory")
    if _is_gguf(path):
        with _GGUFFile(path) as gguf:
            _check_gguf_lora(gguf.header, source)
        return AdapterFiles("gguf", path, None)
    metadata = _check_lora_tensors(path)
    embedded = metadata.get(CONFIG_METADATA_KEY)
    if embedded is not None:
        return AdapterFiles("safetensors", path, _parse_peft_config(embedded, source),
                            config_embedded=True)
    beside = path.parent / PEFT_CONFIG_FILE
    if beside.is_file():
        return AdapterFiles("safetensors", path, _read_peft_config(beside))
    raise UnsupportedModelError(
        source, f"no {PEFT_CONFIG_FILE} beside this safetensors adapter (its lora_alpha sets "
                "the scale); give the adapter's directory")


def read_adapter(path: str | Path, model: ModelConfig) -> LoraAdapter:
    """Reads an adapter's tensors (as float32) for a base model with `model`'s config."""
    files = locate_adapter(path)
    if files.format == "gguf":
        return _read_gguf_lora(files.weights, model)
    return _read_peft(files)


def load_adapters(paths: Sequence[str | Path], model: ModelConfig) -> list[LoraAdapter]:
    """Reads each adapter and checks it against the model's weight shapes."""
    shapes = model.hf_weight_shapes()
    adapters = []
    for path in paths:
        adapter = read_adapter(path, model)
        adapter.check_fits(shapes)
        adapters.append(adapter)
    return adapters


def merge_adapters(weights: Iterable[tuple[str, torch.Tensor]], adapters: Sequence[LoraAdapter]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream with every adapter's update added, in the adapters' order."""
    for name, tensor in weights:
        for adapter in adapters:
            pair = adapter.pairs.get(name)
            if pair is not None:
                # NOTE: not in place: a float32 GGUF tensor is a view of the file's mapping.
                tensor = tensor + pair.delta().to(tensor.device, tensor.dtype)
        yield name, tensor


def self_contained_peft(files: AdapterFiles) -> bytes:
    """A PEFT adapter as one safetensors file with its config in the header (the store's
    layout: the blob alone is the adapter, wherever it is copied or referenced from)."""
    from safetensors.torch import load_file, save

    if files.peft_config is None:
        raise ValueError("self_contained_peft needs a PEFT adapter")
    # NOTE: one metadata key only: safetensors writes its metadata map in hash order, and a
    # fixed byte layout keeps the blob's digest the same for the same adapter.
    return save(load_file(files.weights),
                metadata={CONFIG_METADATA_KEY: json.dumps(files.peft_config, sort_keys=True)})


# -- PEFT --------------------------------------------------------------------------------------

def _read_peft_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UnsupportedModelError(str(path.parent), f"not a PEFT adapter directory: it has "
                                                      f"no {PEFT_CONFIG_FILE}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptModelError(str(path), f"cannot read: {exc}") from None
    return _parse_peft_config(text, str(path))


def _parse_peft_config(text: str, source: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptModelError(source, f"{PEFT_CONFIG_FILE} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CorruptModelError(source, f"{PEFT_CONFIG_FILE} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise UnsupportedModelError(source, f"peft_type {peft_type!r} is not supported (LORA is)")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)"),
                      ("alpha_pattern", "per-module lora_alpha (alpha_pattern)")):
        if config.get(key):
            raise UnsupportedModelError(source, f"{what} adapters are not supported")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CorruptModelError(source, f"{PEFT_CONFIG_FILE}: lora_alpha must be a number, "
                                        f"got {alpha!r}")
    return config


def _check_lora_tensors(path: Path) -> dict[str, str]:
    """Checks a safetensors file holds LoRA tensors; returns its header metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError):
        raise UnsupportedModelError(str(path), "not a LoRA adapter: neither a GGUF nor a "
                                               "safetensors file") from None
    if not any(_PEFT_KEY.fullmatch(key) for key in keys):
        raise UnsupportedModelError(str(path), "this safetensors file is not a LoRA adapter "
                                               "(no lora_A/lora_B tensors)")
    return metadata


def _peft_scale(config: Mapping[str, Any], rank: int, name: str, source: str) -> float:
    configured = config.get("r")
    # NOTE: with a rank_pattern, ranks differ per module; the tensors carry each one.
    if not config.get("rank_pattern") and isinstance(configured, int) and configured != rank:
        raise CorruptModelError(source, f"{name}: the tensors have rank {rank} but "
                                        f"{PEFT_CONFIG_FILE} says r = {configured}")
    alpha = float(config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_peft(files: AdapterFiles) -> LoraAdapter:
    source = str(files.weights)
    config = files.peft_config or {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(files.weights), framework="pt") as f:
            for key in f.keys():
                match = _PEFT_KEY.fullmatch(key)
                if match is None:
                    raise UnsupportedModelError(
                        source, f"unexpected tensor {key!r}: only lora_A/lora_B pairs are "
                                "applied (not modules_to_save, embedding LoRA or DoRA)")
                halves.setdefault(match["module"] + ".weight", {})[match["half"]] = \
                    f.get_tensor(key).float()
    except SafetensorError as exc:
        raise CorruptModelError(source, f"cannot read the adapter's tensors: {exc}") from None
    return LoraAdapter(source, _pairs(halves, source,
                                      lambda name, r: _peft_scale(config, r, name, source)))


# -- GGUF --------------------------------------------------------------------------------------

class _GGUFFile:
    """A GGUF file's parsed header over a private memory map (tensor views need clone())."""

    def __init__(self, path: Path) -> None:
        size = path.stat().st_size
        if size < 24:
            raise CorruptModelError(str(path), f"file too small to be a GGUF file ({size} bytes)")
        self._file = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        self.map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self.header: GGUFHeader = read_gguf_header(self.map, size, str(path))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _GGUFFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass   # a tensor view still references it; it closes when collected
        self._file.close()


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_gguf_lora(header: GGUFHeader, source: str) -> None:
    meta = header.metadata
    kind = meta.get("general.type")
    if kind != "adapter" and not any(_GGUF_KEY.fullmatch(name) for name in header.tensors):
        raise UnsupportedModelError(
            source, f"this GGUF is not a LoRA adapter (general.type is {kind!r} and no tensor is "
                    "named *.lora_a/*.lora_b)")
    adapter_type = meta.get("adapter.type", "lora")
    if adapter_type != "lora":
        raise UnsupportedModelError(source, f"adapter.type {adapter_type!r} is not supported "
                                            "(lora is)")


def _check_architecture(adapter_arch: Any, model: ModelConfig, source: str) -> None:
    if not isinstance(adapter_arch, str):
        return
    ours = GGUF_ARCHITECTURES.get(adapter_arch, adapter_arch)
    if ours == model.architecture or any({ours, model.architecture} <= same
                                         for same in _SAME_LAYOUT):
        return
    raise UnsupportedModelError(source, f"the adapter is for {adapter_arch!r} models, this model "
                                        f"is {model.architecture!r}")


def _read_gguf_lora(path: Path, model: ModelConfig) -> LoraAdapter:
    source = str(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    with _GGUFFile(path) as gguf:
        meta = gguf.header.metadata
        _check_gguf_lora(gguf.header, source)
        _check_architecture(meta.get("general.architecture"), model, source)
        alpha = meta.get("adapter.lora.alpha", 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise CorruptModelError(source, f"adapter.lora.alpha must be a number, got {alpha!r}")
        for name, info in gguf.header.tensors.items():
            match = _GGUF_KEY.fullmatch(name)
            if match is None:
                raise UnsupportedModelError(source, f"unexpected tensor {name!r} in a LoRA adapter "
                                                    "(only *.lora_a/*.lora_b pairs)")
            check_supported(info.ggml_type, name, source)
            raw = torch.from_numpy(np.frombuffer(gguf.map, np.uint8, info.nbytes, info.offset))
            tensor = dequantize(raw, info.ggml_type, info.shape, tensor_name=name, source=source)
            target = gguf_to_hf_name(match["target"], model.architecture) or match["target"]
            halves.setdefault(target, {})[match["half"].upper()] = tensor.float().clone()

    def scale(_name: str, rank: int) -> float:
        return float(alpha) / rank if alpha else 1.0

    pairs = _pairs(halves, source, scale)
    if model.spec.gguf_qk_permuted:
        for name, pair in pairs.items():
            heads = (model.num_heads if ".q_proj." in name else
                     model.num_kv_heads if ".k_proj." in name else 0)
            if heads:
                pairs[name] = LoraPair(pair.a, unpermute_qk(pair.b, heads), pair.scale)
    return LoraAdapter(source, pairs)


# -- shared ------------------------------------------------------------------------------------

def _pairs(halves: Mapping[str, Mapping[str, torch.Tensor]], source: str,
           scale: Callable[[str, int], float]) -> dict[str, LoraPair]:
    """{weight: {"A": a, "B": b}} -> {weight: LoraPair}, checking that A and B fit together."""
    if not halves:
        raise UnsupportedModelError(source, "the adapter holds no LoRA tensors")
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"A", "B"}:
            have = "A" if "A" in half else "B"
            raise CorruptModelError(source, f"{name}: the adapter has lora_{have} without its "
                                            f"other half")
        a, b = half["A"], half["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptModelError(source, f"{name}: lora_A {list(a.shape)} and lora_B "
                                            f"{list(b.shape)} do not form a rank-r pair")
        pairs[name] = LoraPair(a, b, scale(name, a.shape[0]))
    return pairs
