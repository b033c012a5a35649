"""ReplicaActor: one full engine (its own model and KV cache) inside a Ray actor process.

A plain class: cluster.py wraps it with ray.remote, so this module loads without Ray and
the actor's methods are ordinary engine calls. It runs as an async actor, so many
generate() streams share the actor's event loop the way HTTP requests share the server's.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.events import EngineEvent
from shoal.serving.replicas.model_files import ModelFile, local_model_path


class ReplicaActor:
    def __init__(self, config: EngineConfig, model: ModelFile | None = None) -> None:
        self._node = ray_node_id()
        if model is not None:       # the front's file, here or pulled into this node's store
            config = dataclasses.replace(config, model=local_model_path(model, self._node))
        self.engine = AsyncEngine(config)
        # NOTE: a new id per process: after a restart the front forgets what the old one cached.
        self.incarnation = uuid.uuid4().hex
        self._kv_events: deque[tuple[bool, int]] = deque()
        self.engine.core.scheduler.kv.pool.events = self._kv_events
        self._thaw: threading.Event | None = None
        if os.environ.get("SHOAL_TEST_HOOKS") == "1":
            self._install_freeze_hook()

    def model_path(self) -> str:
        """The file this replica loaded (on its own node)."""
        return self.engine.info.model_path

    def describe(self) -> dict[str, Any]:
        """What the front needs to stand in for this engine: its info, limits, tokenizer,
        and how it keys its prefix cache."""
        core = self.engine.core
        return {"info": self.engine.info, "limits": self.engine.limits, "tokenizer": self.engine.tokenizer,
                "block_size": core.scheduler.kv.block_size, "cache_salt": core.cache_salt,
                "incarnation": self.incarnation, "pid": os.getpid(),
                "node": self._node}

    def poll(self) -> dict[str, Any]:
        """The engine's stats, this process's incarnation, pid and node, the prefix-cache
        events since the last poll (in order), and how long the engine loop has been still.

        NOTE: one consumer (the front's poller, one poll at a time per replica) keeps the
        events in order; a deque pops safely while the engine thread appends.
        """
        events = []
        queue = self._kv_events
        while queue:
            events.append(queue.popleft())
        return {"stats": self.engine.stats(), "incarnation": self.incarnation, "events": events,
                "still": time.monotonic() - self.engine.last_beat, "pid": os.getpid(), "node": self._node}

    def cached_hashes(self) -> set[int]:
        """Every hash the prefix cache holds now (to check the front's index against)."""
        return set(self.engine.core.scheduler.kv.pool._cached)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int, batch: bool, batch_aging_s: float) -> AsyncIterator[EngineEvent]:
        async for event in self.engine.generate(request_id, prompt_token_ids, params, priority,
                                                batch=batch, batch_aging_s=batch_aging_s):
            yield event

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # ---- tests only -------------------------------------------------------------------------
    def _install_freeze_hook(self) -> None:
        """Lets a test stall this engine's step loop for real (SHOAL_TEST_HOOKS=1 only)."""
        self._thaw = threading.Event()
        self._thaw.set()
        core, step = self.engine.core, self.engine.core.step

        def step_unless_frozen():
            self._thaw.wait()
            return step()

        core.step = step_unless_frozen

    def freeze(self) -> None:
        """Blocks the engine loop at its next step (with work) until the process ends."""
        if self._thaw is None:
            raise RuntimeError("freeze() is a test hook: set SHOAL_TEST_HOOKS=1 for the replicas")
        self._thaw.clear()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self.engine.shutdown()


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
