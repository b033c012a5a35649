"""The functions a Go template may call: Go's builtins (and or not len index slice print printf
println eq ne lt le gt ge html js urlquery call) with Go's type rules, and Ollama's template.FuncMap
(json currentDate yesterdayDate toTypeScriptType). Also Go's truth of a value, which `not`, `if`,
`with`, `and` and `or` share."""
from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

from shoal.text.gotemplate import gofmt
from shoal.text.gotemplate.gofmt import GoFuncError, GoSlice, GoStruct, go_type_name


class Func:
    """A template function: `params` types its arguments as Go would check them ("value":
    reflect.Value, any non-nil-literal; "any": interface{}; "string"), `variadic` repeats
    the last one."""
    __slots__ = ("name", "fn", "params", "variadic")

    def __init__(self, name: str, fn: Callable[..., Any], params: tuple[str, ...], variadic: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.params = params
        self.variadic = variadic


def _today() -> datetime.date:
    """Today's date for currentDate/yesterdayDate (tests replace it)."""
    return datetime.date.today()


def _utf8(s: str) -> bytes | str:
    """A string's UTF-8 bytes, as Go indexes strings; an ASCII string is its own bytes
    (str.isascii is O(1)), so `len`/`index`/`slice` of a long prompt do not copy it each call."""
    return s if s.isascii() else s.encode("utf-8", "surrogatepass")


def _indirect_len(v: Any, what: str) -> int:
    if isinstance(v, str):
        return len(_utf8(v))
    if isinstance(v, (list, tuple, Mapping, bytes)):
        return len(v)
    if v is None:
        raise GoFuncError(f"{what} of nil pointer")
    raise GoFuncError(f"{what} of type {go_type_name(v)}")


def _fn_len(v: Any) -> int:
    return _indirect_len(v, "len")


def _index_arg(x: Any, cap: int) -> int:
    if x is None:
        raise GoFuncError("cannot index slice/array with nil")
    if isinstance(x, bool) or not isinstance(x, int):
        raise GoFuncError(f"cannot index slice/array with type {go_type_name(x)}")
    if x < 0 or x > cap:
        raise GoFuncError(f"index out of range: {x}")
    return x


def _fn_index(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise GoFuncError("index of untyped nil")
    for x in indexes:
        if item is None:
            raise GoFuncError("index of nil pointer")
        if isinstance(item, str):
            data = _utf8(item)
            i = _index_arg(x, len(data))
            if i >= len(data):
                raise GoFuncError(f"index out of range: {i}")
            item = ord(data[i]) if isinstance(data, str) else data[i]
        elif isinstance(item, (list, tuple)):
            i = _index_arg(x, len(item))
            if i >= len(item):
                raise GoFuncError(f"index out of range: {i}")
            item = item[i]
        elif isinstance(item, Mapping):
            if x is None:
                raise GoFuncError("value is nil; should be of type string")
            if not isinstance(x, str) and all(isinstance(k, str) for k in item):
                raise GoFuncError(f"value has type {go_type_name(x)}; should be string")
            item = item.get(x)
        else:
            raise GoFuncError(f"can't index item of type {go_type_name(item)}")
    return item


def _fn_slice(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise GoFuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise GoFuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise GoFuncError("cannot 3-index slice a string")
        data = _utf8(item)
        size = len(data)
    elif isinstance(item, (list, tuple)):
        size = len(item)
    else:
        raise GoFuncError(f"can't slice item of type {go_type_name(item)}")
    idx = [0, size, size]
    for k, x in enumerate(indexes):
        idx[k] = _index_arg(x, size)
    if idx[0] > idx[1]:
        raise GoFuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise GoFuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    if isinstance(item, str):
        part = data[idx[0]:idx[1]]
        return part if isinstance(part, str) else part.decode("utf-8", "surrogateescape")
    part = item[idx[0]:idx[1]]
    if isinstance(item, GoSlice):
        return GoSlice(part, go_type=item.go_type, stringer=item.stringer, marshal=item.marshal)
    return part


# comparison kinds
_BOOL, _INT, _FLOAT, _COMPLEX, _STRING, _OTHER, _INVALID = range(7)


def _basic_kind(v: Any) -> int:
    if v is None:
        return _INVALID
    if v is True or v is False:
        return _BOOL
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):
        return _FLOAT
    if isinstance(v, complex):
        return _COMPLEX
    if isinstance(v, str):
        return _STRING
    return _OTHER


_NO_COMPARISON = "missing argument for comparison"
_BAD_COMPARISON = "incompatible types for comparison"
_BAD_COMPARISON_TYPE = "invalid type for comparison"


def _fn_eq(arg1: Any, *args: Any) -> bool:
    if not args:
        raise GoFuncError(_NO_COMPARISON)
    k1 = _basic_kind(arg1)
    for arg in args:
        k2 = _basic_kind(arg)
        if k1 != k2:
            if arg1 is not None and arg is not None:
                raise GoFuncError(_BAD_COMPARISON)
            truth = False
        elif k1 == _OTHER:
            if isinstance(arg1, (list, tuple, Mapping)) or isinstance(arg, (list, tuple, Mapping)):
                raise GoFuncError(f"non-comparable type {gofmt.format_v(arg1)}: {go_type_name(arg1)}")
            truth = arg1 == arg
        else:
            truth = arg1 == arg
        if truth:
            return True
    return False


def _fn_ne(a: Any, b: Any) -> bool:
    return not _fn_eq(a, b)


def _fn_lt(a: Any, b: Any) -> bool:
    k1, k2 = _basic_kind(a), _basic_kind(b)
    if k1 in (_INVALID, _OTHER) or k2 in (_INVALID, _OTHER):
        raise GoFuncError(_BAD_COMPARISON_TYPE)
    if k1 != k2:
        raise GoFuncError(_BAD_COMPARISON)
    if k1 in (_BOOL, _COMPLEX):
        raise GoFuncError(_BAD_COMPARISON_TYPE)
    return a < b


def _fn_le(a: Any, b: Any) -> bool:
    return _fn_lt(a, b) or _fn_eq(a, b)


def _fn_gt(a: Any, b: Any) -> bool:
    return not _fn_le(a, b)


def _fn_ge(a: Any, b: Any) -> bool:
    return not _fn_lt(a, b)


def _fn_not(v: Any) -> bool:
    return not truth(v)


def _escaper_text(args: tuple[Any, ...]) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return gofmt.sprint(list(args))


def _fn_printf(fmt: str, *args: Any) -> str:
    return gofmt.sprintf(fmt, list(args))


def _fn_call(fn: Any, *args: Any) -> Any:
    if fn is None:
        raise GoFuncError("call of nil")
    if not callable(fn):
        raise GoFuncError(f"non-function of type {go_type_name(fn)}")
    return fn(*args)


def _fn_json(v: Any) -> str:
    try:
        return gofmt.go_json(v)
    except GoFuncError:
        return ""  # Ollama's json ignores Marshal's error: an empty string


def _fn_current_date(*_args: str) -> str:
    return _today().isoformat()


def _fn_yesterday_date(*_args: str) -> str:
    return (_today() - datetime.timedelta(days=1)).isoformat()


def _ts_type(json_type: str) -> str:
    return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
            "array": "any[]", "object": "Record<string, any>", "null": "null"}.get(json_type, "any")


def to_typescript_type(v: Any) -> str:
    """api.ToolProperty.ToTypeScriptType: anyOf and type lists joined with " | "."""
    if not (isinstance(v, GoStruct) and v.type.name == "api.ToolProperty"):
        return "any"
    any_of = v.values.get("AnyOf") or []
    if any_of:
        return " | ".join(to_typescript_type(p) for p in any_of)
    types = v.values.get("Type") or []
    if not types:
        return "any"
    return " | ".join(_ts_type(t) for t in types)


BUILTINS: dict[str, Func] = {f.name: f for f in (
    Func("and", lambda *a: None, ("value", "value"), True),   # evaluated lazily by the evaluator
    Func("or", lambda *a: None, ("value", "value"), True),
    Func("not", _fn_not, ("value",)),
    Func("len", _fn_len, ("value",)),
    Func("index", _fn_index, ("value", "value"), True),
    Func("slice", _fn_slice, ("value", "value"), True),
    Func("print", lambda *a: gofmt.sprint(list(a)), ("any",), True),
    Func("printf", _fn_printf, ("string", "any"), True),
    Func("println", lambda *a: gofmt.sprintln(list(a)), ("any",), True),
    Func("eq", _fn_eq, ("value", "value"), True),
    Func("ne", _fn_ne, ("value", "value")),
    Func("lt", _fn_lt, ("value", "value")),
    Func("le", _fn_le, ("value", "value")),
    Func("gt", _fn_gt, ("value", "value")),
    Func("ge", _fn_ge, ("value", "value")),
    Func("html", lambda *a: gofmt.html_escape(_escaper_text(a)), ("any",), True),
    Func("js", lambda *a: gofmt.js_escape(_escaper_text(a)), ("any",), True),
    Func("urlquery", lambda *a: gofmt.url_query_escape(_escaper_text(a)), ("any",), True),
    Func("call", _fn_call, ("value", "value"), True),
    # Ollama's template.FuncMap
    Func("json", _fn_json, ("any",)),
    Func("currentDate", _fn_current_date, ("string",), True),
    Func("yesterdayDate", _fn_yesterday_date, ("string",), True),
    Func("toTypeScriptType", to_typescript_type, ("any",)),
)}


# NOTE: Go formats the escapers' operands as it prints values, so the evaluator hands them nil
# as the text nil prints as.
ESCAPERS = frozenset({"html", "js", "urlquery"})


def truth(v: Any) -> bool:
    """Go's isTrue: false, 0, nil, "" and empty slices and maps are false; structs are true."""
    if v is None:
        return False
    if v is True or v is False:
        return v
    if isinstance(v, (int, float, complex)):
        return v != 0
    if isinstance(v, (str, list, tuple, Mapping, bytes)):
        return len(v) > 0
    return True
