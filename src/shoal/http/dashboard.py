"""The live dashboard: GET /dashboard (one self-contained page), its feed and a one-shot snapshot.

`/dashboard` is a single HTML file shipped in the package, its CSS and JS inline and its plots
drawn as inline SVG: no build step, nothing fetched from elsewhere. The page is open (it
holds no data); what it shows comes from `/dashboard/feed`, a server-sent-event stream of
serving/live.py's snapshot (the whole history first, then the newest point each second),
which `shoal top` reads as `/dashboard/snapshot`. Both need an admin key when keys are
required (access/auth.py). The page sends the key in an Authorization header through
fetch(), so it never appears in a URL.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from shoal.access.auth import Access
from shoal.core.errors import AccessDeniedError
from shoal.serving.live import HISTORY_S, LiveStats

router = APIRouter(include_in_schema=False)

# A feed re-checks its key this often: a revoked or expired key stops seeing data within it.
RECHECK_KEY_S = 30.0


@cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy (the inline script allowed by its hash only)."""
    html = resources.files("shoal.http").joinpath("dashboard.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return html, policy


@router.get("/dashboard")
async def dashboard_page() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-store",
                                       "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                                       "X-Content-Type-Options": "nosniff"})


@router.get("/dashboard/snapshot")
async def dashboard_snapshot(request: Request,
                             history: int = Query(60, ge=0, le=HISTORY_S)) -> JSONResponse:
    """The live view now, with the last `history` seconds of the series (`shoal top`)."""
    live: LiveStats = request.app.state.live
    return JSONResponse(live.snapshot(history), headers={"Cache-Control": "no-store"})


@router.get("/dashboard/feed")
async def dashboard_feed(request: Request) -> StreamingResponse:
    live: LiveStats = request.app.state.live
    frames = _frames(live, request.app.state.authenticator, request.headers.get("authorization"),
                     request.app.state.lifecycle)
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _frames(live: LiveStats, authenticator, authorization: str | None,
                  lifecycle) -> AsyncIterator[bytes]:
    yield _frame(json.dumps(live.snapshot(), separators=(",", ":")).encode())
    checked = time.monotonic()
    # NOTE: a draining server ends its feeds (the page reconnects), so they never hold up
    # uvicorn's exit.
    while not lifecycle.draining:
        await live.next_tick()
        if authenticator.needs_key(Access.ADMIN_VIEW) and time.monotonic() - checked >= RECHECK_KEY_S:
            try:
                authenticator.admit(Access.ADMIN_VIEW, authorization)
            except AccessDeniedError as exc:
                yield _frame(json.dumps({"error": str(exc)}).encode(), event="error")
                return
            checked = time.monotonic()
        yield _frame(live.latest_json())


def _frame(data: bytes, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data + b"\n\n"
