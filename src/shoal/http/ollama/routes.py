"""The Ollama dialect's endpoints under /api/ (errors render as Ollama's {"error": "..."})."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shoal.access.model_access import visible_models
from shoal.core.version import __version__
from shoal.http.errors import HttpError
from shoal.http.ollama import info as model_info
from shoal.http.ollama import serving
from shoal.http.ollama.thinking import resolve_think
from shoal.http.ollama.protocol import (OLLAMA_COMPAT_VERSION, ChatBody, GenerateBody, ShowBody,
                                       far_future, timestamp_at)
from shoal.http.openapi_bodies import json_body
from shoal.http.request_body import body_as
from shoal.http.tools import no_other_constraint, tool_plan
from shoal.serving.activity import server_activity
from shoal.serving.catalog import ModelSpec, path_size
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.thinking import thinking_for

router = APIRouter(prefix="/api")

NDJSON = "application/x-ndjson"


async def _run(request: Request, turn: serving.Turn, stream: bool) -> Response:
    service = request.app.state.service
    if not stream:
        body = await run_until_disconnect(request.receive, serving.complete(service, turn))
        return JSONResponse(body)
    updates, first = await serving.start_stream(service, turn, request.receive)
    return StreamingResponse(serving.stream_lines(turn, updates, first), media_type=NDJSON)


@router.post("/generate", openapi_extra=json_body(GenerateBody))
async def generate(request: Request) -> Response:
    started = time.monotonic()
    body = await body_as(request, GenerateBody)
    residency = request.app.state.residency
    name = serving.check_model_name(residency, body.model)
    if body.raw and (body.template or body.system or body.context):
        raise HttpError(400, "raw mode does not support template, system, or context")
    keep_alive = serving.check_keep_alive(residency, body, load_call=not body.prompt)
    if not body.prompt:
        return JSONResponse(await _load_call("generate", residency, name, body.model, keep_alive))
    model = await residency.acquire(name, keep_alive)
    try:
        loaded = time.monotonic()
        serving.check_generates(model, "generate")
        serving.check_common(body, model)
        opts = serving.resolve_options(model, body.options)
        if body.suffix:
            raise HttpError(400, f"{model.name} does not support insert", param="suffix",
                            code="unsupported_parameter")
        structured = serving.check_generation_features(body)
        if body.images:
            raise HttpError(400, f"images are not supported: {model.name} reads text only",
                            param="images", code="unsupported_parameter")
        think = resolve_think(body.think, model, body.model)
        text, ids = await serving.prepare(serving.generate_prompt, model, body, opts, think)
        # NOTE: a raw prompt is the caller's own: its output is passed through unparsed
        thinking = None if body.raw else thinking_for(model, text, show=think is not False)
        structured = serving.format_after_thinking(structured, thinking)
        top = _top_logprobs(body)
        turn = serving.Turn(kind="generate", echo_model=body.model or model.name, model=model,
                            prompt_ids=ids, params=serving.make_params(opts, len(ids), structured, top),
                            started=started, loaded=loaded, with_context=not body.raw,
                            keep_alive=keep_alive, max_tokens_given=opts.num_predict > 0,
                            thinking=thinking, top_logprobs=top)
        return await _run(request, turn, body.stream is not False)
    finally:
        residency.release(model)


@router.post("/chat", openapi_extra=json_body(ChatBody))
async def chat(request: Request) -> Response:
    started = time.monotonic()
    body = await body_as(request, ChatBody)
    residency = request.app.state.residency
    name = serving.check_model_name(residency, body.model)
    keep_alive = serving.check_keep_alive(residency, body, load_call=not body.messages)
    if not body.messages:
        return JSONResponse(await _load_call("chat", residency, name, body.model, keep_alive))
    model = await residency.acquire(name, keep_alive)
    try:
        loaded = time.monotonic()
        serving.check_generates(model, "chat")
        serving.check_common(body, model)
        opts = serving.resolve_options(model, body.options)
        structured = serving.check_generation_features(body)
        think = resolve_think(body.think, model, body.model)
        plan = tool_plan(model, body.tools, None, None)
        no_other_constraint(plan, structured)
        messages = plan.messages(serving.chat_messages(body, model))
        text, ids = await serving.prepare(serving.chat_prompt, model, messages, plan.render_tools,
                                          opts, body.truncate is not False, think)
        thinking = thinking_for(model, text, show=think is not False)
        # the constraint (a format, or the tool-call grammar) binds the answer after the thinking
        structured = serving.format_after_thinking(plan.structured if plan.active else structured, thinking)
        top = _top_logprobs(body)
        params = serving.make_params(opts, len(ids), structured, top)
        if plan.keep_special_tokens:
            params = replace(params, skip_special_tokens=False)
        turn = serving.Turn(kind="chat", echo_model=body.model or model.name, model=model,
                            prompt_ids=ids, params=params,
                            started=started, loaded=loaded, keep_alive=keep_alive,
                            max_tokens_given=opts.num_predict > 0, thinking=thinking, top_logprobs=top,
                            tools=plan if plan.active else None)
        return await _run(request, turn, body.stream is not False)
    finally:
        residency.release(model)


def _top_logprobs(body: GenerateBody | ChatBody) -> int | None:
    """Alternatives per token when `logprobs` is asked for (None: no log-probs)."""
    return (body.top_logprobs or 0) if body.logprobs else None


async def _load_call(kind: str, residency, name: str, echo: str | None,
                     keep_alive: float | None) -> dict[str, Any]:
    """Ollama's empty request: load the model (or, with keep_alive 0, unload it)."""
    if keep_alive == 0:
        await residency.unload(name)
    else:
        await residency.preload(name, keep_alive)
    return serving.load_reply(kind, echo or name, keep_alive == 0)


# ---- models -----------------------------------------------------------------------------------

@router.get("/tags")
@router.head("/tags")
async def tags(request: Request) -> dict[str, Any]:
    """Every model this server can serve, loaded or not."""
    residency = request.app.state.residency
    models = []
    for spec in visible_models(residency.catalog.specs()):
        loaded = residency.get_loaded(spec.name)
        if loaded is not None:
            size, digest = await asyncio.to_thread(lambda m=loaded: (m.size_bytes, m.digest))
            details, modified = model_info.details(loaded), model_info.modified_at(loaded)
        else:
            size, digest, details = await asyncio.to_thread(_unloaded_facts, spec)
            modified = model_info.spec_modified_at(spec)
        models.append({"name": spec.name, "model": spec.name, "modified_at": modified,
                       "size": size, "digest": digest, "details": details})
    return {"models": models}


def _unloaded_facts(spec: ModelSpec) -> tuple[int, str, dict[str, Any]]:
    return path_size(spec.path), spec.digest or "", model_info.spec_details(spec)


@router.post("/show", openapi_extra=json_body(ShowBody))
async def show(request: Request) -> Response:
    body = await body_as(request, ShowBody)
    name = body.model or body.name
    if not name:
        raise HttpError(400, "model is required", param="model")
    residency = request.app.state.residency
    canonical = serving.check_model_name(residency, name)
    store = getattr(request.app.state, "store", None)
    if store is not None and residency.resolve(canonical).digest is not None \
            and await asyncio.to_thread(store.exists, canonical):
        # A stored model, loaded or not: the store knows what its Modelfile set (SYSTEM,
        # TEMPLATE, PARAMETERs, messages, FROM), which is what the model uses; no load needed.
        return JSONResponse(await asyncio.to_thread(model_info.show_stored, store, canonical))
    model = await serving.acquire_model(residency, name)
    try:
        # NOTE: JSONResponse skips FastAPI's encoder walk, which is slow over a verbose token list.
        return JSONResponse(await asyncio.to_thread(model_info.show, model, bool(body.verbose)))
    finally:
        residency.release(model)


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    residency = request.app.state.residency
    for model in visible_models(residency.loaded()):
        digest = await asyncio.to_thread(lambda m=model: m.digest)
        total = model.size_in_memory
        on_gpu = str(model.info.device).startswith("cuda")
        expires = residency.expires_at(model)
        models.append({
            "name": model.name,
            "model": model.name,
            "size": total,
            "digest": digest,
            "details": model_info.details(model),
            "expires_at": _expires_at(expires),
            "size_vram": total if on_gpu else 0,
            "context_length": serving.served_context(model),
        })
        # shoal's addition for a model served by engine replicas (docs/scale-out.md): where each
        # runs and how busy it is
        describe = getattr(model.engine, "describe_replicas", None)
        if describe is not None:
            models[-1]["replicas"] = [{key: row[key] for key in _PS_REPLICA_FIELDS} for row in describe()]
    # shoal's addition (Ollama clients ignore unknown keys): what the server is doing, e.g.
    # "loading smollm2:135m: downloading (4 s); building the CPU kernels (x86-64-v3, 2 s)".
    reply: dict[str, Any] = {"models": models, "status": request.app.state.lifecycle.state}
    activity = server_activity(residency)
    if activity:
        reply["activity"] = activity
    return reply


_PS_REPLICA_FIELDS = ("replica", "node", "pid", "up", "in_flight", "running", "waiting", "kv_usage")
_GO_MAX_DURATION_S = (2**63 - 1) / 1e9


def _expires_at(expires: float | None) -> str:
    # NOTE: a keep_alive longer than Go's largest duration (~292 years) is "forever" in effect,
    # and one past the year 9999 has no date at all: both show as Ollama's far future.
    if expires is None or not abs(expires - time.time()) < _GO_MAX_DURATION_S:
        return far_future()
    return timestamp_at(expires)


@router.get("/version")
@router.head("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_COMPAT_VERSION, "shoal_version": __version__}
