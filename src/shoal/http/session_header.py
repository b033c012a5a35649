"""Session affinity's header: the request's session id for the replica router.

Attached only to a front with replicas (the in-process server has nothing to route).
"""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.serving.replicas.session import MAX_SESSION_ID, current_session


class SessionHeaderMiddleware:
    def __init__(self, app: ASGIApp, header: str) -> None:
        self.app = app
        self.header = header.strip().lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            session = None
            for name, value in scope["headers"]:
                if name == self.header:
                    session = value.decode("latin-1").strip()[:MAX_SESSION_ID] or None
                    break
            # NOTE: set for every request (each runs in its own task, so nothing leaks between them)
            current_session.set(session)
        await self.app(scope, receive, send)
