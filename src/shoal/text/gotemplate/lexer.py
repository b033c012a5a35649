"""The Go template lexer (Go's text/template/parse/lex.go): source text to tokens.

Text between actions becomes one TEXT token with `{{- ` / ` -}}` trimming applied; comments are
dropped; an action is LDELIM, its tokens (spaces included, as Go's parser needs them), RDELIM.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from shoal.text.gotemplate import gofmt
from shoal.text.gotemplate.errors import TemplateError, line_and_column

SPACE_CHARS = " \t\r\n"

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


class Token:
    """One token: its kind (the constants above), its text and its offset in the source."""
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


def _right_delim_at(src: str, p: int) -> int:
    """0: no right delimiter at p; 2: "}}"; 4: " -}}" (trim marker)."""
    if src.startswith("}}", p):
        return 2
    if p < len(src) and src[p] in SPACE_CHARS and src.startswith("-}}", p + 1):
        return 4
    return 0


def _terminator_at(src: str, p: int) -> bool:
    """Go's atTerminator: what may follow a field, variable or identifier."""
    if p >= len(src):
        return True
    c = src[p]
    return c in SPACE_CHARS or c in ".,|:)(" or src.startswith("}}", p)


_NUMBER = re.compile(r"""[+-]?(?:0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]*)?
                          |0[oO][0-7_]*|0[bB][01_]*
                          |[0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9_]*)?)i?""", re.VERBOSE)


def lex(src: str) -> list[Token]:
    """The template as tokens; text has trim markers applied and comments are dropped."""
    toks: list[Token] = []
    n = len(src)
    pos = 0

    def fail(msg: str, at: int) -> None:
        raise TemplateError(msg, *line_and_column(src, at))

    while True:
        x = src.find("{{", pos)
        if x < 0:
            if pos < n:
                toks.append(Token(TEXT, src[pos:], pos))
            break
        trim = src.startswith("-", x + 2) and x + 3 < n and src[x + 3] in SPACE_CHARS
        text = src[pos:x]
        if trim:
            text = text.rstrip(SPACE_CHARS)
        if text:
            toks.append(Token(TEXT, text, pos))
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
                while pos < n and src[pos] in SPACE_CHARS:
                    pos += 1
            continue
        toks.append(Token(LDELIM, "{{", x))
        pos = _lex_action(src, p, x, toks, fail)
    toks.append(Token(EOF, "", n))
    return toks


def _lex_action(src: str, p: int, start: int, toks: list[Token], fail: Callable[[str, int], None]) -> int:
    n = len(src)
    depth = 0
    while True:
        width = _right_delim_at(src, p)
        if width:
            if depth:
                fail("unclosed left paren", p)
            toks.append(Token(RDELIM, "}}", p))
            p += width
            if width == 4:
                while p < n and src[p] in SPACE_CHARS:
                    p += 1
            return p
        if p >= n:
            fail("unclosed action", start)
        c = src[p]
        if c in SPACE_CHARS:
            q = p
            while q < n and src[q] in SPACE_CHARS:
                q += 1
            if src.startswith("-}}", q):
                q -= 1  # that space belongs to the trim marker
            toks.append(Token(SPACE, src[p:q], p))
            p = q
        elif c == "=":
            toks.append(Token(ASSIGN, "=", p))
            p += 1
        elif c == ":":
            if not src.startswith("=", p + 1):
                fail("expected :=", p)
            toks.append(Token(DECLARE, ":=", p))
            p += 2
        elif c == "|":
            toks.append(Token(PIPE, "|", p))
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
            toks.append(Token(STRING if c == '"' else CHAR, src[p:q + 1], p))
            p = q + 1
        elif c == "`":
            q = src.find("`", p + 1)
            if q < 0:
                fail("unterminated raw quoted string", p)
            toks.append(Token(RAWSTRING, src[p:q + 1], p))
            p = q + 1
        elif c == "$":
            q = p + 1
            while q < n and _is_alnum(src[q]):
                q += 1
            if not _terminator_at(src, q):
                fail(f"bad character {_char_name(src[q])}", q)
            toks.append(Token(VAR, src[p:q], p))
            p = q
        elif c == "." and not (p + 1 < n and src[p + 1].isdigit()):
            q = p + 1
            while q < n and _is_alnum(src[q]):
                q += 1
            if q == p + 1:
                toks.append(Token(DOT, ".", p))
            else:
                if not _terminator_at(src, q):
                    fail(f"bad character {_char_name(src[q])}", q)
                toks.append(Token(FIELD, src[p:q], p))
            p = q
        elif c in "+-." or "0" <= c <= "9":
            m = _NUMBER.match(src, p)
            q = m.end() if m else p
            if q < n and _is_alnum(src[q]):
                fail(f"bad number syntax: {gofmt.go_quote(src[p:q + 1])}", p)
            if q == p:
                fail(f"unrecognized character in action: {_char_name(c)}", p)
            toks.append(Token(NUMBER, src[p:q], p))
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
            toks.append(Token(kind, word, p))
            p = q
        elif c == "(":
            depth += 1
            toks.append(Token(LPAREN, "(", p))
            p += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                fail("unexpected right paren", p)
            toks.append(Token(RPAREN, ")", p))
            p += 1
        elif c < "\x7f" and c.isprintable():
            toks.append(Token(PUNCT, c, p))
            p += 1
        else:
            fail(f"unrecognized character in action: {_char_name(c)}", p)


def _char_name(c: str) -> str:
    return f"U+{ord(c):04X} {c!r}" if c.isprintable() else f"U+{ord(c):04X}"
