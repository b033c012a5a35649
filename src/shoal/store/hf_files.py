"""Which files of a Hugging Face model directory the store keeps (and the loader needs)."""
from __future__ import annotations

import re
from pathlib import Path

# NOTE: weights only as safetensors (pickled .bin/.pth can run code and the loader refuses
# them); configs, tokenizers and chat templates by name or extension.
_KEEP_SUFFIXES = (".safetensors", ".json", ".jinja", ".tiktoken")
_KEEP_NAMES = frozenset({"tokenizer.model", "merges.txt", "vocab.txt"})
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def is_model_file_name(name: str) -> bool:
    """True for a top-level file name the store keeps from a model directory."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        return False
    return name in _KEEP_NAMES or name.endswith(_KEEP_SUFFIXES)


def is_safe_title(name: str) -> bool:
    """A layer title usable as a file name in a materialised directory (no paths, no dots)."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


def select_model_files(names: list[str]) -> list[str]:
    """The top-level names to keep, sorted; [] unless config.json and a safetensors are there."""
    kept = sorted(n for n in names if "/" not in n and is_model_file_name(n))
    if "config.json" not in kept or not any(n.endswith(".safetensors") for n in kept):
        return []
    return kept


def model_dir_files(directory: Path) -> list[Path]:
    names = [p.name for p in directory.iterdir() if p.is_file()]
    return [directory / n for n in select_model_files(names)]
