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
from shoal.serving.replicas.model_files import ModelFile, model_file
from shoal.serving.replicas.routing import Router
from shoal.serving.served import ServedModel

log = logging.getLogger("shoal.server")


@dataclass(slots=True, frozen=True)
class ReplicaOptions:
    replicas: int | None = 1        # None: one per GPU of the cluster (with gpus None), else 1
    address: str | None = None      # None: RAY_ADDRESS, else a local cluster of this machine
    cpus: float = 1.0               # Ray CPUs per replica (and its torch threads, at least 1)
    gpus: float | None = 0.0        # Ray GPUs per replica (>0: on CUDA); None: 1 if the cluster has GPUs
    routing: str = "cache_aware"
    max_restarts: int = 3           # Ray restarts a replica whose process died this often
    hang_timeout: float = 60.0      # a replica whose engine loop is still this long is killed (0: never)
    node_store: str | None = None   # the store replicas pull into (None: each node's own)


def placement(replicas: int | None, gpus: float | None, cluster_gpus: float) -> tuple[int, float]:
    """(replicas, GPUs each): on a cluster with GPUs and no --replica-gpus, one GPU per replica
    and, without --replicas, one replica per GPU; else what was asked (1 replica, no GPU)."""
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
        if replicas is None and gpus:
            replicas = int(cluster_gpus)
    return replicas or 1, gpus


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


def start_actors(config: EngineConfig, options: ReplicaOptions, model: ModelFile | None = None) -> list:
    """N ReplicaActors, each a full engine; returns once every one has loaded its model (found
    on its node, or pulled there by digest: model_files.py)."""
    import ray

    from shoal.serving.replicas.actor import ReplicaActor

    threads = config.num_threads or max(1, int(options.cpus))
    device = "cuda" if options.gpus else config.device
    replica_config = dataclasses.replace(config, num_threads=threads, device=device)
    remote = ray.remote(ReplicaActor).options(
        num_cpus=options.cpus, num_gpus=options.gpus, max_restarts=options.max_restarts,
        max_task_retries=0, max_concurrency=1000)
    actors = [remote.remote(replica_config, model) for _ in range(options.replicas or 1)]
    ray.get([a.pid.remote() for a in actors])     # raises here if a replica cannot load
    return actors


def blob_source(files: dict[str, str]):
    """A BlobSource actor on this process's node, serving these files (digest -> path)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shoal.serving.replicas.model_files import BlobSource

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(BlobSource).options(num_cpus=0, scheduling_strategy=here, max_concurrency=8).remote(files)


def build_replicated_model(spec: ModelSpec, base: EngineConfig, options: ReplicaOptions) -> ServedModel:
    """The ServedModel of one model served by N replicas (blocking, like build_served_model)."""
    import ray

    from shoal.serving.replicas.replica_engine import ReplicaEngine

    owns = connect(options.address)
    replicas, gpus = placement(options.replicas, options.gpus, ray.cluster_resources().get("GPU", 0.0))
    options = dataclasses.replace(options, replicas=replicas, gpus=gpus)
    config = dataclasses.replace(base, model=str(spec.path), adapters=tuple(str(p) for p in spec.adapters))
    model, source = model_file(spec.path), None
    if model.digest is not None:    # a store blob: replicas on nodes without it pull it from here
        source = blob_source({model.digest: model.path})
        model = dataclasses.replace(model, source=source, store=options.node_store)
    engine = ReplicaEngine(start_actors(config, options, model), Router(options.routing), owns_cluster=owns,
                           hang_after=options.hang_timeout, helpers=[source] if source else [])
    log.info("%s: %d replicas on Ray (%s GPU each; routing %s)", spec.name, replicas, gpus, options.routing)
    return ServedModel(name=spec.name, engine=engine, info=engine.info,  # type: ignore[arg-type]
                       aliases=spec.aliases, spec=spec)
