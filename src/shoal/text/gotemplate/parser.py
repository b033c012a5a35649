"""The Go template parser (Go's text/template/parse/parse.go): tokens to the node tree.

It checks what Go checks at parse time: functions must be defined (the caller passes their
names), variables declared before use, `break`/`continue` inside `range`, one non-empty body per
`define`d name.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.text.gotemplate import gofmt
from shoal.text.gotemplate.errors import TemplateError, line_and_column
from shoal.text.gotemplate.lexer import (ASSIGN, BOOL, CHAR, DECLARE, DOT, EOF, FIELD, IDENT, LDELIM, LPAREN,
                                         NIL, NUMBER, PIPE, PUNCT, RAWSTRING, RDELIM, RPAREN, SPACE,
                                         SPACE_CHARS, STRING, TEXT, VAR, Token, lex)
from shoal.text.gotemplate.literals import parse_number, unquote
from shoal.text.gotemplate.nodes import (ActionNode, BranchNode, BreakNode, ChainNode, CommandNode,
                                         ContinueNode, DotNode, FieldNode, IdentifierNode, ListNode,
                                         LiteralNode, NilNode, Node, PipeNode, TemplateNode, TextNode,
                                         VariableNode)


def parse_tree(source: str, funcs: Mapping[str, Any]) -> tuple[ListNode, dict[str, ListNode]]:
    """The template's tree and its `define`d (and `block`) bodies by name; `funcs` names the
    functions it may call. Raises TemplateError."""
    parser = _Parser(source, funcs)
    try:
        root = parser.parse()
    except RecursionError:
        raise TemplateError("template nests too deeply to parse") from None
    return root, parser.defines


# NOTE: `{{end}}` and `{{else}}` close the list being parsed; they never reach the tree.
class _EndNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{end}}"


class _ElseNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{else}}"


class _Parser:
    def __init__(self, src: str, funcs: Mapping[str, Any]) -> None:
        self.src = src
        self.toks = lex(src)
        self.i = 0
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.defines: dict[str, ListNode] = {}

    # token stream
    def next(self) -> Token:
        t = self.toks[min(self.i, len(self.toks) - 1)]  # the last token is EOF
        self.i += 1
        return t

    def backup(self, k: int = 1) -> None:
        self.i -= k

    def peek(self) -> Token:
        return self.toks[min(self.i, len(self.toks) - 1)]

    def next_non_space(self) -> Token:
        t = self.next()
        while t.kind == SPACE:
            t = self.next()
        return t

    def peek_non_space(self) -> Token:
        while self.peek().kind == SPACE:
            self.i += 1
        return self.peek()

    def error(self, msg: str, pos: int | None = None) -> None:
        if pos is None:
            pos = self.toks[max(self.i - 1, 0)].pos
        raise TemplateError(msg, *line_and_column(self.src, pos))

    def unexpected(self, tok: Token, context: str) -> None:
        if tok.kind == EOF:
            self.error(f"unexpected EOF in {context}", tok.pos)
        self.error(f"unexpected {tok.describe()} in {context}", tok.pos)

    def expect(self, kind: str, context: str) -> Token:
        t = self.next_non_space()
        if t.kind != kind:
            self.unexpected(t, context)
        return t

    # structure
    def parse(self) -> ListNode:
        root = ListNode(0)
        while self.peek().kind != EOF:
            if self.peek().kind == LDELIM:
                mark = self.i
                delim = self.next()
                if self.next_non_space().kind == "define":
                    self.parse_definition(delim.pos)
                    continue
                self.i = mark
            n = self.text_or_action()
            if isinstance(n, (_EndNode, _ElseNode)):
                self.error(f"unexpected {n}" + (" without a matching {{if}}, {{with}}, {{range}} or "
                                                "{{define}}" if isinstance(n, _EndNode) else ""), n.pos)
            root.nodes.append(n)
        return root

    def parse_definition(self, pos: int) -> None:
        context = "define clause"
        name_tok = self.next_non_space()
        if name_tok.kind not in (STRING, RAWSTRING):
            self.unexpected(name_tok, context)
        name = self._unquote(name_tok)
        self.expect(RDELIM, context)
        saved_vars, self.vars = self.vars, ["$"]
        body, end = self.item_list()
        self.vars = saved_vars
        if not isinstance(end, _EndNode):
            self.error(f"unexpected {end} in {context}", end.pos)
        self.add_define(name, body)

    def add_define(self, name: str, body: ListNode) -> None:
        old = self.defines.get(name)
        if old is not None and _is_non_empty(old) and _is_non_empty(body):
            self.error(f"template: multiple definition of template {gofmt.go_quote(name)}")
        if old is None or _is_non_empty(body):
            self.defines[name] = body

    def item_list(self) -> tuple[ListNode, Node]:
        lst = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().kind != EOF:
            n = self.text_or_action()
            if isinstance(n, (_EndNode, _ElseNode)):
                return lst, n
            lst.nodes.append(n)
        self.error("unexpected EOF: a {{if}}, {{with}}, {{range}} or {{define}} without a matching {{end}}",
                   self.peek().pos)
        raise AssertionError  # unreachable

    def text_or_action(self) -> Node:
        t = self.next_non_space()
        if t.kind == TEXT:
            return TextNode(t.pos, t.val)
        if t.kind == LDELIM:
            return self.action()
        self.unexpected(t, "input")
        raise AssertionError

    def action(self) -> Node:
        t = self.next_non_space()
        k = t.kind
        if k == "block":
            return self.block_control(t)
        if k == "break":
            return self.break_control(t, "break", BreakNode)
        if k == "continue":
            return self.break_control(t, "continue", ContinueNode)
        if k == "else":
            return self.else_control(t)
        if k == "end":
            self.expect(RDELIM, "end")
            return _EndNode(t.pos)
        if k in ("if", "range", "with"):
            return self.branch_control(t, k)
        if k == "template":
            return self.template_control(t)
        self.backup()
        pipe = self.pipeline("command", RDELIM)
        return ActionNode(t.pos, pipe)

    def break_control(self, t: Token, word: str, cls: type) -> Node:
        nxt = self.next_non_space()
        if nxt.kind != RDELIM:
            self.unexpected(nxt, "{{" + word + "}}")
        if self.range_depth == 0:
            self.error("{{" + word + "}} outside {{range}}", t.pos)
        return cls(t.pos)

    def else_control(self, t: Token) -> Node:
        peek = self.peek_non_space()
        if peek.kind in ("if", "with"):
            return _ElseNode(peek.pos)  # "else if"/"else with": the keyword stays pending
        self.expect(RDELIM, "else")
        return _ElseNode(t.pos)

    def branch_control(self, t: Token, context: str) -> BranchNode:
        saved = len(self.vars)
        pipe = self.pipeline(context, RDELIM)
        if context == "range":
            self.range_depth += 1
        body, nxt = self.item_list()
        if context == "range":
            self.range_depth -= 1
        else_list = None
        if isinstance(nxt, _ElseNode):
            if context in ("if", "with") and self.peek().kind == context:
                kw = self.next()
                else_list = ListNode(nxt.pos, [self.branch_control(kw, context)])
            elif self.peek_non_space().kind in ("if", "with") and self.peek_non_space().kind != context:
                kw = self.peek_non_space()
                self.error(f"unexpected {kw.describe()} after {{{{else}}}} in {{{{{context}}}}}", kw.pos)
            else:
                else_list, nxt = self.item_list()
                if not isinstance(nxt, _EndNode):
                    self.error(f"expected end; found {nxt}", nxt.pos)
        del self.vars[saved:]
        return BranchNode(t.pos, context, pipe, body, else_list)

    def template_control(self, t: Token) -> TemplateNode:
        context = "template clause"
        name_tok = self.next_non_space()
        if name_tok.kind not in (STRING, RAWSTRING):
            self.unexpected(name_tok, context)
        name = self._unquote(name_tok)
        pipe = None
        if self.next_non_space().kind != RDELIM:
            self.backup()
            pipe = self.pipeline(context, RDELIM)
        return TemplateNode(t.pos, name, pipe)

    def block_control(self, t: Token) -> TemplateNode:
        context = "block clause"
        name_tok = self.next_non_space()
        if name_tok.kind not in (STRING, RAWSTRING):
            self.unexpected(name_tok, context)
        name = self._unquote(name_tok)
        pipe = self.pipeline(context, RDELIM)
        saved_vars, saved_depth = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        body, end = self.item_list()
        self.vars, self.range_depth = saved_vars, saved_depth
        if not isinstance(end, _EndNode):
            self.error(f"unexpected {end} in {context}", end.pos)
        self.add_define(name, body)
        return TemplateNode(t.pos, name, pipe)

    def _unquote(self, tok: Token) -> str:
        try:
            return unquote(tok.val)
        except ValueError as exc:
            self.error(f"{exc}: {tok.val}", tok.pos)
            raise AssertionError from None

    # pipelines
    def pipeline(self, context: str, end: str) -> PipeNode:
        start = self.peek_non_space()
        decl: list[str] = []
        is_assign = False
        while True:
            v = self.peek_non_space()
            if v.kind != VAR:
                break
            mark = self.i
            self.next()
            nxt = self.peek_non_space()
            if nxt.kind in (ASSIGN, DECLARE):
                is_assign = nxt.kind == ASSIGN
                self.next()
                decl.append(v.val)
                self.vars.append(v.val)
                break
            if nxt.kind == PUNCT and nxt.val == ",":
                self.next()
                decl.append(v.val)
                self.vars.append(v.val)
                if context == "range" and len(decl) < 2:
                    if self.peek_non_space().kind in (VAR, RDELIM, RPAREN):
                        continue
                    self.error("range can only initialize variables", self.peek_non_space().pos)
                self.error(f"too many declarations in {context}", nxt.pos)
            self.i = mark  # not a declaration: put the variable back
            break
        cmds: list[CommandNode] = []
        while True:
            t = self.next_non_space()
            if t.kind == end:
                if not cmds:
                    self.error(f"missing value for {context}", t.pos)
                for k, c in enumerate(cmds[1:]):
                    if isinstance(c.args[0], (LiteralNode, DotNode, NilNode)):
                        self.error(f"non executable command in pipeline stage {k + 2}", c.pos)
                return PipeNode(start.pos, decl, is_assign, cmds)
            if t.kind in (BOOL, CHAR, DOT, FIELD, IDENT, NUMBER, NIL, RAWSTRING, STRING, VAR, LPAREN):
                self.backup()
                cmds.append(self.command())
            else:
                self.unexpected(t, context)

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos, [])
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            t = self.next()
            if t.kind == SPACE:
                continue
            if t.kind in (RDELIM, RPAREN):
                self.backup()
            elif t.kind == PIPE:
                pass
            else:
                self.unexpected(t, "operand")
            break
        if not cmd.args:
            self.error("empty command", cmd.pos)
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().kind == FIELD:
            fields: list[str] = []
            while self.peek().kind == FIELD:
                fields.append(self.next().val[1:])
            if isinstance(node, FieldNode):
                return FieldNode(node.pos, node.idents + tuple(fields))
            if isinstance(node, VariableNode):
                return VariableNode(node.pos, node.idents + tuple(fields))
            if isinstance(node, (LiteralNode, NilNode, DotNode)):
                self.error(f"unexpected . after term {gofmt.go_quote(str(node))}", node.pos)
            return ChainNode(node.pos, node, tuple(fields))
        return node

    def term(self) -> Node | None:
        t = self.next_non_space()
        k = t.kind
        if k == IDENT:
            if t.val not in self.funcs:
                self.error(f"function {gofmt.go_quote(t.val)} not defined", t.pos)
            return IdentifierNode(t.pos, t.val)
        if k == DOT:
            return DotNode(t.pos)
        if k == NIL:
            return NilNode(t.pos)
        if k == VAR:
            if t.val not in self.vars:
                self.error(f"undefined variable {gofmt.go_quote(t.val)}", t.pos)
            return VariableNode(t.pos, (t.val,))
        if k == FIELD:
            return FieldNode(t.pos, (t.val[1:],))
        if k == BOOL:
            return LiteralNode(t.pos, t.val == "true", t.val)
        if k == NUMBER:
            try:
                return LiteralNode(t.pos, parse_number(t.val), t.val)
            except ValueError as exc:
                self.error(str(exc), t.pos)
        if k == CHAR:
            try:
                return LiteralNode(t.pos, ord(unquote(t.val)), t.val)
            except ValueError:
                self.error(f"malformed character constant: {t.val}", t.pos)
        if k == LPAREN:
            return self.pipeline("parenthesized pipeline", RPAREN)
        if k in (STRING, RAWSTRING):
            return LiteralNode(t.pos, self._unquote(t), t.val, is_string=True)
        self.backup()
        return None


def _is_non_empty(lst: ListNode) -> bool:
    return any(not (isinstance(n, TextNode) and not n.text.strip(SPACE_CHARS)) for n in lst.nodes)
