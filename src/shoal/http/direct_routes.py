"""Endpoints served ahead of FastAPI's router, without its per-request machinery.

Embedding requests are small and many (an indexer sends thousands), and on a small machine
the event loop shares the cores with the encoder. FastAPI's routing through every included
router, its request wrappers and its dependency solving took about a fifth of the event
loop's CPU per request (py-spy of an all-MiniLM flood: 1.06 -> 0.86 ms served directly),
and the flood embedded ~6% more sentences/s (docs/benchmarks.md, benchmarks/embed_http_ab.py).

A direct route is a plain Starlette route, first in the app's router, that calls the
endpoint with the Request and sends its Response. Everything around the router applies as
before: the middleware (host and key checks, body limits, request ids, records, CORS) and
the app's error handlers, which render an exception by the path's dialect. The FastAPI route
stays registered, so /openapi.json and /docs still describe the endpoint.

Only an endpoint that takes the bare Request and returns a Response can be served this way
(it reads its own body: request_body.py).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


class _Direct:
    """The ASGI app of one direct route (a class, so Starlette passes the scope as it is)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def serve_directly(app: FastAPI, router: APIRouter, *endpoints: Endpoint) -> None:
    """Puts each of `endpoints` (routes of `router`, which `app` includes without a prefix)
    in front of the app's router, at the same path and methods."""
    for endpoint in endpoints:
        route = next((r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint),
                     None)
        if route is None:
            raise ValueError(f"{endpoint.__name__} is not a route of this router")
        app.router.routes.insert(0, Route(route.path, _Direct(endpoint), methods=sorted(route.methods)))
