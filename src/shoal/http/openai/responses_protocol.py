"""The wire model of OpenAI's Responses API request (POST /v1/responses), served statelessly.

Unlike the chat models, unknown fields are refused (400 naming them): the Responses API is
young and grows often, and a new field would more likely change the output than not. Fields
that need state shoal does not keep (`previous_response_id`, `conversation`, `background`)
are typed here so the translator can refuse them by name.
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from shoal.core.sampling_params import MAX_LOGPROBS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


class TextFormat(_Strict):
    type: str = "text"
    name: str | None = None
    description: str | None = None
    # NOTE: aliased: `schema` is a BaseModel attribute
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningOptions(_Strict):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    # do not change the output: accepted, and `store` is answered truthfully (false)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    # need server-side state shoal does not keep: refused by name
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    max_tool_calls: int | None = None
