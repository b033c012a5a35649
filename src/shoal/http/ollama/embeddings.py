"""Ollama's embedding endpoints: POST /api/embed and the legacy POST /api/embeddings.

As Ollama: an empty `input` (an empty string or list) answers an empty list of embeddings
without running the model, and the legacy endpoint's empty `prompt` an empty `embedding`;
over-long inputs are cut to the context unless `truncate` is false (then 400). /api/embed
normalises each vector, /api/embeddings returns the model's pooled vector as it is.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

from shoal.core.errors import InvalidParameterError
from shoal.http.fast_json import FastJSONResponse
from shoal.http.ollama import serving
from shoal.http.ollama.protocol import _Body, nanoseconds
from shoal.http.openapi_bodies import json_body
from shoal.http.request_body import body_as, json_type
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.embedding import (
    check_dimensions,
    embed,
    finish_vector,
    tokenize_inputs,
)

router = APIRouter(prefix="/api")


class EmbedBody(_Body):
    model: StrictStr | None = None
    input: Any = None
    truncate: StrictBool | None = None
    dimensions: StrictInt | None = None
    options: dict[str, Any] | None = None
    keep_alive: StrictStr | StrictInt | StrictFloat | None = None


class EmbeddingsBody(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    options: dict[str, Any] | None = None
    keep_alive: StrictStr | StrictInt | StrictFloat | None = None


def parse_input(value: Any) -> list[str]:
    """A string or a list of strings (Ollama's "invalid input type" otherwise)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidParameterError("input", f"invalid input type: input[{i}] is "
                                                     f"{json_type(item)}, not a string")
        return list(value)
    raise InvalidParameterError("input", f"invalid input type: {json_type(value)}")


async def _vectors(request: Request, body: EmbedBody | EmbeddingsBody, items: list[str], *,
                   truncate: bool, dimensions: int | None = None):
    residency = request.app.state.residency
    started = time.monotonic()
    keep_alive = serving.check_keep_alive(residency, body, load_call=False)
    model = await serving.acquire_model(residency, body.model, keep_alive)
    try:
        loaded = time.monotonic()
        check_dimensions(model, dimensions)
        opts = serving.resolve_options(model, body.options)
        limit = request.app.state.service.settings.max_embedding_inputs
        if len(items) > limit:
            raise InvalidParameterError("input", f"{len(items)} inputs are more than this server "
                                        f"takes in one request ({limit}, SHOAL_MAX_EMBEDDING_INPUTS)")
        inputs = tokenize_inputs(model, items, truncate=truncate, context=opts.context)
        result = await run_until_disconnect(
            request.receive, embed(request.app.state.service, model, inputs, dialect="ollama",
                                   keep_alive=keep_alive, arrival=started))
    finally:
        residency.release(model)
    return model, result, loaded - started


@router.post("/embed", openapi_extra=json_body(EmbedBody))
async def embed_endpoint(request: Request) -> JSONResponse:
    started = time.monotonic()
    body = await body_as(request, EmbedBody)
    name = serving.check_model_name(request.app.state.residency, body.model)
    items = parse_input(body.input)
    if body.dimensions is not None and body.dimensions <= 0:
        raise InvalidParameterError("dimensions", f"must be a positive integer, got {body.dimensions}")
    if not items:
        return JSONResponse({"model": body.model or name, "embeddings": []})
    model, result, load_seconds = await _vectors(request, body, items,
                                                 truncate=body.truncate is not False,
                                                 dimensions=body.dimensions)
    vectors = [finish_vector(v, normalize=True, dimensions=body.dimensions) for v in result.vectors]
    return FastJSONResponse({"model": body.model or model.name, "embeddings": vectors,
                         "total_duration": nanoseconds(time.monotonic() - started),
                         "load_duration": nanoseconds(load_seconds),
                         "prompt_eval_count": result.num_prompt_tokens})


@router.post("/embeddings", openapi_extra=json_body(EmbeddingsBody))
async def embeddings_endpoint(request: Request) -> JSONResponse:
    body = await body_as(request, EmbeddingsBody)
    serving.check_model_name(request.app.state.residency, body.model)
    if not body.prompt:
        return JSONResponse({"embedding": []})
    _model, result, _load = await _vectors(request, body, [body.prompt], truncate=True)
    return FastJSONResponse({"embedding": result.vectors[0]})
