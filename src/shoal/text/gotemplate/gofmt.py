"""Go values in Python, and how Go prints them: fmt's %v, Sprint/Sprintln/Sprintf, strconv's
quoting, encoding/json, and text/template's html/js/urlquery escapers.

Python values stand for Go values as a template sees them:

    None -> nil          bool -> bool          int -> int          float -> float64
    str -> string        list/tuple -> []any   dict -> map[string]any

plus three wrappers for typed Go values that plain Python types cannot express:

    GoStruct  a struct (or pointer to one): named fields, JSON tags, optional String()
    GoSlice   a typed slice: may be a *nil* slice (JSON null), may have String()/MarshalJSON
    GoMap     a typed map: may be nil, may have String(), may marshal in insertion order

Only what Ollama's templates and their data need is modelled; everything here is pure
functions over these values.
"""
from __future__ import annotations

import base64
import math
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class GoFuncError(Exception):
    """A builtin function failed; the evaluator reports it as `error calling NAME: ...`."""


# ---- typed Go values ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Field:
    """One struct field: its Go name, its JSON name (None: the Go name) and `omitempty`."""
    name: str
    json: str | None = None
    omitempty: bool = False


@dataclass(frozen=True, slots=True)
class StructType:
    """A Go struct type. `stringer` gives the struct a String() method (fmt and templates
    print what it returns); `pointer` makes values print and type as *T."""
    name: str
    fields: tuple[Field, ...]
    stringer: Callable[[GoStruct], str] | None = None
    pointer: bool = False

    @property
    def go_name(self) -> str:
        return ("*" if self.pointer else "") + self.name

    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)


class GoStruct:
    """A value of a StructType; fields are read with `.Name` in templates."""
    __slots__ = ("type", "values")

    def __init__(self, type_: StructType, **values: Any) -> None:
        unknown = set(values) - type_.field_names()
        if unknown:
            raise TypeError(f"{type_.name} has no fields {sorted(unknown)}")
        self.type = type_
        self.values = {f.name: values.get(f.name) for f in type_.fields}

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __repr__(self) -> str:
        return f"GoStruct({self.type.name}, {self.values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoStruct) and other.type is self.type and other.values == self.values

    __hash__ = None  # type: ignore[assignment]


class GoSlice(list):
    """A typed Go slice. `nil` marks a nil slice (JSON `null`, `[]` when printed)."""
    __slots__ = ("go_type", "nil", "stringer", "marshal")

    def __init__(self, items: Any = (), *, go_type: str = "[]interface {}", nil: bool = False,
                 stringer: Callable[[GoSlice], str] | None = None,
                 marshal: Callable[[GoSlice], str] | None = None) -> None:
        super().__init__(items)
        self.go_type = go_type
        self.nil = nil and not self
        self.stringer = stringer
        self.marshal = marshal


class GoMap(dict):
    """A typed Go map. `nil` marks a nil map; `ordered` marshals keys in insertion order (a
    Go map marshals and ranges in sorted key order)."""
    __slots__ = ("go_type", "nil", "stringer", "ordered")

    def __init__(self, items: Any = (), *, go_type: str = "map[string]interface {}", nil: bool = False,
                 stringer: Callable[[GoMap], str] | None = None, ordered: bool = False) -> None:
        super().__init__(items)
        self.go_type = go_type
        self.nil = nil and not self
        self.stringer = stringer
        self.ordered = ordered


def go_type_name(v: Any) -> str:
    """The Go type of a value, as %T and error messages write it."""
    if v is None:
        return "<nil>"
    if v is True or v is False:
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, complex):
        return "complex128"
    if isinstance(v, str):
        return "string"
    if isinstance(v, GoStruct):
        return v.type.go_name
    if isinstance(v, (GoSlice, GoMap)):
        return v.go_type
    if isinstance(v, (list, tuple)):
        return "[]interface {}"
    if isinstance(v, Mapping):
        return "map[string]interface {}"
    return type(v).__name__


def stringer_of(v: Any) -> Callable[[], str] | None:
    """v's String() method, if its Go type has one."""
    if isinstance(v, GoStruct):
        fn = v.type.stringer
        return (lambda: fn(v)) if fn else None
    if isinstance(v, (GoSlice, GoMap)) and v.stringer is not None:
        fn2 = v.stringer
        return lambda: fn2(v)
    return None


def sorted_keys(m: Mapping[Any, Any]) -> list[Any]:
    """A Go map's keys in the order fmt, range and encoding/json use: sorted by value."""
    def key(k: Any) -> tuple:
        if k is True or k is False:
            return (0, k, "")
        if isinstance(k, (int, float)):
            return (1, k, "")
        if isinstance(k, str):
            return (2, 0, k)
        return (3, 0, str(k))
    return sorted(m, key=key)


# ---- floats ------------------------------------------------------------------------------------

def _shortest_digits(f: float) -> tuple[str, int]:
    """(digits, dp) of |f|'s shortest round-trip decimal: value = 0.digits * 10**dp."""
    _, digits, exponent = Decimal(repr(abs(f))).as_tuple()
    ds = "".join(map(str, digits))
    dp = len(ds) + int(exponent)
    stripped = ds.rstrip("0") or "0"
    if stripped == "0":
        return "0", 1
    lead = len(ds) - len(ds.lstrip("0"))
    return stripped.lstrip("0"), dp - lead


def _special_float(f: float) -> str | None:
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return None


def _fmt_e(neg: bool, digits: str, dp: int) -> str:
    exp = dp - 1
    mant = digits[0]
    frac = digits[1:]
    if frac:
        mant += "." + frac
    sign = "-" if exp < 0 else "+"
    return ("-" if neg else "") + f"{mant}e{sign}{abs(exp):02d}"


def _fmt_f(neg: bool, digits: str, dp: int) -> str:
    if dp <= 0:
        s = "0." + "0" * (-dp) + digits
    elif dp >= len(digits):
        s = digits + "0" * (dp - len(digits))
    else:
        s = digits[:dp] + "." + digits[dp:]
    return ("-" if neg else "") + s


def format_float_v(f: float) -> str:
    """fmt's %v (= %g with the shortest precision) of a float64: 3.5, 1e+06, 1.5e-07, +Inf."""
    special = _special_float(f)
    if special:
        return special
    neg = math.copysign(1.0, f) < 0
    if f == 0:
        return "-0" if neg else "0"
    digits, dp = _shortest_digits(f)
    exp = dp - 1
    # strconv's 'g' with the shortest precision switches to %e below 1e-4 and from 1e+06 on.
    if exp < -4 or exp >= 6:
        return _fmt_e(neg, digits, dp)
    return _fmt_f(neg, digits, dp)


def format_float_json(f: float) -> str:
    """encoding/json's float64: shortest digits, %e only below 1e-6 and from 1e21 on."""
    if _special_float(f):
        raise GoFuncError(f"json: unsupported value: {format_float_v(f)}")
    neg = math.copysign(1.0, f) < 0
    if f == 0:
        return "-0" if neg else "0"
    digits, dp = _shortest_digits(f)
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        s = _fmt_e(neg, digits, dp)
        # json writes e-07 as e-7 (but keeps e+21)
        return s[:-2] + s[-1] if s[-4:-1] == "e-0" else s
    return _fmt_f(neg, digits, dp)


# ---- fmt's %v ----------------------------------------------------------------------------------

def format_v(v: Any, plus: bool = False, depth: int = 0) -> str:
    """fmt's %v of one operand (`plus`: %+v, which names struct fields)."""
    if v is None:
        return "<nil>"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float_v(v)
    if isinstance(v, str):
        return v
    method = stringer_of(v)
    if method is not None:
        return method()
    if isinstance(v, complex):
        return f"({format_float_v(v.real)}{'+' if v.imag >= 0 or math.isnan(v.imag) else ''}" \
               f"{format_float_v(v.imag)}i)"
    if isinstance(v, GoStruct):
        if plus:
            inner = " ".join(f"{f.name}:{format_v(v.values[f.name], plus, depth + 1)}" for f in v.type.fields)
        else:
            inner = " ".join(format_v(v.values[f.name], plus, depth + 1) for f in v.type.fields)
        return ("&" if v.type.pointer and depth == 0 and plus else "") + "{" + inner + "}"
    if isinstance(v, Mapping):
        return "map[" + " ".join(f"{format_v(k, plus, depth + 1)}:{format_v(v[k], plus, depth + 1)}"
                                 for k in sorted_keys(v)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(format_v(x, plus, depth + 1) for x in v) + "]"
    if isinstance(v, (bytes, bytearray)):
        return "[" + " ".join(str(b) for b in v) + "]"
    return str(v)


def sprint(args: list[Any]) -> str:
    """fmt.Sprint: operands in %v, a space between two operands when neither is a string."""
    out: list[str] = []
    prev_string = False
    for i, a in enumerate(args):
        is_string = isinstance(a, str)
        if i > 0 and not is_string and not prev_string:
            out.append(" ")
        out.append(format_v(a))
        prev_string = is_string
    return "".join(out)


def sprintln(args: list[Any]) -> str:
    """fmt.Sprintln: operands in %v, always space-separated, then a newline."""
    return " ".join(format_v(a) for a in args) + "\n"


# ---- strconv.Quote and friends ------------------------------------------------------------------

def _is_print(ch: str) -> bool:
    """unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


_QUOTE_ESCAPES = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t",
                  "\v": r"\v", "\\": "\\\\"}


def go_quote(s: str, quote: str = '"') -> str:
    """strconv.Quote (or QuoteRune with quote="'")."""
    out = [quote]
    for ch in s:
        o = ord(ch)
        if ch == quote:
            out.append("\\" + ch)
        elif ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif 0xD800 <= o <= 0xDFFF:
            out.append(r"\ufffd")
        elif _is_print(ch):
            out.append(ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append(quote)
    return "".join(out)


# ---- Sprintf -----------------------------------------------------------------------------------

def _pad(s: str, width: int | None, flags: str, numeric: bool = False) -> str:
    if width is None or len(s) >= width:
        return s
    fill = width - len(s)
    if "-" in flags:
        return s + " " * fill
    if "0" in flags:
        if numeric and s[:1] in "+- ":
            return s[0] + "0" * fill + s[1:]
        return "0" * fill + s
    return " " * fill + s


def _bad_verb(verb: str, v: Any) -> str:
    if v is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({go_type_name(v)}={format_v(v)})"


def _fmt_int(verb: str, flags: str, width: int | None, prec: int | None, v: int) -> str:
    if verb == "c":
        return _pad(chr(v) if 0 <= v <= 0x10FFFF else "\ufffd", width, flags)
    if verb == "q":
        return _pad(go_quote(chr(v) if 0 <= v <= 0x10FFFF else "\ufffd", "'"), width, flags)
    if verb == "U":
        s = f"U+{v:04X}"
        if "#" in flags and 0 <= v <= 0x10FFFF and _is_print(chr(v)):
            s += " '" + chr(v) + "'"
        return _pad(s, width, flags)
    base = {"d": 10, "v": 10, "b": 2, "o": 8, "O": 8, "x": 16, "X": 16}.get(verb)
    if base is None:
        return _bad_verb(verb, v)
    digits = format(abs(v), {10: "d", 2: "b", 8: "o", 16: "x"}[base])
    if verb == "X":
        digits = digits.upper()
    if prec is not None:
        digits = "" if prec == 0 and v == 0 else digits.rjust(prec, "0")
    prefix = ""
    if verb == "O":
        prefix = "0o"
    elif "#" in flags:
        prefix = {2: "0b", 8: "0", 16: "0x" if verb == "x" else "0X"}.get(base, "")
        if base == 8 and digits.startswith("0"):
            prefix = ""
    sign = "-" if v < 0 else "+" if "+" in flags else " " if " " in flags else ""
    body = prefix + digits
    if "0" in flags and "-" not in flags and prec is None and width is not None:
        body = body.rjust(width - len(sign), "0")
    return _pad(sign + body, width, flags)


def _fmt_float(verb: str, flags: str, width: int | None, prec: int | None, v: float) -> str:
    if verb not in "vgGeEfF":
        return _bad_verb(verb, v)
    special = _special_float(v)
    if special:
        s = special
        if s == "+Inf" and "+" not in flags:
            s = "Inf" if " " not in flags else " Inf"
        return _pad(s, width, flags.replace("0", ""))
    if verb in "vgG" and prec is None:
        s = format_float_v(v)
        if verb == "G":
            s = s.upper()
    elif verb in "gG":
        s = format(v, f".{prec}{verb}")
    else:
        s = format(v, f".{6 if prec is None else prec}{verb.lower() if verb in 'fF' else verb}")
    if "+" in flags and not s.startswith("-"):
        s = "+" + s
    elif " " in flags and not s.startswith("-"):
        s = " " + s
    return _pad(s, width, flags, numeric=True)


def _fmt_string(verb: str, flags: str, width: int | None, prec: int | None, s: str) -> str:
    if verb in "vs":
        if prec is not None:
            s = s[:prec]
        return _pad(s, width, flags)
    if verb == "q":
        if prec is not None:
            s = s[:prec]
        if "#" in flags and "`" not in s and all(_is_print(c) or c == "\t" for c in s):
            return _pad("`" + s + "`", width, flags)
        return _pad(go_quote(s), width, flags)
    if verb in "xX":
        data = s.encode("utf-8", "surrogatepass")
        if prec is not None:
            data = data[:prec]
        hexed = [format(b, "02x" if verb == "x" else "02X") for b in data]
        if "#" in flags:
            hexed = [("0x" if verb == "x" else "0X") + h for h in hexed] if " " in flags else hexed
            joined = (" " if " " in flags else "").join(hexed)
            if " " not in flags and hexed:
                joined = ("0x" if verb == "x" else "0X") + joined
        else:
            joined = (" " if " " in flags else "").join(hexed)
        return _pad(joined, width, flags)
    return _bad_verb(verb, s)


def format_one(verb: str, flags: str, width: int | None, prec: int | None, v: Any,
               plus_v: bool | None = None) -> str:
    """One Sprintf operand: %v %s %q %d %x %X %o %b %c %U %e %f %g %t %T and flags/width/prec."""
    if plus_v is None:
        plus_v = verb == "v" and "+" in flags  # %+v names struct fields; it is no sign flag
        if verb == "v":
            flags = flags.replace("+", "").replace("#", "")
    if verb == "T":
        return _pad(go_type_name(v), width, flags)
    if v is None:
        return _pad("<nil>", width, flags) if verb == "v" else _bad_verb(verb, v)
    if verb in "vsxXq":
        method = stringer_of(v)
        if method is not None:
            return _fmt_string("s" if verb == "v" else verb, flags, width, prec, method())
    if v is True or v is False:
        if verb in "vt":
            return _pad("true" if v else "false", width, flags)
        return _bad_verb(verb, v)
    if isinstance(v, int):
        return _fmt_int(verb, flags, width, prec, v)
    if isinstance(v, float):
        return _fmt_float(verb, flags, width, prec, v)
    if isinstance(v, str):
        return _fmt_string(verb, flags, width, prec, v)
    if isinstance(v, GoStruct):
        return "{" + " ".join((f"{f.name}:" if plus_v else "") +
                              format_one(verb, flags, width, prec, v.values[f.name], plus_v)
                              for f in v.type.fields) + "}"
    if isinstance(v, Mapping):
        return "map[" + " ".join(f"{format_one(verb, flags, width, prec, k, plus_v)}:"
                                 f"{format_one(verb, flags, width, prec, v[k], plus_v)}"
                                 for k in sorted_keys(v)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(format_one(verb, flags, width, prec, x, plus_v) for x in v) + "]"
    if isinstance(v, complex) and verb == "v":
        return _pad(format_v(v), width, flags)
    return _bad_verb(verb, v)


_TOO_LARGE = 1_000_000  # fmt refuses widths and precisions above this


def sprintf(fmt: str, args: list[Any], limit: int | None = None) -> str:
    """fmt.Sprintf, with Go's in-band errors: %!d(MISSING), %!(EXTRA ...), %!(NOVERB).
    GoFuncError once the result passes `limit` characters (None: no limit)."""
    out: list[str] = []
    i, n, argi = 0, len(fmt), 0
    size, counted = 0, 0

    def check_size() -> None:
        nonlocal size, counted
        size += sum(len(s) for s in out[counted:])
        counted = len(out)
        if size > limit:  # type: ignore[operator]
            raise GoFuncError(f"the result is too large (over {limit} characters)")

    while i < n:
        if limit is not None:
            check_size()
        j = fmt.find("%", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        i = j + 1
        flags = ""
        while i < n and fmt[i] in "+-# 0":
            flags += fmt[i]
            i += 1
        width: int | None = None
        if i < n and fmt[i] == "*":
            i += 1
            if argi < len(args) and isinstance(args[argi], int) and not isinstance(args[argi], bool) \
                    and abs(args[argi]) <= _TOO_LARGE:
                width = args[argi]
                if width < 0:
                    flags += "-"
                    width = -width
            else:
                out.append("%!(BADWIDTH)")
            argi += 1
        else:
            start = i
            while i < n and "0" <= fmt[i] <= "9":
                i += 1
            if i > start:
                width = int(fmt[start:i])
                if width > _TOO_LARGE:
                    out.append("%!(BADWIDTH)")
                    width = None
        prec: int | None = None
        if i < n and fmt[i] == ".":
            i += 1
            if i < n and fmt[i] == "*":
                i += 1
                if argi < len(args) and isinstance(args[argi], int) and not isinstance(args[argi], bool) \
                        and args[argi] <= _TOO_LARGE:
                    prec = args[argi] if args[argi] >= 0 else None
                else:
                    out.append("%!(BADPREC)")
                argi += 1
            else:
                start = i
                while i < n and "0" <= fmt[i] <= "9":
                    i += 1
                prec = int(fmt[start:i]) if i > start else 0
                if prec > _TOO_LARGE:
                    out.append("%!(BADPREC)")
                    prec = None
        if i >= n:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        out.append(format_one(verb, flags, width, prec, args[argi]))
        argi += 1
    if argi < len(args):
        extra = ", ".join("<nil>" if a is None else f"{go_type_name(a)}={format_v(a)}" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    if limit is not None:
        check_size()
    return "".join(out)


# ---- encoding/json -----------------------------------------------------------------------------

_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
                 "\f": "\\f", "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                 "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _JSON_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append("\ufffd")  # json.Marshal replaces invalid UTF-8 with U+FFFD
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_empty(v: Any) -> bool:
    """encoding/json's omitempty test."""
    if v is None or v is False:
        return True
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    if isinstance(v, (str, list, tuple, Mapping, bytes)):
        return len(v) == 0
    return False


def go_json(v: Any) -> str:
    """json.Marshal: HTML-safe escapes, sorted map keys, struct tags; raises GoFuncError."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float_json(v)
    if isinstance(v, str):
        return _json_string(v)
    if isinstance(v, GoStruct):
        parts = []
        for f in v.type.fields:
            value = v.values[f.name]
            if f.omitempty and _json_empty(value):
                continue
            parts.append(_json_string(f.json or f.name) + ":" + go_json(value))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, GoSlice):
        if v.marshal is not None:
            return v.marshal(v)
        if v.nil:
            return "null"
    if isinstance(v, (bytes, bytearray)):
        return '"' + base64.b64encode(bytes(v)).decode("ascii") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if isinstance(v, GoMap) and v.nil:
            return "null"
        keys = list(v) if isinstance(v, GoMap) and v.ordered else sorted_keys(v)
        if not all(isinstance(k, str) for k in keys):
            keys = sorted(keys, key=lambda k: format_v(k))
        return "{" + ",".join(_json_string(k if isinstance(k, str) else format_v(k)) + ":" + go_json(v[k])
                              for k in keys) + "}"
    if isinstance(v, complex):
        raise GoFuncError("json: unsupported type: complex128")
    raise GoFuncError(f"json: unsupported type: {go_type_name(v)}")


# ---- text/template's escapers ------------------------------------------------------------------

_HTML_ESCAPES = {"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def html_escape(s: str) -> str:
    """template.HTMLEscapeString."""
    return "".join(_HTML_ESCAPES.get(c, c) for c in s)


_JS_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
               "=": "\\u003D"}


def js_escape(s: str) -> str:
    """template.JSEscapeString."""
    out = []
    for c in s:
        esc = _JS_ESCAPES.get(c)
        if esc is not None:
            out.append(esc)
        elif c < " ":
            out.append(f"\\u{ord(c):04X}")
        elif c < "\x80" or _is_print(c):
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04X}")
    return "".join(out)


def url_query_escape(s: str) -> str:
    """url.QueryEscape."""
    return urllib.parse.quote_plus(s.encode("utf-8", "surrogatepass"), safe="")
