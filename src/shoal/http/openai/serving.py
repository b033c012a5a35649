"""The OpenAI dialect's translator: wire request -> GenerateRequest -> wire response."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError, UnsupportedFeatureError
from shoal.core.sampling_params import MAX_LOGPROBS, SamplingParams
from shoal.engine.outputs import PromptLogprob, RequestOutput, TokenLogprob
from shoal.http.errors import HttpError, classify
from shoal.http.json_lines import json_line
from shoal.http.openai.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                       SamplingFields)
from shoal.http.openai.request_fields import check_fields
from shoal.http.openai.structured import structured_output
from shoal.http.tools import no_other_constraint, openai_call, tool_plan
from shoal.serving.completion import Completion, collect
from shoal.serving.disconnect import cancel_and_wait
from shoal.serving.request import GenerateRequest, new_request_id
from shoal.serving.residency import ResidencyManager
from shoal.serving.served import ServedModel
from shoal.serving.thinking import thinking_for
from shoal.text.tokenizer import Tokenizer
from shoal.text.tools.parsing import ToolCall, ToolCallStream


# ---- requests in ---------------------------------------------------------------------
async def acquire_model(residency: ResidencyManager, name: str | None) -> ServedModel:
    """The named model, loaded (pair with residency.release); with no name, the first
    served one (as vLLM does)."""
    if name is None:
        loaded = residency.loaded()
        if loaded:
            name = loaded[0].name
        else:
            specs = residency.catalog.specs()
            if not specs:
                raise HttpError(503, "no model is available", type="server_error")
            name = specs[0].name
    return await residency.acquire(name)


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as the template expects them; content parts joined into one string."""
    out = []
    for i, message in enumerate(messages):
        if message.role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidParameterError(f"messages[{i}].role", f"unknown role '{clip(message.role)}'")
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise UnsupportedFeatureError(
                        f"messages[{i}].content[{j}]",
                        f"content parts of type '{clip(part.type)}' are not supported; this model takes text only")
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": content or ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        thinking = message.reasoning_content or message.reasoning
        if thinking and message.role == "assistant":
            # NOTE: Qwen3's template reads reasoning_content; Go templates .Thinking
            entry["reasoning_content"] = entry["thinking"] = thinking
        out.append(entry)
    return out


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """OpenAI's defaults (temperature 1, top_p 1, no penalties) plus vLLM's extras."""
    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=given(req.temperature, 1.0), top_p=given(req.top_p, 1.0),
        top_k=given(req.top_k, 0), min_p=given(req.min_p, 0.0),
        repetition_penalty=given(req.repetition_penalty, 1.0),
        presence_penalty=given(req.presence_penalty, 0.0),
        frequency_penalty=given(req.frequency_penalty, 0.0),
        logit_bias=req.logit_bias or None, seed=req.seed, stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens, structured=structured_output(req),
        prompt_logprobs=req.prompt_logprobs)


def chat_request(model: ServedModel, req: ChatCompletionRequest, arrival: float) -> GenerateRequest:
    for legacy in ("functions", "function_call"):
        if getattr(req, legacy) is not None:
            raise UnsupportedFeatureError(
                legacy, f"the legacy '{legacy}' field is not supported; send 'tools' and 'tool_choice'")
    if req.continue_final_message or req.echo:
        field = "continue_final_message" if req.continue_final_message else "echo"
        raise UnsupportedFeatureError(field, "is not supported for chat completions")
    if req.top_logprobs is not None and not req.logprobs and req.top_logprobs > 0:
        raise InvalidParameterError("top_logprobs", "requires logprobs to be true")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise InvalidParameterError("top_logprobs", f"must be in 0..{MAX_LOGPROBS}, got {req.top_logprobs}")
    check_fields(req, "chat")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, logprobs)
    plan = tool_plan(model, req.tools, req.tool_choice, req.parallel_tool_calls)
    if plan.active:
        no_other_constraint(plan, params.structured)
        params = replace(params, structured=plan.structured,
                         skip_special_tokens=params.skip_special_tokens and not plan.keep_special_tokens)
    text, ids = model.render_chat(plan.messages(message_dicts(req.messages)), tools=plan.render_tools,
                                  add_generation_prompt=req.add_generation_prompt,
                                  template_kwargs=template_variables(model, req))
    thinking = thinking_for(model, text, show=req.include_reasoning)
    if thinking is not None and params.structured is not None:
        # the constraint (a schema, or the tool-call grammar) binds the answer after the thinking
        params = replace(params, structured=thinking.constrain(params.structured))
    return GenerateRequest(model=model, prompt_token_ids=truncate_prompt(ids, req.truncate_prompt_tokens),
                           params=params, request_id=req.request_id or new_request_id("chatcmpl"),
                           priority=req.priority, prompt_text=text, dialect="openai",
                           arrival_time=arrival, thinking=thinking, tools=plan if plan.active else None)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def template_variables(model: ServedModel, req: ChatCompletionRequest) -> dict[str, Any]:
    """Extra chat-template variables: vLLM's chat_template_kwargs, and reasoning_effort
    where the template reads it (400 naming it anywhere else: never silently ignored)."""
    variables = dict(req.chat_template_kwargs or {})
    effort = req.reasoning_effort
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise InvalidParameterError("reasoning_effort",
                                        f"must be one of {', '.join(REASONING_EFFORTS)}, got '{clip(effort)}'")
        reasoning = model.reasoning
        if reasoning is None:
            raise UnsupportedFeatureError("reasoning_effort", f"{model.name} is not a reasoning model")
        if not reasoning.takes_effort:
            raise UnsupportedFeatureError(
                "reasoning_effort", f"{model.name}'s chat template has no reasoning-effort setting")
        variables["reasoning_effort"] = effort
    return variables


def truncate_prompt(ids: list[int], keep: int | None) -> list[int]:
    """vLLM's truncate_prompt_tokens: only the last `keep` prompt tokens (-1 or None: all)."""
    if keep is None or keep < 0 or keep >= len(ids):
        return ids
    if keep == 0:
        raise InvalidParameterError("truncate_prompt_tokens", "must be at least 1 (or -1 for no limit)")
    return ids[len(ids) - keep:]


def prompt_count(prompt: Any) -> int:
    """How many prompts OpenAI's `prompt` holds (a string or a list of token ids is one)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return 1
    return len(prompt)


def completion_prompts(model: ServedModel, prompt: Any,
                       add_special_tokens: bool = True) -> list[tuple[str, list[int]]]:
    """OpenAI's four prompt forms -> (text, token ids) per prompt."""
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise InvalidParameterError("prompt", "must not be empty")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, tokenizer.encode(p, add_special_tokens=add_special_tokens)))
        else:
            # NOTE: checked before decoding: the tokenizer overflows on an id outside the vocabulary.
            model.engine.limits.check_token_ids(p, "prompt")
            out.append((tokenizer.decode(p, skip_special_tokens=False), list(p)))
    return out


def completion_requests(model: ServedModel, req: CompletionRequest,
                        arrival: float) -> list[GenerateRequest]:
    if req.suffix:
        raise UnsupportedFeatureError("suffix", "fill-in-the-middle is not supported")
    if req.best_of is not None and req.best_of != req.n:
        raise UnsupportedFeatureError("best_of", "must equal n (shoal returns every sample)")
    if req.echo and req.logprobs is not None:
        raise UnsupportedFeatureError("echo", "echo with logprobs (prompt logprobs) is not supported")
    check_fields(req, "completion")
    params = sampling_params(req, req.max_tokens, req.logprobs)
    base_id = req.request_id or new_request_id("cmpl")
    prompts = completion_prompts(model, req.prompt, req.add_special_tokens is not False)
    return [GenerateRequest(model=model, prompt_token_ids=truncate_prompt(ids, req.truncate_prompt_tokens),
                            params=params,
                            request_id=base_id if len(prompts) == 1 else f"{base_id}-{i}",
                            priority=req.priority, prompt_text=text, dialect="openai",
                            arrival_time=arrival)
            for i, (text, ids) in enumerate(prompts)]


# ---- responses out --------------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}


def completion_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob] | None,
                        offset: int = 0) -> dict | None:
    if logprobs is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(lp.logprob))
        top = {token_text(tokenizer, t): _finite(v) for t, v in lp.top}
        top.setdefault(text, _finite(lp.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number.
    return max(float(value), -9999.0)


def stop_reason(req: GenerateRequest, reason: int | str | None) -> int | str | None:
    """vLLM's convention: the stop string or stop_token_ids entry that ended a sample; None for EOS."""
    if isinstance(reason, int) and reason not in req.params.stop_token_ids:
        return None
    return reason


def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": num_cached}}


def chat_message(req: GenerateRequest, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of one sample and its finish reason: a reasoning model's thinking
    split out into vLLM's fields, then the tool calls parsed out of the answer."""
    message: dict = {"role": "assistant", "content": text, "tool_calls": []}
    thinking = req.thinking
    if thinking is not None:
        parser = thinking.parser()
        parser.feed(text)
        parser.finish()
        reasoning = (parser.reasoning or None) if thinking.show else None
        text = parser.content
        message.update(content=text, reasoning_content=reasoning, reasoning=reasoning)
    if req.tools is None:
        return message, finish_reason
    parsed = req.tools.parse(text)
    message.update(content=parsed.content, tool_calls=[openai_call(c) for c in parsed.calls])
    return message, finished_with_calls(finish_reason, bool(parsed.calls))


def finished_with_calls(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself after calling."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def chat_response(req: GenerateRequest, done: Completion, created: int) -> dict:
    tokenizer = req.model.tokenizer
    choices = []
    for s in done.samples:
        message, finish_reason = chat_message(req, s.text, s.finish_reason)
        choices.append({"index": s.index, "message": message,
                        "logprobs": chat_logprobs(tokenizer, s.logprobs),
                        "finish_reason": finish_reason, "stop_reason": stop_reason(req, s.stop_reason)})
    body = {"id": req.request_id, "object": "chat.completion", "created": created,
            "model": req.model.name, "choices": choices, "system_fingerprint": None,
            "usage": usage(done.num_prompt_tokens, done.num_output_tokens, done.num_cached_tokens)}
    if req.params.prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_json(tokenizer, done.prompt_logprobs)
    return body


def prompt_logprobs_json(tokenizer: Tokenizer, entries: Sequence[PromptLogprob | None] | None
                         ) -> list[dict | None] | None:
    """vLLM's shape: None for the first prompt token, then per token {token id: {"logprob",
    "rank", "decoded_token"}} holding the actual token and the top alternatives."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        tokens = {str(t): {"logprob": _finite(v), "rank": rank, "decoded_token": token_text(tokenizer, t)}
                  for rank, (t, v) in enumerate(entry.top, start=1)}
        tokens[str(entry.token_id)] = {"logprob": _finite(entry.logprob), "rank": entry.rank,
                                       "decoded_token": token_text(tokenizer, entry.token_id)}
        out.append(tokens)
    return out


def completion_response(reqs: Sequence[GenerateRequest], dones: Sequence[Completion], created: int,
                        echo: bool, response_id: str) -> dict:
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for p, (req, done) in enumerate(zip(reqs, dones)):
        tokenizer = req.model.tokenizer
        prefix = req.prompt_text if echo and req.prompt_text else ""
        for s in done.samples:
            choice = {"index": p * req.params.n + s.index, "text": prefix + s.text,
                      "logprobs": completion_logprobs(tokenizer, s.logprobs, len(prefix)),
                      "finish_reason": s.finish_reason,
                      "stop_reason": stop_reason(req, s.stop_reason)}
            if req.params.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(tokenizer, done.prompt_logprobs)
            choices.append(choice)
        prompt_tokens += done.num_prompt_tokens
        completion_tokens += done.num_output_tokens
        cached += done.num_cached_tokens
    return {"id": response_id, "object": "text_completion", "created": created,
            "model": reqs[0].model.name, "choices": choices, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens, cached)}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json_line(payload)
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    error = classify(exc)
    return sse({"error": {"message": error.message, "type": error.type, "param": error.param,
                          "code": error.status}})


async def chat_stream(req: GenerateRequest, updates: AsyncIterator[list[RequestOutput]],
                      created: int, include_usage: bool, continuous_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: the role first, then content deltas, a finish reason, usage, [DONE]."""
    tokenizer = req.model.tokenizer
    base = {"id": req.request_id, "object": "chat.completion.chunk", "created": created,
            "model": req.model.name}
    num_prompt = len(req.prompt_token_ids)
    generated = 0
    cached = 0

    def chunk(choices: list[dict]) -> str:
        body = {**base, "choices": choices}
        if include_usage:
            body["usage"] = usage(num_prompt, generated, cached) if continuous_usage else None
        return sse(body)

    thinking_parsers = ({i: req.thinking.parser() for i in range(req.params.n)}
                        if req.thinking is not None else {})
    show_thinking = req.thinking is not None and req.thinking.show

    def split(out: RequestOutput) -> tuple[str, str]:
        """(thinking to show, answer text) of one update."""
        parser = thinking_parsers.get(out.index)
        if parser is None:
            return "", out.text
        reasoning, content = parser.feed(out.text)
        if out.finished:
            more_reasoning, more_content = parser.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return (reasoning if show_thinking else ""), content

    def reasoning_delta(reasoning: str) -> dict:
        return {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}

    try:
        for index in range(req.params.n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        tool_parsers = {i: req.tools.stream() for i in range(req.params.n)} if req.tools is not None else None
        async for batch in updates:
            for out in batch:
                generated += len(out.token_ids)
                cached = max(cached, out.num_cached_tokens)
                reasoning, text = split(out)
                if tool_parsers is not None:
                    # the thinking first, then the answer's text through the tool-call parser
                    if reasoning:
                        yield chunk([{"index": out.index, "delta": reasoning_delta(reasoning),
                                      "logprobs": None, "finish_reason": None}])
                    for body in tool_stream_chunks(tool_parsers[out.index], out, text, tokenizer, req):
                        yield chunk([body])
                    continue
                body = {**reasoning_delta(reasoning), **({"content": text} if text else {})}
                if not body and not out.finished and not out.logprobs:
                    continue
                yield chunk([{"index": out.index, "delta": body,
                              "logprobs": chat_logprobs(tokenizer, out.logprobs),
                              "finish_reason": out.finish_reason if out.finished else None,
                              **({"stop_reason": stop_reason(req, out.stop_reason)} if out.finished else {})}])
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(num_prompt, generated, cached)})
    except Exception as exc:  # noqa: BLE001 - reported in-stream: the headers are already sent
        yield sse_error(exc)
    finally:
        await _close(updates)
    yield sse("[DONE]")


def tool_stream_chunks(parser: ToolCallStream, out: RequestOutput, text: str, tokenizer: Tokenizer,
                       req: GenerateRequest) -> list[dict]:
    """One update of a sample whose tool calls are parsed (`text`: its answer text, the
    thinking taken out): content deltas for its text, and
    for each call as it completes, OpenAI's two deltas (index, id, type, name and empty
    arguments; then the arguments), then the finish reason."""
    pieces = parser.feed(text) if text else []
    if out.finished:
        pieces += parser.finish()
    bodies = []
    for piece in pieces:
        if isinstance(piece, ToolCall):
            k = parser.calls.index(piece)       # the call's place among the sample's calls
            bodies.append({"tool_calls": [{"index": k, "id": piece.id, "type": "function",
                                           "function": {"name": piece.name, "arguments": ""}}]})
            bodies.append({"tool_calls": [{"index": k, "function": {"arguments": piece.arguments_json}}]})
        else:
            bodies.append({"content": piece})
    chunks = [{"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None}
              for delta in bodies]
    if out.finished or out.logprobs:
        last = {"index": out.index, "delta": {}, "logprobs": chat_logprobs(tokenizer, out.logprobs),
                "finish_reason": None}
        if out.finished:
            last["finish_reason"] = finished_with_calls(out.finish_reason, bool(parser.calls))
            last["stop_reason"] = stop_reason(req, out.stop_reason)
        chunks.append(last)
    return chunks


async def completion_stream(reqs: Sequence[GenerateRequest],
                            updates: Sequence[AsyncIterator[list[RequestOutput]]], created: int,
                            echo: bool, include_usage: bool, continuous_usage: bool,
                            response_id: str) -> AsyncIterator[str]:
    """SSE chunks for one or several prompts, interleaved as their tokens arrive."""
    base = {"id": response_id, "object": "text_completion", "created": created,
            "model": reqs[0].model.name}
    num_prompt = sum(len(r.prompt_token_ids) for r in reqs)
    generated = 0
    echoed: set[int] = set()
    offsets: dict[int, int] = {}

    def chunk(choices: list[dict]) -> str:
        body = {**base, "choices": choices}
        if include_usage:
            body["usage"] = usage(num_prompt, generated) if continuous_usage else None
        return sse(body)

    try:
        async for p, batch in merge_streams(updates):
            req = reqs[p]
            tokenizer = req.model.tokenizer
            for out in batch:
                generated += len(out.token_ids)
                index = p * req.params.n + out.index
                text = out.text
                if echo and index not in echoed:
                    echoed.add(index)
                    text = (req.prompt_text or "") + text
                if not text and not out.finished and not out.logprobs:
                    continue
                offset = offsets.get(index, len(text) - len(out.text))
                lps = completion_logprobs(tokenizer, out.logprobs, offset)
                offsets[index] = offset + sum(len(t) for t in (lps or {}).get("tokens", []))
                yield chunk([{"index": index, "text": text, "logprobs": lps,
                              "finish_reason": out.finish_reason if out.finished else None,
                              **({"stop_reason": stop_reason(req, out.stop_reason)} if out.finished else {})}])
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(num_prompt, generated)})
    except Exception as exc:  # noqa: BLE001 - reported in-stream: the headers are already sent
        yield sse_error(exc)
    finally:
        for stream in updates:
            await _close(stream)
    yield sse("[DONE]")


async def merge_streams(streams: Sequence[AsyncIterator[list[RequestOutput]]]
                        ) -> AsyncIterator[tuple[int, list[RequestOutput]]]:
    """Interleaves several request streams as their updates arrive; (stream index, batch)."""
    if len(streams) == 1:
        async for batch in streams[0]:
            yield 0, batch
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[list[RequestOutput]]) -> None:
        try:
            async for batch in stream:
                await queue.put((i, batch))
            await queue.put((i, done))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        # NOTE: waited for: the caller closes these streams next (disconnect.cancel_and_wait)
        await cancel_and_wait(*tasks)


async def collect_all(reqs: Sequence[GenerateRequest],
                      streams: Sequence[AsyncIterator[list[RequestOutput]]]) -> list[Completion]:
    """Gathers several started prompts' requests concurrently (one engine batch)."""
    tasks = [asyncio.ensure_future(collect(r, s)) for r, s in zip(reqs, streams)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await cancel_and_wait(*tasks)


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def now() -> int:
    return int(time.time())
