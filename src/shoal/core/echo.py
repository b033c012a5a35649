"""User input quoted back to people: every error message (and log line) that echoes something a
client sent goes through clip(), so a 15 MB model name cannot become a 15 MB reply or log record."""
from __future__ import annotations

ECHO_LIMIT = 256  # characters of one echoed value (an OCI reference is at most 255 bytes)


def clip(text: object, limit: int = ECHO_LIMIT) -> str:
    """`text` (str() of a non-string) cut to `limit` characters, saying how many were left out;
    lone surrogates (JSON can carry them, UTF-8 cannot) are shown escaped."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
