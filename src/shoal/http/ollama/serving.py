"""The Ollama dialect's translator: Ollama request -> GenerateRequest -> Ollama replies.

Prompt building (chat template, raw, Go `template`, `context` ids), Ollama's options and
defaults, context-window fitting, NDJSON streaming and the final statistics live here;
routes.py only wires them to URLs.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import (InvalidParameterError, PermissionDeniedError, UnknownModelError,
                               UnsupportedFeatureError)
from shoal.core.sampling_params import SamplingParams
from shoal.core.structured_output import StructuredOutput
from shoal.engine.outputs import RequestOutput
from shoal.http.errors import HttpError, classify
from shoal.http.json_lines import json_line
from shoal.http.request_body import json_type
from shoal.http.ollama import templates
from shoal.http.ollama.thinking import logprob_entries
from shoal.http.ollama.protocol import ROLES, ChatBody, GenerateBody, nanoseconds, timestamp
from shoal.http.tools import ollama_call
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.durations import parse_keep_alive
from shoal.serving.generate import GenerationService
from shoal.serving.request import GenerateRequest, new_request_id
from shoal.serving.residency import ResidencyManager
from shoal.serving.served import ServedModel
from shoal.serving.thinking import Thinking
from shoal.text.tools.parsing import ToolCall
from shoal.text.tools.plan import ToolPlan

log = logging.getLogger(__name__)

# Ollama's defaults (api/types.go DefaultOptions, docs/modelfile.md). num_ctx has none here:
# unset, a request gets the whole context the model is served with.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "num_keep": 4,
    "num_predict": -1,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": -1,
}

# Every option Ollama's Options struct knows, with its JSON type.
OPTION_TYPES: dict[str, str] = {
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float",
    "min_p": "float", "typical_p": "float", "tfs_z": "float", "repeat_last_n": "int",
    "temperature": "float", "repeat_penalty": "float", "presence_penalty": "float",
    "frequency_penalty": "float", "mirostat": "int", "mirostat_tau": "float",
    "mirostat_eta": "float", "penalize_newline": "bool", "stop": "strings",
    "numa": "bool", "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int",
    "low_vram": "bool", "f16_kv": "bool", "logits_all": "bool", "vocab_only": "bool",
    "use_mmap": "bool", "use_mlock": "bool", "num_thread": "int", "embedding_only": "bool",
}

# Known options that do not change what shoal generates (hardware/runner knobs, and
# samplers current Ollama engines no longer apply either: mirostat, tfs_z, penalize_newline
# are gone from Ollama's Options). typical_p is still honoured by Ollama's llama.cpp runner,
# so a request asking for it (anything but 1) is refused instead (REFUSED_OPTIONS).
IGNORED_OPTIONS = frozenset({
    "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline",
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "num_thread", "embedding_only",
})

# Options that change the output and that shoal does not implement: their no-op value, and why.
REFUSED_OPTIONS: dict[str, tuple[Any, str]] = {
    "typical_p": (1.0, "typical_p (typical sampling) is not supported; use top_p, top_k or min_p"),
}

# SamplingParams field -> the Ollama option it came from (for error messages).
_PARAM_TO_OPTION = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repetition_window": "repeat_last_n",
    "seed": "seed", "stop": "stop", "max_tokens": "num_predict",
}


# ---- models ------------------------------------------------------------------------------

def check_model_name(residency: ResidencyManager, name: str | None) -> str:
    """The model's canonical name; 400 when no name is given, 404 (Ollama's wording) when unknown."""
    if name is None or not name.strip():
        raise HttpError(400, "model is required", param="model")
    try:
        return residency.resolve(name).name
    except UnknownModelError:
        raise HttpError(404, f"model '{clip(name)}' not found", param="model",
                        code="model_not_found") from None


async def acquire_model(residency: ResidencyManager, name: str | None,
                        keep_alive: float | None = None) -> ServedModel:
    """The named model, loaded (pair with residency.release); errors as check_model_name."""
    return await residency.acquire(check_model_name(residency, name), keep_alive)


def kv_capacity(model: ServedModel) -> int:
    """Tokens one request can hold in the KV cache (0 = unknown)."""
    info = model.info
    return max(0, int(info.num_blocks) * int(info.block_size))


def served_context(model: ServedModel) -> int:
    """The largest context a request gets: the served length, within the KV cache."""
    capacity = kv_capacity(model)
    return min(model.max_model_len, capacity) if capacity else model.max_model_len


# ---- options ------------------------------------------------------------------------------

def _check_option(name: str, value: Any) -> Any:
    kind = OPTION_TYPES[name]
    where = f"options.{name}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidParameterError(where, f"must be a boolean, got {json_type(value)}")
        return value
    if kind == "strings":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InvalidParameterError(where, "must be a list of strings")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        noun = "an integer" if kind == "int" else "a number"
        raise InvalidParameterError(where, f"must be {noun}, got {json_type(value)}")
    if not math.isfinite(value):
        raise InvalidParameterError(where, f"must be a finite number, got {clip(repr(value))}")
    if kind == "int":
        if not float(value).is_integer():
            raise InvalidParameterError(where, f"must be an integer, got {clip(repr(value))}")
        return int(value)
    return float(value)


def merge_options(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones; null values are skipped and unknown names ignored
    (both as Ollama does); each known value is type-checked (400 naming the option)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if value is None:
                continue
            if name not in OPTION_TYPES:
                log.warning("ignoring unknown Ollama option %r", name)
                continue
            merged[name] = _check_option(name, value)
    return merged


@dataclass(slots=True)
class Options:
    """A request's options resolved against Ollama's defaults and the model's own."""

    params: SamplingParams          # max_tokens unset until the prompt length is known
    context: int                    # tokens the request may use: prompt + answer
    num_predict: int                # > 0: at most that many tokens; <= 0: until the context is full
    num_keep: int                   # tokens kept from the start when the prompt is truncated
    values: dict[str, Any] = field(default_factory=dict)


def resolve_options(model: ServedModel, requested: Mapping[str, Any] | None) -> Options:
    """Ollama's defaults, then the model's default_options, then the request's options."""
    if requested is not None and not isinstance(requested, Mapping):
        raise InvalidParameterError("options", "must be an object")
    values = merge_options(OLLAMA_DEFAULTS, model.default_options, requested)
    asked = merge_options(requested)
    for name, (no_op, why) in REFUSED_OPTIONS.items():
        if name in asked and asked[name] != no_op:
            raise UnsupportedFeatureError(f"options.{name}", why)
    limit = served_context(model)
    num_ctx = values.get("num_ctx")
    if num_ctx is not None and num_ctx < 2:
        raise InvalidParameterError("options.num_ctx", f"must be at least 2, got {num_ctx}")
    context = limit if num_ctx is None else min(num_ctx, limit)
    repeat_last_n = values["repeat_last_n"]
    if repeat_last_n < -1:
        raise InvalidParameterError("options.repeat_last_n",
                                    f"must be >= -1 (-1 = the whole context), got {repeat_last_n}")
    top_p = values["top_p"]
    if top_p < 0:
        raise InvalidParameterError("options.top_p", f"must be >= 0, got {top_p}")
    seed = values["seed"]
    try:
        params = SamplingParams(
            n=1, max_tokens=None,
            temperature=values["temperature"],
            top_k=max(0, values["top_k"]),                      # <= 0 disables, as in Ollama
            # NOTE: top_p 0 keeps only the most likely token (llama.cpp); >= 1 disables.
            top_p=min(1.0, top_p) if top_p > 0 else 1e-9,
            min_p=values["min_p"],
            repetition_penalty=values["repeat_penalty"],
            presence_penalty=values["presence_penalty"],
            frequency_penalty=values["frequency_penalty"],
            repetition_window=None if repeat_last_n == -1 else repeat_last_n,
            seed=None if seed == -1 else seed,
            stop=values.get("stop") or [],
        )
    except InvalidParameterError as exc:
        option = _PARAM_TO_OPTION.get(exc.field, exc.field)
        raise InvalidParameterError(f"options.{option}", exc.message) from None
    return Options(params=params, context=context, num_predict=values["num_predict"],
                   num_keep=values["num_keep"], values=values)


# ---- prompts ------------------------------------------------------------------------------

def truncate_prompt(ids: list[int], context: int, num_keep: int, num_predict: int) -> list[int]:
    """Fits a prompt that leaves no room to answer into `context` tokens.

    As Ollama's runner does, the first `num_keep` tokens (negative = all; at most half
    the context here) are kept and the rest comes from the end of the prompt. Ollama then
    shifts the context while answering, discarding half of what follows the kept tokens;
    shoal does not shift, so it leaves that room up front: half of the context after the
    kept tokens, or `num_predict` tokens if fewer are asked for.
    """
    if len(ids) < context:
        return ids
    # NOTE: kept tokens are capped at half the context so that recent tokens and room remain.
    keep = len(ids) if num_keep < 0 else num_keep
    keep = max(0, min(keep, context // 2))
    room = max(1, (context - keep) // 2)
    if 0 < num_predict < room:
        room = num_predict
    target = context - room
    keep = min(keep, target - 1)
    return ids[:keep] + ids[len(ids) - (target - keep):]


def fit_prompt(ids: list[int], opts: Options, truncate: bool) -> list[int]:
    if len(ids) < opts.context:
        return ids
    if not truncate:
        raise InvalidParameterError(
            "prompt", f"the prompt is {len(ids)} tokens, which leaves no room to answer in the "
                      f"context of {opts.context} tokens (truncate is false)")
    fitted = truncate_prompt(ids, opts.context, opts.num_keep, opts.num_predict)
    log.info("truncated an Ollama prompt from %d to %d tokens (context %d, num_keep %d)",
             len(ids), len(fitted), opts.context, opts.num_keep)
    return fitted


def generate_prompt(model: ServedModel, body: GenerateBody, opts: Options,
                    think: bool | None = None) -> tuple[str, list[int]]:
    """/api/generate's prompt: the chat template, a request `template`, or the raw text."""
    prompt = body.prompt or ""
    tokenizer = model.tokenizer
    if body.raw:
        text = prompt
        ids = tokenizer.encode(text, add_special_tokens=True)
    elif body.template:
        text = templates.render(body.template, {"System": body.system or "", "Prompt": prompt,
                                                "Response": ""})
        ids = tokenizer.encode(text, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else [])
        messages.append({"role": "user", "content": prompt})
        text, ids = model.render_chat(messages, think=think)
    if body.context:
        # NOTE: checked here, naming the field: truncation may cut these ids from the prompt.
        model.engine.limits.check_token_ids(body.context, "context")
        ids = list(body.context) + ids
    return text, fit_prompt(ids, opts, body.truncate is not False)


def chat_messages(body: ChatBody, model: ServedModel) -> list[dict[str, Any]]:
    """The request's messages as the chat template reads them."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(body.messages or []):
        if message.role not in ROLES:
            raise InvalidParameterError(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}; got '{clip(message.role)}'")
        if message.images:
            raise UnsupportedFeatureError(
                f"messages[{i}].images", f"messages[{i}].images: images are not supported: "
                                         f"{model.name} reads text only")
        entry: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.thinking:
            # NOTE: Go templates read .Thinking; Jinja ones (Qwen3) reasoning_content
            entry["thinking"] = entry["reasoning_content"] = message.thinking
        if message.tool_calls:
            entry["tool_calls"] = message.tool_calls
        if message.tool_name:
            # NOTE: Hugging Face templates name a tool result's tool `name`; Ollama's field is tool_name.
            entry["tool_name"] = message.tool_name
            entry["name"] = message.tool_name
        out.append(entry)
    return out


def _tool_block_start(messages: Sequence[Mapping[str, Any]], index: int) -> int:
    """Where the tool-call turn that `index` (a tool result) answers begins, so that
    truncation never keeps a tool result without the call that produced it."""
    if index <= 0 or index >= len(messages) or messages[index]["role"] != "tool":
        return index
    start = index
    while start > 0 and messages[start - 1]["role"] == "tool":
        start -= 1
    if start > 0 and messages[start - 1]["role"] == "assistant" and messages[start - 1].get("tool_calls"):
        return start - 1
    return index


def chat_prompt(model: ServedModel, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None, opts: Options,
                truncate: bool, think: bool | None = None) -> tuple[str, list[int]]:
    """/api/chat's prompt. Too long for the context, the oldest messages are dropped first
    (system messages and the last message always stay), as Ollama does; a last message
    that alone is too long is then cut by tokens (truncate_prompt)."""
    text, ids = model.render_chat(messages, tools, think=think)
    if truncate and len(ids) >= opts.context:
        for i in range(1, len(messages)):
            start = _tool_block_start(messages, i)
            kept = [m for m in messages[:start] if m["role"] == "system"] + messages[start:]
            text, ids = model.render_chat(kept, tools, think=think)
            if len(ids) < opts.context:
                log.info("dropped %d old chat messages to fit the context of %d tokens",
                         len(messages) - len(kept), opts.context)
                break
    return text, fit_prompt(ids, opts, truncate)


# ---- request checks -------------------------------------------------------------------------

def check_keep_alive(residency: ResidencyManager, body: GenerateBody | ChatBody,
                     load_call: bool) -> float | None:
    """The request's keep_alive in seconds (None = unset, inf = forever) as the caller's key
    may set it (ResidencyManager.bounded_keep_alive); 400 on garbage. The load call that
    unloads (keep_alive 0, nothing to generate) is a 403 for a key that may not unload."""
    requested = parse_keep_alive(body.keep_alive)
    if load_call and requested == 0 and not residency.may_unload():
        raise PermissionDeniedError("unloading a model (keep_alive 0) needs an admin key when API keys "
                                    "are required", code="admin_required", model=body.model)
    return residency.bounded_keep_alive(requested)


def check_generates(model: ServedModel, kind: str) -> None:
    """An embedding-only model answers chat and generate with Ollama's 400."""
    if model.info.embedding_only:
        raise InvalidParameterError("model", f'"{model.name}" does not support {kind}')


def check_common(body: GenerateBody | ChatBody, model: ServedModel) -> None:
    """Checks shared by generate and chat (think: thinking.resolve_think)."""
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise HttpError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")


def check_generation_features(body: GenerateBody | ChatBody) -> StructuredOutput | None:
    """400s for what shoal cannot do (checked once a real generation is asked for);
    returns the constraint `format` asks for."""
    return format_constraint(body.format)


def format_after_thinking(structured: StructuredOutput | None,
                          thinking: Thinking | None) -> StructuredOutput | None:
    """`format` binds the answer after a reasoning model's thinking, not the thinking."""
    return structured if thinking is None else thinking.constrain(structured)


def format_constraint(fmt: Any) -> StructuredOutput | None:
    """Ollama's `format`: "json" is any JSON object, an object is a JSON schema, "" or null none."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return StructuredOutput.json_object(field="format")
    if isinstance(fmt, dict):
        return StructuredOutput.json_schema(fmt, field="format")
    raise InvalidParameterError("format", "must be \"json\" or a JSON schema object")


# ---- running -------------------------------------------------------------------------------

@dataclass(slots=True)
class Turn:
    """One generate or chat request on its way through the engine."""

    kind: str                       # "generate" | "chat"
    echo_model: str                 # the model name as the request spelled it (Ollama echoes it)
    model: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    started: float                  # time.monotonic() when the handler began
    loaded: float = 0.0             # time.monotonic() when the model was ready (load_duration ends)
    with_context: bool = False      # /api/generate without raw: the reply carries `context`
    keep_alive: float | None = None
    max_tokens_given: bool = True   # num_predict > 0 (else max_tokens is the room left)
    tools: ToolPlan | None = None   # /api/chat with tools: calls parsed out of the answer
    request: GenerateRequest | None = None
    thinking: Thinking | None = None    # a reasoning model's turn: output split into thinking
    top_logprobs: int | None = None     # logprobs asked for: the alternatives per token

    def build(self) -> GenerateRequest:
        self.request = GenerateRequest(
            model=self.model, prompt_token_ids=self.prompt_ids, params=self.params,
            request_id=new_request_id(f"ollama-{self.kind}"), dialect="ollama",
            keep_alive=self.keep_alive, max_tokens_given=self.max_tokens_given,
            thinking=self.thinking, tools=self.tools)
        return self.request

    def split(self, text: str, parser: Any) -> tuple[str, str]:
        """(thinking shown, content) of a piece of output."""
        if parser is None:
            return "", text
        thinking, content = parser.feed(text)
        return (thinking if self.thinking is not None and self.thinking.show else ""), content


def make_params(opts: Options, num_prompt: int,
                structured: StructuredOutput | None = None,
                top_logprobs: int | None = None) -> SamplingParams:
    """The options' sampling parameters with max_tokens = min(num_predict, room left);
    `top_logprobs` not None asks for log-probs with that many alternatives."""
    room = opts.context - num_prompt
    max_tokens = room if opts.num_predict <= 0 else min(opts.num_predict, room)
    return replace(opts.params, max_tokens=max(1, max_tokens), structured=structured,
                   logprobs=top_logprobs)


def load_reply(kind: str, echo_model: str, unload: bool) -> dict[str, Any]:
    """The answer to an empty request (Ollama's way to load or unload a model)."""
    body: dict[str, Any] = {"model": echo_model, "created_at": timestamp()}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body["done"] = True
    body["done_reason"] = "unload" if unload else "load"
    return body


def _answer(turn: Turn, body: dict[str, Any], text: str, thinking: str) -> None:
    if turn.kind == "chat":
        body["message"] = {"role": "assistant", "content": text}
        if thinking:
            body["message"]["thinking"] = thinking
    else:
        body["response"] = text
        if thinking:
            body["thinking"] = thinking


def content_chunk(turn: Turn, text: str, thinking: str = "",
                  logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": turn.echo_model, "created_at": timestamp()}
    _answer(turn, body, text, thinking)
    body["done"] = False
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def _answer_ids(turn: Turn, output_ids: list[int], finish_reason: str | None) -> list[int]:
    """The answer's token ids for `context`: without the end-of-turn token, as Ollama."""
    if output_ids and finish_reason == "stop" and output_ids[-1] in turn.model.tokenizer.eos_token_ids:
        return output_ids[:-1]
    return output_ids


def final_chunk(turn: Turn, last: RequestOutput | None, text: str, output_ids: list[int],
                finish_reason: str | None, thinking: str = "",
                logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The done=true object: the reason, `context` (generate), counts and nanosecond timings."""
    body: dict[str, Any] = {"model": turn.echo_model, "created_at": timestamp()}
    _answer(turn, body, text, thinking)
    if logprobs is not None:
        body["logprobs"] = logprobs
    body["done"] = True
    body["done_reason"] = finish_reason or "stop"
    if turn.with_context:
        body["context"] = turn.prompt_ids + _answer_ids(turn, output_ids, finish_reason)
    now = time.monotonic()
    timings = last.timings if last is not None else None
    engine_start = (timings.scheduled or timings.arrival) if timings else now
    engine_start = max(engine_start or now, turn.started)
    first = (timings.prefill_done or timings.first_token or timings.finished) if timings else None
    first = first or now
    finished = (timings.finished if timings else None) or now
    body["total_duration"] = nanoseconds(now - turn.started)
    # NOTE: as Ollama: load_duration is the wait for the model to be loaded; time queued for
    # the engine counts in total_duration only.
    body["load_duration"] = nanoseconds(max(0.0, (turn.loaded or turn.started) - turn.started))
    body["prompt_eval_count"] = len(turn.prompt_ids)
    body["prompt_eval_duration"] = nanoseconds(first - engine_start)
    body["eval_count"] = len(output_ids)
    body["eval_duration"] = nanoseconds(finished - first)
    return body


def ndjson(obj: Mapping[str, Any]) -> bytes:
    return json_line(obj).encode() + b"\n"


_NOTHING = object()


async def start_stream(service: GenerationService, turn: Turn,
                       receive: Any) -> tuple[AsyncIterator[list[RequestOutput]], Any]:
    """Starts a streamed turn and waits for its first update, so that refusals (busy,
    invalid) still become a plain HTTP error; a client leaving meanwhile aborts it."""
    updates = service.stream(turn.build())
    try:
        first = await run_until_disconnect(receive, _first(updates))
    except BaseException:
        await updates.aclose()
        raise
    return updates, first


async def _first(updates: AsyncIterator[list[RequestOutput]]) -> Any:
    try:
        return await updates.__anext__()
    except StopAsyncIteration:
        return _NOTHING


async def stream_lines(turn: Turn, updates: AsyncIterator[list[RequestOutput]],
                       first: Any) -> AsyncIterator[bytes]:
    """NDJSON lines of a streamed turn; a failure after the first line arrives as a last
    {"error": ...} line (the status is already sent), never as a silently cut stream."""
    output_ids: list[int] = []
    last: RequestOutput | None = None
    finish_reason: str | None = None
    parser = turn.thinking.parser() if turn.thinking is not None else None
    tokenizer = turn.model.tokenizer if turn.top_logprobs is not None else None
    tool_parser = turn.tools.stream() if turn.tools is not None else None
    try:
        batch = first
        while batch is not _NOTHING:
            for out in batch:
                output_ids.extend(out.token_ids)
                thinking, text = turn.split(out.text, parser)
                if out.finished and parser is not None:
                    more_thinking, more_text = parser.finish()
                    thinking += more_thinking if turn.thinking.show else ""
                    text += more_text
                logprobs = (logprob_entries(tokenizer, out.logprobs, turn.top_logprobs)
                            if turn.top_logprobs is not None else None)
                if tool_parser is not None:
                    # the answer's text (the thinking taken out) through the tool-call parser
                    if thinking or logprobs:
                        yield ndjson(content_chunk(turn, "", thinking, logprobs))
                    pieces = tool_parser.feed(text) if text else []
                    if out.finished:
                        pieces += tool_parser.finish()
                    for piece in pieces:
                        yield ndjson(tool_piece_chunk(turn, piece, tool_parser.calls))
                elif text or thinking or logprobs:
                    yield ndjson(content_chunk(turn, text, thinking, logprobs))
                if out.finished:
                    last, finish_reason = out, out.finish_reason
            if last is not None:
                break
            try:
                batch = await updates.__anext__()
            except StopAsyncIteration:
                break
        if finish_reason == "abort":
            yield ndjson({"error": "the request was aborted before it finished"})
            return
        yield ndjson(final_chunk(turn, last, "", output_ids, finish_reason))
    except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
        yield ndjson({"error": classify(exc).message})
    finally:
        await updates.aclose()


async def complete(service: GenerationService, turn: Turn) -> dict[str, Any]:
    """A non-streamed turn: one object with the whole answer and the final fields."""
    completion = await service.complete(turn.build())
    sample = completion.samples[0]
    if sample.finish_reason == "abort":
        raise HttpError(500, "the request was aborted before it finished", type="server_error")
    thinking, text = "", sample.text
    if turn.thinking is not None:
        parser = turn.thinking.parser()
        parser.feed(sample.text)
        parser.finish()
        thinking = parser.reasoning if turn.thinking.show else ""
        text = parser.content
    logprobs = (logprob_entries(turn.model.tokenizer, sample.logprobs, turn.top_logprobs)
                if turn.top_logprobs is not None else None)
    body = final_chunk(turn, completion.last, text, sample.token_ids, sample.finish_reason,
                       thinking, logprobs)
    if turn.tools is not None:
        parsed = turn.tools.parse(text)
        body["message"]["content"] = parsed.content or ""
        if parsed.calls:
            body["message"]["tool_calls"] = [ollama_call(c, i) for i, c in enumerate(parsed.calls)]
    return body


def tool_piece_chunk(turn: Turn, piece: str | ToolCall, calls: list[ToolCall]) -> dict[str, Any]:
    """A streamed line of an answer with tools: its text, or one whole call (as Ollama streams
    a call: once complete, in a line of its own with empty content)."""
    if isinstance(piece, str):
        return content_chunk(turn, piece)
    body = content_chunk(turn, "")
    body["message"]["tool_calls"] = [ollama_call(piece, calls.index(piece))]
    return body


async def prepare(func: Any, *args: Any) -> Any:
    """Runs prompt rendering and tokenization off the event loop (long prompts take a while)."""
    return await asyncio.to_thread(func, *args)
