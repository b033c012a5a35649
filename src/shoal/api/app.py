"""The FastAPI application: shared endpoints, error rendering per dialect, body limits, API keys."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import shoal
from shoal.api.errors import ApiError, classify
from shoal.api.generation import GenerationService
from shoal.api.metrics import CONTENT_TYPE, ServerMetrics
from shoal.api.models import ResidencyManager
from shoal.api.settings import ServerSettings
from shoal.errors import AccessDeniedError, ShoalError
from shoal.guard import observability
from shoal.guard.auth import Authenticator, AuthMiddleware
from shoal.guard.lifecycle import ServerLifecycle
from shoal.guard.requestid import request_id_headers


def dialect_of(path: str) -> str:
    """Which dialect's error shape a path answers in: Ollama's under /api/, OpenAI's elsewhere."""
    return "ollama" if path.startswith("/api/") else "openai"


def error_response(path: str, error: ApiError) -> JSONResponse:
    # NOTE: messages may echo user text; a lone surrogate in it must not turn a 400 into a 500.
    message = error.message.encode("utf-8", "backslashreplace").decode("utf-8")
    if dialect_of(path) == "ollama":
        ollama = error.ollama_message or message
        body: dict = {"error": ollama.encode("utf-8", "backslashreplace").decode("utf-8")}
    else:
        body = {"error": {"message": message, "type": error.type, "param": error.param,
                          "code": error.code}}
    observability.note_refusal(message)
    # NOTE: a 500 is rendered outside the request-id middleware; the header is added here.
    return JSONResponse(body, status_code=error.status, headers={**error.headers, **request_id_headers()})


def origin_refused(path: str, origin: str) -> JSONResponse:
    return error_response(path, ApiError(403, f"requests from origin {origin} are not allowed "
                                              "(SHOAL_ORIGINS lists more)", type="permission_error",
                                         code="origin_not_allowed"))


def _describe_validation(errors: Iterable[dict]) -> ApiError:
    """FastAPI's validation errors as one 400 that names the first bad field."""
    errors = list(errors)
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON: "
                        + str(first.get("ctx", {}).get("error", first.get("msg", ""))))
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param, code="invalid_value")


class BodyLimitMiddleware:
    """Refuses bodies over the limit with 413, before any JSON parsing; every body is JSON.

    The body is read here (at most `limit` bytes, within `read_timeout` seconds, else 408
    and the connection is closed) and replayed to the app; later receive() calls go to the
    server, so a disconnect is still seen by the app. Bodies are read as JSON whatever their
    Content-Type, as Ollama's server does: `curl -d '{...}'` sends form encoding, and
    Ollama's own docs use exactly that.
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or \
                scope.get("path", "").startswith("/api/blobs/"):
            # NOTE: blob uploads are model files, streamed to disk by their route.
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = dict(scope.get("headers", ())).get(b"content-length")
        too_large = ApiError(413, f"the request body is larger than the limit of {self.limit} bytes "
                                  "(SHOAL_MAX_BODY_BYTES)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(path, too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            # NOTE: a total deadline, not an idle one: a client trickling one byte a second
            # (or declaring more bytes than it sends) must not hold the connection for ever.
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await error_response(path, too_large)(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            too_slow = ApiError(408, f"the request body did not arrive within {self.read_timeout:g}s "
                                     "(SHOAL_READ_TIMEOUT)", code="request_timeout",
                                headers={"Connection": "close"})
            await error_response(path, too_slow)(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, replay, send)


def create_app(residency: ResidencyManager, settings: ServerSettings, store=None,
               recorder: observability.Recorder | None = None) -> FastAPI:
    """The server's app; `residency` decides which models are loaded; `store` (a
    shoal.store ModelStore, optional) backs pull/create/copy/delete; `recorder` (default:
    from the settings) receives every request's record (access log, audit, traces)."""
    recorder = recorder or observability.Recorder.from_settings(settings)

    lifecycle = ServerLifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        residency.start()
        lifecycle.started = True
        try:
            yield
        finally:
            lifecycle.started = False
            await residency.shutdown()
            authenticator.close()
            recorder.close()        # after the engines stop: every request has its record

    app = FastAPI(title="shoal", version=shoal.__version__, docs_url="/docs", redoc_url=None,
                  lifespan=lifespan)
    metrics = ServerMetrics(lambda: [(m.name, m.engine.core) for m in residency.loaded()])
    for model in residency.loaded():
        metrics.register_model(model.name)
    residency.add_load_listener(lambda model: metrics.register_model(model.name))
    service = GenerationService(residency, metrics, settings, lifecycle)
    authenticator = Authenticator.from_settings(settings)
    app.state.residency = residency
    app.state.store = store
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.state.authenticator = authenticator
    app.state.lifecycle = lifecycle
    app.state.started_at = time.time()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, _describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request.url.path, ApiError(exc.status_code, message,
                                                          headers=dict(exc.headers or {})))

    def count_rejection(exc: AccessDeniedError) -> None:
        metrics.rejected.labels(exc.model or "", exc.reason).inc()

    @app.exception_handler(ShoalError)
    async def _shoal_error(request: Request, exc: ShoalError) -> JSONResponse:
        if isinstance(exc, AccessDeniedError):
            count_rejection(exc)
        return error_response(request.url.path, classify(exc))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        # NOTE: Starlette logs the traceback of what reaches this handler itself.
        return error_response(request.url.path, classify(exc, log_unexpected=False))

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    async def root() -> str:
        return "shoal is running"

    @app.get("/health")
    async def health() -> Response:
        for model in residency.loaded():
            if model.engine.dead is not None:
                return JSONResponse({"status": "engine dead", "model": model.name}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": shoal.__version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    from shoal.api.ollama.lifecycle import router as lifecycle_router
    from shoal.api.ollama.routes import router as ollama_router
    from shoal.api.openai.routes import router as openai_router
    from shoal.guard.admin_api import router as admin_router
    from shoal.guard.lifecycle import router as probes_router
    app.include_router(probes_router)
    app.include_router(openai_router)
    app.include_router(ollama_router)
    app.include_router(lifecycle_router)
    app.include_router(admin_router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       read_timeout=settings.read_timeout)
    # NOTE: runs before the routes and the body limit: a request without a valid key is
    # refused unread (only the observability layer, attached below, runs before it).
    app.add_middleware(AuthMiddleware, authenticator=authenticator, count=count_rejection,
                       render=lambda path, exc: error_response(path, classify(exc)))
    # NOTE: attached last, so its middleware runs first: every response gets its request id
    # and record, and CORS preflights are answered before anything asks for a key.
    observability.attach(app, recorder, service, residency, settings.origins, refuse=origin_refused)
    return app
