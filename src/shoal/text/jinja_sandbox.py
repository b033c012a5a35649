"""The sandbox chat templates run in: Jinja's immutable sandbox, plus a size and a time budget.

A chat template comes with the model file, and a pulled model is anyone's file. Jinja's sandbox
stops attribute tricks but not arithmetic: `'x' * 10**9`, or a namespace string doubled in a
loop, fills the memory, and nested loops run for hours. Here every render has a budget
(render(); MAX_CHARS, MAX_SECONDS):

  * characters made: each string a `+`, `*`, `%`, `~`, call or filter returns, and the output,
    are charged; an operation whose result can be sized beforehand (repetition, padding,
    replace, join, format widths) is refused *before* it allocates past the budget;
  * time: checked at every loop iteration, call, operator and output chunk.

Either running out raises TemplateBudgetError (an InvalidParameterError: a 400).
"""
from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from shoal.core.errors import InvalidParameterError
from shoal.text.printed_size import printed_size

# Characters one render may make. A prompt is at most a request body (SHOAL_MAX_BODY_BYTES,
# 16 MiB by default), and templates concatenate each message a few times on its way out.
MAX_CHARS = 64 << 20
MAX_SECONDS = 2.0
_LOOP_FILTER = "shoal_budgeted_loop"
_CONCAT_FILTER = "shoal_budgeted_concat"
# printf-style conversions (`%-10.3f`, `%*d`, `%(name)s`) and str.format fields (`{0:>20}`):
# their widths and precisions are what can make a short format long.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


class TemplateBudgetError(InvalidParameterError):
    """A chat template that would make too much text or run too long."""

    def __init__(self, problem: str) -> None:
        super().__init__("messages", f"the chat template {problem}")


class _Budget:
    __slots__ = ("deadline", "left", "max_chars", "seconds")

    def __init__(self, max_chars: int, seconds: float) -> None:
        self.left = self.max_chars = max_chars
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"runs too long (over {self.seconds:g}s)")

    def room(self, chars: int) -> None:
        """Refuses before making `chars` characters the budget does not have."""
        if chars > self.left:
            raise TemplateBudgetError(f"makes too much text (over {self.max_chars} characters)")

    def charge(self, value: Any) -> Any:
        """Takes a made value's size from the budget; returns the value."""
        if isinstance(value, (str, bytes, list, tuple)):
            self.room(len(value))
            self.left -= len(value)
        return value


_active: ContextVar[_Budget | None] = ContextVar("shoal_jinja_budget", default=None)


@contextlib.contextmanager
def budget(max_chars: int | None = None, seconds: float | None = None) -> Iterator[_Budget]:
    """The budget of the renders in this block (defaults MAX_CHARS, MAX_SECONDS)."""
    active = _Budget(MAX_CHARS if max_chars is None else max_chars,
                     MAX_SECONDS if seconds is None else seconds)
    token = _active.set(active)
    try:
        yield active
    finally:
        _active.reset(token)


def render(template: jinja2.Template, variables: Mapping[str, Any], *,
           max_chars: int | None = None, seconds: float | None = None) -> str:
    """`template` rendered with `variables` within a budget; TemplateBudgetError past it."""
    with budget(max_chars, seconds) as active:
        pieces = []
        for piece in template.generate(**variables):
            active.tick()
            pieces.append(active.charge(piece))
        return "".join(pieces)


# ---- sizes ------------------------------------------------------------------------------

_size = printed_size


def _format_size(fmt: str, values: list[Any], percent: bool, limit: int) -> int:
    """An upper bound on a formatted string's length: the format, its widths and precisions,
    and each conversion printing at most the largest value (a field may repeat one)."""
    widths = 0
    if percent:
        specs = list(_PERCENT_SPEC.finditer(fmt))
        for spec in specs:
            for part in spec.groups():
                if part == "*":
                    widths += max([abs(v) for v in values if isinstance(v, int)] or [0])
                elif part:
                    widths += int(part)
        fields = len(specs)
    else:
        found = _FORMAT_FIELD.findall(fmt)
        for field in found:
            spec = field.partition(":")[2]
            widths += sum(int(d) for d in re.findall(r"\d+", spec))
            if "{" in spec:      # a width from an argument: `{0:{1}}`
                widths += max([abs(v) for v in values if isinstance(v, int)] or [0])
        fields = len(found)
    largest = max([_size(v, limit) for v in values] or [0])
    return len(fmt) + widths + fields * largest


def _replace_size(s: str, old: str, new: str) -> int:
    if len(new) <= len(old):
        return len(s)
    return len(s) + (s.count(old) if old else len(s) + 1) * (len(new) - len(old))


def _join_size(sep: str, items: Any, limit: int) -> int:
    if not isinstance(items, (list, tuple)):
        return 0         # a generator: sized after the fact
    return len(sep) * max(0, len(items) - 1) + sum(_size(x, limit) for x in items)


def _str_method_size(method: Any, args: tuple, kwargs: dict, limit: int) -> int:
    """What calling a str method with these arguments can make (0: nothing to check first)."""
    s, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(len(s), args[0])
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * (size if isinstance(size, int) else 8)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return _replace_size(s, args[0], args[1])
    if name == "join" and args:
        return _join_size(s, args[0], limit)
    if name == "translate" and args and isinstance(args[0], Mapping):
        longest = max([len(v) for v in args[0].values() if isinstance(v, str)] or [1])
        return len(s) * longest
    return 0


def _filter_size(name: str, args: tuple, kwargs: dict, limit: int) -> int:
    """What a built-in filter can make from these arguments (0: nothing to check first)."""
    if not args:
        return 0
    value, rest = args[0], args[1:]

    def arg(i: int, key: str, default: Any) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    if name == "center":
        width = arg(0, "width", 80)
        return max(_size(value, limit), width if isinstance(width, int) else 0)
    if name == "indent" and isinstance(value, str):
        width = arg(0, "width", 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * pad
    if name == "wordwrap" and isinstance(value, str):
        width, wrap = arg(0, "width", 79), arg(2, "wrapstring", None)
        lines = len(value) // max(1, width if isinstance(width, int) else 1) + 1
        return len(value) + lines * (len(wrap) if isinstance(wrap, str) else 1)
    if name == "replace" and isinstance(value, str):
        old, new = arg(0, "old", ""), arg(1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            return _replace_size(value, old, new)
    if name == "join":
        sep = arg(0, "d", "")
        return _join_size(sep if isinstance(sep, str) else "", value, limit)
    if name == "format" and isinstance(value, str):
        return _format_size(value, [*rest, *kwargs.values()], True, limit)
    if name == "tojson":
        indent = arg(0, "indent", None)
        # NOTE: an indent is paid on every line at every depth; model templates use 2 or 4.
        return limit + 1 if isinstance(indent, int) and indent > 16 else 0
    if name in ("batch", "slice"):
        count = arg(0, "linecount" if name == "batch" else "slices", 0)
        return count if isinstance(count, int) else 0
    return 0


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter with its output sized first where it can be, and charged after."""
    passes = getattr(func, "jinja_pass_arg", None) is not None

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        active = _active.get()
        if active is not None:
            active.tick()
            active.room(_filter_size(name, args[1:] if passes else args, kwargs, active.left))
        result = func(*args, **kwargs)
        return active.charge(result) if active is not None else result

    return guarded


# ---- the environment ---------------------------------------------------------------------

class _BudgetLoopsAndConcats(NodeTransformer):
    """Every `for` iterates through the loop filter (a clock tick per item), every `~` joins
    through the concat filter (sized before it joins)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT_FILTER, [], [], None,
                            None, lineno=node.lineno)


# Integers a template may compute: big enough for any count or id, small enough to stay fast
# (10 ** 10 ** 8 takes minutes, and Python will not even print one over 4300 digits).
_MAX_INT_BITS = 1 << 16


def _check_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise TemplateBudgetError(f"computes too large a number (over {_MAX_INT_BITS} bits)")


@jinja2.pass_context
def _budgeted_loop(_context: Context, iterable: Any) -> Iterator[Any]:
    active = _active.get()
    if active is None:
        yield from iterable
        return
    for item in iterable:
        active.tick()
        yield item


@jinja2.pass_context
def _budgeted_concat(_context: Context, values: list[Any]) -> str:
    texts = [str(v) for v in values]
    active = _active.get()
    if active is not None:
        active.room(sum(len(t) for t in texts))
    out = "".join(texts)
    return active.charge(out) if active is not None else out


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose operators, calls, filters and loops are charged to
    the budget of the render() in progress (none outside one)."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)        # lipsum(10**9): text for nothing
        self.filters = {name: guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = _budgeted_loop
        self.filters[_CONCAT_FILTER] = _budgeted_concat

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _BudgetLoopsAndConcats().visit(super()._parse(source, name, filename))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        active = _active.get()
        if active is None:
            return super().call_binop(context, operator, left, right)
        active.tick()
        limit = active.left
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            active.room(len(left) + len(right))
        elif operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                active.room(len(seq) * times)
            elif isinstance(seq, int) and isinstance(times, int):
                _check_bits(seq.bit_length() + times.bit_length())
        elif operator == "%" and isinstance(left, str):
            values = list(right.values()) if isinstance(right, Mapping) else \
                list(right) if isinstance(right, tuple) else [right]
            active.room(_format_size(left, values, True, limit))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            _check_bits(right * left.bit_length())
        return active.charge(super().call_binop(context, operator, left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        active = _active.get()
        if active is None:
            return super().call(context, obj, *args, **kwargs)
        active.tick()
        if isinstance(getattr(obj, "__self__", None), str):
            active.room(_str_method_size(obj, args, kwargs, active.left))
        return active.charge(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__

        def sized(*args: Any, **kwargs: Any) -> str:
            active = _active.get()
            if active is not None:
                values = [*args, *kwargs.values()]
                if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                    values = list(args[0].values())
                active.room(_format_size(fmt, values, False, active.left))
            return wrapped(*args, **kwargs)

        return sized
