"""The key-management HTTP API (/admin/keys); AuthMiddleware lets only admin keys in.

    GET    /admin/keys          every key (never a secret)
    POST   /admin/keys          create one; the reply holds the key, shown this once
    DELETE /admin/keys/{id}     revoke one
"""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from shoal.access.auth import Authenticator
from shoal.access.keydb import UnknownKeyError
from shoal.access.keys import parse_expiry
from shoal.access.principal import KeyLimits
from shoal.http.errors import HttpError

router = APIRouter(prefix="/admin")


# NOTE: the keys DB stores limits as SQLite INTEGERs (64-bit); a larger one must be a 400,
# not an OverflowError at the INSERT.
_MAX_LIMIT = 2**63 - 1


class NewKeyBody(BaseModel):
    name: str
    models: list[str] | None = None
    rpm: int | None = Field(None, ge=1, le=_MAX_LIMIT)
    tpm: int | None = Field(None, ge=1, le=_MAX_LIMIT)
    max_concurrent: int | None = Field(None, ge=1, le=_MAX_LIMIT)
    max_prompt_tokens: int | None = Field(None, ge=1, le=_MAX_LIMIT)
    max_tokens: int | None = Field(None, ge=1, le=_MAX_LIMIT)
    priority_class: Literal["interactive", "batch"] = "interactive"
    expires: str | None = None        # '30d', '12h', or an ISO date/time
    admin: bool = False


def _auth(request: Request) -> Authenticator:
    return request.app.state.authenticator


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    records = await asyncio.to_thread(_auth(request).db.list)
    return {"keys": [record.to_json() for record in records]}


@router.post("/keys", status_code=201)
async def create_key(body: NewKeyBody, request: Request) -> JSONResponse:
    limits = KeyLimits(requests_per_minute=body.rpm, tokens_per_minute=body.tpm,
                       max_concurrent=body.max_concurrent,
                       max_prompt_tokens=body.max_prompt_tokens, max_tokens=body.max_tokens)
    expires_at = parse_expiry(body.expires) if body.expires else None
    key, record = await asyncio.to_thread(
        _auth(request).db.create, body.name, models=body.models, limits=limits,
        priority_class=body.priority_class, expires_at=expires_at, admin=body.admin)
    return JSONResponse({"key": key, **record.to_json()}, status_code=201)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    try:
        record = await asyncio.to_thread(_auth(request).db.revoke, key_id)
    except UnknownKeyError as exc:
        raise HttpError(404, str(exc), param="id", code="key_not_found") from None
    return record.to_json()
