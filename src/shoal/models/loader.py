"""Entry point for model loading: resolve a model spec, open it as a ModelSource."""
from __future__ import annotations

from pathlib import Path

import torch

from shoal.errors import ModelNotFoundError, UnsupportedModelError
from shoal.models.default_model import DEFAULT_MODEL_ALIASES, ensure_default_model
from shoal.models.loaders import ModelSource
from shoal.models.loaders.gguf_loader import GGUF_MAGIC, GGUFModelSource
from shoal.models.loaders.hf_loader import HFModelSource

__all__ = ["ModelSource", "model_class_for", "open_model", "resolve_model"]


def resolve_model(spec: str | Path | None) -> Path:
    """None / "default" / "smollm2" -> the embedded default model (fetched if needed);
    anything else -> that filesystem path (~ expanded). Does not check existence."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in DEFAULT_MODEL_ALIASES):
        return ensure_default_model()
    return Path(spec).expanduser()


def open_model(path: str | Path) -> ModelSource:
    """Opens a .gguf file or a Hugging Face model directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        return HFModelSource(path)
    if not path.exists():
        raise ModelNotFoundError(str(path), "no such file or directory")
    if path.suffix.lower() == ".gguf":
        return GGUFModelSource(path)
    # NOTE: extension-less or renamed GGUF files are common (blob stores); sniff the magic.
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelNotFoundError(str(path), f"cannot read: {exc}") from None
    if magic == GGUF_MAGIC:
        return GGUFModelSource(path)
    if path.name == "config.json":
        return HFModelSource(path.parent)
    raise UnsupportedModelError(
        str(path), "not a GGUF file or a Hugging Face model directory")


def model_class_for(architecture: str) -> type[torch.nn.Module]:
    """The decoder class that computes `architecture` (a key of models.config.ARCHITECTURES)."""
    if architecture == "gemma3":
        from shoal.models.gemma3 import Gemma3ForCausalLM
        return Gemma3ForCausalLM
    from shoal.models.llama import LlamaForCausalLM
    return LlamaForCausalLM
