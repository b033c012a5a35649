"""Where the server is in its life (starting, serving, draining) and the probes that report it.

`GET /livez`: the process answers HTTP (200 whenever it can answer at all): a liveness
probe, restart the process when it fails. `GET /readyz`: 200 while the server takes
traffic (started and not draining), else 503: a readiness probe, send no new requests
when it fails. `GET /health` (app.py) stays vLLM's: 200 unless an engine loop died.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse


class ServerLifecycle:
    """Set by the app's lifespan (started) and by the signal handler (draining)."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "ready" if self.started else "starting"


router = APIRouter()


@router.api_route("/livez", methods=["GET", "HEAD"])
async def livez() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request) -> JSONResponse:
    lifecycle: ServerLifecycle = request.app.state.lifecycle
    return JSONResponse({"status": lifecycle.state}, status_code=200 if lifecycle.ready else 503)
