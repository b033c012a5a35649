"""Global per-request limits: prompt tokens and max_tokens (SHOAL_MAX_PROMPT_TOKENS, SHOAL_MAX_TOKENS).

Over a limit a request gets 400 naming it. A request that sets no max_tokens (OpenAI's
None, Ollama's num_predict <= 0) is not refused but capped, as it asked for "as much as
fits", not for a number. 0 disables a limit.
"""
from __future__ import annotations

from dataclasses import replace

from shoal.core.errors import TokenLimitError
from shoal.core.sampling_params import SamplingParams
from shoal.serving.request import GenerateRequest


def apply_server_limits(req: GenerateRequest, max_prompt_tokens: int, max_tokens: int) -> None:
    """Both limits on one request: 400 over them, an unset max_tokens capped (in req.params)."""
    num_prompt = len(req.prompt_token_ids)
    check_prompt_tokens(num_prompt, max_prompt_tokens)
    req.params = cap_max_tokens(
        req.params, max_tokens, given=req.max_tokens_given,
        room=req.model.engine.limits.max_model_len - num_prompt,
        param="options.num_predict" if req.dialect == "ollama" else "max_tokens")


def check_prompt_tokens(num_prompt_tokens: int, limit: int) -> None:
    if limit and num_prompt_tokens > limit:
        raise TokenLimitError("prompt", f"the prompt is {num_prompt_tokens} tokens, over this "
                              f"server's limit of {limit} (SHOAL_MAX_PROMPT_TOKENS)")


def cap_max_tokens(params: SamplingParams, limit: int, *, given: bool, room: int,
                   param: str) -> SamplingParams:
    """`params` with max_tokens within `limit`: refused if the client asked for more,
    capped if it left the number to the server. `room` is what the context has left;
    `param` names the field in the client's dialect."""
    asked = params.max_tokens
    if not limit or (asked is not None and asked <= limit):
        return params
    if given and asked is not None:
        raise TokenLimitError(param, f"{asked} is over this server's limit of {limit} "
                              "(SHOAL_MAX_TOKENS)")
    if room < 1:
        return params      # the engine's context-length check names the real problem
    return replace(params, max_tokens=min(limit, room if asked is None else asked))
