"""OpenAI's Responses API served as a translation of the chat completion it amounts to.

POST /v1/responses is stateless here (as Ollama and vLLM serve it): `input` and
`instructions` become chat messages, `text.format` becomes `response_format`, the function
tools and `tool_choice` are reshaped to chat's, and the chat answer (or its SSE stream) is
reshaped back into output items (reasoning, message, function_call) and the Responses event
sequence. Going through the chat request keeps one code path for templates, tools, reasoning
and structured output, so everything the chat endpoint enforces holds here too.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError, UnsupportedFeatureError
from shoal.http.error_responses import describe_validation
from shoal.http.json_lines import json_line
from shoal.http.openai.protocol import ChatCompletionRequest
from shoal.http.openai.responses_protocol import ResponsesRequest

# where a chat field's error comes from in the Responses request
_FIELD_NAMES = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens",
                "max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort",
                "logprobs": "include"}
_STATELESS = "shoal serves the Responses API statelessly: send the whole conversation in `input`"
_LOGPROBS_INCLUDE = "message.output_text.logprobs"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- request: Responses -> chat ------------------------------------------------------
def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion this Responses request amounts to; 400s name Responses fields."""
    _refuse_stateful(req)
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req), "stream": req.stream}
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.tools is not None:
        body["tools"] = [_chat_tool(i, tool) for i, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
    response_format = _response_format(req)
    if response_format is not None:
        body["response_format"] = response_format
    if req.reasoning is not None:
        if req.reasoning.summary or req.reasoning.generate_summary:
            raise UnsupportedFeatureError("reasoning.summary", "reasoning summaries are not produced; "
                                          "the model's own reasoning is returned as a reasoning item")
        if req.reasoning.effort is not None:
            body["reasoning_effort"] = req.reasoning.effort
    if _wants_logprobs(req):
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = describe_validation(exc.errors())
        first = exc.errors()[0].get("msg", "invalid value") if exc.errors() else "invalid value"
        raise InvalidParameterError(_responses_field(error.param or "input"), first) from None


def renamed(exc: InvalidParameterError) -> InvalidParameterError:
    """A chat-level error about this request, naming the Responses field it came from."""
    field = _responses_field(exc.field)
    # NOTE: renamed in place: a subclass (ContextLengthExceededError) keeps its type and its
    # own constructor's arguments, which a new instance could not be given.
    if field != exc.field:
        exc.field = field
        exc.args = (f"{field}: {exc.message}",)
    return exc


def _responses_field(field: str) -> str:
    head, sep, rest = field.partition(".")
    base = head.split("[", 1)[0]
    if base in ("messages", "response_format"):      # nested chat shapes the caller never wrote
        return "input" if base == "messages" else "text.format"
    return _FIELD_NAMES.get(base, base) + head[len(base):] + sep + rest


def _refuse_stateful(req: ResponsesRequest) -> None:
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, name) is not None:
            raise UnsupportedFeatureError(name, f"{name} is not supported: {_STATELESS}")
    if req.background:
        raise UnsupportedFeatureError("background", "background responses need stored state: " + _STATELESS)
    if req.max_tool_calls is not None:
        raise UnsupportedFeatureError("max_tool_calls", "max_tool_calls is not supported; use parallel_tool_calls")
    if req.truncation not in (None, "disabled"):
        raise UnsupportedFeatureError("truncation", "truncation: only 'disabled' is supported: an input that does not "
                                      "fit the context is a 400, never silently cut")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise UnsupportedFeatureError("text.verbosity", "text.verbosity is not supported")
    for i, item in enumerate(req.include or []):
        if item != _LOGPROBS_INCLUDE:
            raise UnsupportedFeatureError(f"include[{i}]", f"include '{clip(str(item))}' is not supported; only "
                                          f"'{_LOGPROBS_INCLUDE}'")


def _wants_logprobs(req: ResponsesRequest) -> bool:
    return bool(req.top_logprobs) or _LOGPROBS_INCLUDE in (req.include or [])


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    if not req.input:
        raise InvalidParameterError("input", "must not be empty")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": _role(item, i), "content": _text_of(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", i), "type": "function",
                    "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}
            last = messages[-1] if messages else None
            # consecutive calls are one assistant turn with several tool_calls, as chat has them
            if last and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_of(output, f"input[{i}].output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", i), "content": output})
        elif kind == "reasoning":
            continue    # earlier reasoning is not shown to the model again, as chat templates drop it
        else:
            raise UnsupportedFeatureError(f"input[{i}].type", f"input items of type '{clip(str(kind))}' are "
                                          "not supported (message, function_call, function_call_output, reasoning)")
    return messages


def _role(item: dict[str, Any], i: int) -> str:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InvalidParameterError(f"input[{i}].role", f"unknown role '{clip(str(role))}'")
    return role


def _string(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidParameterError(f"input[{i}].{key}", "must be a string")
    return value


def _text_of(content: Any, field: str) -> str:
    """A message's content: a string, or its text parts joined (images and files refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameterError(field, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise UnsupportedFeatureError(f"{field}[{j}]", f"content parts of type '{clip(str(kind))}' are "
                                          "not supported; this model takes text only")
        texts.append(part["text"])
    return "\n".join(texts)


def _chat_tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise UnsupportedFeatureError(f"tools[{i}].type", f"tools of type '{clip(str(tool.get('type')))}' are "
                                      "not supported; only 'function' (shoal runs no hosted tools)")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise UnsupportedFeatureError("tool_choice", f"a choice of type '{clip(str(choice.get('type')))}' is "
                                  "not supported; 'none', 'auto', 'required' or a function")


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise InvalidParameterError("text.format.schema", "a json_schema format needs a schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                       "strict": fmt.strict}}
    raise InvalidParameterError("text.format.type", f"unknown format '{clip(fmt.type)}'; one of text, "
                                "json_object, json_schema")


# ---- response: chat -> Responses -----------------------------------------------------
class ResponseShell:
    """The fields every Responses object repeats, from the request."""

    def __init__(self, req: ResponsesRequest, model: str, created: int) -> None:
        self.id = new_id("resp")
        self.req = req
        self.model = model
        self.created = created

    def body(self, status: str, output: list[dict], usage: dict | None,
             incomplete_reason: str | None = None, error: dict | None = None) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": error,
            "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": False, "temperature": req.temperature, "text": {"format": fmt},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "top_p": req.top_p, "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }


def response_usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0)},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def _incomplete_reason(finish_reason: str | None) -> str | None:
    return "max_output_tokens" if finish_reason == "length" else None


def response_body(shell: ResponseShell, chat: dict) -> dict:
    """A whole chat completion as a Responses object."""
    choice = chat["choices"][0]
    message = choice["message"]
    output: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        output.append(_reasoning_item(new_id("rs"), reasoning))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        output.append(_message_item(new_id("msg"), message.get("content") or "",
                                    _logprobs(choice.get("logprobs")), "completed"))
    for call in calls:
        output.append(_call_item(new_id("fc"), call["id"], call["function"]["name"],
                                 call["function"]["arguments"], "completed"))
    reason = _incomplete_reason(choice.get("finish_reason"))
    return shell.body("incomplete" if reason else "completed", output, response_usage(chat.get("usage")), reason)


def _message_item(item_id: str, text: str, logprobs: list | None, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _logprobs(chat_logprobs: dict | None) -> list | None:
    """Chat's logprobs.content entries as output_text logprobs (the same fields)."""
    if not chat_logprobs or not chat_logprobs.get("content"):
        return None
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes")}
                              for t in e.get("top_logprobs") or []]}
            for e in chat_logprobs["content"]]


# ---- streaming: chat chunks -> Responses events --------------------------------------
class _OpenItem:
    def __init__(self, kind: str, item_id: str, output_index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind              # "message", "reasoning" or "function_call"
        self.id = item_id
        self.output_index = output_index
        self.text: list[str] = []
        self.logprobs: list = []
        self.call_id = call_id
        self.name = name


class ResponseEvents:
    """Turns the chat stream's chunks into the Responses event sequence: created,
    in_progress, then per output item added / deltas / done, then completed (or
    incomplete, or failed). Each event carries its sequence_number."""

    def __init__(self, shell: ResponseShell) -> None:
        self.shell = shell
        self.sequence = 0
        self.output: list[dict] = []
        self.open: _OpenItem | None = None
        self.calls: dict[int, _OpenItem] = {}    # chat's tool-call index -> its item
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json_line(payload)}\n\n"

    def start(self) -> list[str]:
        body = self.shell.body("in_progress", [], None)
        return [self.event("response.created", response=body), self.event("response.in_progress", response=body)]

    def chunk(self, chunk: dict) -> list[str]:
        """Events for one chat chunk (a parsed `data:` payload)."""
        if "error" in chunk:
            return self._failed(chunk["error"])
        if chunk.get("usage"):
            self.usage = response_usage(chunk["usage"])
        events: list[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                events += self._text_delta("reasoning", reasoning, None)
            if delta.get("content"):
                events += self._text_delta("message", delta["content"], _logprobs(choice.get("logprobs")))
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[str]:
        events = self._close()
        if not self.output:        # nothing was said: still one (empty) message, as a whole answer has
            events += self._open("message")
            events += self._close()
        reason = _incomplete_reason(self.finish_reason)
        body = self.shell.body("incomplete" if reason else "completed", self.output, self.usage, reason)
        return events + [self.event("response.incomplete" if reason else "response.completed", response=body)]

    def _failed(self, error: dict) -> list[str]:
        events = [self.event("error", code=str(error.get("code")), message=error.get("message"),
                             param=error.get("param"))]
        body = self.shell.body("failed", self.output, self.usage,
                               error={"code": str(error.get("code")), "message": error.get("message")})
        return events + [self.event("response.failed", response=body)]

    def _open(self, kind: str, call_id: str = "", name: str = "") -> list[str]:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item = _OpenItem(kind, new_id(prefix), len(self.output), call_id, name)
        self.output.append({})        # its place; filled in when it is done
        self.open = item
        if kind == "message":
            added = _message_item(item.id, "", None, "in_progress")
            added["content"] = []
            return [self.event("response.output_item.added", output_index=item.output_index, item=added),
                    self.event("response.content_part.added", item_id=item.id, output_index=item.output_index,
                               content_index=0, part=_text_part("", None))]
        if kind == "reasoning":
            added = _reasoning_item(item.id, "")
            added["content"] = []
            return [self.event("response.output_item.added", output_index=item.output_index, item=added)]
        return [self.event("response.output_item.added", output_index=item.output_index,
                           item=_call_item(item.id, call_id, name, "", "in_progress"))]

    def _text_delta(self, kind: str, text: str, logprobs: list | None) -> list[str]:
        events: list[str] = []
        if self.open is None or self.open.kind != kind:
            events += self._close()
            events += self._open(kind)
        item = self.open
        assert item is not None
        item.text.append(text)
        if kind == "reasoning":
            events.append(self.event("response.reasoning_text.delta", item_id=item.id,
                                     output_index=item.output_index, content_index=0, delta=text))
        else:
            item.logprobs += logprobs or []
            events.append(self.event("response.output_text.delta", item_id=item.id, output_index=item.output_index,
                                     content_index=0, delta=text, logprobs=logprobs or []))
        return events

    def _call_delta(self, call: dict) -> list[str]:
        events: list[str] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            events += self._close()
            events += self._open("function_call", call.get("id") or new_id("call"), function.get("name") or "")
            item = self.calls[index] = self.open
        fragment = function.get("arguments") or ""
        if fragment:
            item.text.append(fragment)
            events.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                     output_index=item.output_index, delta=fragment))
        return events

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        text = "".join(item.text)
        where = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "message":
            done = _message_item(item.id, text, item.logprobs, "completed")
            events = [self.event("response.output_text.done", **where, content_index=0, text=text,
                                 logprobs=item.logprobs),
                      self.event("response.content_part.done", **where, content_index=0,
                                 part=done["content"][0])]
        elif item.kind == "reasoning":
            done = _reasoning_item(item.id, text)
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=text)]
        else:
            done = _call_item(item.id, item.call_id, item.name, text, "completed")
            events = [self.event("response.function_call_arguments.done", **where, name=item.name,
                                 arguments=text)]
        self.output[item.output_index] = done
        return events + [self.event("response.output_item.done", output_index=item.output_index, item=done)]


async def response_stream(shell: ResponseShell, chat_sse: AsyncIterator[str]) -> AsyncIterator[str]:
    """The Responses event stream for a chat SSE stream (`data: {...}` lines, then [DONE])."""
    events = ResponseEvents(shell)
    for line in events.start():
        yield line
    failed = False
    async for frame in chat_sse:
        data = frame.removeprefix("data: ").strip()
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        failed = failed or "error" in chunk
        for line in events.chunk(chunk):
            yield line
    if not failed:
        for line in events.finish():
            yield line
