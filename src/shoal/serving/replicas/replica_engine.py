"""ReplicaEngine: N engine replicas (Ray actors) behind the AsyncEngine interface.

The serving layer holds a ServedModel whose `engine` is this object; it calls validate(),
generate(), abort(), stats() and reads limits/tokenizer/info exactly as with the in-process
AsyncEngine, so admission, quotas, metrics and both dialects work unchanged and stay global
(one front). Each generate() picks a replica (routing.py) from the prompt's block hashes,
computed with the engine's own hashing function, and streams that replica's events through.

A background poller asks each replica for its stats and its prefix-cache events (in order,
one poll at a time per replica) and marks it down when the call fails or times out; a
request routed to a replica that died before it produced a token is retried on another.
A replica that hangs (its engine loop still for `hang_after` seconds, or its process
silent that long while requests wait on it) is killed, so the same paths take over: Ray
restarts it, its waiting requests go elsewhere, its streams end with an error.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from shoal.core.errors import EngineDeadError, ShoalError, UnsupportedFeatureError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.events import EngineEvent, Scheduled
from shoal.engine.kv.hashing import prompt_block_hashes
from shoal.engine.stats import EngineStats
from shoal.engine.structured.grammar import check_structured_output
from shoal.serving.replicas.routing import Decision, ReplicaState, Router
from shoal.serving.replicas.session import current_session

log = logging.getLogger(__name__)

_DEAD = (RayActorError, GetTimeoutError, asyncio.TimeoutError)


@dataclass(slots=True, eq=False)
class Replica:
    """One actor and what the front knows of it."""

    actor: Any                          # a Ray actor handle (ReplicaActor)
    state: ReplicaState
    stats: EngineStats | None = None
    node: str = ""
    pid: int = 0
    last_ok: float = field(default_factory=time.monotonic)
    poll_lock: asyncio.Lock | None = None
    polls: int = 0
    hangs: int = 0                      # times it was killed for a stalled engine loop
    killed: str | None = None           # the incarnation last killed as hung (killed once)


@dataclass(slots=True, frozen=True)
class Route:
    """Where one request went (kept for /metrics and tests; the last few hundred)."""

    request_id: str
    replica: str
    matched_blocks: int
    prompt_blocks: int
    reason: str


class ReplicaEngine:
    def __init__(self, actors: list[Any], router: Router, *, poll_interval: float = 0.5,
                 dead_after: float = 5.0, hang_after: float = 60.0, owns_cluster: bool = False,
                 helpers: list[Any] | None = None) -> None:
        described = ray.get([a.describe.remote() for a in actors])
        first = described[0]
        self.info = first["info"]
        self.limits = first["limits"]
        self._tokenizer = first["tokenizer"]
        self.block_size: int = first["block_size"]
        self.cache_salt: int = first["cache_salt"]
        self.replicas = [
            Replica(actor, ReplicaState(f"r{i}", incarnation=d["incarnation"]), node=d["node"], pid=d["pid"])
            for i, (actor, d) in enumerate(zip(actors, described))]
        self.router = router
        self.poll_interval = poll_interval
        self.dead_after = dead_after
        self._node = ray.get_runtime_context().get_node_id()     # this front's Ray node
        self.hang_after = hang_after if hang_after > 0 else math.inf
        self.owns_cluster = owns_cluster
        self.helpers = helpers or []            # other actors of this model (its BlobSource), killed with it
        self.routes: deque[Route] = deque(maxlen=512)
        self.decisions: dict[str, int] = {}
        self.retries = 0
        self.dead: BaseException | None = None
        self._poller: asyncio.Task | None = None
        self._closed = False

    # ---- what the serving layer reads ------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """As AsyncEngine.validate: every replica runs the same model with the same limits."""
        max_tokens = self.limits.validate(prompt_token_ids, params)
        check_structured_output(params.structured)
        return max_tokens

    def validate_embedding(self, inputs: list[list[int]]) -> None:
        """Embeddings are not routed to replicas yet: a 400 saying so, before admission."""
        raise UnsupportedFeatureError("input", "embeddings are not served through Ray replicas yet; "
                                      "serve the embedding model from a server without --replicas")

    def stats(self) -> EngineStats:
        """The replicas' last polled stats, summed (KV usage: their mean)."""
        seen = [r.stats for r in self.replicas if r.stats is not None]
        if not seen:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        total = EngineStats(*(sum(getattr(s, f) for s in seen) for f in EngineStats.__dataclass_fields__))
        return replace(total, kv_usage=total.kv_usage / len(seen))

    def replica_stats(self) -> list[tuple[str, EngineStats]]:
        """Each replica that is up and its last polled stats (/metrics' `replica` series)."""
        return [(r.state.name, r.stats) for r in self.replicas if r.state.up and r.stats is not None]

    def describe_replicas(self) -> list[dict[str, Any]]:
        """Each replica as the front sees it now (GET /v1/replicas, /metrics)."""
        rows = []
        for r in self.replicas:
            stats = r.stats
            rows.append({"replica": r.state.name, "node": r.node, "pid": r.pid, "up": r.state.up,
                         "incarnation": r.state.incarnation, "in_flight": r.state.in_flight,
                         "routed": r.state.routed, "cached_blocks": len(r.state.cached),
                         "running": stats.running if stats else 0, "waiting": stats.waiting if stats else 0,
                         "kv_usage": stats.kv_usage if stats else 0.0,
                         "prefix_cache_queries": stats.prefix_queries if stats else 0,
                         "prefix_cache_hits": stats.prefix_hits if stats else 0, "hung": r.hangs})
        return rows

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, *, batch: bool = False,
                       batch_aging_s: float = math.inf) -> AsyncIterator[EngineEvent]:
        self._ensure_poller()
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size, self.cache_salt)
        session = current_session.get()     # in the HTTP request's context (its first read)
        tried: list[ReplicaState] = []
        scheduled_sent = False
        while True:
            decision = self.router.choose([r.state for r in self.replicas], hashes, exclude=tried,
                                          session=session)
            if decision is None:
                raise EngineDeadError("no engine replica is up" + (" (tried again after one died)" if tried else ""))
            replica = self._replica(decision)
            state = replica.state
            state.begin(hashes)
            self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
            self.routes.append(Route(request_id, state.name, decision.matched_blocks, len(hashes), decision.reason))
            streamed = False
            finished = False
            try:
                stream = replica.actor.generate.remote(request_id, list(prompt_token_ids), params, priority,
                                                       batch, batch_aging_s)
                try:
                    async for ref in stream:
                        event = await ref
                        if isinstance(event, Scheduled):
                            self._refresh_soon(replica)     # its prompt blocks are cached now
                            if scheduled_sent:
                                continue
                            scheduled_sent = True
                        else:
                            streamed = True
                        yield event
                except RayTaskError as exc:
                    finished = True     # the replica ended the request itself
                    cause = exc.cause
                    raise cause if isinstance(cause, ShoalError) else EngineDeadError(str(exc)) from None
                except _DEAD as exc:
                    finished = True
                    self._mark_down(replica, exc)
                    if streamed:
                        raise EngineDeadError(f"engine replica {state.name} died while streaming this "
                                              "response") from None
                    tried.append(state)
                    self.retries += 1
                    log.warning("replica %s failed before request %s produced a token; retrying elsewhere",
                                state.name, request_id)
                    continue
                finished = True
                return
            finally:
                state.end(hashes)
                if finished:
                    self._refresh_soon(replica)
                else:       # the caller went away: abort on the replica, across the hop
                    replica.actor.abort.remote(request_id)

    def abort(self, request_id: str) -> None:
        for route in reversed(self.routes):
            if route.request_id == request_id:
                for replica in self.replicas:
                    if replica.state.name == route.replica:
                        replica.actor.abort.remote(request_id)
                return

    def _replica(self, decision: Decision) -> Replica:
        return next(r for r in self.replicas if r.state is decision.replica)

    # ---- polling: stats, prefix-cache events, health ---------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None and not self._closed:
            self._poller = asyncio.ensure_future(self._poll_forever())

    async def _poll_forever(self) -> None:
        while not self._closed:
            await self.refresh()
            await asyncio.sleep(self.poll_interval)

    async def refresh(self) -> None:
        """Polls every replica once now (stats, prefix-cache events, up or down)."""
        await asyncio.gather(*(self._poll(r) for r in self.replicas))

    def _refresh_soon(self, replica: Replica) -> None:
        if self._closed:
            return
        try:
            asyncio.get_running_loop().create_task(self._poll(replica))
        except RuntimeError:        # a stream closed outside the loop (garbage collection)
            pass

    async def _poll(self, replica: Replica) -> None:
        if replica.poll_lock is None:
            replica.poll_lock = asyncio.Lock()
        async with replica.poll_lock:     # one at a time: the events must apply in order
            try:
                ref = replica.actor.poll.remote()
                reply = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.dead_after)
            except RayActorError as exc:       # its process is gone: Ray restarts it
                self._mark_down(replica, exc)
                return
            except (GetTimeoutError, TimeoutError) as exc:
                self._mark_down(replica, exc)
                # NOTE: only with requests waiting on it: an actor that is restarting (loading
                # its model) is silent too, and is left to finish
                silent = time.monotonic() - replica.last_ok
                if replica.state.in_flight and silent > self.hang_after:
                    self._kill_hung(replica, f"it has not answered for {silent:.0f} s with "
                                    f"{replica.state.in_flight} requests on it")
                return
            except Exception as exc:  # noqa: BLE001 - a poll must not kill the poller
                log.warning("polling replica %s failed: %r", replica.state.name, exc)
                return
            if reply["still"] > self.hang_after:
                self._mark_down(replica, TimeoutError("engine loop stalled"))
                self._kill_hung(replica, f"its engine loop has been still for {reply['still']:.0f} s")
                return
            if not replica.state.up:
                log.warning("engine replica %s is up again", replica.state.name)
            replica.state.up = True
            replica.state.apply(reply["incarnation"], reply["events"])
            replica.stats = reply["stats"]
            replica.pid, replica.node = reply["pid"], reply["node"]     # new after a restart
            replica.last_ok = time.monotonic()
            replica.polls += 1

    def _kill_hung(self, replica: Replica, why: str) -> None:
        """A hung replica is treated as dead: killed, so its streams fail and its waiting
        requests are retried elsewhere (generate's paths for a dead replica); Ray restarts it."""
        if replica.killed == replica.state.incarnation:
            return          # killed already; its restart reports a new incarnation
        log.warning("engine replica %s is hung (%s): killing it", replica.state.name, why)
        replica.hangs += 1
        replica.killed = replica.state.incarnation
        try:
            ray.kill(replica.actor, no_restart=False)
        except Exception as exc:  # noqa: BLE001 - already gone is as good
            log.warning("killing replica %s: %r", replica.state.name, exc)
        # NOTE: ray.kill asks the worker to exit, which a stopped process does only when Ray's
        # own timeout kills it (seconds later); on this node the signal is at hand
        if replica.node == self._node and replica.pid:
            try:
                os.kill(replica.pid, signal.SIGKILL)
            except OSError:         # gone already
                pass

    def _mark_down(self, replica: Replica, exc: BaseException) -> None:
        if replica.state.up:
            log.warning("engine replica %s is down: %r", replica.state.name, exc)
        replica.state.up = False
        if not any(r.state.up for r in self.replicas):
            self.dead = exc
        else:
            self.dead = None

    # ---- shutdown ----------------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the replicas (from a worker thread, as the residency calls it)."""
        self._closed = True
        if self._poller is not None:
            loop = self._poller.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._poller.cancel)
        try:
            ray.get([r.actor.shutdown.remote() for r in self.replicas if r.state.up], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("replica shutdown: %r", exc)
        for actor in [r.actor for r in self.replicas] + self.helpers:
            ray.kill(actor, no_restart=True)
        if self.owns_cluster:
            ray.shutdown()
