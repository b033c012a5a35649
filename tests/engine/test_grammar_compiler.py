"""The grammar layer on SmolLM2's real vocabulary: the early check, the compile cache, and
the token masks (what they allow, and how they are applied to logits)."""
from __future__ import annotations

import time

import pytest
import torch

from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput
from shoal.engine.structured import compiler as compiler_module
from shoal.engine.structured.compiler import GrammarCompiler
from shoal.engine.structured.grammar import check_structured_output
from shoal.engine.structured.masks import MaskFiller, SampleGrammar, apply_masks, unpack_bitmask


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer) -> GrammarCompiler:
    compiler = GrammarCompiler(smollm2_tokenizer, smollm2_tokenizer.vocab_size, cache_size=4)
    yield compiler
    compiler.close()


@pytest.mark.parametrize("structured, problem", [
    (StructuredOutput.json_schema({"type": "objectx"}, field="response_format"), "objectx"),
    (StructuredOutput.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}},
                                  field="response_format"), "/$defs/gone"),
    (StructuredOutput.json_schema({"type": "string", "format": "shoe-size"}, field="response_format"),
     "shoe-size"),
    (StructuredOutput.json_schema({"type": "string", "pattern": "[a-"}, field="response_format"),
     "unclosed character class"),
    (StructuredOutput.regex("[0-9", field="guided_regex"), "unclosed character class"),
    (StructuredOutput.grammar("start: x\nx: /[a-z/", field="guided_grammar"), "invalid regex"),
    (StructuredOutput.grammar("start: missing_rule", field="guided_grammar"), "missing_rule"),
])
def test_constraints_that_cannot_compile_are_refused_naming_their_field(structured, problem):
    with pytest.raises(InvalidParameterError) as info:
        check_structured_output(structured)
    assert info.value.field == structured.field
    assert problem in info.value.message and structured.kind.value in info.value.message


def test_good_constraints_pass_the_check():
    for structured in (StructuredOutput.json_object(), StructuredOutput.regex("[0-9]+"),
                       StructuredOutput.choice(["a", "b c"]), StructuredOutput.grammar('start: "x"+'),
                       StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}})):
        check_structured_output(structured)
    check_structured_output(None)


def test_compiles_are_cached_by_constraint_least_recently_used_dropped(compiler):
    first = compiler.compile_now(StructuredOutput.regex("[0-9]+"))
    again = compiler.submit(StructuredOutput.regex("[0-9]+", field="another_field"))
    assert again.done() and again.result() is first        # a hit: no second compile
    for pattern in ("a+", "b+", "c+", "d+"):                 # cache_size=4: "[0-9]+" goes first
        compiler.compile_now(StructuredOutput.regex(pattern))
    assert not compiler.submit(StructuredOutput.regex("a+")).result() is first
    recompiled = compiler.compile_now(StructuredOutput.regex("[0-9]+"))
    assert recompiled is not first


def test_a_failed_compile_is_the_future_s_error(compiler):
    future = compiler.submit(StructuredOutput.regex("(unclosed", field="guided_regex"))
    with pytest.raises(InvalidParameterError, match="guided_regex"):
        future.result(timeout=30)


def test_one_compile_serves_concurrent_requests_for_the_same_constraint(compiler, monkeypatch):
    calls = []
    real = compiler_module.grammar_text

    def slow(structured):
        calls.append(structured)
        time.sleep(0.3)
        return real(structured)

    monkeypatch.setattr(compiler_module, "grammar_text", slow)
    spec = StructuredOutput.regex("[a-f]{4}")
    futures = [compiler.submit(spec) for _ in range(3)]
    assert len({id(f) for f in futures}) == 1 and not futures[0].done()
    futures[0].result(timeout=30)
    assert len(calls) == 1


def _allowed_ids(disallowed: torch.Tensor) -> list[int]:
    return (~disallowed[0]).nonzero().flatten().tolist()


def test_masks_allow_exactly_what_the_grammar_can_continue_with(compiler, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    compiled = compiler.compile_now(StructuredOutput.regex("[0-9]+"))
    grammar = SampleGrammar(compiled.new_matcher(), tokenizer.eos_token_ids)
    masks = MaskFiller(tokenizer.vocab_size)
    try:
        allowed = _allowed_ids(masks.wait(masks.submit([grammar])))
        assert allowed and all(tokenizer.decode([t]).isdigit() for t in allowed)
        assert not tokenizer.eos_token_ids & set(allowed)      # nothing written yet: no EOS
        assert grammar.accept(tokenizer.encode("7", add_special_tokens=False)[0])
        allowed = set(_allowed_ids(masks.wait(masks.submit([grammar]))))
        assert tokenizer.eos_token_ids <= allowed               # "7" is complete: EOS may end it
        assert not grammar.accept(tokenizer.encode("x", add_special_tokens=False)[0])
        assert grammar.ended
    finally:
        masks.close()


def test_masks_apply_to_their_rows_only():
    logits = torch.zeros((3, 40))
    disallowed = torch.zeros((2, 64), dtype=torch.bool)   # masks may be wider than the logits
    disallowed[0, :39] = True                             # row 2 of logits: only token 39
    disallowed[1, 1:] = True                              # row 0 of logits: only token 0
    apply_masks(logits, [2, 0], disallowed)
    assert logits[2].argmax() == 39 and torch.isinf(logits[2, :39]).all()
    assert logits[0].argmax() == 0 and torch.isinf(logits[0, 1:]).all()
    assert (logits[1] == 0).all()                         # the free row is untouched


def test_masks_for_an_accelerator_cross_packed_and_unpack_where_the_logits_are(compiler,
                                                                               smollm2_tokenizer):
    compiled = compiler.compile_now(StructuredOutput.choice(["alpha", "beta"]))
    grammars = [SampleGrammar(compiled.new_matcher(), smollm2_tokenizer.eos_token_ids)]
    host, packed = MaskFiller(smollm2_tokenizer.vocab_size), MaskFiller(
        smollm2_tokenizer.vocab_size, unpack_on_host=False)
    try:
        unpacked = host.wait(host.submit(grammars))
        words = packed.wait(packed.submit(grammars))
        assert words.dtype == torch.int32 and unpacked.dtype == torch.bool
        assert torch.equal(unpack_bitmask(words, smollm2_tokenizer.vocab_size), unpacked)
        one, two = torch.zeros((1, smollm2_tokenizer.vocab_size)), torch.zeros((1, smollm2_tokenizer.vocab_size))
        apply_masks(one, [0], unpacked)
        apply_masks(two, [0], words)
        assert torch.equal(one, two) and 0 < int(torch.isfinite(one).sum()) < 10
    finally:
        host.close()
        packed.close()
