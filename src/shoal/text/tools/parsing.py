"""Tool calls out of a model's text: one incremental parser per format (ToolCallStream), and
parse_tool_calls, which is that parser fed the whole text at once, so a streamed answer and a
whole one always split the same way.

The stream holds back text that may be the start of a call marker (or of an end-of-turn token
to drop), and whitespace-only text until something follows it; it gives back text pieces and
whole ToolCalls, each call as soon as it is complete. Text that looks like a call but does not
parse as one is given back as text: nothing the model wrote is lost.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from shoal.text.tools.formats import LLAMA3_JSON, MISTRAL, ToolFormat

_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    """An id in OpenAI's shape: call_ and 24 random characters."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: Mapping[str, Any]
    id: str = field(default_factory=new_call_id)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


Piece = Union[str, ToolCall]


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None              # the text outside the calls (None: calls only)
    calls: list[ToolCall]


def as_call(value: Any, fmt: ToolFormat) -> ToolCall | None:
    """A decoded JSON value as a call ({"name", "arguments"|"parameters"}), or None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    other = "parameters" if fmt.args_key == "arguments" else "arguments"
    args = value.get(fmt.args_key, value.get(other, {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], args)


def _held_prefix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is the start of a marker (held back)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class ToolCallStream:
    """feed(text) -> pieces as they become certain; finish() -> the rest."""

    def __init__(self, fmt: ToolFormat, strip: Iterable[str] = ()) -> None:
        self.fmt = fmt
        # NOTE: end-of-turn tokens reach the text when special tokens are kept (a format whose
        # marker is a special token); they are not content.
        self._strip = tuple(s for s in strip if s and s not in fmt.markers)
        self._buf = ""
        self._pending_space = ""
        self._state = "start" if fmt is LLAMA3_JSON else "text"
        self.calls: list[ToolCall] = []

    # ---- public --------------------------------------------------------------------------
    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        self._run(out, final=True)
        if self._buf:
            self._emit_text(out, self._buf)
            self._buf = ""
        if self._pending_space and not self.calls:
            out.append(self._pending_space)
        self._pending_space = ""
        return out

    # ---- states ---------------------------------------------------------------------------
    def _run(self, out: list[Piece], final: bool) -> None:
        seen = set()
        while True:
            before = (self._state, len(self._buf))
            # NOTE: a safety net: a state seen twice in one run is a cycle, never progress
            if before in seen:
                return
            seen.add(before)
            if self._state == "start":
                self._start(final)
            elif self._state in ("text", "plain"):
                self._text(out, final)
            elif self.fmt.end:
                self._closed_call(out, final)
            else:
                self._json_calls(out, final)
            if (self._state, len(self._buf)) == before:
                return

    def _start(self, final: bool) -> None:
        """llama3_json: the answer is calls if it opens with <|python_tag|> or '{'."""
        head = self._buf.lstrip()
        tag = self.fmt.start
        if not head:
            if final:
                self._state = "text"
            return
        if head.startswith(tag):
            self._buf, self._state = head[len(tag):], "calls"
        elif head[0] == "{":
            self._buf, self._state = head, "calls"
        elif tag.startswith(head) and not final:
            return
        else:
            self._state = "text"

    def _text(self, out: list[Piece], final: bool) -> None:
        markers = ([self.fmt.start] if self.fmt is not LLAMA3_JSON else []) + list(self._strip)
        found = [(self._buf.find(m), m) for m in markers]
        found = [(i, m) for i, m in found if i >= 0]
        if found:
            i, marker = min(found)
            self._emit_text(out, self._buf[:i])
            self._buf = self._buf[i + len(marker):]
            if marker == self.fmt.start:
                self._state = "calls"
            return
        keep = 0 if final else _held_prefix(self._buf, markers)
        self._emit_text(out, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]

    def _closed_call(self, out: list[Piece], final: bool) -> None:
        """hermes/builtin: <tool_call> JSON </tool_call>."""
        i = self._buf.find(self.fmt.end)
        if i < 0 and not final:
            return
        body = self._buf if i < 0 else self._buf[:i]
        rest = "" if i < 0 else self._buf[i + len(self.fmt.end):]
        clean = self._without_strip(body).strip()
        call = None
        try:
            value, end = _DECODER.raw_decode(clean)
            if not clean[end:].strip():
                call = as_call(value, self.fmt)
        except ValueError:
            pass
        if call is None:
            self._emit_text(out, self.fmt.start + body + ("" if i < 0 else self.fmt.end))
        else:
            self._emit_call(out, call)
        self._buf, self._state = rest, "text"

    def _json_calls(self, out: list[Piece], final: bool) -> None:
        """mistral: a JSON list of calls after [TOOL_CALLS]; llama3_json: objects split by ';'."""
        stripped = self._without_strip(self._buf)
        text = stripped.lstrip().lstrip(";").lstrip() if self.fmt is not MISTRAL else stripped.lstrip()
        if not text:
            if final:
                self._buf, self._state = "", "text"
            return
        try:
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            if final:
                self._give_back_as_text(out)
            return
        values = value if isinstance(value, list) and self.fmt is MISTRAL else [value]
        calls = [as_call(v, self.fmt) for v in values]
        if not calls or any(c is None for c in calls):
            # NOTE: JSON, but not calls: it is the answer's text, as the model wrote it.
            self._give_back_as_text(out)
            return
        for call in calls:
            self._emit_call(out, call)    # type: ignore[arg-type]
        self._buf = text[end:]
        if self.fmt is MISTRAL:
            self._state = "text"

    def _give_back_as_text(self, out: list[Piece]) -> None:
        """What followed the marker was no call: all of it (the marker too) is text.

        NOTE: emitted, not put back in the buffer: the text state would find the marker again."""
        marker = self.fmt.start if self.fmt is MISTRAL else ""
        self._emit_text(out, marker + self._without_strip(self._buf))
        self._buf, self._state = "", "plain" if self.fmt is LLAMA3_JSON else "text"

    # ---- output ---------------------------------------------------------------------------
    def _without_strip(self, text: str) -> str:
        for s in self._strip:
            text = text.replace(s, "")
        return text

    def _emit_text(self, out: list[Piece], text: str) -> None:
        # NOTE: trailing whitespace waits for what follows: before a call it is dropped, so
        # the text does not depend on where the stream's chunks happen to split.
        body = text.rstrip()
        if not body:
            self._pending_space += text
            return
        out.append(self._pending_space + body)
        self._pending_space = text[len(body):]

    def _emit_call(self, out: list[Piece], call: ToolCall) -> None:
        self._pending_space = ""
        self.calls.append(call)
        out.append(call)


def parse_tool_calls(text: str, fmt: ToolFormat, strip: Iterable[str] = ()) -> ParsedOutput:
    """The whole answer's calls and the text around them (stripped when there are calls)."""
    stream = ToolCallStream(fmt, strip)
    pieces = stream.feed(text) + stream.finish()
    return collect_pieces(pieces)


def collect_pieces(pieces: Iterable[Piece]) -> ParsedOutput:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for piece in pieces:
        (calls if isinstance(piece, ToolCall) else texts).append(piece)  # type: ignore[arg-type]
    content = "".join(texts)
    if calls:
        return ParsedOutput(content.strip() or None, calls)
    return ParsedOutput(content, calls)
