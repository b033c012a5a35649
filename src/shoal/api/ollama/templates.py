"""A small interpreter for the Go templates Ollama clients send in /api/generate's `template`.

Ollama's templates are Go `text/template` programs over a few values. This module runs
the common single-turn subset:

    {{ .System }}  {{ .Prompt }}  {{ .Response }}
    {{ if .X }} ... {{ else if .Y }} ... {{ else }} ... {{ end }}
    {{- ... -}} (whitespace trimming)   {{/* comments */}}

As in Ollama, rendering stops at `{{ .Response }}`: what follows it in the template is
what the model is about to write, so the prompt ends there. Anything else (`range`,
`.Messages`, functions, pipelines) raises TemplateError, which the API turns into a 400
naming the construct; the full translator comes with Modelfile support.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.errors import InvalidParameterError

# The values a single-turn template may read; the API supplies them all (empty if unset).
FIELDS = ("System", "Prompt", "Response")

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_GO_SPACE = " \t\r\n"


class TemplateError(InvalidParameterError):
    """The template cannot be parsed, or uses a construct this interpreter does not run."""

    def __init__(self, message: str) -> None:
        super().__init__("template", message)


@dataclass(slots=True)
class _Text:
    text: str


@dataclass(slots=True)
class _Field:
    name: str


@dataclass(slots=True)
class _If:
    # (condition field or None for `else`, body) in order
    branches: list[tuple[str | None, list]] = field(default_factory=list)


class _Stop(Exception):
    """Raised on reaching {{ .Response }}: the prompt ends there."""


def _field_name(expr: str, action: str) -> str:
    """`.System` -> 'System'; anything else is unsupported."""
    if not re.fullmatch(r"\.[A-Za-z_][A-Za-z0-9_]*", expr):
        raise TemplateError(f"unsupported action {{{{{action}}}}}: only .System, .Prompt and "
                            ".Response, with if/else/end, are supported so far")
    name = expr[1:]
    if name not in FIELDS:
        raise TemplateError(f"unsupported field .{name} in {{{{{action}}}}}: only .System, "
                            ".Prompt and .Response are supported so far")
    return name


def _lex(source: str) -> list[tuple[str, str]]:
    """The template as ("text", s) and ("action", inner) items, with trim markers applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip(_GO_SPACE)
        inner = match.group(1)
        # NOTE: Go requires whitespace after "{{-" and before "-}}"; "{{-3}}" is the number -3.
        if len(inner) >= 2 and inner[0] == "-" and inner[1] in _GO_SPACE:
            text = text.rstrip(_GO_SPACE)
            inner = inner[1:]
        trim_next = len(inner) >= 2 and inner[-1] == "-" and inner[-2] in _GO_SPACE
        if trim_next:
            inner = inner[:-1]
        if text:
            items.append(("text", text))
        items.append(("action", inner.strip(_GO_SPACE)))
        pos = match.end()
    rest = source[pos:]
    if trim_next:
        rest = rest.lstrip(_GO_SPACE)
    if "{{" in rest:
        raise TemplateError("unclosed action: '{{' without a matching '}}'")
    if rest:
        items.append(("text", rest))
    return items


def parse(source: str) -> list:
    """Parses a template into nodes; raises TemplateError on anything unsupported."""
    if not isinstance(source, str):
        raise TemplateError("must be a string")
    root: list = []
    stack: list[tuple[_If, list]] = []   # open ifs and the body being filled
    body = root
    for kind, value in _lex(source):
        if kind == "action":
            # NOTE: actions are quoted in error messages; keep them encodable.
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        if kind == "text":
            body.append(_Text(value))
            continue
        action = value
        if action.startswith("/*"):
            if not action.endswith("*/"):
                raise TemplateError(f"unclosed comment in {{{{{action}}}}}")
            continue
        words = action.split()
        if not words:
            raise TemplateError("empty action {{}}")
        if words[0] == "if":
            node = _If()
            node.branches.append((_field_name(" ".join(words[1:]), action), []))
            body.append(node)
            stack.append((node, body))
            body = node.branches[-1][1]
        elif words[0] == "else":
            if not stack:
                raise TemplateError("{{ else }} without a matching {{ if }}")
            node = stack[-1][0]
            if node.branches[-1][0] is None:
                raise TemplateError("{{ else }} after {{ else }}")
            if len(words) == 1:
                node.branches.append((None, []))
            elif words[1] == "if":
                node.branches.append((_field_name(" ".join(words[2:]), action), []))
            else:
                raise TemplateError(f"unsupported action {{{{{action}}}}}")
            body = node.branches[-1][1]
        elif words[0] == "end":
            if len(words) != 1:
                raise TemplateError(f"unsupported action {{{{{action}}}}}")
            if not stack:
                raise TemplateError("{{ end }} without a matching {{ if }}")
            _, body = stack.pop()
        elif words[0] in ("range", "with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{ {words[0]} }}}} is not supported yet (in {{{{{action}}}}}); "
                                "only .System, .Prompt and .Response with if/else/end are")
        else:
            body.append(_Field(_field_name(action, action)))
    if stack:
        raise TemplateError("{{ if }} without a matching {{ end }}")
    return root


def _render(nodes: list, values: Mapping[str, str], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Field):
            if node.name == "Response":
                raise _Stop
            out.append(values.get(node.name, ""))
        else:
            for condition, body in node.branches:
                # Go's truthiness for strings: non-empty is true.
                if condition is None or values.get(condition, ""):
                    _render(body, values, out)
                    break


def render(source: str, values: Mapping[str, str]) -> str:
    """The prompt text: `source` run over `values` up to {{ .Response }}."""
    nodes = parse(source)
    out: list[str] = []
    try:
        _render(nodes, {k: v or "" for k, v in values.items()}, out)
    except _Stop:
        pass
    return "".join(out)
