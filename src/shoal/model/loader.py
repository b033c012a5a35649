"""Entry point for model loading: resolve a model spec, open it, pick the module that runs it."""
from __future__ import annotations

from pathlib import Path

from shoal.core.errors import ModelNotFoundError, UnsupportedModelError
from shoal.model.config import ARCHITECTURES
from shoal.model.decoder import CausalLM
from shoal.model.default_model import DEFAULT_MODEL_ALIASES, ensure_default_model
from shoal.model.loaders import ModelSource
from shoal.model.loaders.gguf_loader import GGUF_MAGIC, GGUFModelSource
from shoal.model.loaders.hf_loader import HFModelSource

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


def model_class_for(architecture: str) -> type[CausalLM]:
    """The module class that computes `architecture` (a key of model.config.ARCHITECTURES).

    Every supported family runs on the one decoder, shaped by its ArchitectureSpec; only a
    family those switches cannot express would need a class of its own here.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    return CausalLM
