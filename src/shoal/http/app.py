"""The FastAPI application: the shared endpoints, the routers and the middleware, wired to one
residency, generation service and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from shoal.access.auth import Authenticator
from shoal.core.errors import AccessDeniedError
from shoal.core.version import __version__
from shoal.http import observability
from shoal.http.admin_keys import router as admin_router
from shoal.http.auth import AuthMiddleware
from shoal.http.body_limits import BodyLimitMiddleware
from shoal.http.dashboard import router as dashboard_router
from shoal.http.direct_routes import serve_directly
from shoal.http.error_responses import add_error_handlers, host_refused, origin_refused
from shoal.http.hosts import AllowedHosts, HostPolicy
from shoal.http.ollama import embeddings as ollama_embeddings
from shoal.http.ollama.model_management import router as model_management_router
from shoal.http.ollama.routes import router as ollama_router
from shoal.http.openai import embeddings as openai_embeddings
from shoal.http.openai.routes import router as openai_router
from shoal.http.probes import router as probes_router
from shoal.http.replicas import router as replicas_router
from shoal.http.session_header import SessionHeaderMiddleware
from shoal.serving.activity import server_activity
from shoal.serving.generate import GenerationService
from shoal.serving.live import LiveStats
from shoal.serving.metrics import CONTENT_TYPE, PREFIX, ServerMetrics
from shoal.serving.replicas.metrics import ReplicaCollector, engine_stats
from shoal.serving.residency import ResidencyManager
from shoal.serving.server_state import ServerLifecycle
from shoal.serving.settings import ServerSettings


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
        ticker = asyncio.create_task(live.run(), name="shoal-live-dashboard")
        try:
            yield
        finally:
            ticker.cancel()
            lifecycle.started = False
            await residency.shutdown()
            authenticator.close()
            recorder.close()        # after the engines stop: every request has its record

    app = FastAPI(title="shoal", version=__version__, docs_url="/docs", redoc_url=None,
                  lifespan=lifespan)
    metrics = ServerMetrics(lambda: engine_stats(residency.loaded()))
    for model in residency.loaded():
        metrics.register_model(model.name)
    residency.add_load_listener(lambda model: metrics.register_model(model.name))
    metrics.registry.register(ReplicaCollector(residency.loaded, PREFIX))
    service = GenerationService(residency, metrics, settings, lifecycle)
    authenticator = Authenticator.from_settings(settings)
    # the live dashboard's rolling view (GET /dashboard, `shoal top`), fed by every request record
    live = LiveStats(service, keys_required=authenticator.required)
    recorder.sinks.append(live.observe_record)
    app.state.residency = residency
    app.state.store = store
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.state.authenticator = authenticator
    app.state.lifecycle = lifecycle
    app.state.live = live
    app.state.started_at = time.time()

    def count_rejection(exc: AccessDeniedError) -> None:
        metrics.rejected.labels(exc.model or "", exc.reason).inc()

    add_error_handlers(app, count_rejection)

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    async def root() -> Response:
        # NOTE: 503 while the --model loads, so `shoal run` and scripts that poll GET / wait
        # for a server that can answer (and /readyz says what it is doing).
        if lifecycle.loading_pinned:
            return PlainTextResponse(f"shoal is starting: {server_activity(residency) or 'loading'}",
                                     status_code=503)
        return PlainTextResponse("shoal is running")

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(probes_router)
    app.include_router(openai_router)
    app.include_router(ollama_router)
    app.include_router(openai_embeddings.router)
    app.include_router(ollama_embeddings.router)
    app.include_router(model_management_router)
    app.include_router(admin_router)
    app.include_router(dashboard_router)
    app.include_router(replicas_router)
    # small, frequent requests: past FastAPI's routing and wrappers (direct_routes.py)
    serve_directly(app, openai_embeddings.router, openai_embeddings.embeddings)
    serve_directly(app, ollama_embeddings.router, ollama_embeddings.embed_endpoint,
                   ollama_embeddings.embeddings_endpoint)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       read_timeout=settings.read_timeout)
    if settings.replicated and settings.session_header:
        app.add_middleware(SessionHeaderMiddleware, header=settings.session_header)
    # NOTE: runs before the routes and the body limit: a request without a valid key is
    # refused unread (only the observability layer, attached below, runs before it).
    app.add_middleware(AuthMiddleware, authenticator=authenticator, count=count_rejection)
    # NOTE: before the key check: a page that rebinds its name to 127.0.0.1 must get nothing.
    app.add_middleware(HostPolicy, allowed=AllowedHosts.for_server(settings.host, settings.allowed_hosts),
                       refuse=host_refused)
    # NOTE: attached last, so its middleware runs first: every response gets its request id
    # and record, and CORS preflights are answered before anything asks for a key.
    observability.attach(app, recorder, service, residency, settings.origins, refuse=origin_refused)
    return app
