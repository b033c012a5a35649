"""The WordPiece tokenizer of a llama.cpp `bert` GGUF (`tokenizer.ggml.model` = "bert").

llama.cpp's converter rewrites a BERT vocabulary: a word-initial piece gets a "▁" prefix and a
continuation loses its "##", bracketed specials ([CLS], [SEP], ...) stay as they are. Undoing
that gives back the original vocab.txt, which the `tokenizers` WordPiece model then reads with
BERT's normaliser and pre-tokenizer, and [CLS] ... [SEP] around each input.
"""
from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from shoal.core.errors import CorruptModelError

_WORD_START = "\u2581"


def original_piece(token: str) -> str:
    if token.startswith(_WORD_START):
        return token[len(_WORD_START):]
    if token.startswith("[") and token.endswith("]"):
        return token
    return "##" + token


def _special(metadata: dict[str, Any], tokens: list[str], keys: tuple[str, ...], source: str) -> int:
    for key in keys:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and 0 <= value < len(tokens):
            return value
    raise CorruptModelError(source, f"the WordPiece vocabulary needs tokenizer.ggml.{keys[0]}")


def wordpiece_from_gguf(metadata: dict[str, Any], source: str) -> RustTokenizer:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CorruptModelError(source, "tokenizer.ggml.tokens is missing or empty")
    pieces = [original_piece(t) for t in tokens]
    vocab = {piece: i for i, piece in reversed(list(enumerate(pieces)))}
    unk = _special(metadata, tokens, ("unknown_token_id",), source)
    cls = _special(metadata, tokens, ("cls_token_id", "bos_token_id"), source)
    sep = _special(metadata, tokens, ("seperator_token_id", "separator_token_id", "eos_token_id"),
                   source)
    tokenizer = RustTokenizer(WordPiece(vocab, unk_token=pieces[unk], max_input_chars_per_word=100))
    # NOTE: the file does not say whether the model is cased; a vocabulary without ASCII
    # capitals was trained lower-cased (BERT's uncased checkpoints, MiniLM: their only
    # "upper-case" pieces are symbols such as ℝ).
    lowercase = not any(any("A" <= c <= "Z" for c in p) for p in pieces if not p.startswith("["))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = [p for p in pieces if p.startswith("[") and p.endswith("]")]
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{pieces[cls]} $A {pieces[sep]}",
        pair=f"{pieces[cls]} $A {pieces[sep]} $B:1 {pieces[sep]}:1",
        special_tokens=[(pieces[cls], cls), (pieces[sep], sep)])
    return tokenizer
