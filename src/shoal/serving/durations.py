"""Durations as Ollama writes them: a number of seconds, or a Go duration string ("5m", "1h30m").

A request's keep_alive (Ollama's dialect) and the server's duration settings (SHOAL_KEEP_ALIVE,
SHOAL_QUEUE_TIMEOUT, ...) are both read here.
"""
from __future__ import annotations

import math
import re
from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
             "h": 3600.0}
_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
FOREVER = float("inf")
# Longer than this (about 31 years) is "forever": expiry times stay representable as dates,
# and a client cannot pick a number no clock or /api/ps can handle.
MAX_SECONDS = 1e9


def _finite(value: Any, seconds: float) -> float:
    """`seconds` of a value written as a number: negative or over MAX_SECONDS is forever;
    NaN and infinities (JSON's NaN/Infinity, or 1e400 read as inf) are a 400."""
    if not math.isfinite(seconds):
        raise InvalidParameterError("keep_alive", f"{clip(repr(value))} is not a finite duration")
    return FOREVER if seconds < 0 or seconds > MAX_SECONDS else seconds


def parse_keep_alive(value: Any) -> float | None:
    """keep_alive in seconds (inf = keep loaded forever; None = not given).

    Ollama takes a number of seconds (negative = forever) or a Go duration string
    ("5m", "1h30m", "300ms", "0"; negative = forever). A plain number in a string
    ("300", "-1") is taken as seconds too, as OLLAMA_KEEP_ALIVE is. Anything over
    MAX_SECONDS is forever; NaN and infinities are refused.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidParameterError("keep_alive", "must be a duration string or a number of seconds")
    if isinstance(value, int):
        # NOTE: compared as an int: float() of a 400-digit JSON integer raises OverflowError.
        return FOREVER if value < 0 or value > MAX_SECONDS else float(value)
    if isinstance(value, float):
        return _finite(value, value)
    if not isinstance(value, str):
        raise InvalidParameterError("keep_alive", "must be a duration string or a number of seconds")
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return _finite(value, seconds)
    sign = 1.0
    body = text
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for match in _GO_DURATION.finditer(body):
        number = match.group(1)
        if match.start() != pos or number in ("", "."):
            break
        total += float(number) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise InvalidParameterError(
            "keep_alive", f"{clip(repr(value))} is not a duration (use e.g. \"5m\", \"1h\", \"30s\", 0 or -1)")
    # NOTE: a Go duration is written in digits, so it is never NaN; a huge one is forever.
    return FOREVER if (sign < 0 and total > 0) or total > MAX_SECONDS else total
