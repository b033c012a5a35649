"""Reasoning ("thinking") models: which chat templates emit `<think>…</think>`, and a parser
that splits a model's output into its thinking and its answer, whole or chunk by chunk.

A model reasons when its chat template writes the closing tag (DeepSeek-R1 distills strip
earlier thinking with `split('</think>')`, Qwen3 renders it) and its vocabulary holds that tag
as one token: detected from the template and the tokens, never from the model's name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """How one model writes its thinking, and which template switches steer it."""

    start: str = THINK_START
    end: str = THINK_END
    # the template variable that turns thinking off (Qwen3's `enable_thinking`, Ollama's
    # `.Think`), if the template has one
    switch: str | None = None
    # the template reads `reasoning_effort` (so an OpenAI request's value can reach it)
    takes_effort: bool = False


def detect_reasoning(template: str | None, token_to_id: Callable[[str], int | None]
                     ) -> ReasoningFormat | None:
    """The reasoning format of a model with this chat template and vocabulary, or None."""
    if not template or THINK_END not in template:
        return None
    if token_to_id(THINK_START) is None or token_to_id(THINK_END) is None:
        return None
    # Qwen3's Jinja switch; a Modelfile (Go) TEMPLATE reads Ollama's .Think instead
    switch = "enable_thinking" if "enable_thinking" in template else (
        "Think" if ".Think" in template else None)
    return ReasoningFormat(switch=switch, takes_effort="reasoning_effort" in template)


def prompt_opens_thinking(prompt_text: str, fmt: ReasoningFormat) -> bool:
    """True when the rendered prompt already opened the thinking (the template writes
    `<think>` into the generation prompt), so the output starts inside it."""
    opened = prompt_text.rfind(fmt.start)
    return opened >= 0 and opened > prompt_text.rfind(fmt.end)


def _held(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningParser:
    """Splits streamed output into (thinking, content) deltas; the result does not depend on
    where the stream was cut. Output that does not open with the start tag (leading
    whitespace aside) is all content, unless the prompt already opened the thinking.
    Whitespace around the thinking and at the start of the answer is dropped, as Ollama
    and vLLM's clients show it."""

    __slots__ = ("_fmt", "_state", "_buffer", "_reasoning", "_content")

    def __init__(self, fmt: ReasoningFormat, in_thinking: bool = False) -> None:
        self._fmt = fmt
        self._state = "thinking_start" if in_thinking else "before"
        self._buffer = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def reasoning(self) -> str:
        """All thinking handed out so far."""
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        """All content handed out so far."""
        return "".join(self._content)

    @property
    def thinking_done(self) -> bool:
        return self._state in ("answer_start", "content")

    def feed(self, text: str) -> tuple[str, str]:
        """Takes new output text; returns the (thinking, content) that became final."""
        self._buffer += text
        reasoning, content = [], []
        while True:
            progressed = self._step(reasoning, content, final=False)
            if not progressed:
                break
        return self._out(reasoning, content)

    def finish(self) -> tuple[str, str]:
        """Hands out whatever is still held at the end of the output."""
        reasoning, content = [], []
        while self._step(reasoning, content, final=True):
            pass
        if self._buffer:
            target = reasoning if self._state in ("thinking_start", "thinking") else content
            text = self._buffer.rstrip() if target is reasoning else self._buffer
            if self._state in ("before", "thinking_start", "answer_start"):
                text = text.lstrip()
            target.append(text)
            self._buffer = ""
        return self._out(reasoning, content)

    def _out(self, reasoning: list[str], content: list[str]) -> tuple[str, str]:
        r, c = "".join(reasoning), "".join(content)
        if r:
            self._reasoning.append(r)
        if c:
            self._content.append(c)
        return r, c

    def _step(self, reasoning: list[str], content: list[str], *, final: bool) -> bool:
        """One state transition over the buffer; False when it must wait for more text."""
        buf, fmt = self._buffer, self._fmt
        if self._state == "before":
            stripped = buf.lstrip()
            if stripped.startswith(fmt.start):
                self._buffer = stripped[len(fmt.start):]
                self._state = "thinking_start"
                return True
            if not final and fmt.start.startswith(stripped):
                return False            # still possibly the start tag (or only whitespace)
            self._state = "content"
            return True
        if self._state in ("thinking_start", "answer_start"):
            stripped = buf.lstrip()
            if not stripped:
                self._buffer = ""
                return False
            self._buffer = stripped
            self._state = "thinking" if self._state == "thinking_start" else "content"
            return True
        if self._state == "thinking":
            end = buf.find(fmt.end)
            if end >= 0:
                reasoning.append(buf[:end].rstrip())
                self._buffer = buf[end + len(fmt.end):]
                self._state = "answer_start"
                return True
            if final:
                return False
            # hold a tail that may grow into the end tag, and trailing whitespace (dropped
            # if the end tag follows it)
            keep = len(buf) - _held(buf, fmt.end)
            safe = buf[:keep].rstrip()
            if safe:
                reasoning.append(safe)
            self._buffer = buf[len(safe):]
            return False
        # content: everything passes
        if buf:
            content.append(buf)
            self._buffer = ""
        return False


def split_reasoning(text: str, fmt: ReasoningFormat, in_thinking: bool = False) -> tuple[str, str]:
    """(thinking, content) of a whole output."""
    parser = ReasoningParser(fmt, in_thinking)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content
