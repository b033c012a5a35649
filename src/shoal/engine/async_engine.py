"""AsyncEngine: the online interface, with the engine loop on a background thread.

`generate()` is an async iterator of RequestOutput for one request; cancelling it
(e.g. a client that disconnects) aborts the request, and its KV blocks are freed at
the next step. The loop thread owns the EngineCore; other threads only post
commands to it, so the core needs no locks.

NOTE: a thread, not a process: torch kernels release the GIL, so the HTTP event
loop runs while a step computes, and outputs cross without pickling
(docs/architecture.md has the measurements behind this choice).
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shoal.config import EngineConfig
from shoal.engine.builder import EngineInfo, build_engine_core
from shoal.engine.core import EngineCore
from shoal.engine.outputs import RequestOutput
from shoal.errors import EngineDeadError, InvalidParameterError
from shoal.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Put on a stream's queue when the engine first schedules its request.
_SCHEDULED = object()


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    samples_left: int


class AsyncEngine:
    """Serves many concurrent generate() calls from one engine loop."""

    def __init__(self, config: EngineConfig) -> None:
        """Builds the engine on its own thread and returns once it is ready (or raises)."""
        self.core: EngineCore
        self.info: EngineInfo
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = False
        self.dead: BaseException | None = None
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

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, *, batch: bool = False,
                       batch_aging_s: float = math.inf) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs until all n samples finish. Raises typed errors early."""
        async for outputs in self.generate_batches(request_id, prompt_token_ids, params, priority,
                                                   batch=batch, batch_aging_s=batch_aging_s):
            for item in outputs:
                yield item

    async def generate_batches(self, request_id: str, prompt_token_ids: list[int],
                               params: SamplingParams, priority: int = 0, *, batch: bool = False,
                               batch_aging_s: float = math.inf
                               ) -> AsyncIterator[list[RequestOutput]]:
        """Like generate(), but yields everything that arrived since the last read at once.

        A consumer that falls behind (a slow HTTP reader) gets one larger batch instead of
        a growing backlog of small ones; the engine itself never waits for a consumer.
        An empty batch says the request was just scheduled (it left the waiting queue); it
        comes once at most, and not when outputs arrived with it. `batch` and
        `batch_aging_s` choose the scheduling class (see Scheduler).
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop died: {self.dead!r}")
        self.core.check_request(prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidParameterError("request_id", f"{request_id!r} is already running")
            self._streams[request_id] = stream
        self._post("add", (request_id, list(prompt_token_ids), params, priority, batch, batch_aging_s))
        finished = False
        try:
            while True:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                outputs = []
                for item in items:
                    if item is _SCHEDULED:
                        continue
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    outputs.append(item)
                    if item.finished:
                        stream.samples_left -= 1
                if stream.samples_left <= 0:
                    finished = True
                yield outputs
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
        self.core.on_first_scheduled = self._deliver_scheduled
        ready.set()
        self._run_loop()

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.core.has_unfinished_requests():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
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

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's outputs to their streams: one wake-up per event loop, not per request.

        NOTE: every cross-thread wake-up costs the event loop a round of work while the
        next step computes; one per loop per step keeps that interference small.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_pairs, items)

    def _deliver_scheduled(self, request_ids: list[str]) -> None:
        """Tells the callers of newly scheduled requests, one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._streams_lock:
            for request_id in request_ids:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, _SCHEDULED))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_pairs, items)

    def _deliver(self, request_id: str, items: list[Any]) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.loop.call_soon_threadsafe(_put_all, stream.queue, items)


def _put_pairs(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _put_all(q: asyncio.Queue, items: list[Any]) -> None:
    for item in items:
        q.put_nowait(item)
