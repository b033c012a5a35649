"""A route's JSON body read and validated by hand.

Routes that take the bare Request (Ollama's, which accept any Content-Type, as Ollama's own
`curl -d` examples need, and the ones served directly: direct_routes.py) read their body
here. Malformed JSON and bad fields reach the app's 400 path as FastAPI's own body parsing
sends them (RequestValidationError, each location under "body"), so every endpoint names
them the same way; a missing or non-object body gets a plain sentence.
"""
from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from shoal.http.errors import HttpError

B = TypeVar("B", bound=BaseModel)


def parse_json(raw: bytes) -> Any:
    """The body's JSON value (None for an empty body)."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # NOTE: besides syntax and UTF-8 errors (both ValueErrors), json.loads raises
        # ValueError for integers over 4300 digits and RecursionError for deep nesting.
        problem = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "JSON decode error", "ctx": {"error": problem}}]) from None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def validated(model: type[B], data: Any) -> B:
    """A decoded body (None: none was sent) as `model`."""
    if data is None:
        raise HttpError(400, "missing request body")
    if not isinstance(data, dict):
        raise HttpError(400, f"the request body must be a JSON object, got {json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors()]) from None


async def body_as(request: Request, model: type[B]) -> B:
    """The request's JSON body as `model`, whatever its Content-Type."""
    return validated(model, parse_json(await request.body()))
