"""A Go `text/template` interpreter: the language Ollama's Modelfile TEMPLATEs are written in.

It follows Go's lexer, parser and evaluator (text/template/parse and exec.go) closely:

  * actions `{{ }}` with `{{- ` / ` -}}` trimming (a dash *and* a space: `{{-3}}` is the number
    -3), comments `{{/* */}}`, newlines inside actions;
  * `if` / `else if` / `else` / `end`, `with` / `else with` / `else`, `range` over slices, maps
    (sorted keys) and integers, with `$x :=` / `$i, $x :=` / `=` forms, `else`, `break`,
    `continue`; `define`, `template` and `block`;
  * variables (`$x := ...`, `$x = ...`, `$` the data), field chains (`.A.B`, `$x.A`, `$.A`,
    `(pipeline).A`), pipelines with `|` (the previous value is the last argument), parentheses;
  * literals: strings with Go escapes, raw strings, character constants, numbers (ints, floats,
    hex/octal/binary, `_` separators), true/false/nil;
  * Go's builtins (and or not len index slice print printf println eq ne lt le gt ge html js
    urlquery call) with Go's lazy and/or and type rules, plus Ollama's functions (json,
    currentDate, yesterdayDate, toTypeScriptType);
  * Go truthiness: false, 0, nil, "" and empty slices/maps are false; structs are true.

Data are Python values (see gofmt: None/bool/int/float/str/list/dict, and GoStruct/GoSlice/
GoMap for typed Go values). A missing map key is nil, like Go's missingkey=zero over
map[string]any. By default nil prints as "" and a field of nil is nil (lenient, for plain
dicts); `strict=True` is Go exactly: nil prints "<no value>" and a field of a nil read from a
map is an error (render_chat runs strict, as Ollama does). A field a GoStruct does not have is
always an error, as in Go: `can't evaluate field X in type T`.

Not supported: method calls on data (`.Method arg`), function values and `call` on them,
complex numbers, custom delimiters, and html/template's contextual escaping. A `slice` of a
string that cuts a UTF-8 sequence prints U+FFFD where Go would print the raw bytes.

Every problem, at parse or at execution time, is a TemplateError naming the line and column.
Execution is bounded (MAX_STEPS) so that a template from a request cannot run for minutes.
"""
from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import is_dataclass, fields as dataclass_fields
from typing import Any

from shoal.errors import InvalidParameterError
from shoal.templates import gofmt
from shoal.templates.gofmt import GoFuncError, GoStruct, GoSlice, GoMap, go_type_name


class TemplateError(InvalidParameterError):
    """A Go template that cannot be parsed or executed; `line`/`column` (1-based) say where."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        # NOTE: messages quote template text and data; keep them encodable (lone surrogates).
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.line = line
        self.column = column
        self.detail = message
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__("template", where + message)


_SPACE = " \t\r\n"
NO_VALUE = "<no value>"  # what Go prints for nil (a missing key of a map[string]any included)
_CUT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes of a UTF-8 sequence `slice` cut (surrogateescape)
_MAX_DEPTH = 1000  # nested {{ template }} calls (Go allows 100000; Python's stack does not)
# Node visits one execution may make: a guard against templates that would run for minutes
# ({{ range 1000000000 }}) on a server thread. A 100-message chat takes about 10,000.
MAX_STEPS = 2_000_000


# ---- lexer -------------------------------------------------------------------------------------

# token kinds
TEXT, LDELIM, RDELIM, SPACE, EOF = "text", "{{", "}}", "space", "EOF"
IDENT, FIELD, VAR, DOT, BOOL, NIL, NUMBER, CHAR, STRING, RAWSTRING = (
    "identifier", "field", "variable", "dot", "bool", "nil", "number", "character constant",
    "string", "raw string")
PIPE, ASSIGN, DECLARE, LPAREN, RPAREN, PUNCT = "|", "=", ":=", "(", ")", "char"
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break",
            "continue", "nil"}


def _is_alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or c.isdigit()


class _Tok:
    __slots__ = ("kind", "val", "pos")

    def __init__(self, kind: str, val: str, pos: int) -> None:
        self.kind = kind
        self.val = val
        self.pos = pos

    def __repr__(self) -> str:
        return f"<{self.kind} {self.val!r}@{self.pos}>"

    def describe(self) -> str:
        if self.kind == EOF:
            return "EOF"
        if self.kind in KEYWORDS:
            return f"<{self.val}>"
        if self.kind == SPACE:
            return "space"
        if self.kind == RDELIM:
            return '"}}"'
        return gofmt.go_quote(self.val if len(self.val) < 40 else self.val[:37] + "...")


def _position(src: str, pos: int) -> tuple[int, int]:
    line = src.count("\n", 0, pos) + 1
    return line, pos - (src.rfind("\n", 0, pos) + 1) + 1


def _right_delim_at(src: str, p: int) -> int:
    """0: no right delimiter at p; 2: "}}"; 4: " -}}" (trim marker)."""
    if src.startswith("}}", p):
        return 2
    if p < len(src) and src[p] in _SPACE and src.startswith("-}}", p + 1):
        return 4
    return 0


def _terminator_at(src: str, p: int) -> bool:
    """Go's atTerminator: what may follow a field, variable or identifier."""
    if p >= len(src):
        return True
    c = src[p]
    return c in _SPACE or c in ".,|:)(" or src.startswith("}}", p)


_NUMBER = re.compile(r"""[+-]?(?:0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]*)?
                          |0[oO][0-7_]*|0[bB][01_]*
                          |[0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9_]*)?)i?""", re.VERBOSE)


def lex(src: str) -> list[_Tok]:
    """The template as tokens; text has trim markers applied and comments are dropped."""
    toks: list[_Tok] = []
    n = len(src)
    pos = 0

    def fail(msg: str, at: int) -> None:
        raise TemplateError(msg, *_position(src, at))

    while True:
        x = src.find("{{", pos)
        if x < 0:
            if pos < n:
                toks.append(_Tok(TEXT, src[pos:], pos))
            break
        trim = src.startswith("-", x + 2) and x + 3 < n and src[x + 3] in _SPACE
        text = src[pos:x]
        if trim:
            text = text.rstrip(_SPACE)
        if text:
            toks.append(_Tok(TEXT, text, pos))
        p = x + 2 + (2 if trim else 0)
        if src.startswith("/*", p):
            end = src.find("*/", p + 2)
            if end < 0:
                fail("unclosed comment", x)
            q = end + 2
            width = _right_delim_at(src, q)
            if not width:
                fail("comment ends before closing delimiter", x)
            pos = q + width
            if width == 4:
                while pos < n and src[pos] in _SPACE:
                    pos += 1
            continue
        toks.append(_Tok(LDELIM, "{{", x))
        pos = _lex_action(src, p, x, toks, fail)
    toks.append(_Tok(EOF, "", n))
    return toks


def _lex_action(src: str, p: int, start: int, toks: list[_Tok], fail: Callable[[str, int], None]) -> int:
    n = len(src)
    depth = 0
    while True:
        width = _right_delim_at(src, p)
        if width:
            if depth:
                fail("unclosed left paren", p)
            toks.append(_Tok(RDELIM, "}}", p))
            p += width
            if width == 4:
                while p < n and src[p] in _SPACE:
                    p += 1
            return p
        if p >= n:
            fail("unclosed action", start)
        c = src[p]
        if c in _SPACE:
            q = p
            while q < n and src[q] in _SPACE:
                q += 1
            if src.startswith("-}}", q):
                q -= 1  # that space belongs to the trim marker
            toks.append(_Tok(SPACE, src[p:q], p))
            p = q
        elif c == "=":
            toks.append(_Tok(ASSIGN, "=", p))
            p += 1
        elif c == ":":
            if not src.startswith("=", p + 1):
                fail("expected :=", p)
            toks.append(_Tok(DECLARE, ":=", p))
            p += 2
        elif c == "|":
            toks.append(_Tok(PIPE, "|", p))
            p += 1
        elif c == '"' or c == "'":
            q = p + 1
            while True:
                if q >= n or src[q] == "\n":
                    fail("unterminated quoted string" if c == '"' else "unterminated character constant", p)
                if src[q] == "\\":
                    q += 2
                    continue
                if src[q] == c:
                    break
                q += 1
            toks.append(_Tok(STRING if c == '"' else CHAR, src[p:q + 1], p))
            p = q + 1
        elif c == "`":
            q = src.find("`", p + 1)
            if q < 0:
                fail("unterminated raw quoted string", p)
            toks.append(_Tok(RAWSTRING, src[p:q + 1], p))
            p = q + 1
        elif c == "$":
            q = p + 1
            while q < n and _is_alnum(src[q]):
                q += 1
            if not _terminator_at(src, q):
                fail(f"bad character {_char_name(src[q])}", q)
            toks.append(_Tok(VAR, src[p:q], p))
            p = q
        elif c == "." and not (p + 1 < n and src[p + 1].isdigit()):
            q = p + 1
            while q < n and _is_alnum(src[q]):
                q += 1
            if q == p + 1:
                toks.append(_Tok(DOT, ".", p))
            else:
                if not _terminator_at(src, q):
                    fail(f"bad character {_char_name(src[q])}", q)
                toks.append(_Tok(FIELD, src[p:q], p))
            p = q
        elif c in "+-." or "0" <= c <= "9":
            m = _NUMBER.match(src, p)
            q = m.end() if m else p
            if q < n and _is_alnum(src[q]):
                fail(f"bad number syntax: {gofmt.go_quote(src[p:q + 1])}", p)
            if q == p:
                fail(f"unrecognized character in action: {_char_name(c)}", p)
            toks.append(_Tok(NUMBER, src[p:q], p))
            p = q
        elif _is_alnum(c):
            q = p
            while q < n and _is_alnum(src[q]):
                q += 1
            word = src[p:q]
            if not _terminator_at(src, q):
                fail(f"bad character {_char_name(src[q])}", q)
            if word in KEYWORDS:
                kind = NIL if word == "nil" else word
            elif word in ("true", "false"):
                kind = BOOL
            else:
                kind = IDENT
            toks.append(_Tok(kind, word, p))
            p = q
        elif c == "(":
            depth += 1
            toks.append(_Tok(LPAREN, "(", p))
            p += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                fail("unexpected right paren", p)
            toks.append(_Tok(RPAREN, ")", p))
            p += 1
        elif c < "\x7f" and c.isprintable():
            toks.append(_Tok(PUNCT, c, p))
            p += 1
        else:
            fail(f"unrecognized character in action: {_char_name(c)}", p)


def _char_name(c: str) -> str:
    return f"U+{ord(c):04X} {c!r}" if c.isprintable() else f"U+{ord(c):04X}"


# ---- literals ----------------------------------------------------------------------------------

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


# ---- parse tree --------------------------------------------------------------------------------

class Node:
    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


class ListNode(Node):
    __slots__ = ("nodes",)

    def __init__(self, pos: int, nodes: list[Node] | None = None) -> None:
        super().__init__(pos)
        self.nodes = nodes if nodes is not None else []

    def __str__(self) -> str:
        return "".join(str(n) for n in self.nodes)


class TextNode(Node):
    __slots__ = ("text",)

    def __init__(self, pos: int, text: str) -> None:
        super().__init__(pos)
        self.text = text

    def __str__(self) -> str:
        return self.text


class PipeNode(Node):
    __slots__ = ("decl", "is_assign", "cmds")

    def __init__(self, pos: int, decl: list[str], is_assign: bool, cmds: list[CommandNode]) -> None:
        super().__init__(pos)
        self.decl = decl
        self.is_assign = is_assign
        self.cmds = cmds

    def __str__(self) -> str:
        s = ""
        if self.decl:
            s = ", ".join(self.decl) + (" = " if self.is_assign else " := ")
        return s + " | ".join(str(c) for c in self.cmds)


class CommandNode(Node):
    __slots__ = ("args",)

    def __init__(self, pos: int, args: list[Node]) -> None:
        super().__init__(pos)
        self.args = args

    def __str__(self) -> str:
        return " ".join(f"({a})" if isinstance(a, PipeNode) else str(a) for a in self.args)


class ActionNode(Node):
    __slots__ = ("pipe",)

    def __init__(self, pos: int, pipe: PipeNode) -> None:
        super().__init__(pos)
        self.pipe = pipe

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


class FieldNode(Node):
    __slots__ = ("idents",)

    def __init__(self, pos: int, idents: tuple[str, ...]) -> None:
        super().__init__(pos)
        self.idents = idents

    def __str__(self) -> str:
        return "".join("." + i for i in self.idents)


class VariableNode(Node):
    __slots__ = ("idents",)  # ("$x", "Field", ...)

    def __init__(self, pos: int, idents: tuple[str, ...]) -> None:
        super().__init__(pos)
        self.idents = idents

    def __str__(self) -> str:
        return ".".join(self.idents)


class ChainNode(Node):
    __slots__ = ("node", "fields")

    def __init__(self, pos: int, node: Node, fields: tuple[str, ...]) -> None:
        super().__init__(pos)
        self.node = node
        self.fields = fields

    def __str__(self) -> str:
        inner = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return inner + "".join("." + f for f in self.fields)


class IdentifierNode(Node):
    __slots__ = ("name",)

    def __init__(self, pos: int, name: str) -> None:
        super().__init__(pos)
        self.name = name

    def __str__(self) -> str:
        return self.name


class DotNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "."


class NilNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "nil"


class LiteralNode(Node):
    """A bool, number, character or string constant: `value` typed as Go would."""
    __slots__ = ("value", "text", "is_string")

    def __init__(self, pos: int, value: Any, text: str, is_string: bool = False) -> None:
        super().__init__(pos)
        self.value = value
        self.text = text
        self.is_string = is_string

    def __str__(self) -> str:
        return self.text


class BranchNode(Node):
    """if / with / range."""
    __slots__ = ("kind", "pipe", "list", "else_list")

    def __init__(self, pos: int, kind: str, pipe: PipeNode, list_: ListNode,
                 else_list: ListNode | None) -> None:
        super().__init__(pos)
        self.kind = kind
        self.pipe = pipe
        self.list = list_
        self.else_list = else_list

    def __str__(self) -> str:
        s = "{{" + self.kind + " " + str(self.pipe) + "}}" + str(self.list)
        if self.else_list is not None:
            s += "{{else}}" + str(self.else_list)
        return s + "{{end}}"


class TemplateNode(Node):
    __slots__ = ("name", "pipe")

    def __init__(self, pos: int, name: str, pipe: PipeNode | None) -> None:
        super().__init__(pos)
        self.name = name
        self.pipe = pipe

    def __str__(self) -> str:
        return "{{template " + gofmt.go_quote(self.name) + (" " + str(self.pipe) if self.pipe else "") + "}}"


class BreakNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{break}}"


class ContinueNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{continue}}"


class _EndNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{end}}"


class _ElseNode(Node):
    __slots__ = ()

    def __str__(self) -> str:
        return "{{else}}"


# ---- parser ------------------------------------------------------------------------------------

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
    def next(self) -> _Tok:
        t = self.toks[min(self.i, len(self.toks) - 1)]  # the last token is EOF
        self.i += 1
        return t

    def backup(self, k: int = 1) -> None:
        self.i -= k

    def peek(self) -> _Tok:
        return self.toks[min(self.i, len(self.toks) - 1)]

    def next_non_space(self) -> _Tok:
        t = self.next()
        while t.kind == SPACE:
            t = self.next()
        return t

    def peek_non_space(self) -> _Tok:
        while self.peek().kind == SPACE:
            self.i += 1
        return self.peek()

    def error(self, msg: str, pos: int | None = None) -> None:
        if pos is None:
            pos = self.toks[max(self.i - 1, 0)].pos
        raise TemplateError(msg, *_position(self.src, pos))

    def unexpected(self, tok: _Tok, context: str) -> None:
        if tok.kind == EOF:
            self.error(f"unexpected EOF in {context}", tok.pos)
        self.error(f"unexpected {tok.describe()} in {context}", tok.pos)

    def expect(self, kind: str, context: str) -> _Tok:
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

    def break_control(self, t: _Tok, word: str, cls: type) -> Node:
        nxt = self.next_non_space()
        if nxt.kind != RDELIM:
            self.unexpected(nxt, "{{" + word + "}}")
        if self.range_depth == 0:
            self.error("{{" + word + "}} outside {{range}}", t.pos)
        return cls(t.pos)

    def else_control(self, t: _Tok) -> Node:
        peek = self.peek_non_space()
        if peek.kind in ("if", "with"):
            return _ElseNode(peek.pos)  # "else if"/"else with": the keyword stays pending
        self.expect(RDELIM, "else")
        return _ElseNode(t.pos)

    def branch_control(self, t: _Tok, context: str) -> BranchNode:
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

    def template_control(self, t: _Tok) -> TemplateNode:
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

    def block_control(self, t: _Tok) -> TemplateNode:
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

    def _unquote(self, tok: _Tok) -> str:
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
    return any(not (isinstance(n, TextNode) and not n.text.strip(_SPACE)) for n in lst.nodes)


# ---- evaluation --------------------------------------------------------------------------------

class _Missing:
    """No value passed down a pipeline (Go's missingVal)."""
    __slots__ = ()


_MISSING = _Missing()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Func:
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


def _indirect_len(v: Any, what: str) -> int:
    if isinstance(v, str):
        return len(v.encode("utf-8", "surrogatepass"))
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
            data = item.encode("utf-8", "surrogatepass")
            i = _index_arg(x, len(data))
            if i >= len(data):
                raise GoFuncError(f"index out of range: {i}")
            item = data[i]
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
        data = item.encode("utf-8", "surrogatepass")
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
        return data[idx[0]:idx[1]].decode("utf-8", "surrogateescape")
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


BUILTINS: dict[str, _Func] = {f.name: f for f in (
    _Func("and", lambda *a: None, ("value", "value"), True),   # evaluated lazily by the evaluator
    _Func("or", lambda *a: None, ("value", "value"), True),
    _Func("not", _fn_not, ("value",)),
    _Func("len", _fn_len, ("value",)),
    _Func("index", _fn_index, ("value", "value"), True),
    _Func("slice", _fn_slice, ("value", "value"), True),
    _Func("print", lambda *a: gofmt.sprint(list(a)), ("any",), True),
    _Func("printf", _fn_printf, ("string", "any"), True),
    _Func("println", lambda *a: gofmt.sprintln(list(a)), ("any",), True),
    _Func("eq", _fn_eq, ("value", "value"), True),
    _Func("ne", _fn_ne, ("value", "value")),
    _Func("lt", _fn_lt, ("value", "value")),
    _Func("le", _fn_le, ("value", "value")),
    _Func("gt", _fn_gt, ("value", "value")),
    _Func("ge", _fn_ge, ("value", "value")),
    _Func("html", lambda *a: gofmt.html_escape(_escaper_text(a)), ("any",), True),
    _Func("js", lambda *a: gofmt.js_escape(_escaper_text(a)), ("any",), True),
    _Func("urlquery", lambda *a: gofmt.url_query_escape(_escaper_text(a)), ("any",), True),
    _Func("call", _fn_call, ("value", "value"), True),
    # Ollama's template.FuncMap
    _Func("json", _fn_json, ("any",)),
    _Func("currentDate", _fn_current_date, ("string",), True),
    _Func("yesterdayDate", _fn_yesterday_date, ("string",), True),
    _Func("toTypeScriptType", to_typescript_type, ("any",)),
)}


_ESCAPERS = frozenset({"html", "js", "urlquery"})


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


class _State:
    __slots__ = ("tmpl", "vars", "out", "node", "depth", "no_value", "strict", "steps")

    def __init__(self, tmpl: GoTemplate, data: Any, strict: bool) -> None:
        self.tmpl = tmpl
        self.vars: list[list[Any]] = [["$", data]]
        self.out: list[str] = []
        self.node: Node | None = None
        self.depth = 0
        self.strict = strict
        self.no_value = NO_VALUE if strict else ""
        self.steps = 0

    def error(self, msg: str, node: Node | None = None, at: Node | None = None) -> None:
        """Raises TemplateError at `node` (default: the node being evaluated), quoting `at`."""
        node = node or self.node
        if node is None:
            raise TemplateError(f"executing: {msg}")
        line, col = _position(self.tmpl.source, node.pos)
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
        for node in nodes:
            kind = type(node)
            if kind is TextNode:
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
        body = self.tmpl.defines.get(node.name)
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
            self.out.append(self.no_value)
        elif isinstance(val, str):
            self.out.append(val)
        else:
            self.out.append(gofmt.format_v(val))

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
        if name in _ESCAPERS:
            # Go formats the escapers' operands as it prints values: nil is "<no value>"
            values = [self.no_value if v is None else v for v in values]
        self.node = ident
        try:
            return fn.fn(*values)
        except (GoFuncError, TypeError, ValueError, AttributeError) as exc:
            self.error(f"error calling {name}: {exc}", ident, CommandNode(ident.pos, args))


def _node_text(node: Node) -> str:
    s = str(node)
    return s if len(s) <= 60 else s[:57] + "..."


# ---- the compiled template ---------------------------------------------------------------------

class GoTemplate:
    """A parsed Go template: `render(data)` runs it; `identifiers()` lists the field and
    variable names it reads (what Ollama's template.Vars collects)."""
    __slots__ = ("source", "root", "defines")

    def __init__(self, source: str, root: ListNode, defines: dict[str, ListNode]) -> None:
        self.source = source
        self.root = root
        self.defines = defines

    def render(self, data: Any = None, *, strict: bool = False) -> str:
        """The template run over `data`.

        By default nil (None, a missing map key) prints as "" and a field of nil is nil.
        strict=True behaves exactly as Go with missingkey=zero (Ollama's setting): nil prints
        as "<no value>" and a field of a nil read from a map is an error."""
        return self.execute(self.root, data, strict=strict)

    def execute(self, root: ListNode, data: Any, *, strict: bool = False) -> str:
        """Runs `root` (this template's tree, or one derived from it) over `data`."""
        state = _State(self, data, strict)
        try:
            state.walk(data, root.nodes)
        except RecursionError:
            raise TemplateError("template nests too deeply to execute") from None
        out = "".join(state.out)
        if _CUT_UTF8.search(out):
            # `slice` of a string cut a UTF-8 sequence; put the bytes back together as Go would
            out = out.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return out

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
    parser = _Parser(source, BUILTINS)
    try:
        root = parser.parse()
    except RecursionError:
        raise TemplateError("template nests too deeply to parse") from None
    return GoTemplate(source, root, parser.defines)


@functools.lru_cache(maxsize=256)
def compile_template(source: str) -> GoTemplate:
    """The parsed template for `source`, cached per text (a parsed template is immutable)."""
    return parse(source)


def render(source: str, data: Any = None, *, strict: bool = False) -> str:
    """Runs the Go template `source` over `data` (see GoTemplate.render for `strict`)."""
    return compile_template(source).render(data, strict=strict)
