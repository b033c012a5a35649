"""Opens a Hugging Face model directory (config.json + safetensors, optionally sharded)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shoal.core.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from shoal.model.config import ModelConfig
from shoal.model.loaders import ModelSource

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# checkpoint entries that are not weights (old transformers saved RoPE caches)
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(str(path), f"cannot read JSON: {exc}") from None


class HFModelSource(ModelSource):
    """A Hugging Face checkpoint directory, read lazily through safetensors' mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = "hf"
        self.metadata = None
        source = str(self.path)
        if not self.path.is_dir():
            raise ModelNotFoundError(source, "no such model directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(str(config_path), "model directory has no config.json")
        hf_config = _read_json(config_path)
        if not isinstance(hf_config, dict):
            raise CorruptModelError(str(config_path), "config.json is not a JSON object")
        self.hf_config: dict[str, Any] = hf_config
        self.config = ModelConfig.from_hf_config(hf_config, str(config_path))
        self._handles: dict[Path, Any] = {}
        self._closed = False
        try:
            self._locations = self._locate_weights()
            self._check_weights()
        except BaseException:
            self.close()
            raise

    def _locate_weights(self) -> dict[str, Path]:
        """Maps every tensor name in the checkpoint to the safetensors file holding it."""
        index_path = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CorruptModelError(str(index_path), "index has no 'weight_map' object")
            locations = {name: self.path / str(shard) for name, shard in weight_map.items()}
            for shard in sorted(set(locations.values())):
                if not shard.is_file():
                    raise CorruptModelError(str(shard), "shard listed in the index is missing")
            return locations
        if single.is_file():
            return {name: single for name in self._handle(single).keys()}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pth")):
            raise UnsupportedModelError(
                str(self.path), "only safetensors checkpoints are supported (found PyTorch "
                                ".bin/.pth files)")
        raise CorruptModelError(str(single), f"no {SINGLE_FILE} or {INDEX_FILE} in the directory")

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CorruptModelError(
                    str(file), f"not a readable safetensors file: {exc}") from None
            self._handles[file] = handle
        return handle

    def _check_weights(self) -> None:
        expected = self.config.hf_weight_shapes()
        present = {n: f for n, f in self._locations.items() if not _IGNORED.fullmatch(n)}
        for name in present:
            if name not in expected and not (name == "lm_head.weight"
                                             and self.config.tie_word_embeddings):
                raise UnsupportedModelError(
                    str(present[name]), f"unexpected tensor {name!r} for architecture "
                                        f"{self.config.architecture!r}")
        self.weight_types = {}
        for name, shape in expected.items():
            file = present.get(name)
            if file is None:
                raise CorruptModelError(str(self.path), f"missing tensor {name!r}")
            handle = self._handle(file)
            try:
                tensor_slice = handle.get_slice(name)
            except SafetensorError:
                raise CorruptModelError(str(file), f"missing tensor {name!r} (listed in the "
                                                   "index)") from None
            stored_shape = tuple(tensor_slice.get_shape())
            if stored_shape != shape:
                raise CorruptModelError(
                    str(file), f"tensor {name!r} has shape {list(stored_shape)}, expected "
                               f"{list(shape)} for this config")
            dtype = tensor_slice.get_dtype()
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise UnsupportedModelError(str(file), f"tensor {name!r} has dtype {dtype}")
            self.weight_types[name] = dtype

    def get_weight(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """One weight by HF name as float32."""
        if name not in self.weight_types:
            raise KeyError(name)
        if self._closed:
            raise RuntimeError(f"{self.path}: model source is closed")
        file = self._locations[name]
        try:
            tensor = self._handle(file).get_tensor(name)
        except SafetensorError as exc:
            raise CorruptModelError(str(file), f"cannot read tensor {name!r}: {exc}") from None
        # NOTE: move first, widen second: a bf16/f16 transfer is half the bytes.
        return tensor.to(device or "cpu").to(torch.float32)

    def iter_weights(self, device: torch.device | str | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in list(self.weight_types):
            yield name, self.get_weight(name, device)

    def close(self) -> None:
        self._closed = True
        self._handles.clear()
        self._locations = {}
