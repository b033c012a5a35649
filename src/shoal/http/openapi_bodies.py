"""OpenAPI descriptions of request bodies that a route reads by hand.

Ollama's endpoints parse their JSON themselves (any Content-Type, Ollama's own errors), so
FastAPI sees no body parameter and /openapi.json would show them taking none: clients,
docs and schema-driven fuzzers (tests/http/test_fuzz.py) would never send one. These
helpers give such routes an `openapi_extra` that documents the body the route really
parses; the parsing itself is unchanged.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_DEFS_PREFIX = "#/$defs/"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that validates its JSON body as `model`."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    # NOTE: nested models are inlined: a `#/$defs/...` ref inside an operation would point
    # into the OpenAPI document's root, where those definitions are not.
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _inline(schema, defs)}}}}


def binary_body() -> dict[str, Any]:
    """`openapi_extra` for a route that streams its body as raw bytes (a blob upload)."""
    return {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS_PREFIX):
            # the protocol models are not recursive, so inlining always ends
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return {**_inline(defs[ref[len(_DEFS_PREFIX):]], defs), **_inline(siblings, defs)}
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    return node
