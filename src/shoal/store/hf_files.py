"""Which files of a Hugging Face model directory the store keeps (and the loader needs).

An allow-list by exact name (and `*.safetensors`): a directory someone else filled may hold any
`*.json`, and whatever is kept ends up in a blob that a push sends out.
"""
from __future__ import annotations

import re

# NOTE: weights only as safetensors (pickled .bin/.pth can run code and the loader refuses
# them).
_WEIGHTS_SUFFIX = ".safetensors"
_KEEP_NAMES = frozenset({
    # the model
    "config.json", "generation_config.json", "model.safetensors.index.json",
    # tokenizers and chat templates (text/tokenizer.py, and the files transformers writes)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.json",
    "chat_template.jinja",
    # sentence-transformers models
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
})
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
# A PEFT adapter directory: what model/lora.py reads of it.
ADAPTER_FILE_NAMES = ("adapter_model.safetensors", "adapter_config.json")


def is_model_file_name(name: str) -> bool:
    """True for a top-level file name the store keeps from a model directory."""
    if not is_safe_title(name):
        return False
    return name in _KEEP_NAMES or name.endswith(_WEIGHTS_SUFFIX) or is_module_file_name(name)


def is_safe_title(name: str) -> bool:
    """A layer title usable as a file name in a materialised directory (no paths, no dots)."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


# A sentence-transformers module's config ("1_Pooling/config.json"), kept flat as
# "1_Pooling.config.json": the store's layers have no folders.
_MODULE_FILE = re.compile(r"[0-9]+_[A-Za-z]+\.config\.json")


def is_module_file_name(name: str) -> bool:
    return bool(_MODULE_FILE.fullmatch(name))


def module_folders(modules_json: bytes) -> list[str]:
    """The module folders a modules.json names whose config.json the store keeps ([] for
    anything unexpected: the loader then says what is missing)."""
    import json
    try:
        modules = json.loads(modules_json)
    except (ValueError, UnicodeDecodeError):
        return []
    folders = []
    for module in modules if isinstance(modules, list) else []:
        path = module.get("path") if isinstance(module, dict) else None
        if isinstance(path, str) and is_module_file_name(f"{path}.config.json"):
            folders.append(path)
    return folders


def select_model_files(names: list[str]) -> list[str]:
    """The top-level names to keep, sorted; [] unless config.json and a safetensors are there."""
    kept = sorted(n for n in names if "/" not in n and is_model_file_name(n))
    if "config.json" not in kept or not any(n.endswith(_WEIGHTS_SUFFIX) for n in kept):
        return []
    return kept


def select_adapter_files(names: list[str]) -> list[str]:
    return [n for n in ADAPTER_FILE_NAMES if n in names]
