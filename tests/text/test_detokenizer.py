"""IncrementalDetokenizer: UTF-8 safety, stop strings, minimal hold-back, windowed decoding."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shoal.text import IncrementalDetokenizer, Tokenizer


# The real SmolLM2 file comes from conftest's session fixtures (skipped when unavailable).
@pytest.fixture(scope="module")
def tok(smollm2_source, smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_source.metadata, str(smollm2_path))


@pytest.fixture(scope="module")
def prompt(tok: Tokenizer) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something."}]))


def _run(tok: Tokenizer, ids: Sequence[int], chunks: Sequence[int] = (), *,
         prompt: Sequence[int] = (), flush: bool = True, **kwargs) -> tuple[IncrementalDetokenizer, list]:
    """Feeds `ids` in pieces of the given sizes (cycled; one at a time by default)."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    steps, pos, sizes = [], 0, list(chunks) or [1]
    while pos < len(ids):
        size = max(1, sizes[len(steps) % len(sizes)])
        steps.append(detok.add_tokens(list(ids[pos:pos + size])))
        pos += size
    if flush:
        steps.append(detok.flush())
    return detok, steps


# NOTE: SmolLM2's vocab lacks a few bytes (0xF1/0xF2 lead planes 4-11, some C0 controls), so
# such characters cannot be encoded at all; stay below plane 4 and skip the rest with assume().
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffd",
                      max_codepoint=0x3FFFF),
        st.sampled_from(list("😀👍🏽🇫🇷中文日本語한국어é ß\n\t ")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4), with_prompt=st.booleans())
def test_deltas_concatenate_to_decode(tok: Tokenizer, prompt: list[int], text: str,
                                      chunks: list[int], with_prompt: bool) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assume(tok.decode(ids) == text)
    detok, steps = _run(tok, ids, chunks, prompt=prompt if with_prompt else ())
    assert "".join(s.text_delta for s in steps) == tok.decode(ids) == detok.output_text
    # Valid text never shows a replacement character mid-stream, even where a character's bytes
    # are spread over several tokens.
    assert not any("\ufffd" in s.text_delta for s in steps)
    assert all(s.stop_string is None for s in steps)


def test_split_characters_are_held_until_complete(tok: Tokenizer) -> None:
    text = "ok 😀👍🏽 中文字 🇫🇷!"
    ids = tok.encode(text, add_special_tokens=False)
    detok, steps = _run(tok, ids, flush=False)
    deltas = [s.text_delta for s in steps]
    assert "".join(deltas) == text
    assert "\ufffd" not in "".join(deltas)
    # At least one token ended inside a character and produced nothing until the next one.
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    assert "" in deltas


def test_incomplete_tail_is_flushed_as_decode_gives_it(tok: Tokenizer) -> None:
    ids = tok.encode("hi 😀", add_special_tokens=False)
    partial = ids[:-1]
    assert tok.decode(partial).endswith("\ufffd")
    detok, steps = _run(tok, partial, flush=False)
    assert "\ufffd" not in detok.output_text
    final = detok.flush()
    assert detok.output_text == tok.decode(partial)
    assert final.text_delta.endswith("\ufffd")
    assert detok.add_tokens(ids[-1:]).text_delta == ""  # finished: later ids are ignored


def test_no_over_holding(tok: Tokenizer) -> None:
    # Nothing in this text can begin "###", so every token's text is out as soon as it is whole.
    text = "The answer is 42, clearly; see section 3.1 for #details."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["###", "STOP"])
    for k in range(1, len(ids) + 1):
        detok.add_tokens(ids[k - 1:k])
        shown = tok.decode(ids[:k])
        expected = shown[:-1] if shown.endswith("#") else shown  # "#" could begin "###"
        assert detok.output_text == expected


def test_holds_only_a_stop_prefix_and_releases_it(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["<END>"])
    a = detok.add_tokens(tok.encode("value <EN", add_special_tokens=False))
    assert a.text_delta == "value "                     # "<EN" might become "<END>"
    b = detok.add_tokens(tok.encode("X done", add_special_tokens=False))
    assert b.stop_string is None
    assert detok.output_text == "value <ENX done"


def test_hold_never_exceeds_longest_stop_minus_one(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["abcd", "xy"])
    detok.add_tokens(tok.encode("zzz abc", add_special_tokens=False))
    assert detok.output_text == "zzz "                  # "abc" = 3 chars = len("abcd") - 1
    detok.add_tokens(tok.encode("abc", add_special_tokens=False))
    assert detok.output_text == "zzz abc"               # "abcabc": only the last "abc" may start it
    tail = detok.flush()
    assert tail.text_delta == "abc" and detok.output_text == "zzz abcabc"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tok: Tokenizer, include: bool) -> None:
    text = "Hello world, how are you today? Fine."
    stop = "d, how a"
    ids = tok.encode(text, add_special_tokens=False)
    # The stop string spans several tokens.
    starts = [len(tok.decode(ids[:k])) for k in range(len(ids) + 1)]
    at = text.index(stop)
    assert sum(at < s < at + len(stop) for s in starts) >= 2
    detok, steps = _run(tok, ids, stop=[stop, "never"], include_stop_str_in_output=include,
                        flush=False)
    hits = [s for s in steps if s.stop_string is not None]
    assert len(hits) == 1 and hits[0].stop_string == stop
    expected = text[:at + len(stop)] if include else text[:at]
    assert detok.output_text == expected == "".join(s.text_delta for s in steps)
    assert detok.finished and detok.flush().text_delta == ""
    after_hit = steps[steps.index(hits[0]) + 1:]
    assert all(s.text_delta == "" for s in after_hit)


def test_stop_inside_one_chunk_truncates_and_drops_the_rest(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta STOP gamma delta", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop="STOP")
    step = detok.add_tokens(ids)
    assert step == type(step)("alpha beta ", "STOP")
    assert detok.add_tokens(tok.encode(" more", add_special_tokens=False)).text_delta == ""
    assert detok.output_text == "alpha beta "


def test_first_completed_stop_wins_regardless_of_chunking(tok: Tokenizer) -> None:
    ids = tok.encode("xx abcdef yy", add_special_tokens=False)
    stops = ["bcdef", "cd", "abcdefg"]
    results = set()
    for chunks in ([1], [2], [len(ids)]):
        detok, steps = _run(tok, ids, chunks, stop=stops, flush=False)
        results.add((detok.output_text, next(s.stop_string for s in steps if s.stop_string)))
    assert results == {("xx ab", "cd")}


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>", add_special_tokens=False)
    skipped, _ = _run(tok, ids)
    kept, _ = _run(tok, ids, skip_special_tokens=False)
    assert skipped.output_text == "hi"
    assert kept.output_text == "hi<|im_end|>"


class _CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call is given."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_output(tok: Tokenizer, prompt: list[int]) -> None:
    text = "Lorem ipsum dolor sit amet, 😀 consectetur 中文 adipiscing elit. " * 40
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 600
    counter = _CountingDecoder(tok)
    detok, steps = _run(counter, ids, prompt=prompt, stop=["never-appears"])  # type: ignore[arg-type]
    assert detok.output_text == tok.decode(ids)
    assert max(counter.sizes) <= 12   # a window of recent ids, never the whole output


def test_sentencepiece_byte_fallback_stream() -> None:
    sp = "\u2581"
    pieces = [sp, "a", "b", sp + "a", sp + "ab", "ab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    spm = Tokenizer.from_gguf_metadata(meta, "synthetic.gguf")
    text = "ab 😀 é ab中"
    ids = spm.encode(text, add_special_tokens=False)
    assert sum(1 for i in ids if spm.id_to_token(i).startswith("<0x")) >= 9  # bytes, not chars
    detok, steps = _run(spm, ids)
    assert "".join(s.text_delta for s in steps) == spm.decode(ids) == text
    assert not any("\ufffd" in s.text_delta for s in steps)
    # After a prompt, the first piece keeps the space its '▁' stands for (as vLLM/llama.cpp).
    with_prompt, _ = _run(spm, spm.encode("ab", add_special_tokens=False), prompt=spm.encode("ab"))
    assert with_prompt.output_text == " ab"
