"""StructuredOutput -> llguidance grammar text, the check that it compiles, and the
vocabulary llguidance masks over.

llguidance was chosen over xgrammar by measurement (docs/architecture.md, "Dependencies and
why"; benchmarks/grammar_backends.py).
"""
from __future__ import annotations

import json

import llguidance
import torch

from shoal.core.closed_objects import close_objects
from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput, StructuredOutputKind, ThinkingTokens
from shoal.text.tokenizer import Tokenizer

# NOTE: JSON is written on one line with single spaces (`{"a": 1, "b": [2, 3]}`), as
# json.dumps writes it. Free whitespace between tokens lets a small model pad with newlines
# until max_tokens cuts the document off; OpenAI's own structured outputs are compact too.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; InvalidParameterError if it cannot be built."""
    text = _body_grammar_text(structured)
    return text if structured.thinking is None else _after_thinking(text, structured.thinking)


def _after_thinking(body: str, thinking: ThinkingTokens) -> str:
    """A grammar of free thinking (any tokens but the closing one and the banned ones), the
    closing token, a little whitespace (bounded: a model must not pad forever), then `body`
    (as llguidance's sub-grammar @answer)."""
    try:
        top = json.loads(body)
    except ValueError:
        top = {"grammars": [{"lark_grammar": body}]}     # grammar_from gives Lark text for some kinds
    answer, *rest = top["grammars"]
    answer = {**answer, "name": "answer"}
    banned = ",".join(str(t) for t in (*thinking.banned_ids, thinking.close_id))
    opening = f"<[{thinking.open_id}]> " if thinking.open_id is not None else ""
    lark = (f"start: {opening}thought* <[{thinking.close_id}]> GAP @answer\n"
            f"thought: <[^{banned}]>\n"
            "GAP: /[ \\t\\r\\n]{0,4}/")
    return json.dumps({**top, "grammars": [{"name": "thinking", "lark_grammar": lark}, answer, *rest]})


def _body_grammar_text(structured: StructuredOutput) -> str:
    kind, spec = structured.kind, structured.spec
    try:
        if kind is StructuredOutputKind.JSON_SCHEMA:
            closed = json.dumps(close_objects(json.loads(spec)), ensure_ascii=False)
            return llguidance.LLMatcher.grammar_from_json_schema(closed, overrides=JSON_OPTIONS)
        if kind is StructuredOutputKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                                 overrides=JSON_OPTIONS)
        if kind is StructuredOutputKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind is StructuredOutputKind.CHOICE:
            return llguidance.grammar_from("choice", structured.choices)  # type: ignore[arg-type]
        return llguidance.grammar_from("grammar", spec)   # Lark, or GBNF converted to Lark
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidParameterError(structured.field, f"invalid {kind.value}: {exc}") from None


def check_structured_output(structured: StructuredOutput | None) -> None:
    """Raises InvalidParameterError naming structured.field when the schema, regex or
    grammar does not compile (an unsupported keyword, a bad pattern, a $ref to nowhere).

    NOTE: no tokenizer needed, so any thread may call it (the serving layer does, to answer
    400 before admitting the request); it costs milliseconds even for large schemas."""
    if structured is None:
        return
    error = llguidance.LLMatcher.validate_grammar(grammar_text(structured))
    if error:
        raise InvalidParameterError(structured.field, f"invalid {structured.kind.value}: {error.strip()}")


def mask_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> int:
    """Tokens a mask covers: the model's logits, or the tokenizer's ids if it has more."""
    return max(model_vocab_size, tokenizer.vocab_size)


def build_llg_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, `vocab_size` (mask_vocab_size) tokens wide
    (~0.4 s for 49k tokens: built once per engine, off the engine thread)."""
    eos = sorted(tokenizer.eos_token_ids)
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                  eos_token=eos or None)


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row of llguidance's token bitmask."""
    return (vocab_size + 31) // 32


def fill_bitmask(matcher: llguidance.LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """Writes the matcher's allowed tokens into row `row` of an int32 CPU bitmask: bit t % 32
    of word t // 32 is set when token t may come next. Releases the GIL while it works.

    NOTE: what llguidance.torch.fill_next_token_bitmask does, without importing that module:
    it pulls in torch.compile, which costs seconds at import."""
    target = bitmask[row]
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not target.is_contiguous():
        raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
    matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
