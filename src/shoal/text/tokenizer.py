"""Tokenizer: one text<->ids interface over GGUF-described and Hugging Face tokenizers."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from shoal.core.errors import CorruptModelError, InvalidParameterError, ModelNotFoundError
from shoal.text.chat_template import fallback_chat_template, render_chat_template
from shoal.text.gguf_vocab import gguf_add_bos_token, tokenizer_from_gguf_metadata

# Tokens that end an assistant turn in common chat formats; one counts as an EOS id when it is a
# special token of the vocabulary and the chat template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
                      "<|return|>", "<|call|>", "<|end_of_turn|>", "<turn|>")
# End-of-document tokens: an instruct model may still emit its base model's EOS.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


class Tokenizer:
    """Encodes and decodes text for one model and renders its chat template."""

    __slots__ = ("_backend", "_bos_id", "_eos_id", "_eos_ids", "_add_bos", "_backend_adds_bos",
                 "_templates", "_vocab_size", "_special_ids")

    def __init__(self, backend: RustTokenizer, *, bos_token_id: int | None,
                 eos_token_id: int | None, add_bos_token: bool | None = None,
                 chat_template: str | Mapping[str, str] | None = None,
                 extra_eos_token_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
        # NOTE: tokenizer.json may configure padding and truncation (sentence-transformers
        # directories pad to 128): they would pad every encode; lengths are the engine's job.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._bos_id = bos_token_id
        self._eos_id = eos_token_id
        self._backend_adds_bos = (bos_token_id is not None and
                                  backend.encode("", add_special_tokens=True).ids[:1] == [bos_token_id])
        # NOTE: None means "whatever tokenizer.json's post-processor does".
        self._add_bos = self._backend_adds_bos if add_bos_token is None else bool(add_bos_token)
        if self._add_bos and bos_token_id is None:
            self._add_bos = False
        if isinstance(chat_template, Mapping):
            self._templates = {str(k): str(v) for k, v in chat_template.items() if v}
        else:
            self._templates = {"default": chat_template} if chat_template else {}
        self._vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        self._special_ids = frozenset(
            index for index, added in backend.get_added_tokens_decoder().items() if added.special)
        self._eos_ids = self._collect_eos_ids(extra_eos_token_ids)

    # ----- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf>") -> Tokenizer:
        """The tokenizer a GGUF file describes (metadata as read_gguf_metadata returns it)."""
        meta = dict(metadata)
        backend = tokenizer_from_gguf_metadata(meta, source)
        tokens = meta["tokenizer.ggml.tokens"]
        extra = [meta[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if isinstance(meta.get(key), int)]
        template = meta.get("tokenizer.chat_template")
        if not template:
            # NOTE: some converters drop the template (the gemma3:270m file has none); a known
            # turn format is still better than ChatML, which such a model never saw.
            special = {added.content for added in backend.get_added_tokens_decoder().values()
                       if added.special}
            template = fallback_chat_template(special)
        return cls(backend, bos_token_id=_valid_id(meta.get("tokenizer.ggml.bos_token_id"), tokens),
                   eos_token_id=_valid_id(meta.get("tokenizer.ggml.eos_token_id"), tokens),
                   add_bos_token=gguf_add_bos_token(meta),
                   chat_template=template,
                   extra_eos_token_ids=extra, vocab_size=len(tokens))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json and its configs)."""
        root = Path(path)
        if not root.is_dir():
            raise ModelNotFoundError(str(path), "no such model directory")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelNotFoundError(str(tok_file), "the model directory has no tokenizer.json")
        try:
            backend = RustTokenizer.from_file(str(tok_file))
        except Exception as exc:  # NOTE: the Rust side raises a bare Exception on bad JSON.
            raise CorruptModelError(str(tok_file), f"cannot parse tokenizer.json: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")
        model_config = _read_json(root / "config.json")

        bos_text = _token_text(config.get("bos_token"))
        eos_text = _token_text(config.get("eos_token"))
        bos_id = backend.token_to_id(bos_text) if bos_text else None
        eos_id = backend.token_to_id(eos_text) if eos_text else None
        extra: list[int] = []
        for source in (generation, model_config):
            if eos_id is None and isinstance(source.get("eos_token_id"), int):
                eos_id = source["eos_token_id"]
            if bos_id is None and isinstance(source.get("bos_token_id"), int):
                bos_id = source["bos_token_id"]
        raw = generation.get("eos_token_id")
        extra.extend(raw if isinstance(raw, list) else [raw] if isinstance(raw, int) else [])
        add_bos = config.get("add_bos_token")
        return cls(backend, bos_token_id=bos_id, eos_token_id=eos_id,
                   add_bos_token=add_bos if isinstance(add_bos, bool) else None,
                   chat_template=_hf_chat_templates(root, config),
                   extra_eos_token_ids=[i for i in extra if isinstance(i, int)])

    def _collect_eos_ids(self, extra: Iterable[int]) -> frozenset[int]:
        ids = {i for i in extra if 0 <= i < self._vocab_size}
        if self._eos_id is not None:
            ids.add(self._eos_id)
        template_text = "\n".join(self._templates.values())
        for token in END_OF_TURN_TOKENS:
            # NOTE: OpenAI's harmony format writes <|end|> between messages of one reply and
            # finishes with <|return|>; there <|end|> must not stop generation.
            if token == "<|end|>" and "<|return|>" in template_text:
                continue
            index = self._backend.token_to_id(token)
            if index is not None and index in self._special_ids and token in template_text:
                ids.add(index)
        for token in END_OF_TEXT_TOKENS:
            index = self._backend.token_to_id(token)
            if index is not None and index in self._special_ids:
                ids.add(index)
        return frozenset(ids)

    # ----- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text (e.g. '<|im_start|>') becomes its single id.

        add_special_tokens adds BOS (and EOS) only when the model asks for it. Text rendered by a
        chat template that already writes the BOS token should be encoded with it False.
        """
        if not isinstance(text, str):
            raise InvalidParameterError("prompt", f"expected text, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                # JSON allows "\ud800"; a lone surrogate is not a character any model can read.
                raise InvalidParameterError(
                    "prompt", f"the text holds an invalid Unicode code point "
                    f"{text[exc.start]!a} at position {exc.start}") from None
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos != self._backend_adds_bos:
            if self._add_bos:
                ids.insert(0, self._bos_id)  # type: ignore[arg-type]
            elif ids[:1] == [self._bos_id]:
                del ids[0]
        return ids

    def special_affixes(self) -> tuple[int, int]:
        """How many special tokens encode() adds before and after a text ([CLS] ... [SEP]:
        (1, 1); BOS ...: (1, 0)), so a cut input can keep them."""
        full = self.encode("a")
        bare = self.encode("a", add_special_tokens=False)
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return start, len(full) - start - len(bare)
        return 0, 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form whole characters come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of one id (e.g. 'Ġthe'), or None outside the vocab."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled exactly `token`, or None."""
        return self._backend.token_to_id(token)

    # ----- properties --------------------------------------------------------------------------

    @property
    def backend(self) -> RustTokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def bos_token(self) -> str | None:
        return None if self._bos_id is None else self._backend.id_to_token(self._bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self._eos_id is None else self._backend.id_to_token(self._eos_id)

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default") or next(iter(self._templates.values()), None)

    @property
    def tool_use_template(self) -> str | None:
        """The model's separate template for chats with tools, if it ships one."""
        return self._templates.get("tool_use")

    # ----- chat --------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            **kwargs: Any) -> str:
        """Renders the conversation as prompt text (ChatML when the model has no template)."""
        template = self._templates.get("tool_use") if tools else None
        return render_chat_template(
            template or self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=tools, **kwargs)


def _valid_id(value: Any, tokens: Sequence[str]) -> int | None:
    return value if isinstance(value, int) and 0 <= value < len(tokens) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(str(path), f"cannot parse JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _hf_chat_templates(root: Path, config: Mapping[str, Any]) -> dict[str, str]:
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
        for entry in raw:
            if isinstance(entry, Mapping) and isinstance(entry.get("template"), str):
                templates[str(entry.get("name", "default"))] = entry["template"]
    # NOTE: newer transformers save the template beside the config; that file wins.
    processor = _read_json(root / "chat_template.json")
    if isinstance(processor.get("chat_template"), str):
        templates["default"] = processor["chat_template"]
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates
