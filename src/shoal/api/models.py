"""The models a server serves: their names (as both dialects spell them) and their engines.

Loading on demand, keep_alive and unloading belong to residency (a later layer); here a
model is loaded at start and stays.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.engine.async_engine import AsyncEngine
from shoal.engine.builder import EngineInfo
from shoal.errors import UnknownModelError
from shoal.tokenizer.tokenizer import Tokenizer


def normalize_name(name: str) -> str:
    """Ollama's rule: a name without a tag means ':latest'; names compare case-insensitively."""
    name = name.strip().lower()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass(slots=True)
class ServedModel:
    """One loaded model and what the API reports about it."""

    name: str
    engine: AsyncEngine
    info: EngineInfo
    aliases: tuple[str, ...] = ()
    loaded_at: float = field(default_factory=time.time)
    # Sampling defaults of the model (a Modelfile's PARAMETERs, in Ollama's names).
    default_options: dict[str, Any] = field(default_factory=dict)
    _digest: str | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def family(self) -> str:
        return self.info.model_config.architecture

    @property
    def size_bytes(self) -> int:
        path = Path(self.info.model_path)
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.exists() else 0

    @property
    def digest(self) -> str:
        """sha256 of the weights file (of config.json for a directory), computed once."""
        if self._digest is None:
            path = Path(self.info.model_path)
            target = path / "config.json" if path.is_dir() else path
            h = hashlib.sha256()
            with open(target, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return self._digest

    @property
    def parameter_size(self) -> str:
        """Ollama's style: '135M', '1.2B'."""
        n = self.info.num_parameters
        if n >= 1e9:
            return f"{n / 1e9:.1f}B"
        return f"{round(n / 1e6)}M"

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """The chat as prompt text (the model's template) and its token ids."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tools=tools or None)
        # NOTE: the template writes BOS itself when the model wants one.
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def supports_tools(self) -> bool:
        template = self.tokenizer.chat_template or ""
        return "tools" in template


class ModelRegistry:
    """Finds a served model by any of its names."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._names: dict[str, str] = {}

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model
        for name in (model.name, *model.aliases):
            self._names[normalize_name(name)] = model.name
            self._names[name.strip().lower()] = model.name

    def get(self, name: str | None) -> ServedModel:
        """The model a request names; raises UnknownModelError (404) otherwise."""
        if not name or not isinstance(name, str):
            raise UnknownModelError(str(name or ""), self.names())
        key = self._names.get(name.strip().lower()) or self._names.get(normalize_name(name))
        if key is None:
            raise UnknownModelError(name, self.names())
        return self._models[key]

    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self):
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def shutdown(self) -> None:
        for model in self._models.values():
            model.engine.shutdown()
