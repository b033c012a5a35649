"""TemplateError, the one error of the Go template engine, and where in the source it points."""
from __future__ import annotations

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError


class TemplateError(InvalidParameterError):
    """A Go template that cannot be parsed or executed; `line`/`column` (1-based) say where."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        # NOTE: messages quote template text and data (a whole prompt, say): clipped, and
        # encodable (lone surrogates escaped).
        message = clip(message)
        self.line = line
        self.column = column
        self.detail = message
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__("template", where + message)


def line_and_column(source: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of `offset` in `source`."""
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1
