"""The OpenAI dialect's wire models (requests validated by pydantic; responses built as dicts).

Field names, defaults and bounds follow OpenAI's API reference and vLLM's extensions.
Unknown fields are ignored, as OpenAI's server does; known ones are typed strictly, as OpenAI
types them: `"max_tokens": "5"`, `"stream": "yes"` or `"n": 2.0` are a 400 naming the field,
not a silent coercion (an integer is a number, though: `"temperature": 1`).
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from shoal.core.sampling_params import MAX_LOGPROBS, MAX_N


class _Body(BaseModel):
    """Unknown fields ignored, known ones strictly typed."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class TextPart(_Body):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # an earlier assistant turn's thinking (vLLM's names), for templates that render it
    reasoning_content: str | None = None
    reasoning: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False       # vLLM: usage on every chunk


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    # NOTE: aliased: `schema` is a BaseModel attribute; shapes are checked by StructuredOutput
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None
    # Together's and Fireworks' spelling: {"type": "json_object", "schema": {...}}
    schema_: Any = Field(default=None, alias="schema")


class SamplingFields(_Body):
    """Fields both generate endpoints share (OpenAI's, then vLLM's extras).

    Undeclared fields are kept (model_extra) so that request_fields.py can refuse the ones
    that would change the output instead of dropping them."""
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    # OpenAI's ranges (docs/api.md promises them); NaN fails them too
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras; the structured-output ones are typed loosely here, as their shape is
    # checked where they become a StructuredOutput (http/openai/structured.py), naming the field
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: str | None = None
    structured_outputs: dict[str, Any] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    request_id: str | None = None
    # vLLM: log-probs of the prompt's tokens (k alternatives), keep only the last k prompt tokens
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None                          # checked in text/tools/spec.py, naming the field
    tool_choice: Any = None                    # checked in text/tools/spec.py, naming the field
    parallel_tool_calls: bool | None = None
    # the legacy spelling of tools: refused by name (serving.py), never ignored
    functions: Any = None
    function_call: Any = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # reasoning models (vLLM's fields)
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    modalities: list[str] | None = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None                          # vLLM's: the chat as a request with these tools renders it


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]

