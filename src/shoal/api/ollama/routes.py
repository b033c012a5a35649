"""The Ollama dialect's endpoints under /api/ (errors render as Ollama's {"error": "..."})."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

import shoal
from shoal.api.errors import ApiError
from shoal.api.generation import run_until_disconnect
from shoal.api.ollama import info as model_info
from shoal.api.ollama import serving
from shoal.api.ollama.protocol import (OLLAMA_COMPAT_VERSION, ChatBody, GenerateBody, ShowBody,
                                       far_future)

router = APIRouter(prefix="/api")

NDJSON = "application/x-ndjson"


B = TypeVar("B", bound=BaseModel)


async def read_body(request: Request, model: type[B]) -> B:
    """The JSON body as `model`, whatever the Content-Type (Ollama's own examples use plain
    `curl -d`, which sends a form type). Errors take the app's 400 path: malformed JSON and
    bad fields are named the same way on every endpoint."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "JSON decode error", "ctx": {"error": str(exc)}}]) from None
    if data is None:
        raise ApiError(400, "missing request body")
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {serving.json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors()]) from None


async def _run(request: Request, turn: serving.Turn, stream: bool) -> Response:
    service = request.app.state.service
    if not stream:
        body = await run_until_disconnect(request.receive, serving.complete(service, turn))
        return JSONResponse(body)
    updates, first = await serving.start_stream(service, turn, request.receive)
    return StreamingResponse(serving.stream_lines(turn, updates, first), media_type=NDJSON)


@router.post("/generate")
async def generate(request: Request) -> Response:
    started = time.monotonic()
    body = await read_body(request, GenerateBody)
    model = serving.find_model(request.app.state.registry, body.model)
    loaded = time.monotonic()       # models are resident; on-demand loading will wait here
    keep_alive = serving.check_common(body, model)
    opts = serving.resolve_options(model, body.options)
    if body.raw and (body.template or body.system or body.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    if body.suffix:
        raise ApiError(400, f"{model.name} does not support insert", param="suffix",
                       code="unsupported_parameter")
    if not body.prompt:
        return JSONResponse(serving.load_reply("generate", body.model or "", keep_alive == 0))
    serving.check_generation_features(body)
    if body.images:
        raise ApiError(400, f"images are not supported: {model.name} reads text only",
                       param="images", code="unsupported_parameter")
    _text, ids = await serving.prepare(serving.generate_prompt, model, body, opts)
    turn = serving.Turn(kind="generate", echo_model=body.model or model.name, model=model,
                        prompt_ids=ids, params=serving.make_params(opts, len(ids)),
                        started=started, loaded=loaded, with_context=not body.raw)
    return await _run(request, turn, body.stream is not False)


@router.post("/chat")
async def chat(request: Request) -> Response:
    started = time.monotonic()
    body = await read_body(request, ChatBody)
    model = serving.find_model(request.app.state.registry, body.model)
    loaded = time.monotonic()       # models are resident; on-demand loading will wait here
    keep_alive = serving.check_common(body, model)
    opts = serving.resolve_options(model, body.options)
    if body.tools and not model.supports_tools():
        raise ApiError(400, f"{model.name} does not support tools", param="tools",
                       code="unsupported_parameter")
    if not body.messages:
        return JSONResponse(serving.load_reply("chat", body.model or "", keep_alive == 0))
    serving.check_generation_features(body)
    messages = serving.chat_messages(body, model)
    _text, ids = await serving.prepare(serving.chat_prompt, model, messages, body.tools or None,
                                       opts, body.truncate is not False)
    turn = serving.Turn(kind="chat", echo_model=body.model or model.name, model=model,
                        prompt_ids=ids, params=serving.make_params(opts, len(ids)),
                        started=started, loaded=loaded)
    return await _run(request, turn, body.stream is not False)


# ---- models -----------------------------------------------------------------------------------

@router.get("/tags")
@router.head("/tags")
async def tags(request: Request) -> dict[str, Any]:
    models = []
    for model in request.app.state.registry:
        size, digest = await asyncio.to_thread(lambda m=model: (m.size_bytes, m.digest))
        models.append({
            "name": model.name,
            "model": model.name,
            "modified_at": model_info.modified_at(model),
            "size": size,
            "digest": digest,
            "details": model_info.details(model),
        })
    return {"models": models}


@router.post("/show")
async def show(request: Request) -> Response:
    body = await read_body(request, ShowBody)
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model is required", param="model")
    model = serving.find_model(request.app.state.registry, name)
    # NOTE: JSONResponse skips FastAPI's encoder walk, which is slow over a verbose token list.
    return JSONResponse(await asyncio.to_thread(model_info.show, model, bool(body.verbose)))


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    for model in request.app.state.registry:
        size, digest = await asyncio.to_thread(lambda m=model: (m.size_bytes, m.digest))
        total = size + int(model.info.kv_cache_bytes)
        on_gpu = str(model.info.device).startswith("cuda")
        models.append({
            "name": model.name,
            "model": model.name,
            "size": total,
            "digest": digest,
            "details": model_info.details(model),
            # NOTE: models stay loaded for the server's life (residency comes later).
            "expires_at": far_future(),
            "size_vram": total if on_gpu else 0,
            "context_length": serving.served_context(model),
        })
    return {"models": models}


@router.get("/version")
@router.head("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_COMPAT_VERSION, "shoal_version": shoal.__version__}
