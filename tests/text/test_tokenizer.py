"""Tokenizer: GGUF and HF loading, encode/decode against transformers, SentencePiece vocabs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from shoal.text import Tokenizer, tokenizer_from_gguf_metadata


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\n\n\ttabs   and   runs of    spaces  ",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "numbers 12345 3.14159 1,000,000 x1y2 2024-06-01",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧 done",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "café naïve résumé Ωmega straße Ελληνικά",
    "it's they're I'M we'll you'd",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "before<|endoftext|>after <file_sep> x",
    "",
    " ",
    "\n\n\n",
    "{\"key\": [1, 2, {\"nested\": null}]}",
]


# The real SmolLM2 file comes from conftest's session fixtures (skipped when unavailable).

@pytest.fixture(scope="module")
def metadata(smollm2_source) -> dict:
    return smollm2_source.metadata


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer) -> Tokenizer:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def reference(reference_tokenizer):
    return reference_tokenizer


# ----- the real GGUF file ---------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, reference, text: str) -> None:
    assert tok.encode(text) == reference(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == reference(
        text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skippable(tok: Tokenizer, metadata: dict) -> None:
    tokens = metadata["tokenizer.ggml.tokens"]
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok.encode(name) == [tokens.index(name)]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.all_special_ids == {i for i, t in enumerate(metadata["tokenizer.ggml.token_type"])
                                   if t == 3}


@pytest.mark.parametrize(("text", "pieces"), [
    ("2024", ["2", "0", "2", "4"]),
    (" 123", [" ", "1", "2", "3"]),
    ("x ½½", ["x", " ", "½", "½"]),
    ("①②", ["①", "②"]),
    ("٣٤٥", ["٣", "٤", "٥"]),
])
def test_smollm_pretokenizer_splits_every_numeral(tok: Tokenizer, text: str,
                                                   pieces: list[str]) -> None:
    # llama.cpp's 'smollm' pre-tokenizer (like SmolLM2's own Digits pre-tokenizer) cuts every
    # \p{N} character out on its own, so a run encodes as its pieces do one by one.
    assert tok.encode(text) == [i for piece in pieces for i in tok.encode(piece)]


def test_model_facts(tok: Tokenizer, metadata: dict) -> None:
    tokens = metadata["tokenizer.ggml.tokens"]
    assert tok.vocab_size == len(tokens) == metadata["llama.vocab_size"]
    assert tok.bos_token_id == metadata["tokenizer.ggml.bos_token_id"]
    assert tok.bos_token == tokens[tok.bos_token_id]
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert tok.chat_template == metadata["tokenizer.chat_template"]
    assert tok.id_to_token(tok.encode(" the")[0]) == "Ġthe"
    # The file says add_bos_token = False.
    assert tok.encode("hi")[0] != tok.bos_token_id


def test_add_bos_token_flag_is_honoured(metadata: dict) -> None:
    tok = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_bos_token": True}, "x")
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [metadata["tokenizer.ggml.bos_token_id"], *plain]


def test_hf_dir_matches_transformers(tmp_path: Path, reference, tok: Tokenizer) -> None:
    reference.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 7]}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert hf.encode(text) == reference(text)["input_ids"]
    assert hf.eos_token == "<|im_end|>"
    assert hf.eos_token_ids == {0, 2, 7}
    assert hf.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_hf_dir_add_bos_and_jinja_file(tmp_path: Path, tok: Tokenizer) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>",
        "add_bos_token": True, "chat_template": "config template"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file template")
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert hf.encode("hi") == [1, *tok.encode("hi")]
    assert hf.chat_template == "{{ bos_token }}file template"
    assert hf.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>file template"


def test_tiny_hf_dir_and_tiny_gguf_agree(tiny_llama_dir: Path, tiny_llama_gguf: Path) -> None:
    import gguf

    from shoal.model.loaders.gguf_metadata import read_gguf_metadata

    hf = Tokenizer.from_hf_dir(tiny_llama_dir)
    gg = Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf.GGUFReader(str(tiny_llama_gguf))),
                                      str(tiny_llama_gguf))
    messages = [{"role": "user", "content": "hello there, world!"}]
    prompt = hf.apply_chat_template(messages)
    assert prompt == gg.apply_chat_template(messages)
    assert hf.encode(prompt) == gg.encode(prompt)
    assert hf.encode(prompt)[0] == hf.token_to_id("<|im_start|>")
    assert hf.eos_token_ids == gg.eos_token_ids == {0, 2}
    assert (hf.bos_token_id, hf.eos_token_id) == (gg.bos_token_id, gg.eos_token_id) == (1, 2)
    assert hf.vocab_size == gg.vocab_size


def test_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptModelError):
        Tokenizer.from_hf_dir(tmp_path)


def test_unknown_tokenizer_model_is_unsupported() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]},
                                     "/models/x.gguf")
    assert info.value.path == "/models/x.gguf"
    assert "rwkv" in str(info.value)
    with pytest.raises(UnsupportedModelError):
        tokenizer_from_gguf_metadata({}, "/models/y.gguf")
    with pytest.raises(CorruptModelError):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]},
                                     "/models/z.gguf")


# ----- pre-tokenizer choice on a small byte-level vocab -------------------------------------

def _byte_level_metadata(pre: str | None) -> dict:
    # ASCII letters/digits spell themselves in GPT-2's byte alphabet; a space is 'Ġ'.
    chars = list("0123456789abcdefghijklmnopqrstuvwxyz") + ["Ġ"]
    merges = ["Ġ 1", "1 2", "12 3", "123 4", "a b", "ab c"]
    tokens = ["<|end|>"] + chars + ["12", "123", "1234", "Ġ1", "ab", "abc"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


@pytest.mark.parametrize(("pre", "expected"), [
    ("gpt2", ["1234", "Ġ1", "2", "abc"]),            # ' ?\p{N}+': the whole run is one word
    (None, ["1234", "Ġ1", "2", "abc"]),              # default: GPT-2's split
    ("llama-bpe", ["123", "4", "Ġ", "12", "abc"]),   # '\p{N}{1,3}', spaces apart from digits
    ("smollm", ["1", "2", "3", "4", "Ġ", "1", "2", "abc"]),
    ("qwen2", ["1", "2", "3", "4", "Ġ", "1", "2", "abc"]),
])
def test_pre_tokenizer_follows_gguf_pre(pre: str | None, expected: list[str]) -> None:
    tok = Tokenizer.from_gguf_metadata(_byte_level_metadata(pre), "x")
    ids = tok.encode("1234 12abc", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == expected
    assert tok.decode(ids) == "1234 12abc"
    assert tok.encode("<|end|>") == [0]


def test_mislabelled_end_of_turn_token_is_special_and_eos() -> None:
    meta = _byte_level_metadata("gpt2")
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "<|im_end|>"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1]  # says "normal"
    meta["tokenizer.chat_template"] = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    tok = Tokenizer.from_gguf_metadata(meta, "x")
    end = len(meta["tokenizer.ggml.tokens"]) - 1
    assert tok.encode("ab<|im_end|>", add_special_tokens=False) == [tok.token_to_id("ab"), end]
    assert tok.eos_token_ids == {0, end}
    assert tok.decode([end]) == ""


# ----- SentencePiece-style ('llama') vocab -------------------------------------------------

SP = "\u2581"
_WORDS = ["the", "hello", "world", "and", "token", "ab", "ba", "tent", "note"]


def _spm_metadata(add_space_prefix: bool = True) -> dict:
    rng = random.Random(1234)
    pieces: list[str] = []
    for word in _WORDS:
        for stem in (SP + word, word):
            for end in range(1, len(stem) + 1):
                if stem[:end] not in pieces:
                    pieces.append(stem[:end])
    for extra in ("en", "he", "lo", "or", "ld", "to", "ke", "  "):
        if extra not in pieces:
            pieces.append(extra)
    # SentencePiece keeps every character of its pieces as a piece of its own.
    for char in sorted({c for p in pieces for c in p if c != " "}):
        if char not in pieces:
            pieces.append(char)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * (3 + 256) + rng.sample(range(-10_000, 0), len(pieces)) + [0.0]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [float(s) for s in scores],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def _spm_reference(meta: dict, text: str) -> list[int]:
    """llama.cpp's SentencePiece BPE, written out plainly: merge the best-scoring adjacent pair
    whose union is a normal token, leftmost first on ties; unknown characters become bytes."""
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    # A token stored as real spaces stands for '▁'s (Gemma files do this).
    ids = {t.replace(" ", SP): i for i, t in enumerate(tokens) if types[i] == 1}
    if not text:
        return []  # llama.cpp has no fragment to prefix
    if meta["tokenizer.ggml.add_space_prefix"]:
        text = " " + text
    symbols = list(text.replace(" ", SP))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            union = symbols[i] + symbols[i + 1]
            if union in ids and (best is None or scores[ids[union]] > scores[ids[best]]):
                best, at = union, i
        if best is None:
            break
        symbols[at:at + 2] = [best]
    out: list[int] = []
    for sym in symbols:
        if sym in ids:
            out.append(ids[sym])
        else:
            out.extend(tokens.index(f"<0x{b:02X}>") for b in sym.encode("utf-8"))
    return out


@pytest.fixture(scope="module")
def spm() -> tuple[dict, Tokenizer]:
    meta = _spm_metadata()
    return meta, Tokenizer.from_gguf_metadata(meta, "synthetic.gguf")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("thelowrdankbe ") + ["é", "😀", "\n", "ß"]), max_size=30))
def test_spm_matches_reference_and_round_trips(spm: tuple[dict, Tokenizer], text: str) -> None:
    meta, tok = spm
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == _spm_reference(meta, text)
    assert tok.decode(ids) == text


def test_spm_bos_byte_fallback_and_specials(spm: tuple[dict, Tokenizer]) -> None:
    meta, tok = spm
    tokens = meta["tokenizer.ggml.tokens"]
    ids = tok.encode("hello 😀")
    assert ids[0] == 1  # add_bos_token defaults to True for SentencePiece files
    assert [tok.id_to_token(i) for i in ids[1:]] == [
        SP + "hello", SP, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(ids) == "hello 😀"
    # A lone byte decodes to U+FFFD; a special token is one id and the text after it gets the
    # space prefix again, as llama.cpp does.
    assert tok.decode([tokens.index("<0xF0>")]) == "\ufffd"
    assert tok.encode("world</s>the", add_special_tokens=False) == [
        tokens.index(SP + "world"), 2, tokens.index(SP + "the")]
    assert tok.encode("a<tool>b", add_special_tokens=False)[1] == tokens.index("<tool>")
    assert tok.decode(tok.encode("the</s>")) == "the"
    assert tok.eos_token_ids == {2}


def test_spm_without_space_prefix() -> None:
    meta = _spm_metadata(add_space_prefix=False)
    tok = Tokenizer.from_gguf_metadata(meta, "gemma-like.gguf")
    tokens = meta["tokenizer.ggml.tokens"]
    ids = tok.encode("hello world", add_special_tokens=False)
    assert ids == [tokens.index("hello"), tokens.index(SP + "world")]
    assert tok.decode(ids) == "hello world"
    # The file stored a two-space token as real spaces; it must still be used.
    two = tok.encode("a  b", add_special_tokens=False)
    assert tok.decode(two) == "a  b"
