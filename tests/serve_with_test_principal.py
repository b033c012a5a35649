"""`shoal serve` with a test-only middleware that sets the caller's priority class.

A request's class comes from its principal, which the keys branch's auth middleware sets;
until then the tests set it with the X-Test-Priority-Class header through this wrapper.
shoal itself has no such header: clients never pick their own class.

Usage (as LiveServer's `entry`): python tests/serve_with_test_principal.py serve --model ...
"""
from __future__ import annotations

import sys

from shoal.access.principal import Principal, current_principal
from shoal.cli import main
import shoal.http.server
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = b"x-test-priority-class"


class TestPrincipalMiddleware:
    """Runs the request as a principal of the class the header names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        priority_class = dict(scope.get("headers", ())).get(HEADER) if scope["type"] == "http" else None
        if priority_class is None:
            await self.app(scope, receive, send)
            return
        token = current_principal.set(Principal(key_id="test", name="test",
                                                priority_class=priority_class.decode()))
        try:
            await self.app(scope, receive, send)
        finally:
            current_principal.reset(token)


_create_app = shoal.http.server.create_app


def _create_app_with_test_principal(*args, **kwargs):
    app = _create_app(*args, **kwargs)
    app.add_middleware(TestPrincipalMiddleware)
    return app


if __name__ == "__main__":
    shoal.http.server.create_app = _create_app_with_test_principal
    sys.exit(main(sys.argv[1:]))
