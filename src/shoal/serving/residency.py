"""ResidencyManager: load on demand, keep while used, unload when idle or when room is needed.

Kept apart from token scheduling: the engine decides which tokens run each step, this
decides which models exist in memory. Everything here runs on the server's event loop
(no locks); a model loads on a worker thread so the loop keeps serving the others.

Rules (Ollama's, see docs/operations.md):
- a request's keep_alive (seconds; None = SHOAL_KEEP_ALIVE; 0 = unload when idle; < 0 =
  never) sets how long its model stays after the model's last request ends;
- at most `max_loaded` models, and their sizes (weights + reserved KV) within
  `memory_budget`; to make room, idle models go first, least recently used first; if every
  loaded model is busy, the new load waits up to `load_timeout`, then 503;
- requests for a model that is loading wait for that one load;
- a pinned model (`serve --model`) never unloads, whoever asks: unload() refuses it too;
- with API keys on, a non-admin key's keep_alive may lengthen its model's stay but not
  shorten it below SHOAL_KEEP_ALIVE (bounded_keep_alive): other callers share that model,
  and making it reload for them is an admin's (or, keys off, a local caller's) decision.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.access.model_access import check_model_access
from shoal.access.principal import current_principal
from shoal.core.errors import ServerBusyError, ShoalError
from shoal.serving.catalog import Catalog, ModelSpec
from shoal.serving.served import ServedModel
from shoal.store.names import check_name_size, normalize_name

log = logging.getLogger(__name__)

NEVER = math.inf


@dataclass(slots=True)
class _Slot:
    spec: ModelSpec
    model: ServedModel | None = None
    loading: asyncio.Future | None = None
    phase: str = ""                   # while loading: what the load is doing (for /api/ps)
    phase_since: float = field(default_factory=time.monotonic)
    active: int = 0
    keep_alive: float = 300.0
    idle_since: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def expires_at(self) -> float:
        """Monotonic time the model unloads if still idle (inf: never; while busy: inf)."""
        if self.spec.pinned or self.active or self.keep_alive < 0:
            return NEVER
        return self.idle_since + self.keep_alive


class ResidencyManager:
    """Which models are loaded; `acquire` a model for a request, `release` it after."""

    def __init__(self, catalog: Catalog, build: Callable[[ModelSpec], ServedModel], *,
                 max_loaded: int = 3, memory_budget: int | None = None,
                 default_keep_alive: float = 300.0, load_timeout: float = 300.0,
                 estimate: Callable[[ModelSpec], int] | None = None,
                 on_load: Callable[[ServedModel], None] | None = None) -> None:
        self.catalog = catalog
        self._build = build
        self.max_loaded = max(1, max_loaded)
        self.memory_budget = memory_budget
        self.default_keep_alive = default_keep_alive
        self.load_timeout = load_timeout
        self._estimate = estimate or (lambda spec: 0)
        self._load_listeners: list[Callable[[ServedModel], None]] = [on_load] if on_load else []
        self._slots: dict[str, _Slot] = {}
        self._changed = asyncio.Event()     # a release or unload happened (room may exist)
        self._reaper: asyncio.Task | None = None
        self.loads_total = 0
        self.unloads_total = 0
        self.pinned_spec: ModelSpec | None = None   # the --model, when it loads after the start

    def add_load_listener(self, listener: Callable[[ServedModel], None]) -> None:
        """`listener(model)` runs on the event loop after each load (metrics register here)."""
        self._load_listeners.append(listener)

    # ---- queries ---------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelSpec:
        """The model a name means, loaded or not; raises UnknownModelError, or 403 when the
        caller's API key may not use it (checked here so no route can load it for them); a
        name over 255 bytes is a 400 before any lookup."""
        check_name_size(name)
        spec = self.catalog.resolve(name)
        check_model_access(current_principal.get(), spec)
        return spec

    def loaded(self) -> list[ServedModel]:
        return [s.model for s in self._slots.values() if s.model is not None]

    def __iter__(self):
        return iter(self.loaded())

    def loading(self) -> list[tuple[str, str, float, bool]]:
        """The loads in progress: (name, phase, seconds in that phase, pinned)."""
        now = time.monotonic()
        return [(s.spec.name, s.phase, now - s.phase_since, s.spec.pinned)
                for s in self._slots.values() if s.loading is not None]

    def get_loaded(self, name: str) -> ServedModel | None:
        slot = self._slots.get(self._key(name))
        return slot.model if slot else None

    def expires_at(self, model: ServedModel) -> float | None:
        """Wall-clock time the model will unload if it stays idle (None: never)."""
        slot = self._slots.get(model.name)
        if slot is None or not math.isfinite(slot.expires_at):
            return None
        return time.time() + (slot.expires_at - time.monotonic())

    def active(self, model: ServedModel) -> int:
        slot = self._slots.get(model.name)
        return slot.active if slot else 0

    def bounded_keep_alive(self, requested: float | None) -> float | None:
        """The keep_alive a request gets from what it asked: as asked for anonymous callers
        (keys off) and admin keys; at least the server default (SHOAL_KEEP_ALIVE) for any other
        key, so that one key cannot unload a model that other keys' requests are using."""
        principal = current_principal.get()
        if requested is None or principal.key_id is None or principal.admin:
            return requested
        return max(requested, self.default_keep_alive)

    def may_unload(self) -> bool:
        """Whether the caller may unload a model on request (Ollama's keep_alive 0 load call)."""
        principal = current_principal.get()
        return principal.key_id is None or principal.admin

    # ---- acquire / release -----------------------------------------------------------------
    async def acquire(self, name: str, keep_alive: float | None = None) -> ServedModel:
        """The model for one request, loading it first if needed. Pair with release()."""
        spec = self.resolve(name)
        key = spec.name
        while True:
            slot = self._slots.get(key)
            if slot is not None and slot.model is not None:
                slot.active += 1
                slot.last_used = time.monotonic()
                if keep_alive is not None:
                    slot.keep_alive = keep_alive
                return slot.model
            if slot is not None and slot.loading is not None:
                try:
                    await asyncio.shield(slot.loading)
                except ShoalError:
                    raise
                continue
            await self._load(spec, keep_alive)

    def retain(self, model: ServedModel) -> None:
        """One more hold on a model already acquired (e.g. a stream outliving its route)."""
        slot = self._slots.get(model.name)
        if slot is not None and slot.model is model:
            slot.active += 1

    def release(self, model: ServedModel, keep_alive: float | None = None) -> None:
        slot = self._slots.get(model.name)
        if slot is None or slot.model is not model:
            return
        slot.active = max(0, slot.active - 1)
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        if slot.active == 0:
            slot.idle_since = time.monotonic()
            if slot.keep_alive == 0 and not slot.spec.pinned:
                asyncio.ensure_future(self.unload(model.name))
        self._changed.set()

    def adopt(self, model: ServedModel, pinned: bool = True) -> None:
        """Registers a model loaded before the event loop started (`serve --model`)."""
        spec = model.spec or ModelSpec(name=model.name, path=Path(model.info.model_path),
                                       aliases=model.aliases)
        spec.pinned = pinned
        model.spec = spec
        self._slots[spec.name] = _Slot(spec=spec, model=model, keep_alive=self.default_keep_alive)
        self.loads_total += 1

    async def load_pinned(self, spec: ModelSpec, prepare: Callable[[], None] | None = None) -> None:
        """Loads a pinned model while the server already answers (`serve --model`): requests
        for it wait for this load. `prepare` (a download) runs first, on the worker thread."""
        spec.pinned = True
        await self._load(spec, None, prepare)

    async def preload(self, name: str, keep_alive: float | None = None) -> ServedModel:
        """Loads a model without a request (Ollama's empty-prompt call); it idles from now."""
        model = await self.acquire(name, keep_alive)
        self.release(model)
        return model

    async def unload(self, name: str) -> bool:
        """Unloads a model now if it is loaded, idle and not pinned; True if it was unloaded."""
        slot = self._slots.get(self._key(name))
        if slot is None or slot.model is None or slot.active or slot.spec.pinned:
            return False
        del self._slots[slot.spec.name]
        model = slot.model
        slot.model = None
        self.unloads_total += 1
        log.info("unloading %s", model.name)
        await asyncio.to_thread(model.engine.shutdown)
        self._changed.set()
        return True

    # ---- loading and room ------------------------------------------------------------------
    async def _load(self, spec: ModelSpec, keep_alive: float | None,
                    prepare: Callable[[], None] | None = None) -> None:
        slot = _Slot(spec=spec, keep_alive=self.default_keep_alive if keep_alive is None else keep_alive)
        slot.loading = asyncio.get_running_loop().create_future()
        self._slots[spec.name] = slot

        def set_phase(phase: str) -> None:
            slot.phase, slot.phase_since = phase, time.monotonic()

        def prepare_and_build() -> ServedModel:
            if prepare is not None:
                set_phase("downloading")
                prepare()
            set_phase("loading")
            return self._build(spec)

        try:
            set_phase("waiting for room")
            await self._make_room(spec)
            started = time.monotonic()
            model = await asyncio.to_thread(prepare_and_build)
            model.load_seconds = time.monotonic() - started
        except BaseException as exc:
            # NOTE: a load cancelled by a shutdown may find its slot already gone
            self._slots.pop(spec.name, None)
            if not slot.loading.done():
                slot.loading.set_exception(exc if isinstance(exc, Exception) else ShoalError(repr(exc)))
                slot.loading.exception()   # retrieved: no "never retrieved" warning
            self._changed.set()
            raise
        slot.model = model
        slot.idle_since = time.monotonic()
        self.loads_total += 1
        for listener in self._load_listeners:
            listener(model)
        slot.loading.set_result(model)
        slot.loading = None
        log.info("loaded %s in %.2fs", spec.name, model.load_seconds)

    def _used_bytes(self, exclude: str) -> int:
        total = 0
        for name, slot in self._slots.items():
            if name == exclude:
                continue
            total += slot.model.size_in_memory if slot.model is not None else self._estimate(slot.spec)
        return total

    def _fits(self, spec: ModelSpec) -> bool:
        others = [s for n, s in self._slots.items() if n != spec.name]
        if len(others) >= self.max_loaded:
            return False
        if self.memory_budget is not None and others:
            return self._used_bytes(spec.name) + self._estimate(spec) <= self.memory_budget
        return True

    async def _make_room(self, spec: ModelSpec) -> None:
        deadline = time.monotonic() + self.load_timeout
        while not self._fits(spec):
            victims = sorted((s for n, s in self._slots.items()
                              if n != spec.name and s.model is not None and not s.active
                              and not s.spec.pinned), key=lambda s: s.last_used)
            if victims:
                await self.unload(victims[0].spec.name)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerBusyError(
                    f"cannot load {spec.name}: the loaded models are all busy "
                    f"(SHOAL_MAX_LOADED_MODELS={self.max_loaded}); try again later", retry_after=5)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    # ---- expiry ----------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the background task that unloads models whose keep_alive ran out."""
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self, interval: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.reap()

    async def reap(self) -> None:
        now = time.monotonic()
        for slot in list(self._slots.values()):
            if slot.model is not None and slot.expires_at <= now:
                await self.unload(slot.spec.name)

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for slot in list(self._slots.values()):
            if slot.model is not None:
                await asyncio.to_thread(slot.model.engine.shutdown)
        self._slots.clear()

    def _key(self, name: str) -> str:
        for key, slot in self._slots.items():
            if slot.spec.matches(name):
                return key
        return normalize_name(name)
