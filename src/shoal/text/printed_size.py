"""How many characters a template value would print as, counted without printing it: both
template engines size a value before a function builds a string from it, so a budget stops a
runaway template before the memory is spent, not after."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def printed_size(value: Any, limit: int,
                 fields: Callable[[Any], Iterable[Any] | None] = lambda v: None) -> int:
    """About how many characters `value` prints as: strings by length, containers by their
    elements (`fields` gives the elements of an engine's own record type, None for others).
    Counting stops once it passes `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
            total += 2
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
            total += 2 + len(v)
        elif (inner := fields(v)) is not None:
            stack.extend(inner)
            total += 2
        else:
            total += 24          # a number, bool or nil prints short
    return total
