"""Every request field OpenAI and vLLM define for /v1/chat/completions and /v1/completions
that shoal does not implement: a 400 naming it when its value would change the output,
ignored only when it cannot (docs/api.md has the table).

The wire models (protocol.py) keep unknown fields in `model_extra`, so a field shoal does not
declare is still seen here rather than silently dropped.
"""
from __future__ import annotations

from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import UnsupportedFeatureError
from shoal.http.openai.protocol import SamplingFields

# Fields that do not change what is generated: bookkeeping, billing, caching hints.
IGNORED = frozenset({
    "metadata", "store", "user", "service_tier", "prompt_cache_key", "safety_identifier",
    "cache_salt",          # vLLM: who may share prefix-cache blocks; never the output
    "request_id",
})

# Owned by the tool-calling layer; not judged here.
TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"})

# Field -> why it is refused when given a value other than its no-op default (below).
REFUSED: dict[str, str] = {
    "audio": "audio output is not supported; this model writes text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "verbosity": "is not supported; the model's own length is used",
    "bad_words": "is not supported (no word-level bans)",
    "allowed_token_ids": "is not supported",
    "logits_processors": "custom logits processors are not supported",
    "vllm_xargs": "is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "applies to beam search, which is not supported",
    "guided_whitespace_pattern": "is not supported",
    "documents": "is not supported",
    "mm_processor_kwargs": "is not supported; this model reads text only",
    "prompt_embeds": "is not supported",
    "return_tokens_as_token_ids": "is not supported",
    "return_token_ids": "is not supported",
    "kv_transfer_params": "disaggregated prefill is not supported",
    "chat_template": "a per-request chat template is not supported; the model's own is used",
    "spaces_between_special_tokens": "only true (the default) is supported",
    "thinking_token_budget": "is not supported",
}

# The values of refused fields that change nothing (a client sending the default is fine).
_NO_OP: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "spaces_between_special_tokens": (True,),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "modalities": (["text"],),
    "verbosity": ("medium",),
}

def check_fields(req: SamplingFields, endpoint: str) -> None:
    """400 for a given field that would change the output and that shoal does not do."""
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED or name in TOOL_FIELDS or value is None:
            continue
        if name in REFUSED and value not in _NO_OP.get(name, ()):
            raise UnsupportedFeatureError(name, REFUSED[name])
    if req.prompt_logprobs is not None and req.stream:
        # NOTE: as vLLM: the prompt's log-probs come with a whole response only
        raise UnsupportedFeatureError("prompt_logprobs", "is not available when stream is true")
    modalities = getattr(req, "modalities", None)
    if modalities is not None and modalities not in _NO_OP["modalities"]:
        raise UnsupportedFeatureError(
            "modalities", f"only [\"text\"] is supported, got {clip(repr(modalities))}")
    if endpoint == "chat" and req.add_special_tokens:
        raise UnsupportedFeatureError(
            "add_special_tokens", "the chat template writes the special tokens itself")
