"""GET /v1/replicas: the engine replicas behind this front (docs/scale-out.md); an empty list
on a server whose engines run in process."""
from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/replicas")
async def list_replicas(request: Request) -> dict:
    rows = []
    for model in request.app.state.residency.loaded():
        describe = getattr(model.engine, "describe_replicas", None)
        if describe is not None:
            rows.extend({"model": model.name, **row} for row in describe())
    return {"object": "list", "data": rows}
