"""`shoal serve`: load the model, build the app, run uvicorn."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import uvicorn

from shoal.api.app import create_app
from shoal.api.models import ModelRegistry, ServedModel
from shoal.api.settings import ServerSettings
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.models.default_model import DEFAULT_MODEL_ALIASES, default_model_path

log = logging.getLogger("shoal.server")

DEFAULT_MODEL_NAME = "smollm2:135m"


def served_name(model_spec: str | None, explicit: str | None) -> tuple[str, tuple[str, ...]]:
    """The name clients use for a model, and the other names it answers to.

    `explicit` may list several names, comma-separated (as vLLM's --served-model-name
    takes several): the first is the one reported.
    """
    if explicit:
        names = [n.strip() for n in explicit.split(",") if n.strip()]
        return names[0], tuple(names[1:]) + ((model_spec,) if model_spec else ())
    is_default = model_spec is None or model_spec.strip().lower() in DEFAULT_MODEL_ALIASES
    if not is_default:
        try:
            is_default = Path(model_spec).expanduser().resolve() == default_model_path().resolve()
        except OSError:
            is_default = False
    if is_default:
        return DEFAULT_MODEL_NAME, ("smollm2", "default", "smollm2-135m-instruct") + (
            (model_spec,) if model_spec else ())
    path = Path(model_spec).expanduser()
    stem = path.name.removesuffix(".gguf") if path.name else str(path)
    return stem, (model_spec,)


def load_models(engine_config: EngineConfig, settings: ServerSettings) -> ModelRegistry:
    started = time.monotonic()
    engine = AsyncEngine(engine_config)
    name, aliases = served_name(engine_config.model, settings.served_model_name)
    registry = ModelRegistry()
    registry.add(ServedModel(name=name, engine=engine, info=engine.info, aliases=aliases))
    log.info("model %s loaded in %.2fs (context %d tokens, %d KV blocks)", name,
             time.monotonic() - started, engine.info.max_model_len, engine.info.num_blocks)
    return registry


def serve(engine_config: EngineConfig, settings: ServerSettings) -> None:
    """Blocks serving HTTP until interrupted; the model is loaded before the port opens."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    registry = load_models(engine_config, settings)
    app = create_app(registry, settings)

    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        if server.started:
            log.info("shoal is ready on http://%s:%d in %.2fs (models: %s)", settings.host,
                     settings.port, time.monotonic() - started, ", ".join(registry.names()))

    server.startup = startup  # type: ignore[method-assign]
    try:
        server.run()
    finally:
        registry.shutdown()
