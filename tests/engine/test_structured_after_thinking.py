"""A constraint applied after a reasoning model's thinking (StructuredOutput.after_thinking):
the thinking is free, the closing token ends it, the answer must match."""
from __future__ import annotations

import llguidance
import pytest

import tiny_models
from shoal.core.structured_output import StructuredOutput
from shoal.engine.structured.grammar import build_llg_tokenizer, check_structured_output, grammar_text
from shoal.text.tokenizer import Tokenizer

OPEN, CLOSE, EOS = 299, 300, 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_models.write_reasoning_model(tmp_path_factory.mktemp("r")))


def _accepts(tokenizer: Tokenizer, structured: StructuredOutput, text: str) -> bool:
    matcher = llguidance.LLMatcher(build_llg_tokenizer(tokenizer, tokenizer.vocab_size),
                                   grammar_text(structured))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


SCHEMA = StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                       "required": ["a"], "additionalProperties": False})


@pytest.mark.parametrize("structured,answer,wrong", [
    (SCHEMA, '{"a": 12}', '{"b": 1}'),
    (StructuredOutput.regex("[0-9]+"), "42", "4x"),
    (StructuredOutput.choice(["yes", "no"]), "yes", "maybe"),
    (StructuredOutput.grammar('start: "x" NUM\nNUM: /[0-9]+/'), "x12", "y12"),
])
def test_free_thinking_then_the_constrained_answer(tokenizer, structured, answer, wrong) -> None:
    opened = structured.after_thinking(None, CLOSE, (EOS,))        # the prompt opened <think>
    check_structured_output(opened)
    assert _accepts(tokenizer, opened, "anything {at all} 123</think>\n\n" + answer)
    assert not _accepts(tokenizer, opened, "thoughts</think>" + wrong)
    assert not _accepts(tokenizer, opened, answer)                  # the thinking must close first
    own = structured.after_thinking(OPEN, CLOSE, (EOS,))           # the model opens it itself
    assert _accepts(tokenizer, own, "<think>hmm</think>" + answer)
    assert not _accepts(tokenizer, own, "hmm</think>" + answer)


def test_whitespace_after_the_thinking_is_bounded(tokenizer) -> None:
    opened = StructuredOutput.regex("[0-9]+").after_thinking(None, CLOSE, (EOS,))
    assert _accepts(tokenizer, opened, "t</think>\n\n 7")
    assert not _accepts(tokenizer, opened, "t</think>" + " " * 5 + "7")


def test_the_thinking_tokens_are_part_of_the_cache_key() -> None:
    plain = StructuredOutput.regex("[0-9]+")
    assert plain != plain.after_thinking(None, CLOSE) != plain.after_thinking(OPEN, CLOSE)
    assert plain.after_thinking(None, CLOSE) == StructuredOutput.regex("[0-9]+").after_thinking(None, CLOSE)
