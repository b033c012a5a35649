"""The health probes: liveness, readiness, and vLLM's /health.

`GET /livez`: the process answers HTTP (200 whenever it can answer at all): a liveness
probe, restart the process when it fails. `GET /readyz`: 200 while the server takes
traffic (started, its --model loaded, not draining), else 503 (`starting`, `loading`,
`draining`): a readiness probe, send no new requests when it fails. While anything loads or
builds, `activity` says what (the CLI prints it while it waits). `GET /health` stays
vLLM's: 200 unless an engine loop died.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from shoal.serving.activity import server_activity
from shoal.serving.server_state import ServerLifecycle

router = APIRouter()


@router.api_route("/livez", methods=["GET", "HEAD"])
async def livez() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request) -> JSONResponse:
    lifecycle: ServerLifecycle = request.app.state.lifecycle
    body = {"status": lifecycle.state}
    activity = server_activity(request.app.state.residency)
    if activity and not lifecycle.draining:
        body["activity"] = activity
    return JSONResponse(body, status_code=200 if lifecycle.ready else 503)


@router.get("/health")
async def health(request: Request) -> Response:
    for model in request.app.state.residency.loaded():
        if model.engine.dead is not None:
            return JSONResponse({"status": "engine dead", "model": model.name}, status_code=503)
    return Response(status_code=200)
