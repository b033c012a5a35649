"""Loading the models a server serves: the name clients use for the --model, building a
ServedModel from a ModelSpec (and estimating its memory first), and the residency over the
catalogs with the --model loaded and pinned."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shoal.core.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.kv.tensors import default_kv_cache_bytes
from shoal.model.default_model import DEFAULT_MODEL_ALIASES, default_model_path
from shoal.model.loader import resolve_model
from shoal.serving.catalog import ChainCatalog, ModelSpec, StaticCatalog, StoreCatalog, path_size
from shoal.serving.residency import ResidencyManager
from shoal.serving.served import ServedModel
from shoal.serving.settings import ServerSettings

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


def build_served_model(spec: ModelSpec, base: EngineConfig) -> ServedModel:
    """Loads one model (blocking; residency calls it on a worker thread)."""
    engine = AsyncEngine(dataclasses.replace(base, model=str(spec.path),
                                             adapters=tuple(str(p) for p in spec.adapters)))
    return ServedModel(name=spec.name, engine=engine, info=engine.info, aliases=spec.aliases, spec=spec)


def estimate_bytes(spec: ModelSpec, base: EngineConfig) -> int:
    """Memory a model will take before it is loaded: its file(s) plus the KV reservation."""
    return int(path_size(Path(spec.path)) * 1.5) + (base.kv_cache_bytes or default_kv_cache_bytes(torch.device("cpu")))


def make_residency(engine_config: EngineConfig, settings: ServerSettings,
                   store=None, load_now: bool = True) -> ResidencyManager:
    """The catalog (the --model, then the model store) and its residency.

    The --model (or the default model when none is given) is pinned: loaded now, or with
    `load_now=False` left to `load_pinned_model` once the event loop runs (the server then
    answers, and says what it is doing, while the model downloads and loads).
    """
    started = time.monotonic()
    name, aliases = served_name(engine_config.model, settings.served_model_name)
    if not load_now:
        spec = ModelSpec(name=name, path=planned_model_path(engine_config.model), aliases=aliases,
                         pinned=True)
        residency = _residency(engine_config, settings, store, spec)
        residency.pinned_spec = spec
        return residency
    spec = ModelSpec(name=name, path=resolve_model(engine_config.model), aliases=aliases, pinned=True)
    residency = _residency(engine_config, settings, store, spec)
    model = _model_builder(engine_config, settings)(spec)
    residency.adopt(model, pinned=True)
    log.info("model %s loaded in %.2fs (context %d tokens, %d KV blocks)", name,
             time.monotonic() - started, model.info.max_model_len, model.info.num_blocks)
    return residency


async def load_pinned_model(residency: ResidencyManager, engine_config: EngineConfig) -> None:
    """Downloads (the default model, once) and loads the pinned model of `make_residency(...,
    load_now=False)`; requests for it wait meanwhile."""
    spec = residency.pinned_spec
    started = time.monotonic()
    await residency.load_pinned(spec, lambda: resolve_model(engine_config.model))
    model = residency.get_loaded(spec.name)
    log.info("model %s loaded in %.2fs (context %d tokens, %d KV blocks)", spec.name,
             time.monotonic() - started, model.info.max_model_len, model.info.num_blocks)


def planned_model_path(model_spec: str | None) -> Path:
    """Where the model of `--model` is or will be, without downloading it."""
    if model_spec is None or model_spec.strip().lower() in DEFAULT_MODEL_ALIASES:
        return default_model_path()
    return Path(model_spec).expanduser()


def _residency(engine_config: EngineConfig, settings: ServerSettings, store,
               spec: ModelSpec) -> ResidencyManager:
    catalogs = [StaticCatalog([spec])]
    if store is not None:
        catalogs.append(StoreCatalog(store))
    catalog = ChainCatalog(catalogs)
    build = _model_builder(engine_config, settings)
    residency = ResidencyManager(
        catalog, build,
        max_loaded=settings.max_loaded_models, memory_budget=settings.memory_budget,
        default_keep_alive=settings.keep_alive, load_timeout=settings.load_timeout,
        estimate=lambda s: estimate_bytes(s, engine_config))
    return residency


def _model_builder(engine_config: EngineConfig, settings: ServerSettings) -> Callable[[ModelSpec], ServedModel]:
    """In-process engines; or, with --replicas / --ray / --ray-address, replicas on Ray
    (imported only then: the default server never loads Ray)."""
    if not settings.replicated:
        return lambda s: build_served_model(s, engine_config)
    from shoal.serving.replicas.cluster import ReplicaOptions, build_replicated_model

    # NOTE: replicas and GPUs not given (None): placement() decides from the cluster's GPUs
    options = ReplicaOptions(replicas=settings.replicas or None, address=settings.ray_address,
                             cpus=float(settings.replica_cpus),
                             gpus=None if settings.replica_gpus is None else float(settings.replica_gpus),
                             routing=settings.routing, hang_timeout=settings.replica_hang_timeout)
    return lambda s: build_replicated_model(s, engine_config, options)
