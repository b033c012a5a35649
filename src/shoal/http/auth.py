"""The API-key check of each HTTP request: shoal.access.auth's policy applied as ASGI middleware,
which sets `current_principal` for everything the request runs."""
from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.access.auth import Authenticator, required_access
from shoal.access.principal import current_principal
from shoal.core.errors import AccessDeniedError
from shoal.http.error_responses import error_response
from shoal.http.errors import HttpError, classify


class AuthMiddleware:
    """Pure ASGI (as BodyLimitMiddleware): checks the key before the body is read, and sets
    `current_principal` for everything that runs for the request, streaming included.

    Refusals are answered in the path's dialect and counted by `count(error)` (the app's
    rejected-requests metric).
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator,
                 count: Callable[[AccessDeniedError], None]) -> None:
        self.app = app
        self.auth = authenticator
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        access = required_access(scope["method"], path, self.auth.protect_metrics)
        if not self.auth.needs_key(access):
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        if len(given) > 1:
            # NOTE: which one counts would differ between a proxy and this server (the last
            # one wins here): the request is refused rather than guessed.
            error = HttpError(400, f"the request has {len(given)} Authorization headers; send one",
                              code="invalid_request")
            await error_response(path, error)(scope, receive, send)
            return
        authorization = given[0].decode("latin-1") if given else ""
        try:
            principal = self.auth.admit(access, authorization)
        except AccessDeniedError as exc:
            self.count(exc)
            await error_response(path, classify(exc))(scope, receive, send)
            return
        token = current_principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            current_principal.reset(token)
