"""shoal: self-hosted LLM serving with Ollama's ergonomics on a vLLM-style engine."""
from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.core.sampling_params import SamplingParams
from shoal.core.version import __version__

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from shoal.core.config import EngineConfig
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.llm import LLM


def __getattr__(name: str):
    # NOTE: lazy, so `import shoal` (e.g. for the CLI's --help) does not import torch.
    if name == "LLM":
        from shoal.engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from shoal.engine.async_engine import AsyncEngine
        return AsyncEngine
    if name == "EngineConfig":
        from shoal.core.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
