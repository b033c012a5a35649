"""AsyncEngine: the online interface, with the engine loop on a background thread.

`generate()` is an async iterator of one request's events (engine/events.py); cancelling
it (e.g. a client that disconnects) aborts the request, and its KV blocks are freed at the
next step. The loop thread owns the EngineCore; other threads only post commands to it,
so the core needs no locks. What they may read is frozen or a snapshot: `limits` (and
`validate()` against them), `info`, `stats()`.

NOTE: a thread, not a process: torch kernels release the GIL, so the HTTP event
loop runs while a step computes, and outputs cross without pickling
(docs/architecture.md has the measurements behind this choice).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shoal.core.config import EngineConfig
from shoal.core.errors import EngineDeadError, InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import EngineInfo, build_engine_core
from shoal.engine.core import EngineCore
from shoal.engine.encoder_core import EncoderCore
from shoal.engine.events import EngineEvent, Scheduled, Update
from shoal.engine.limits import EngineLimits
from shoal.engine.outputs import RequestOutput
from shoal.engine.stats import EngineStats
from shoal.engine.structured.grammar import check_structured_output
from shoal.engine.turns import ENGINE_TURNS

log = logging.getLogger(__name__)

# What the loop thread puts on a request's queue: its outputs, the news that it was
# scheduled, or the error that ended it.
_Item = RequestOutput | Scheduled | BaseException


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]
    samples_left: int


class AsyncEngine:
    """Serves many concurrent generate() calls from one engine loop."""

    def __init__(self, config: EngineConfig) -> None:
        """Builds the engine on its own thread and returns once it is ready (or raises)."""
        self.core: EngineCore | EncoderCore
        self.info: EngineInfo
        self.limits: EngineLimits
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = False
        self.dead: BaseException | None = None
        # when the loop last went round (it does at least twice a second, idle or not): a
        # replica's front reads a stalled loop as a hung engine (serving/replicas)
        self.last_beat = time.monotonic()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._build_and_run, args=(config, ready, failure),
                                        name="shoal-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(config)

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks a request against this engine's limits (EngineLimits.validate) and that its
        constraint compiles (InvalidParameterError naming the constraint's field), from any
        thread; returns its resolved max_tokens."""
        if self.info.embedding_only:
            raise InvalidParameterError("model", "this model only computes embeddings: it "
                                                 "cannot generate text")
        max_tokens = self.limits.validate(prompt_token_ids, params)
        check_structured_output(params.structured)
        return max_tokens

    def validate_embedding(self, inputs: list[list[int]]) -> None:
        """Checks each input of an embedding request against this engine, from any thread."""
        for ids in inputs:
            self.limits.validate_embedding(ids)

    def stats(self) -> EngineStats:
        """The engine's state and counters now (read without locks, for metrics)."""
        return self.core.stats()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, *, batch: bool = False,
                       batch_aging_s: float = math.inf,
                       embed_inputs: list[list[int]] | None = None) -> AsyncIterator[EngineEvent]:
        """The request's events until all n samples finish (engine/events.py gives the order).

        A request the engine refuses (validate()'s errors) raises at the first read, having
        queued nothing; callers that must refuse earlier call validate() first. `batch` and
        `batch_aging_s` choose the scheduling class (see Scheduler). With `embed_inputs` the
        request computes one embedding per input instead (output i has index i and its
        `embedding`; `prompt_token_ids` and `params` are then only for the caller's books).
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop died: {self.dead!r}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         params.n if embed_inputs is None else len(embed_inputs))
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidParameterError("request_id", f"{request_id!r} is already running")
            self._streams[request_id] = stream
        if embed_inputs is None:
            self._post("add", (request_id, list(prompt_token_ids), params, priority, batch,
                               batch_aging_s))
        else:
            self._post("embed", (request_id, embed_inputs, priority, batch, batch_aging_s))
        finished = False
        try:
            while True:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                scheduled = False
                outputs: list[RequestOutput] = []
                for item in items:
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    if isinstance(item, Scheduled):
                        scheduled = True
                        continue
                    outputs.append(item)
                    if item.finished:
                        stream.samples_left -= 1
                if stream.samples_left <= 0:
                    finished = True
                if scheduled:
                    yield Scheduled()
                if outputs:
                    yield Update(outputs)
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._post("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
        if hasattr(self, "core"):
            self.core.close()

    # ---- the loop thread -----------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wakeup.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, ids, params, priority, batch, batch_aging_s = payload
                with self._streams_lock:
                    wanted = request_id in self._streams
                if not wanted:
                    continue  # the caller went away before the request reached the loop
                try:
                    self.core.add_request(request_id, ids, params, priority, batch=batch,
                                          batch_aging_s=batch_aging_s)
                except Exception as exc:  # typed errors go back to the caller
                    self._deliver(request_id, [exc])
            elif kind == "embed":
                request_id, inputs, priority, batch, batch_aging_s = payload
                with self._streams_lock:
                    wanted = request_id in self._streams
                if not wanted:
                    continue
                try:
                    self.core.add_embedding_request(request_id, inputs, priority, batch=batch,
                                                    batch_aging_s=batch_aging_s)
                except Exception as exc:  # noqa: BLE001 - typed errors go back to the caller
                    self._deliver(request_id, [exc])
            elif kind == "abort":
                # Final "abort" outputs reach a caller still listening (an explicit abort);
                # a cancelled caller has already gone and _deliver drops them.
                finals = self.core.abort_request(payload)
                if finals:
                    self._deliver(payload, finals)

    def _build_and_run(self, config: EngineConfig, ready: threading.Event,
                       failure: list[BaseException]) -> None:
        # NOTE: the model is loaded on the thread that will run it. Torch's OpenMP pool is
        # per calling thread: a model loaded on the main thread and stepped on another ran
        # 30% slower at 32 streams here (two thread teams fighting for 2 cores).
        try:
            self.core, self.info = build_engine_core(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            failure.append(exc)
            ready.set()
            return
        _freeze_heap()
        self.limits = self.core.limits
        self._decoder = isinstance(self.core, EngineCore)
        self.core.on_first_scheduled = self._deliver_scheduled
        self.core.on_request_failed = lambda request_id, exc: self._deliver(request_id, [exc])
        if isinstance(self.core, EngineCore):
            self.core.structured.compiler.on_done = self._wakeup.set
        ready.set()
        self._run_loop()

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self.last_beat = time.monotonic()
                self._drain_commands()
                if not self.core.has_work_ready():
                    if self._decoder:
                        ENGINE_TURNS.decoder_busy(self, self.core.has_unfinished_requests())
                    # NOTE: also while every request waits for its grammar: a finished compile
                    # sets the wake-up event; the short wait notices compile timeouts.
                    self._wakeup.wait(0.5 if not self.core.has_unfinished_requests() else 0.1)
                    self._wakeup.clear()
                    continue
                if ENGINE_TURNS.engaged and self._decoder:
                    # NOTE: an encoder's core takes its own turns (short passes while we wait)
                    with ENGINE_TURNS:
                        started = time.perf_counter()
                        outputs = self.core.step()
                        ENGINE_TURNS.last_decoder_seconds = time.perf_counter() - started
                    ENGINE_TURNS.decoder_busy(self, self.core.has_unfinished_requests())
                else:
                    outputs = self.core.step()
                if outputs:
                    self._deliver_step(outputs)
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("engine loop died")
            self.dead = exc
            with self._streams_lock:
                ids = list(self._streams)
            for request_id in ids:
                self._deliver(request_id, [EngineDeadError(f"the engine loop died: {exc!r}")])
        finally:
            ENGINE_TURNS.decoder_busy(self, False)   # an unloaded engine has no next step

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's outputs to their streams: one wake-up per event loop, not per request.

        NOTE: every cross-thread wake-up costs the event loop a round of work while the
        next step computes; one per loop per step keeps that interference small.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, _Item]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_pairs, items)

    def _deliver_scheduled(self, request_ids: list[str]) -> None:
        """Tells the callers of newly scheduled requests, one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, _Item]]] = {}
        scheduled = Scheduled()
        with self._streams_lock:
            for request_id in request_ids:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, scheduled))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_pairs, items)

    def _deliver(self, request_id: str, items: list[_Item]) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.loop.call_soon_threadsafe(_put_all, stream.queue, items)


def _freeze_heap() -> None:
    """Moves every object alive now (the model's modules, the tokenizer, the web framework)
    out of the garbage collector's reach.

    NOTE: a full collection walks every tracked object while holding the GIL, so the engine
    thread cannot start its next kernel: in a server with a loaded model (~240k objects) one
    took 100-150 ms, and over HTTP they came every few seconds under load, each one a stall of
    every stream. These objects live as long as the process (or the model), so scanning them
    finds nothing; later collections only walk what requests create. Garbage made during the
    load is collected first, so the freeze keeps nothing dead."""
    gc.collect()
    gc.freeze()


def _put_pairs(items: list[tuple[asyncio.Queue, _Item]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _put_all(q: asyncio.Queue, items: list[_Item]) -> None:
    for item in items:
        q.put_nowait(item)
