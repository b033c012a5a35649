"""Renders a model's Jinja chat template over OpenAI-style messages, in a sandbox."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError
from shoal.text import jinja_sandbox
from shoal.text.jinja_sandbox import BudgetedSandbox, guard_filter

# Used when a model carries no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format, for GGUF files that carry no template of their own (the gemma3:270m
# file has none): <start_of_turn>{user|model}\n ... <end_of_turn>\n, the system prompt
# folded into the first user turn, contents trimmed, as Gemma 3's own template renders them.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def fallback_chat_template(special_tokens: frozenset[str] | set[str]) -> str | None:
    """A template for a model file without one, recognised by its turn tokens; None = ChatML."""
    if {"<start_of_turn>", "<end_of_turn>"} <= special_tokens:
        return GEMMA_CHAT_TEMPLATE
    return None


ROLES = frozenset({"system", "user", "assistant", "tool"})
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


def render_chat_template(template: str | None, messages: Any, *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "",
                         tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
    """Prompt text for `messages`; any fault in them or in the template is InvalidParameterError.

    The template runs sandboxed, within jinja_sandbox's size and time budget."""
    normalized = normalize_messages(messages)
    compiled = _compile(template or DEFAULT_CHAT_TEMPLATE)
    variables = {**kwargs, "messages": normalized, "add_generation_prompt": add_generation_prompt,
                 "bos_token": bos_token, "eos_token": eos_token, "tools": tools}
    try:
        return jinja_sandbox.render(compiled, variables)
    except InvalidParameterError:
        raise
    except jinja2.TemplateError as exc:
        raise InvalidParameterError("messages", f"the chat template failed: {clip(exc)}") from exc
    except RecursionError:
        raise InvalidParameterError("messages", "the chat template nests too deeply") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
        # NOTE: templates do things like `'<s>' + message['content']`; a shape they did not
        # expect surfaces as a plain Python error, which is still the request's fault.
        raise InvalidParameterError(
            "messages", f"the chat template cannot render these messages: "
                        f"{type(exc).__name__}: {clip(exc)}") from exc


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked copies of the messages, each content flattened to a string."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidParameterError("messages", "must be a list of message objects")
    if not messages:
        raise InvalidParameterError("messages", "must contain at least one message")
    return [_normalize_message(i, message) for i, message in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidParameterError("messages", f"{where} must be an object with a role")
    role = message.get("role")
    if role == "developer":
        role = "system"  # NOTE: OpenAI's newer name for the system role; templates know only "system".
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidParameterError(
            "messages", f"{where}.role must be one of {sorted(ROLES)}, got {clip(repr(role))}")
    out = dict(message)
    out["role"] = role
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
            raise InvalidParameterError(
                "messages", f"{where}.tool_calls must be a list on an assistant message")
        out["tool_calls"] = [_normalize_tool_call(f"{where}.tool_calls[{j}]", call)
                             for j, call in enumerate(tool_calls)]
    if "content" not in message and not (role == "assistant" and tool_calls):
        raise InvalidParameterError("messages", f"{where} has no content")
    out["content"] = _flatten_content(where, message.get("content"))
    return out


def _normalize_tool_call(where: str, call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise InvalidParameterError("messages", f"{where} must be an object with a function")
    function = dict(call["function"])
    if not isinstance(function.get("name"), str):
        raise InvalidParameterError("messages", f"{where}.function.name must be a string")
    arguments = function.get("arguments")
    # NOTE: OpenAI sends arguments as a JSON string; most templates expect a mapping they can
    # iterate or `tojson`, as Hugging Face passes them. Parse when it parses.
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**call, "function": function}


def _flatten_content(where: str, content: Any) -> str:
    if content is None:
        return ""  # NOTE: an assistant turn holding only tool calls has null content.
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise InvalidParameterError("messages", f"{where}.content[{j}] must be an object")
            kind = part.get("type")
            if kind not in _TEXT_PART_TYPES:
                raise InvalidParameterError(
                    "messages", f"{where}.content[{j}] has type {clip(repr(kind))}; this model reads text only")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidParameterError("messages", f"{where}.content[{j}].text must be a string")
            texts.append(text)
        # NOTE: vLLM joins text parts with newlines; so do we, so prompts match across servers.
        return "\n".join(texts)
    raise InvalidParameterError(
        "messages", f"{where}.content must be a string or a list of text parts")


def _raise_exception(message: str) -> NoReturn:
    raise InvalidParameterError("messages", str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # NOTE: jinja's own tojson escapes non-ASCII and HTML characters; model templates expect
    # plain JSON, as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> BudgetedSandbox:
    env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = guard_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        # NOTE: within a budget: Jinja folds constant expressions while compiling, and a
        # filter that would pass the budget must fail there (left to run, within a render's).
        with jinja_sandbox.budget():
            return _environment().from_string(template)
    except jinja2.TemplateError as exc:
        raise InvalidParameterError("messages", f"the model's chat template is invalid: {clip(exc)}") from exc
