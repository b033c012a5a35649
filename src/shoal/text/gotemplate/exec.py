"""The Go template evaluator (Go's text/template/exec.go): runs a node tree over data.

Lenient by default (nil prints "", a field of nil is nil); strict is Go exactly (nil prints
"<no value>", a field of a nil read from a map is an error). Execution is bounded so that a
template from a request cannot run for minutes, exhaust the stack or fill the memory: MAX_STEPS
node visits, MAX_SECONDS, _MAX_DEPTH nested {{ template }} calls, and MAX_CHARS characters made
in all (the output, and every string a function returns: a 200-byte template that doubles a
string thirty times is refused before the doubling that passes the budget, not after).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields as dataclass_fields, is_dataclass
from typing import Any

from shoal.text.gotemplate import gofmt
from shoal.text.gotemplate.errors import TemplateError, line_and_column
from shoal.text.gotemplate.funcs import BUILTINS, ESCAPERS, truth
from shoal.text.gotemplate.gofmt import GoFuncError, GoStruct, go_type_name
from shoal.text.gotemplate.nodes import (ActionNode, BranchNode, BreakNode, ChainNode, CommandNode,
                                         ContinueNode, DotNode, FieldNode, IdentifierNode, ListNode,
                                         LiteralNode, NilNode, Node, PipeNode, TemplateNode, TextNode,
                                         VariableNode)
from shoal.text.printed_size import printed_size

NO_VALUE = "<no value>"  # what Go prints for nil (a missing key of a map[string]any included)
_CUT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes of a UTF-8 sequence `slice` cut (surrogateescape)
_MAX_DEPTH = 1000  # nested {{ template }} calls (Go allows 100000; Python's stack does not)
# Node visits one execution may make: a guard against templates that would run for minutes
# ({{ range 1000000000 }}) on a server thread. A 100-message chat takes about 10,000.
MAX_STEPS = 2_000_000
# Characters one execution may make: its output plus every string a function call returns. A
# prompt is at most the request body (SHOAL_MAX_BODY_BYTES, 16 MiB by default) and a context
# of a million tokens is a few MB of text; this leaves room for both.
MAX_CHARS = 16 << 20
MAX_SECONDS = 2.0         # wall-clock time of one execution
_CLOCK_EVERY = 64         # steps between looks at the clock
# Functions whose result is built from their arguments' text: their arguments' sizes are
# checked before the call, so that one call cannot make a string far over the budget. (The
# escapers and json can still grow what fits a few times, `<` to `\u003c`: a long prompt must
# stay printable through them; the result is charged after.)
_BUILDERS = frozenset({"print", "printf", "println", "html", "js", "urlquery", "json"})


def execute_tree(source: str, defines: Mapping[str, ListNode], root: ListNode, data: Any, *,
                 strict: bool = False, max_chars: int | None = None) -> str:
    """Runs `root` over `data`; `source` is the text the tree was parsed from (for error
    positions), `defines` the templates `{{ template }}` may call; `max_chars` the size budget
    (default MAX_CHARS)."""
    state = _State(source, defines, data, strict, MAX_CHARS if max_chars is None else max_chars)
    try:
        state.walk(data, root.nodes)
    except RecursionError:
        raise TemplateError("template nests too deeply to execute") from None
    out = "".join(state.out)
    if _CUT_UTF8.search(out):
        # `slice` of a string cut a UTF-8 sequence; put the bytes back together as Go would
        out = out.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return out


class _Missing:
    """No value passed down a pipeline (Go's missingVal)."""
    __slots__ = ()


_MISSING = _Missing()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _iterate(v: Any, two_vars: bool) -> Iterable[tuple[Any, Any]] | None:
    """(index or key, element) pairs for range; None for something range cannot iterate."""
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return enumerate(v)
    if isinstance(v, Mapping):
        return [(k, v[k]) for k in gofmt.sorted_keys(v)]
    if isinstance(v, int) and not isinstance(v, bool):
        if two_vars:
            raise GoFuncError(f"can't use {v} to iterate over more than one variable")
        return ((i, i) for i in range(v))
    return None


def _size(value: Any, limit: int) -> int:
    """About how many characters `value` prints as; a struct counts by its fields."""
    return printed_size(value, limit, lambda v: v.values.values() if isinstance(v, GoStruct) else None)


class _State:
    """One execution: the variable stack, the output, the node being evaluated (for error
    positions), the {{ template }} depth, the steps taken and the characters left to make."""
    __slots__ = ("source", "defines", "vars", "out", "node", "depth", "no_value", "strict", "steps",
                 "budget", "max_chars", "deadline", "clock_at")

    def __init__(self, source: str, defines: Mapping[str, ListNode], data: Any, strict: bool,
                 max_chars: int = MAX_CHARS) -> None:
        self.source = source
        self.defines = defines
        self.vars: list[list[Any]] = [["$", data]]
        self.out: list[str] = []
        self.node: Node | None = None
        self.depth = 0
        self.strict = strict
        self.no_value = NO_VALUE if strict else ""
        self.steps = 0
        self.budget = self.max_chars = max_chars
        self.deadline = time.monotonic() + MAX_SECONDS
        self.clock_at = _CLOCK_EVERY

    def charge(self, chars: int, node: Node | None = None) -> None:
        """Takes `chars` from the size budget; a TemplateError when it runs out."""
        self.budget -= chars
        if self.budget < 0:
            self.error(f"template output too large (over {self.max_chars} characters)", node)

    def check_room(self, values: list[Any], node: Node) -> None:
        """A TemplateError when printing `values` would pass the size budget."""
        need = 0
        for v in values:
            need += _size(v, self.budget - need)
            if need > self.budget:
                self.error(f"template output too large (over {self.max_chars} characters)", node)

    def error(self, msg: str, node: Node | None = None, at: Node | None = None) -> None:
        """Raises TemplateError at `node` (default: the node being evaluated), quoting `at`."""
        node = node or self.node
        if node is None:
            raise TemplateError(f"executing: {msg}")
        line, col = line_and_column(self.source, node.pos)
        raise TemplateError(f"executing at <{_node_text(at or node)}>: {msg}", line, col)

    # variables
    def var_value(self, name: str) -> Any:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                return self.vars[i][1]
        self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i][1] = value
                return
        self.error(f"undefined variable: {name}")

    # walking
    def walk(self, dot: Any, nodes: list[Node]) -> None:
        out = self.out
        self.steps += len(nodes) + 1
        if self.steps > MAX_STEPS:
            self.error(f"template runs too long (over {MAX_STEPS} steps)", nodes[0] if nodes else None)
        if self.steps >= self.clock_at:
            self.clock_at = self.steps + _CLOCK_EVERY
            if time.monotonic() > self.deadline:
                self.error(f"template runs too long (over {MAX_SECONDS:g}s)", nodes[0] if nodes else None)
        for node in nodes:
            kind = type(node)
            if kind is TextNode:
                self.charge(len(node.text), node)  # type: ignore[attr-defined]
                out.append(node.text)  # type: ignore[attr-defined]
            elif kind is ActionNode:
                pipe = node.pipe  # type: ignore[attr-defined]
                val = self.eval_pipeline(dot, pipe)
                if not pipe.decl:
                    self.print_value(node, val)
            elif kind is BranchNode:
                if node.kind == "range":  # type: ignore[attr-defined]
                    self.walk_range(dot, node)  # type: ignore[arg-type]
                else:
                    self.walk_if_or_with(dot, node)  # type: ignore[arg-type]
            elif kind is TemplateNode:
                self.walk_template(dot, node)  # type: ignore[arg-type]
            elif kind is BreakNode:
                raise _Break
            elif kind is ContinueNode:
                raise _Continue
            elif kind is ListNode:
                self.walk(dot, node.nodes)  # type: ignore[attr-defined]
            else:
                self.error(f"unknown node: {node}", node)

    def walk_if_or_with(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        val = self.eval_pipeline(dot, node.pipe)
        if truth(val):
            self.walk(val if node.kind == "with" else dot, node.list.nodes)
        elif node.else_list is not None:
            self.walk(dot, node.else_list.nodes)
        del self.vars[mark:]

    def walk_range(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        pipe = node.pipe
        val = self.eval_pipeline(dot, pipe, declare=False)
        self.node = node
        try:
            items = _iterate(val, len(pipe.decl) > 1)
        except GoFuncError as exc:
            self.error(str(exc), pipe)
        if items is None:
            self.error(f"range can't iterate over {gofmt.format_v(val)}", pipe)
        body = node.list.nodes
        empty = True
        for index, elem in items:
            empty = False
            if pipe.decl:
                if pipe.is_assign:
                    if len(pipe.decl) > 1:
                        self.set_var(pipe.decl[0], index)
                        self.set_var(pipe.decl[1], elem)
                    else:
                        self.set_var(pipe.decl[0], elem)
                elif len(pipe.decl) > 1:
                    self.vars.append([pipe.decl[0], index])
                    self.vars.append([pipe.decl[1], elem])
                else:
                    self.vars.append([pipe.decl[0], elem])
            try:
                self.walk(elem, body)
            except _Continue:
                pass
            except _Break:
                break
            finally:
                del self.vars[mark:]
        if empty and node.else_list is not None:
            self.walk(dot, node.else_list.nodes)
        del self.vars[mark:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        body = self.defines.get(node.name)
        if body is None:
            self.error(f"no such template {gofmt.go_quote(node.name)}", node)
        if self.depth >= _MAX_DEPTH:
            self.error(f"exceeded maximum template depth ({_MAX_DEPTH})", node)
        new_dot = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else None
        saved = self.vars
        self.vars = [["$", new_dot]]
        self.depth += 1
        try:
            self.walk(new_dot, body.nodes)
        finally:
            self.depth -= 1
            self.vars = saved

    def print_value(self, node: Node, val: Any) -> None:
        if val is None:
            text = self.no_value
        elif isinstance(val, str):
            text = val
        else:
            self.check_room([val], node)      # before formatting it; then charged exactly
            text = gofmt.format_v(val)
        self.charge(len(text), node)
        self.out.append(text)

    # pipelines and commands
    def eval_pipeline(self, dot: Any, pipe: PipeNode, declare: bool = True) -> Any:
        self.node = pipe
        value: Any = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        if declare:
            for name in pipe.decl:
                if pipe.is_assign:
                    self.set_var(name, value)
                else:
                    self.vars.append([name, value])
        return value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not _MISSING:
            self.error(f"can't give argument to non-function {args[0]}", args[0])

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        kind = type(first)
        self.node = first
        if kind is FieldNode:
            return self.eval_field_chain(dot, dot, first, first.idents, cmd.args, final)  # type: ignore
        if kind is ChainNode:
            return self.eval_chain(dot, first, cmd.args, final)  # type: ignore[arg-type]
        if kind is IdentifierNode:
            return self.eval_call(dot, first, cmd.args, final)  # type: ignore[arg-type]
        if kind is VariableNode:
            value = self.var_value(first.idents[0])  # type: ignore[attr-defined]
            if len(first.idents) == 1:  # type: ignore[attr-defined]
                self.not_a_function(cmd.args, final)
                return value
            return self.eval_field_chain(dot, value, first, first.idents[1:], cmd.args, final)  # type: ignore
        self.not_a_function(cmd.args, final)
        if kind is PipeNode:
            return self.eval_pipeline(dot, first)  # type: ignore[arg-type]
        if kind is DotNode:
            return dot
        if kind is LiteralNode:
            return first.value  # type: ignore[attr-defined]
        if kind is NilNode:
            self.error("nil is not a command", first)
        self.error(f"can't evaluate command {first}", first)

    def eval_chain(self, dot: Any, chain: ChainNode, args: list[Node], final: Any) -> Any:
        if isinstance(chain.node, NilNode):
            self.error(f"indirection through explicit nil in {chain}", chain)
        receiver = self.eval_arg(dot, chain.node, "any")
        return self.eval_field_chain(dot, receiver, chain, chain.fields, args, final)

    def eval_field_chain(self, dot: Any, receiver: Any, node: Node, idents: tuple[str, ...],
                         args: list[Node], final: Any) -> Any:
        last = len(idents) - 1
        for i, name in enumerate(idents):
            if receiver is None and i > 0 and self.strict:
                # Go: a nil read from a map or field is a nil interface, and a field of it fails
                self.error(f"nil pointer evaluating interface {{}}.{name}", node)
            receiver = self.eval_field(node, name, receiver, i == last and (len(args) > 1 or final is not _MISSING))
        return receiver

    def eval_field(self, node: Node, name: str, receiver: Any, has_args: bool) -> Any:
        if receiver is None:
            return None  # Go: a field of an invalid (nil) value is itself nil
        if isinstance(receiver, GoStruct):
            values = receiver.values
            if name in values:
                if has_args:
                    self.error(f"{name} has arguments but cannot be invoked as function", node)
                return values[name]
        elif isinstance(receiver, Mapping):
            if has_args:
                self.error(f"{name} is not a method but has arguments", node)
            return receiver.get(name)
        elif is_dataclass(receiver) and not isinstance(receiver, type) and \
                name in {f.name for f in dataclass_fields(receiver)}:
            if has_args:
                self.error(f"{name} has arguments but cannot be invoked as function", node)
            return getattr(receiver, name)
        self.error(f"can't evaluate field {name} in type {go_type_name(receiver)}", node)

    def eval_arg(self, dot: Any, arg: Node, want: str) -> Any:
        """An argument as Go's evalArg types it for a parameter of kind `want`."""
        self.node = arg
        kind = type(arg)
        if kind is DotNode:
            value = dot
        elif kind is NilNode:
            if want == "any":
                return None
            self.error("cannot assign nil to " + ("reflect.Value" if want == "value" else want), arg)
        elif kind is FieldNode:
            value = self.eval_field_chain(dot, dot, arg, arg.idents, [arg], _MISSING)  # type: ignore
        elif kind is VariableNode:
            value = self.var_value(arg.idents[0])  # type: ignore[attr-defined]
            if len(arg.idents) > 1:  # type: ignore[attr-defined]
                value = self.eval_field_chain(dot, value, arg, arg.idents[1:], [arg], _MISSING)  # type: ignore
        elif kind is PipeNode:
            value = self.eval_pipeline(dot, arg)  # type: ignore[arg-type]
        elif kind is IdentifierNode:
            value = self.eval_call(dot, arg, [arg], _MISSING)  # type: ignore[arg-type]
        elif kind is ChainNode:
            value = self.eval_chain(dot, arg, [arg], _MISSING)  # type: ignore[arg-type]
        elif kind is LiteralNode:
            if want == "string" and not arg.is_string:  # type: ignore[attr-defined]
                self.error(f"expected string; found {arg}", arg)
            return arg.value  # type: ignore[attr-defined]
        else:
            self.error(f"can't handle {arg} for arg", arg)
        if want == "string":
            return self.want_string(value, arg)
        return value

    def want_string(self, value: Any, node: Node) -> str:
        if value is None:
            self.error("invalid value; expected string", node)
        if not isinstance(value, str):
            self.error(f"wrong type for value; expected string; got {go_type_name(value)}", node)
        return value

    def eval_call(self, dot: Any, ident: IdentifierNode, args: list[Node], final: Any) -> Any:
        name = ident.name
        fn = BUILTINS.get(name)
        if fn is None:
            self.error(f"{gofmt.go_quote(name)} is not a defined function", ident)
        argv = args[1:]
        count = len(argv) + (0 if final is _MISSING else 1)
        need = len(fn.params) - (1 if fn.variadic else 0)
        if fn.variadic:
            if count < need:
                self.error(f"wrong number of args for {name}: want at least {need} got {count}", ident)
        elif count != need:
            self.error(f"wrong number of args for {name}: want {need} got {count}", ident)

        def param(i: int) -> str:
            return fn.params[min(i, len(fn.params) - 1)]

        if name in ("and", "or"):
            want_true = name == "or"
            v: Any = None
            for a in argv:
                v = self.eval_arg(dot, a, "value")
                if truth(v) == want_true:
                    return v
            if final is not _MISSING:
                v = final
            return v
        values = [self.eval_arg(dot, a, param(i)) for i, a in enumerate(argv)]
        if final is not _MISSING:
            if param(len(values)) == "string":
                final = self.want_string(final, ident)
            values.append(final)
        if name in ESCAPERS:
            # Go formats the escapers' operands as it prints values: nil is "<no value>"
            values = [self.no_value if v is None else v for v in values]
        self.node = ident
        if name in _BUILDERS:
            # NOTE: checked before the call: `print $s $s $s ...` would otherwise build the
            # whole string first. Escapers and json may still grow it a few times (quoting).
            self.check_room(values, ident)
        try:
            if name == "printf":
                # NOTE: widths (up to a million) can make a short format long: sprintf stops
                # at the budget itself.
                result = gofmt.sprintf(values[0], values[1:], limit=self.budget)
            else:
                result = fn.fn(*values)
        except (GoFuncError, TypeError, ValueError, AttributeError) as exc:
            self.error(f"error calling {name}: {exc}", ident, CommandNode(ident.pos, args))
        if isinstance(result, str):
            self.charge(len(result), ident)
        return result


def _node_text(node: Node) -> str:
    s = str(node)
    return s if len(s) <= 60 else s[:57] + "..."
