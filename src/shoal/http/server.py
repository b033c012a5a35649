"""`shoal serve`: open the port, load the pinned model meanwhile (serving/model_loading.py),
run uvicorn until a drain."""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence

import uvicorn

from shoal.core.config import EngineConfig
from shoal.http.app import create_app
from shoal.http.connection_limits import capped_http_protocol, fitting_cap, raise_open_file_limit
from shoal.http.header_limits import limited_http_protocol
from shoal.http.logs import configure_logging
from shoal.http.observability import Recorder
from shoal.http.shutdown import DrainingServer
from shoal.model.kernels.cpu import start_build
from shoal.serving.activity import server_activity
from shoal.serving.model_loading import load_pinned_model, make_residency
from shoal.serving.policy import policy_summary
from shoal.serving.settings import ServerSettings
from shoal.store.registry import RegistryClient
from shoal.store.store import ModelStore

log = logging.getLogger("shoal.server")


# NOTE: a client waiting on a first start must never go 2 s without a word (issue 17).
PROGRESS_INTERVAL = 1.5


def serve(engine_config: EngineConfig, settings: ServerSettings, policy: Sequence[str] = (),
          verbose: bool = False) -> None:
    """Blocks serving HTTP until SIGTERM/SIGINT and a drain. The port opens first; the pinned
    model downloads and loads meanwhile (GET / and /readyz answer 503 and say what the server
    is doing, requests for the model wait), and a load that fails stops the server with its
    error. `policy` (lines describing the effective settings) is logged first: in one line
    (the settings not at their defaults) unless `verbose`, all of them at debug level."""
    if settings.log_file:
        print(f"shoal: logging to {settings.log_file}", file=sys.stderr, flush=True)
    configure_logging(settings.log_level, settings.log_format, settings.log_file,
                      int(settings.log_max_bytes), settings.log_backups)
    if engine_config.device in (None, "auto", "cpu"):
        start_build()   # the CPU kernels compile (seconds) while the model downloads and loads
    if policy:
        if verbose:
            log.info("\n".join(policy))
        else:
            # NOTE: the message, not an argument: arguments are clipped at 256 characters
            # (they may echo clients); the operator's own settings are not.
            log.info(policy_summary(policy))
            log.debug("\n".join(policy))
    max_connections = fitting_cap(settings.max_connections, raise_open_file_limit())
    started = time.monotonic()
    recorder = Recorder.from_settings(settings)     # a bad audit path or tracing setup fails here
    # NOTE: the egress policy goes down as a parameter: the store never reads server settings.
    store = ModelStore.from_env(registry=RegistryClient(egress=settings.registry_egress))
    # NOTE: what a kill -9 left half-written (uploads, fetches) goes now, not at some prune.
    leftovers = store.remove_leftovers()
    if leftovers:
        log.info("removed %d file(s) that interrupted uploads or downloads left behind", len(leftovers))
    residency = make_residency(engine_config, settings, store, load_now=False)
    app = create_app(residency, settings, store, recorder=recorder)
    lifecycle = app.state.lifecycle
    lifecycle.loading_pinned = True
    failure: list[BaseException] = []

    # NOTE: log_config=None: uvicorn's loggers reach the root handler (one format for all
    # lines); its access log is off, shoal's own (shoal.http.access) has the model and tokens.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=5,
                            http=capped_http_protocol(limited_http_protocol(settings.read_timeout),
                                                      max_connections))
    server = DrainingServer(config, app.state.lifecycle, app.state.service, settings.drain_timeout)

    original_startup = server.startup

    async def load_then_ready() -> None:
        try:
            await load_pinned_model(residency, engine_config)
        except BaseException as exc:  # noqa: BLE001 - reported by serve() after the shutdown
            failure.append(exc)
            server.should_exit = True
            return
        finally:
            lifecycle.loading_pinned = False
        log.info("shoal is ready on http://%s:%d in %.2fs (loaded: %s)", settings.host,
                 settings.port, time.monotonic() - started,
                 ", ".join(m.name for m in residency.loaded()))

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            activity = server_activity(residency)
            if activity:
                log.info("%s", activity)

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        if server.started:
            log.info("shoal is listening on http://%s:%d; loading %s", settings.host, settings.port,
                     residency.pinned_spec.name)
            app.state.background = (asyncio.ensure_future(load_then_ready()),
                                    asyncio.ensure_future(report_progress()))

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    if failure:
        raise failure[0]
