"""POST /v1/embeddings: OpenAI's embeddings endpoint, with vLLM's truncate_prompt_tokens.

`input` is a string, a list of strings, a list of token ids, or a list of such lists (token
ids are the model's own, taken as they are: no special tokens are added to them). An empty
string or list is a 400, as OpenAI answers. Vectors are L2-normalised (as OpenAI's are, and
vLLM's by default) and sent as floats or as base64 of little-endian float32.
"""
from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from shoal.core.errors import InvalidParameterError
from shoal.http.fast_json import FastJSONResponse
from shoal.http.openai import serving
from shoal.http.openai.protocol import _Body
from shoal.http.openapi_bodies import json_body
from shoal.http.request_body import body_as
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.embedding import (
    check_dimensions,
    embed,
    finish_vector,
    tokenize_inputs,
)

router = APIRouter()


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Any = None                  # checked below, so errors say which item is wrong
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None            # an end-user id for the caller's books; changes nothing
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


def parse_input(value: Any) -> list[str | list[int]]:
    """OpenAI's four input shapes -> one list of texts or token lists (400 naming `input`)."""
    if isinstance(value, str):
        if not value:
            raise InvalidParameterError("input", "the input is an empty string")
        return [value]
    if not isinstance(value, list):
        raise InvalidParameterError("input", "must be a string, a list of strings, a list of "
                                             f"token ids or a list of those; got {_kind(value)}")
    if not value:
        raise InvalidParameterError("input", "the input is an empty list")
    if all(_is_token(v) for v in value):
        return [list(value)]
    items: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, list) and all(_is_token(v) for v in item):
            items.append(list(item))
        else:
            raise InvalidParameterError("input", f"input[{i}] must be a string or a list of token "
                                                 f"ids; got {_kind(item)}")
    return items


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list holding " + (_kind(next((v for v in value if not _is_token(v)), 0)))
    return {dict: "an object", bool: "a boolean", float: "a number", int: "a number",
            type(None): "null", str: "a string"}.get(type(value), type(value).__name__)


def _encode(vector: np.ndarray, fmt: str) -> np.ndarray | str:
    if fmt == "float":
        return vector
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


# NOTE: the route takes the bare Request and reads its body by hand (request_body.py), so
# that the app can serve it directly (direct_routes.py).
@router.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    arrival = time.monotonic()
    body = await body_as(request, EmbeddingRequest)
    service = request.app.state.service
    residency = request.app.state.residency
    items = parse_input(body.input)
    if body.truncate_prompt_tokens == 0:
        raise InvalidParameterError("truncate_prompt_tokens", "must be a positive number of "
                                                              "tokens, or -1 for the context")
    model = await serving.acquire_model(residency, body.model)
    try:
        check_dimensions(model, body.dimensions)
        # NOTE: over-long inputs are cut only when asked (vLLM's truncate_prompt_tokens);
        # otherwise, as OpenAI, they are a 400.
        keep = body.truncate_prompt_tokens
        keep_last = None if keep is None else (model.max_model_len if keep == -1 else keep)
        if len(items) > service.settings.max_embedding_inputs:
            # before tokenizing what would be refused anyway
            raise InvalidParameterError("input", f"{len(items)} inputs are more than this server "
                                        f"takes in one request ({service.settings.max_embedding_inputs}, "
                                        "SHOAL_MAX_EMBEDDING_INPUTS)")
        inputs = tokenize_inputs(model, items, truncate=False, keep_last=keep_last)
        result = await run_until_disconnect(
            request.receive, embed(service, model, inputs, dialect="openai", arrival=arrival))
    finally:
        residency.release(model)
    data = [{"object": "embedding", "index": i,
             "embedding": _encode(finish_vector(v, normalize=True, dimensions=body.dimensions),
                                  body.encoding_format)}
            for i, v in enumerate(result.vectors)]
    return FastJSONResponse({"object": "list", "data": data, "model": body.model or model.name,
                         "usage": {"prompt_tokens": result.num_prompt_tokens,
                                   "total_tokens": result.num_prompt_tokens}})
