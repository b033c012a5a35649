"""serve_directly: an endpoint put ahead of FastAPI's router still runs inside the app's
middleware and error handlers, at its own path and methods only."""
from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from shoal.core.errors import InvalidParameterError
from shoal.http.direct_routes import serve_directly
from shoal.http.openai.embeddings import EmbeddingRequest
from shoal.http.request_body import body_as


def _app() -> tuple[FastAPI, list[str]]:
    seen: list[str] = []

    def through_fastapi() -> None:
        seen.append("dependency")

    router = APIRouter(prefix="/api", dependencies=[Depends(through_fastapi)])

    @router.post("/direct")
    async def direct(request: Request) -> JSONResponse:
        body = await body_as(request, EmbeddingRequest)
        if body.input == "bad":
            raise InvalidParameterError("input", "is bad")
        return JSONResponse({"input": body.input})

    @router.post("/routed")
    async def routed(request: Request) -> JSONResponse:
        return JSONResponse({"routed": True})

    app = FastAPI()
    app.include_router(router)

    @app.middleware("http")
    async def mark(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-middleware"] = "ran"
        return response

    @app.exception_handler(InvalidParameterError)
    async def invalid(_request: Request, exc: InvalidParameterError) -> JSONResponse:
        return JSONResponse({"param": exc.field}, status_code=400)

    serve_directly(app, router, direct)
    return app, seen


def test_a_direct_route_skips_fastapi_but_not_the_middleware_or_error_handlers() -> None:
    app, seen = _app()
    client = TestClient(app)
    ok = client.post("/api/direct", json={"input": "hello"})
    assert ok.json() == {"input": "hello"} and ok.headers["x-middleware"] == "ran"
    assert seen == []                       # the router's FastAPI dependency never ran
    bad = client.post("/api/direct", json={"input": "bad"})
    assert bad.status_code == 400 and bad.json() == {"param": "input"}
    assert bad.headers["x-middleware"] == "ran"
    # the other routes of the same router still go through FastAPI
    assert client.post("/api/routed").json() == {"routed": True} and seen == ["dependency"]
    assert client.get("/api/direct").status_code == 405


def test_only_an_endpoint_of_the_router_can_be_served_directly() -> None:
    app, _ = _app()

    async def stray(request: Request) -> JSONResponse:
        return JSONResponse({})

    with pytest.raises(ValueError, match="stray"):
        serve_directly(app, APIRouter(), stray)
