"""Starting (or joining) a Ray cluster and placing engine replicas on it.

The only place `shoal serve` imports Ray, and only when asked for replicas: the default
server stays one process with its engine on a thread.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from shoal.core.config import EngineConfig
from shoal.serving.catalog import ModelSpec
from shoal.serving.replicas.routing import Router
from shoal.serving.served import ServedModel

log = logging.getLogger("shoal.server")


@dataclass(slots=True, frozen=True)
class ReplicaOptions:
    replicas: int = 1
    address: str | None = None      # None: RAY_ADDRESS, else a local cluster of this machine
    cpus: float = 1.0               # Ray CPUs per replica (and its torch threads, at least 1)
    gpus: float = 0.0               # Ray GPUs per replica (>0: the replica runs on CUDA)
    routing: str = "cache_aware"
    max_restarts: int = 3           # Ray restarts a replica whose process died this often
    hang_timeout: float = 60.0      # a replica whose engine loop is still this long is killed (0: never)


def connect(address: str | None) -> bool:
    """Joins the cluster at `address` (or RAY_ADDRESS), else starts one on this machine;
    True when this process started it (and so stops it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # NOTE: the workers must import this very shoal (a checkout on PYTHONPATH included).
    # (and a test's hooks reach the replicas of a server it starts: actor.py)
    env = {k: os.environ[k] for k in ("PYTHONPATH", "SHOAL_TEST_HOOKS") if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        log.info("joined the Ray cluster at %s", address)
        return False
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=False)
    log.info("started a local Ray cluster (%d CPUs)", os.cpu_count())
    return True


def start_actors(config: EngineConfig, options: ReplicaOptions) -> list:
    """N ReplicaActors, each a full engine; returns once every one has loaded its model."""
    import ray

    from shoal.serving.replicas.actor import ReplicaActor

    threads = config.num_threads or max(1, int(options.cpus))
    device = "cuda" if options.gpus > 0 else config.device
    replica_config = dataclasses.replace(config, num_threads=threads, device=device)
    remote = ray.remote(ReplicaActor).options(
        num_cpus=options.cpus, num_gpus=options.gpus, max_restarts=options.max_restarts,
        max_task_retries=0, max_concurrency=1000)
    actors = [remote.remote(replica_config) for _ in range(options.replicas)]
    ray.get([a.pid.remote() for a in actors])     # raises here if a replica cannot load
    return actors


def build_replicated_model(spec: ModelSpec, base: EngineConfig, options: ReplicaOptions) -> ServedModel:
    """The ServedModel of one model served by N replicas (blocking, like build_served_model)."""
    from shoal.serving.replicas.replica_engine import ReplicaEngine

    owns = connect(options.address)
    config = dataclasses.replace(base, model=str(spec.path), adapters=tuple(str(p) for p in spec.adapters))
    engine = ReplicaEngine(start_actors(config, options), Router(options.routing), owns_cluster=owns,
                           hang_after=options.hang_timeout)
    log.info("%s: %d replicas on Ray (routing %s)", spec.name, options.replicas, options.routing)
    return ServedModel(name=spec.name, engine=engine, info=engine.info,  # type: ignore[arg-type]
                       aliases=spec.aliases, spec=spec)
