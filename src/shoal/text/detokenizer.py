"""Incremental detokenization: streamed text deltas with UTF-8 and stop-string care."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# NOTE: decoding a few prompt tokens before the output gives decoders that look at context
# (SentencePiece's leading-space strip) the same surroundings the model saw, as vLLM does.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True, slots=True)
class DetokenizerStep:
    """Text that became final in one step, and the stop string that ended the output, if any."""

    text_delta: str
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas, one step at a time.

    Each call decodes only a short window of recent ids: the ids already shown (prefix) and the
    ones not yet shown (`read` onwards); the new text is the window's text minus the prefix's.
    A window that ends inside a multi-byte character decodes to a trailing U+FFFD and is held
    until the character completes. Stable text then passes the stop-string check, which holds
    back only a tail that could still grow into a stop string.
    """

    __slots__ = ("_tok", "_skip_special", "_ids", "_prefix", "_read", "_stops", "_max_hold",
                 "_include_stop", "_pending", "_chunks", "_finished", "_stop_string")

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: str | Iterable[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if PROMPT_CONTEXT_TOKENS else []
        if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(
                _REPLACEMENT):
            context = []  # NOTE: a prompt cut inside a character would skew the text offsets.
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        stops = [stop] if isinstance(stop, str) else list(stop)
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self._pending = ""           # stable text held back as a possible stop-string start
        self._chunks: list[str] = []  # every delta handed out
        self._finished = False
        self._stop_string: str | None = None

    @property
    def output_text(self) -> str:
        """All text handed out so far (the concatenation of the deltas)."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        """True once a stop string hit or flush() ran; later ids are ignored."""
        return self._finished

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    def add_tokens(self, new_ids: Sequence[int]) -> DetokenizerStep:
        """Takes the ids sampled this step; returns the text that became final."""
        if self._finished or not new_ids:
            return DetokenizerStep("")
        self._ids.extend(new_ids)
        return self._consume(self._stable_text(force=False), final=False)

    def flush(self) -> DetokenizerStep:
        """Hands out everything still held; call when the request ends for any other reason."""
        if self._finished:
            return DetokenizerStep("")
        return self._consume(self._stable_text(force=True), final=True)

    def _stable_text(self, *, force: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        window = self._ids[self._prefix:]
        prefix_text = self._tok.decode(window[:self._read - self._prefix],
                                       skip_special_tokens=self._skip_special)
        full_text = self._tok.decode(window, skip_special_tokens=self._skip_special)
        if not force and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            return ""  # NOTE: nothing new yet, or the last character is still incomplete.
        piece = full_text[len(prefix_text):]
        # Slide the window: what was just read becomes the next prefix; drop ids before it.
        del self._ids[:self._read]
        self._prefix = 0
        self._read = len(self._ids)
        return piece

    def _consume(self, piece: str, *, final: bool) -> DetokenizerStep:
        text = self._pending + piece
        if self._stops:
            hit = self._find_stop(text)
            if hit is not None:
                start, stop = hit
                end = start + len(stop) if self._include_stop else start
                self._pending = ""
                self._finished = True
                self._stop_string = stop
                return self._emit(text[:end], stop)
        hold = 0 if final else self._held_tail(text)
        self._pending = text[len(text) - hold:] if hold else ""
        if final:
            self._finished = True
        return self._emit(text[:len(text) - hold], None)

    def _emit(self, delta: str, stop: str | None) -> DetokenizerStep:
        if delta:
            self._chunks.append(delta)
        return DetokenizerStep(delta, stop)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        # NOTE: the stop that completes first wins (ties: the one starting first), so the result
        # is the same however the text was cut into steps. No stop can start in text already
        # emitted: a tail that could begin one is always held.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_tail(self, text: str) -> int:
        # Longest tail of `text` that is a proper prefix of some stop string.
        for size in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(len(stop) > size and stop.startswith(tail) for stop in self._stops):
                return size
        return 0
