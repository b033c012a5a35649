"""Ollama's `think`, and its `logprobs` / `top_logprobs`, on shoal's models."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import UnsupportedFeatureError
from shoal.engine.outputs import TokenLogprob
from shoal.serving.served import ServedModel
from shoal.text.tokenizer import Tokenizer


def resolve_think(think: Any, model: ServedModel, echo_model: str | None) -> bool | None:
    """The request's think for this model: None for a model that does not reason (where only
    an unset or false think is accepted), else True or False, unset meaning True (as Ollama
    defaults a thinking model to think)."""
    if isinstance(think, str):
        # NOTE: Ollama takes think levels ("high", ...) for gpt-oss's harmony format only.
        raise UnsupportedFeatureError("think", f"think value \"{clip(think)}\" is not supported for this model")
    if model.reasoning is None:
        if think:
            raise UnsupportedFeatureError("think", f"\"{clip(echo_model or model.name)}\" does not support thinking")
        return None
    return True if think is None else bool(think)


def logprob_entries(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob] | None,
                    top: int) -> list[dict[str, Any]]:
    """Ollama's `logprobs`: per generated token its text, log-probability and UTF-8 bytes, with
    the `top` most likely alternatives."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": max(float(logprob), -9999.0),
                "bytes": list(text.encode("utf-8"))}

    out = []
    for lp in logprobs or ():
        item = entry(lp.token_id, lp.logprob)
        if top > 0:
            item["top_logprobs"] = [entry(t, v) for t, v in lp.top[:top]]
        out.append(item)
    return out
