"""JSON for line-delimited output (SSE, NDJSON, log files): one object stays one line.

json.dumps escapes every ASCII control character, but with ensure_ascii=False it writes
U+0085 (NEXT LINE), U+2028 (LINE SEPARATOR) and U+2029 (PARAGRAPH SEPARATOR) raw, and
Python's str.splitlines(), which httpx's iter_lines (and so the ollama SDK and many SSE
readers) uses, breaks lines at all three: a generated U+2028 cut a chunk in two and the
client died on an unterminated string. Only these three are escaped (Go's encoder, hence
Ollama, escapes U+2028/U+2029): ensure_ascii=True would do it too, but would send every
other non-ASCII character as \\uXXXX, two to three times its UTF-8 size.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# NOTE: these characters only ever occur inside JSON strings (JSON's syntax is ASCII),
# where their \u escape decodes to the same text.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_line(obj: Any, *, compact: bool = True, default: Callable[[Any], Any] | None = None) -> str:
    """`obj` as JSON text with no character any line splitter breaks at (no newline added)."""
    text = json.dumps(obj, ensure_ascii=False, default=default,
                      separators=(",", ":") if compact else None)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.translate(_LINE_BREAKS)
    return text
