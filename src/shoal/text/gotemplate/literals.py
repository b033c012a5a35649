"""Go literal text to values: quoted strings and character constants (strconv.Unquote) and
numbers typed as Go's idealConstant types them."""
from __future__ import annotations

import re

from shoal.text.gotemplate import gofmt

_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def unquote(lit: str) -> str:
    """strconv.Unquote for "..." and '...' literals (`...` raw strings drop their \\r)."""
    q = lit[0]
    if q == "`":
        return lit[1:-1].replace("\r", "")
    body = lit[1:-1]
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            if c == q:
                raise ValueError("invalid syntax")
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError("invalid syntax")
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e == q:
            out.append(ord(q))
            i += 2
        elif e in "xuU":
            size = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + size]
            if len(digits) != size or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("invalid syntax")
            v = int(digits, 16)
            if e == "x":
                out.append(v)
            else:
                if v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                    raise ValueError("invalid syntax")
                out += chr(v).encode("utf-8")
            i += 2 + size
        elif e in "01234567":
            digits = body[i + 1:i + 4]
            if len(digits) != 3 or not all(d in "01234567" for d in digits) or int(digits, 8) > 255:
                raise ValueError("invalid syntax")
            out.append(int(digits, 8))
            i += 4
        else:
            raise ValueError("invalid syntax")
    text = out.decode("utf-8", "replace")
    if q == "'" and len(text) != 1:
        raise ValueError("invalid syntax")
    return text


def parse_number(text: str) -> int | float:
    """A number literal's value as Go's idealConstant types it: int unless it looks like a float."""
    t = text
    if t.endswith("i"):
        raise ValueError("complex constants are not supported")
    body = t.lstrip("+-")
    neg = t.startswith("-")
    is_hex = body[:2].lower() == "0x"
    looks_float = ("p" in body.lower()) if is_hex else any(ch in body for ch in ".eE")
    if not looks_float:
        if re.fullmatch(r"0[0-7]+", body):
            v = int(body, 8)
        else:
            try:
                v = int(body, 0)
            except ValueError:
                raise ValueError(f"illegal number syntax: {gofmt.go_quote(text)}") from None
        v = -v if neg else v
        if not -(1 << 63) <= v < (1 << 63):
            raise ValueError(f"{text} overflows int")
        return v
    try:
        f = float.fromhex(t) if is_hex else float(t.replace("_", ""))
    except ValueError:
        raise ValueError(f"illegal number syntax: {gofmt.go_quote(text)}") from None
    return f
