"""Model file readers (GGUF, Hugging Face directories) behind one ModelSource interface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from shoal.model.config import ModelConfig


class ModelSource(ABC):
    """An opened model: config, provenance, and its weights streamed in HF naming."""

    path: Path
    format: str  # "gguf" | "hf"
    config: ModelConfig
    metadata: dict[str, Any] | None  # GGUF key/values (tokenizer, chat template); None for HF
    weight_types: dict[str, str]  # HF weight name -> stored type ("Q4_1", "BF16", ...)

    @abstractmethod
    def iter_weights(self, device: torch.device | str | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (hf_name, float32 tensor) one weight at a time, on `device` (default CPU)."""

    @abstractmethod
    def close(self) -> None:
        """Releases file handles and mappings; iter_weights fails afterwards."""

    def weight_names(self) -> list[str]:
        """The HF names iter_weights yields, in order."""
        return list(self.weight_types)

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        arch = self.config.architecture
        return f"{type(self).__name__}({str(self.path)!r}, architecture={arch!r})"
