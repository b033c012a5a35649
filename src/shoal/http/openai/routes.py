"""The OpenAI dialect's endpoints (and vLLM's utility endpoints)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from shoal.access.model_access import visible_models
from shoal.core.errors import InvalidParameterError
from shoal.http.openai import responses, serving
from shoal.http.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest)
from shoal.http.openai.responses_protocol import ResponsesRequest
from shoal.http.tools import tool_plan
from shoal.serving.catalog import ModelSpec
from shoal.serving.completion import collect
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.generate import GenerationService
from shoal.serving.residency import ResidencyManager
from shoal.serving.served import ServedModel

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _residency(request: Request) -> ResidencyManager:
    return request.app.state.residency


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    arrival = time.monotonic()
    service = _service(request)
    residency = _residency(request)
    model = await serving.acquire_model(residency, body.model)
    try:
        gen = serving.chat_request(model, body, arrival)
        updates = service.start(gen)      # the stream holds the model from here
    finally:
        residency.release(model)
    created = serving.now()
    if body.stream:
        await service.wait_scheduled([updates], request.receive)   # refusals stay plain errors
        options = body.stream_options
        return StreamingResponse(
            serving.chat_stream(gen, updates, created, bool(options and options.include_usage),
                                bool(options and options.continuous_usage_stats)),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    done = await run_until_disconnect(request.receive, collect(gen, updates))
    return JSONResponse(serving.chat_response(gen, done, created))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    arrival = time.monotonic()
    service = _service(request)
    residency = _residency(request)
    model = await serving.acquire_model(residency, body.model)
    try:
        service.check_prompt_count(model, serving.prompt_count(body.prompt))    # before tokenizing them
        gens = serving.completion_requests(model, body, arrival)
        updates = service.start_all(gens)  # the streams hold the model from here
    finally:
        residency.release(model)
    created = serving.now()
    response_id = gens[0].request_id.rsplit("-", 1)[0] if len(gens) > 1 else gens[0].request_id
    if body.stream:
        await service.wait_scheduled(updates, request.receive)     # refusals stay plain errors
        options = body.stream_options
        return StreamingResponse(
            serving.completion_stream(gens, updates, created, body.echo,
                                      bool(options and options.include_usage),
                                      bool(options and options.continuous_usage_stats), response_id),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    dones = await run_until_disconnect(request.receive, serving.collect_all(gens, updates))
    return JSONResponse(serving.completion_response(gens, dones, created, body.echo, response_id))


def _model_card(spec: ModelSpec, loaded: ServedModel | None) -> dict:
    created = loaded.loaded_at if loaded else (spec.modified_at or 0)
    return {"id": spec.name, "object": "model", "created": int(created), "owned_by": "shoal",
            "root": str(spec.path), "parent": None,
            "max_model_len": loaded.max_model_len if loaded else None}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    residency = _residency(request)
    return {"object": "list", "data": [_model_card(spec, residency.get_loaded(spec.name))
                                       for spec in visible_models(residency.catalog.specs())]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    residency = _residency(request)
    spec = residency.resolve(model_id)
    return _model_card(spec, residency.get_loaded(spec.name))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    residency = _residency(request)
    model = await serving.acquire_model(residency, body.model)
    try:
        return _tokenize(model, body)
    finally:
        residency.release(model)


def _tokenize(model: ServedModel, body: TokenizeRequest) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidParameterError("prompt", "give exactly one of 'prompt' or 'messages'")
    if body.messages is not None:
        # exactly the tokens a chat request would send (the model's template, SYSTEM, MESSAGEs)
        plan = tool_plan(model, body.tools, None, None)
        _text, ids = model.render_chat(plan.messages(serving.message_dicts(body.messages)),
                                       tools=plan.render_tools,
                                       add_generation_prompt=body.add_generation_prompt,
                                       template_kwargs=body.chat_template_kwargs)
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = model.tokenizer.encode(body.prompt or "", add_special_tokens=add_special)
    strs = [model.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    residency = _residency(request)
    model = await serving.acquire_model(residency, body.model)
    try:
        return _detokenize(model, body)
    finally:
        residency.release(model)


def _detokenize(model: ServedModel, body: DetokenizeRequest) -> dict:
    model.engine.limits.check_token_ids(body.tokens, "tokens")
    return {"prompt": model.tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.post("/v1/responses")
async def responses_create(body: ResponsesRequest, request: Request):
    """OpenAI's Responses API, statelessly, as the chat completion it amounts to."""
    arrival = time.monotonic()
    service = _service(request)
    residency = _residency(request)
    try:
        chat = responses.chat_request(body)
    except InvalidParameterError as exc:
        raise responses.renamed(exc) from None
    model = await serving.acquire_model(residency, chat.model)
    try:
        try:
            gen = serving.chat_request(model, chat, arrival)
            updates = service.start(gen)      # the stream holds the model from here
        except InvalidParameterError as exc:
            raise responses.renamed(exc) from None
    finally:
        residency.release(model)
    shell = responses.ResponseShell(body, model.name, serving.now())
    if body.stream:
        await service.wait_scheduled([updates], request.receive)   # refusals stay plain errors
        chat_sse = serving.chat_stream(gen, updates, shell.created, True, False)
        return StreamingResponse(responses.response_stream(shell, chat_sse),
                                 media_type="text/event-stream", headers=_SSE_HEADERS)
    done = await run_until_disconnect(request.receive, collect(gen, updates))
    return JSONResponse(responses.response_body(shell, serving.chat_response(gen, done, shell.created)))
