"""The names the API layers use for models (the implementations live in shoal.residency)."""
from __future__ import annotations

from shoal.residency.catalog import ModelSpec, normalize_name
from shoal.residency.manager import ResidencyManager
from shoal.residency.served import ServedModel

__all__ = ["ModelSpec", "ResidencyManager", "ServedModel", "normalize_name"]
