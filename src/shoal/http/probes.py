"""The health probes: liveness, readiness, and vLLM's /health.

`GET /livez`: the process answers HTTP (200 whenever it can answer at all): a liveness
probe, restart the process when it fails. `GET /readyz`: 200 while the server takes
traffic (started and not draining), else 503: a readiness probe, send no new requests
when it fails. `GET /health` stays vLLM's: 200 unless an engine loop died.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from shoal.serving.server_state import ServerLifecycle

router = APIRouter()


@router.api_route("/livez", methods=["GET", "HEAD"])
async def livez() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request) -> JSONResponse:
    lifecycle: ServerLifecycle = request.app.state.lifecycle
    return JSONResponse({"status": lifecycle.state}, status_code=200 if lifecycle.ready else 503)


@router.get("/health")
async def health(request: Request) -> Response:
    for model in request.app.state.residency.loaded():
        if model.engine.dead is not None:
            return JSONResponse({"status": "engine dead", "model": model.name}, status_code=503)
    return Response(status_code=200)
