"""Reads a GGUF file's key/value metadata into plain Python values."""
from __future__ import annotations

from typing import Any

from gguf import GGUFReader, GGUFValueType


def read_gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Returns {key: value} with strings decoded, numbers as int/float/bool, arrays as lists.

    Skips the reader's pseudo-keys (GGUF.version etc.), which describe the container.
    """
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(field)
    return metadata


def _field_value(field: Any) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        item_type = types[-1] if len(types) > 1 else None
        if item_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    if types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value
