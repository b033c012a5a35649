"""A compiled Go template: parse(source) builds a GoTemplate (its tree and its `define`d
templates); compile_template caches one per text; render runs one over data."""
from __future__ import annotations

import functools
from typing import Any

from shoal.text.gotemplate.errors import TemplateError
from shoal.text.gotemplate.exec import execute_tree
from shoal.text.gotemplate.funcs import BUILTINS
from shoal.text.gotemplate.nodes import (ActionNode, BranchNode, FieldNode, ListNode, Node, PipeNode,
                                         TemplateNode, VariableNode)
from shoal.text.gotemplate.parser import parse_tree


class GoTemplate:
    """A parsed Go template: `render(data)` runs it; `identifiers()` lists the field and
    variable names it reads (what Ollama's template.Vars collects)."""
    __slots__ = ("source", "root", "defines")

    def __init__(self, source: str, root: ListNode, defines: dict[str, ListNode]) -> None:
        self.source = source
        self.root = root
        self.defines = defines

    def render(self, data: Any = None, *, strict: bool = False, max_chars: int | None = None) -> str:
        """The template run over `data`.

        By default nil (None, a missing map key) prints as "" and a field of nil is nil.
        strict=True behaves exactly as Go with missingkey=zero (Ollama's setting): nil prints
        as "<no value>" and a field of a nil read from a map is an error. `max_chars`: the
        characters the run may make (default exec.MAX_CHARS); more is a TemplateError."""
        return self.execute(self.root, data, strict=strict, max_chars=max_chars)

    def execute(self, root: ListNode, data: Any, *, strict: bool = False, max_chars: int | None = None) -> str:
        """Runs `root` (this template's tree, or one derived from it) over `data`."""
        return execute_tree(self.source, self.defines, root, data, strict=strict, max_chars=max_chars)

    def identifiers(self) -> list[str]:
        """Field and variable identifiers in the template and its definitions, in order."""
        names: list[str] = []
        for root in (self.root, *self.defines.values()):
            _identifiers(root, names)
        return names


def _identifiers(node: Node | None, out: list[str]) -> None:
    """Ollama's template.Identifiers: walks lists, actions, branches, template calls and
    pipelines (not chains); collects FieldNode and VariableNode identifiers."""
    if node is None:
        return
    kind = type(node)
    if kind is ListNode:
        for n in node.nodes:  # type: ignore[attr-defined]
            _identifiers(n, out)
    elif kind is ActionNode:
        _identifiers(node.pipe, out)  # type: ignore[attr-defined]
    elif kind is TemplateNode:
        _identifiers(node.pipe, out)  # type: ignore[attr-defined]
    elif kind is BranchNode:
        _identifiers(node.pipe, out)  # type: ignore[attr-defined]
        _identifiers(node.list, out)  # type: ignore[attr-defined]
        _identifiers(node.else_list, out)  # type: ignore[attr-defined]
    elif kind is PipeNode:
        for cmd in node.cmds:  # type: ignore[attr-defined]
            for a in cmd.args:
                _identifiers(a, out)
    elif kind is FieldNode or kind is VariableNode:
        out.extend(node.idents)  # type: ignore[attr-defined]


def parse(source: str) -> GoTemplate:
    """Parses a template (uncached); raises TemplateError."""
    if not isinstance(source, str):
        raise TemplateError("must be a string")
    root, defines = parse_tree(source, BUILTINS)
    return GoTemplate(source, root, defines)


@functools.lru_cache(maxsize=256)
def compile_template(source: str) -> GoTemplate:
    """The parsed template for `source`, cached per text (a parsed template is immutable)."""
    return parse(source)


def render(source: str, data: Any = None, *, strict: bool = False, max_chars: int | None = None) -> str:
    """Runs the Go template `source` over `data` (see GoTemplate.render for the options)."""
    return compile_template(source).render(data, strict=strict, max_chars=max_chars)
