"""Tokens and text: GGUF/HF tokenizers, chat templates, incremental detokenization."""
from __future__ import annotations

from shoal.text.chat_template import DEFAULT_CHAT_TEMPLATE, normalize_messages, render_chat_template
from shoal.text.detokenizer import DetokenizerStep, IncrementalDetokenizer
from shoal.text.gguf_vocab import tokenizer_from_gguf_metadata
from shoal.text.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DetokenizerStep",
    "IncrementalDetokenizer",
    "Tokenizer",
    "normalize_messages",
    "render_chat_template",
    "tokenizer_from_gguf_metadata",
]
