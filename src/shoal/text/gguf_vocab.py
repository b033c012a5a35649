"""Builds a Rust `tokenizers.Tokenizer` from the tokenizer a GGUF file describes in its metadata."""
from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from shoal.core.errors import CorruptModelError, UnsupportedModelError
from shoal.text.gguf_wordpiece import wordpiece_from_gguf

SPIECE_SPACE = "\u2581"  # '▁', SentencePiece's spelling of a space


class TokenType(enum.IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Split patterns (facts from llama.cpp's llama-vocab.cpp). A byte-level vocabulary's merges were
# learned on text cut by one of these; each list is applied in order, each cut kept ("isolated").
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
                  "smaug-bpe", "midm-2.0", "lfm2", "chatglm-bpe")
_DIGIT_SPLIT_FAMILY = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                       "minerva-7b")

PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **{name: (_LLAMA3,) for name in _LLAMA3_FAMILY},
    # NOTE: these vocabularies were trained with every digit on its own.
    **{name: (r"\p{N}", _GPT2) for name in _DIGIT_SPLIT_FAMILY},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    **{name: (_GPT4O,) for name in ("gpt-4o", "llama4", "minimax-m2")},
    "qwen35": (_QWEN35,),
    "tekken": (_TEKKEN,),
    "deepseek-v3": _DEEPSEEK3,
    "gpt2": (_GPT2,),
}
DEFAULT_SPLITS: tuple[str, ...] = (_GPT2,)

# NOTE: llama.cpp turns these on for the Llama 3 family: a whole pre-token found in the vocab is
# taken as is, even when the merges would not build it.
_IGNORE_MERGES = frozenset(_LLAMA3_FAMILY)


def tokenizer_from_gguf_metadata(metadata: dict[str, Any], source: str = "<gguf>") -> RustTokenizer:
    """Builds the tokenizer described by `tokenizer.ggml.*` keys; `source` names the file in errors."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise UnsupportedModelError(source, "the file has no tokenizer (tokenizer.ggml.model missing)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model in ("gpt2", "llama") and (not isinstance(tokens, list) or not tokens):
        raise CorruptModelError(source, "tokenizer.ggml.tokens is missing or empty")
    if model == "gpt2":
        tokenizer = _byte_level_bpe(metadata, tokens, source)
    elif model == "llama":
        tokenizer = _sentencepiece_bpe(metadata, tokens, source)
    elif model == "bert":
        return wordpiece_from_gguf(metadata, source)
    else:
        raise UnsupportedModelError(
            source, f"tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")
    _add_special_tokens(tokenizer, tokens, _token_types(metadata, tokens, source))
    _set_post_processor(tokenizer, metadata, tokens, source)
    return tokenizer


def gguf_add_bos_token(metadata: dict[str, Any]) -> bool:
    """Whether encoding prepends BOS: the file's flag, else llama.cpp's default for its vocab."""
    flag = metadata.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        return bool(flag)
    if not isinstance(metadata.get("tokenizer.ggml.bos_token_id"), int):
        return False
    if metadata.get("tokenizer.ggml.model") == "llama":
        return True  # NOTE: old SentencePiece files carry no flag; llama.cpp adds BOS to them.
    return metadata.get("tokenizer.ggml.pre") in _LLAMA3_FAMILY


# End-of-turn tokens llama.cpp treats as control whatever type the file gives them.
_FORCED_CONTROL = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                             "<|endoftext|>", "<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>"})


def _token_types(metadata: dict[str, Any], tokens: list[str], source: str) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        types = [TokenType.NORMAL] * len(tokens)
    elif len(types) != len(tokens):
        raise CorruptModelError(
            source, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    out = list(types)
    # NOTE: some converters mislabel these as normal/user-defined; llama.cpp overrides that so
    # they encode whole and end generation, and so do we.
    for index, token in enumerate(tokens):
        if token in _FORCED_CONTROL and out[index] in (TokenType.NORMAL, TokenType.USER_DEFINED):
            out[index] = TokenType.CONTROL
    return out


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    # NOTE: a few files repeat a token string; the model's vocab can map a string to one id only,
    # so the first wins and later copies just never come out of encode.
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str], source: str) -> RustTokenizer:
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges_raw, list):
        raise CorruptModelError(source, "a 'gpt2' tokenizer needs tokenizer.ggml.merges")
    vocab = _first_ids(tokens)
    merges = _parse_merges(merges_raw, vocab, source)
    pre = metadata.get("tokenizer.ggml.pre")
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = RustTokenizer(model)
    splits = PRE_TOKENIZER_SPLITS.get(pre, DEFAULT_SPLITS) if isinstance(pre, str) else DEFAULT_SPLITS
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _parse_merges(lines: list[str], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for line in lines:
        left, sep, right = line.partition(" ")
        if not sep or not left or not right:
            raise CorruptModelError(source, f"malformed merge {line!r} in tokenizer.ggml.merges")
        if left + right not in vocab or left not in vocab or right not in vocab:
            continue  # NOTE: the Rust BPE rejects merges naming unknown tokens; llama.cpp skips them.
        merges.append((left, right))
    return merges


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], source: str) -> RustTokenizer:
    types = _token_types(metadata, tokens, source)
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is not None and len(scores) != len(tokens):
        raise CorruptModelError(
            source, f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    spelled = _respell_space_runs(tokens, types)
    vocab = _first_ids(spelled)
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if isinstance(merges_raw, list) and merges_raw:
        merges = _parse_merges(merges_raw, vocab, source)
    else:
        merges = _merges_from_scores(spelled, types, scores, vocab)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = spelled[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(spelled) else None
    tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                         byte_fallback=True))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # NOTE: llama.cpp prepends the space to every text fragment after a special token, which is
    # what a normalizer (run on each piece between added tokens) does.
    steps: list[normalizers.Normalizer] = []
    if add_space_prefix:
        steps.append(normalizers.Prepend(SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", SPIECE_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    chain: list[decoders.Decoder] = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
    if add_space_prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(chain)
    return tokenizer


def _respell_space_runs(tokens: list[str], types: list[int]) -> list[str]:
    # NOTE: some converters (Gemma) store a token of spaces as real spaces, but the normalizer
    # turns text spaces into '▁' before lookup; spell them the way lookup will see them.
    taken = set(tokens)
    out = list(tokens)
    for index, token in enumerate(tokens):
        if token and types[index] == TokenType.NORMAL and not token.strip(" "):
            spelled = SPIECE_SPACE * len(token)
            if spelled not in taken:
                out[index] = spelled
                taken.add(spelled)
    return out


def _merges_from_scores(tokens: list[str], types: list[int], scores: Sequence[float],
                        vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose union scores highest; as ranked merges
    that is every split of a normal token into two normal tokens, best union score first."""
    mergeable = {token for token, index in vocab.items()
                 if types[index] in (TokenType.NORMAL, TokenType.UNDEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token in mergeable:
        index = vocab[token]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[index]), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _add_special_tokens(tokenizer: RustTokenizer, tokens: list[str], types: list[int]) -> None:
    # NOTE: llama.cpp matches control, unknown and user-defined tokens whole in raw text; only
    # the first two are "special" (skipped by decode(skip_special_tokens=True)).
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    special = [AddedToken(tok, normalized=False, special=True)
               for tok, kind in zip(tokens, types)
               if kind in (TokenType.CONTROL, TokenType.UNKNOWN) and tok and tok in vocab]
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, kind in zip(tokens, types)
            if kind == TokenType.USER_DEFINED and tok and tok in vocab]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)


def _set_post_processor(tokenizer: RustTokenizer, metadata: dict[str, Any], tokens: list[str],
                        source: str) -> None:
    add_bos = gguf_add_bos_token(metadata)
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    pieces: list[tuple[str, int]] = []
    if add_bos:
        pieces.append(_special_piece(metadata, tokens, "bos", source))
    eos_piece = _special_piece(metadata, tokens, "eos", source) if add_eos else None
    if not pieces and eos_piece is None:
        return
    single = [name for name, _ in pieces] + ["$A"] + ([eos_piece[0]] if eos_piece else [])
    pair = single + ["$B:1"] + ([eos_piece[0]] if eos_piece else [])
    specials = pieces + ([eos_piece] if eos_piece else [])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _special_piece(metadata: dict[str, Any], tokens: list[str], which: str,
                   source: str) -> tuple[str, int]:
    token_id = metadata.get(f"tokenizer.ggml.{which}_token_id")
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise CorruptModelError(
            source, f"the tokenizer adds {which.upper()} but tokenizer.ggml.{which}_token_id is "
                    f"{token_id!r} (vocab has {len(tokens)} tokens)")
    return tokens[token_id], token_id
