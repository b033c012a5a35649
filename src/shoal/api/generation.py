"""The one internal generate path both dialects translate onto.

GenerationService admits a request (a bounded number in flight per model, else 503 +
Retry-After), streams it from the engine, merges updates a slow reader has not yet
taken, records metrics, and aborts the request when the caller goes away.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from shoal.api.metrics import ServerMetrics
from shoal.api.models import ResidencyManager, ServedModel
from shoal.api.settings import ServerSettings
from shoal.engine.outputs import RequestOutput, TokenLogprob
from shoal.errors import ServerBusyError, ShoalError
from shoal.guard.context import Principal, current_principal
from shoal.guard.quotas import KeyQuotas, Lease
from shoal.sampling_params import SamplingParams

T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(slots=True)
class GenerateRequest:
    """What every dialect's endpoint becomes: a tokenized prompt and sampling parameters."""

    model: ServedModel
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: new_request_id("req"))
    priority: int = 0
    prompt_text: str | None = None
    dialect: str = "openai"
    arrival_time: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None     # seconds the model stays after this request (None: default)
    # who asked (set by the auth middleware for the HTTP request that builds this one)
    principal: Principal = field(default_factory=current_principal.get)


@dataclass(slots=True)
class GenerationEnd:
    """How one admitted request ended, for observers (access log, audit, per-key metrics)."""

    request: GenerateRequest
    final: RequestOutput | None     # the last update ("abort" when the caller left); None: refused
    num_output_tokens: int = 0      # over all samples
    texts: list[str] | None = None  # each sample's text, when GenerationService.keep_text is set


# Called when a request's stream starts (in its HTTP request's context); returns its end callback.
GenerationObserver = Callable[[GenerateRequest], Callable[[GenerationEnd], None]]


@dataclass(slots=True)
class Sample:
    """One finished sample of a non-streamed request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Completion:
    """A finished non-streamed request: its samples and the usage and timing figures."""

    samples: list[Sample]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    last: RequestOutput | None          # the final update of the last sample to finish


def merge_updates(updates: list[RequestOutput]) -> list[RequestOutput]:
    """Folds consecutive updates of the same sample into one (order kept by first appearance)."""
    if len(updates) == 1 or len({out.index for out in updates}) == len(updates):
        return updates          # the usual case: the reader kept up, nothing to fold
    merged: dict[int, RequestOutput] = {}
    for out in updates:
        prev = merged.get(out.index)
        if prev is None:
            merged[out.index] = RequestOutput(
                request_id=out.request_id, index=out.index, text=out.text,
                token_ids=list(out.token_ids), finished=out.finished,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                logprobs=list(out.logprobs) if out.logprobs is not None else None,
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                num_output_tokens=out.num_output_tokens, num_preemptions=out.num_preemptions,
                timings=out.timings, produced_at=out.produced_at)
            continue
        prev.text += out.text
        prev.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + list(out.logprobs)
        prev.finished, prev.finish_reason, prev.stop_reason = out.finished, out.finish_reason, out.stop_reason
        prev.num_cached_tokens = out.num_cached_tokens
        prev.num_output_tokens, prev.num_preemptions = out.num_output_tokens, out.num_preemptions
        prev.timings, prev.produced_at = out.timings, out.produced_at
    return list(merged.values())


class GenerationService:
    """Admission, streaming and accounting for every generate request of the server."""

    def __init__(self, residency: ResidencyManager, metrics: ServerMetrics,
                 settings: ServerSettings) -> None:
        self.residency = residency
        self.metrics = metrics
        self.settings = settings
        self.quotas = KeyQuotas()       # per-key limits (guard/quotas.py)
        self._in_flight: dict[str, int] = {}
        self._ids = itertools.count()
        self.observers: list[GenerationObserver] = []
        self.keep_text = False          # gather each sample's text for the observers

    def in_flight(self, model: ServedModel) -> int:
        return self._in_flight.get(model.name, 0)

    def capacity(self, model: ServedModel) -> int:
        """Requests one model accepts at once: a full running batch plus the waiting queue."""
        return model.engine.core.scheduler.config.max_num_seqs + self.settings.max_queue

    def _admit(self, model: ServedModel) -> None:
        # NOTE: runs on the event loop thread only, so the counter needs no lock.
        current = self._in_flight.get(model.name, 0)
        if current >= self.capacity(model):
            self.metrics.rejected.labels(model.name, "queue_full").inc()
            raise ServerBusyError(
                f"server busy: {current} requests are already running or queued for "
                f"{model.name}; try again later", retry_after=self._retry_after(model, current))
        self._in_flight[model.name] = current + 1

    def _release(self, model: ServedModel) -> None:
        self._in_flight[model.name] = max(0, self._in_flight.get(model.name, 1) - 1)

    def _retry_after(self, model: ServedModel, in_flight: int) -> int:
        """Seconds until a slot is likely free: queued batches ahead x mean request latency."""
        mean = self.metrics.mean_latency(model.name) or 1.0
        batches_ahead = max(1, in_flight - self.capacity(model) + self.settings.max_queue) / max(
            1, model.engine.core.scheduler.config.max_num_seqs)
        return int(min(60, max(1, math.ceil(mean * batches_ahead))))

    def start(self, req: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """Validates and admits a request now; returns the iterator of its merged updates.

        Raises typed errors (InvalidParameterError, ContextLengthExceededError -> 400,
        ServerBusyError -> 503) here, before a streaming response has started. The
        iterator yields at most one update per sample per read until every sample ends;
        closing it early aborts the request in the engine.
        """
        return self.start_all([req])[0]

    def start_all(self, reqs: list[GenerateRequest]) -> list[AsyncIterator[list[RequestOutput]]]:
        """start() for several prompts of one HTTP request: all are admitted, or none."""
        for req in reqs:
            req.model.engine.core.check_request(req.prompt_token_ids, req.params)
        tickets: list[_Ticket] = []
        try:
            for req in reqs:
                lease = self.quotas.admit(req)      # 403/429 for the caller's key first
                try:
                    self._admit(req.model)
                except BaseException:
                    lease.cancel()
                    raise
                tickets.append(_Ticket(self, req, lease))
        except BaseException:
            for ticket in tickets:
                ticket.release()
            raise
        streams = []
        for req, ticket in zip(reqs, tickets):
            stream = self._stream(req, ticket)
            # NOTE: a generator that is never started never runs its `finally`; if the
            # client leaves before the first read, garbage collection returns the slot.
            weakref.finalize(stream, ticket.release)
            streams.append(stream)
        return streams

    async def stream(self, req: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """start() as an async generator: the errors start() raises come at the first read."""
        stream = self.start(req)
        try:
            async for batch in stream:
                yield batch
        finally:
            await stream.aclose()

    async def _stream(self, req: GenerateRequest, ticket: "_Ticket") -> AsyncIterator[list[RequestOutput]]:
        model = req.model
        name = model.name
        first_token_seen = False
        last_produced: dict[int, float] = {}
        generated = 0
        final: RequestOutput | None = None
        last_seen: RequestOutput | None = None
        rejected = False
        texts: list[list[str]] | None = [[] for _ in range(req.params.n)] if self.keep_text else None
        # NOTE: at the first read, so in the HTTP request's context; a stream never read
        # never started, and never ends, for the observers.
        on_end = [observe(req) for observe in self.observers]
        try:
            async for batch in model.engine.generate_batches(req.request_id, req.prompt_token_ids,
                                                             req.params, req.priority):
                for out in batch:
                    last_seen = out
                    generated += len(out.token_ids)
                    if texts is not None:
                        texts[out.index].append(out.text)
                    if out.token_ids:
                        if not first_token_seen:
                            first_token_seen = True
                            self.metrics.observe_first_token(name, out.produced_at - req.arrival_time)
                        prev = last_produced.get(out.index)
                        if prev is not None:
                            self.metrics.observe_token_gap(name, out.produced_at - prev)
                        last_produced[out.index] = out.produced_at
                    if out.finished and out.finish_reason != "abort":
                        final = out
                yield merge_updates(batch)
        except ShoalError:
            rejected = last_seen is None    # refused by the engine: it never ran
            raise
        finally:
            ticket.release(None if rejected else generated)
            if final is not None:
                self.metrics.observe_finished(name, final, req.arrival_time, generated)
            elif not rejected:
                self.metrics.observe_finished(name, _aborted(req, last_seen), req.arrival_time,
                                              generated)
            if on_end:
                end = GenerationEnd(req, final or (None if rejected else _aborted(req, last_seen)),
                                    generated, None if texts is None else ["".join(t) for t in texts])
                for ended in on_end:
                    ended(end)

    async def complete(self, req: GenerateRequest) -> Completion:
        """Runs a request to the end and gathers its samples (for non-streamed responses)."""
        return await self.collect(req, self.start(req))

    async def collect(self, req: GenerateRequest,
                      stream: AsyncIterator[list[RequestOutput]]) -> Completion:
        """Gathers a started request's samples."""
        samples = [Sample(index=i, logprobs=[] if req.params.logprobs is not None else None)
                   for i in range(req.params.n)]
        num_cached = 0
        last: RequestOutput | None = None
        try:
            async for batch in stream:
                for out in batch:
                    sample = samples[out.index]
                    sample.text += out.text
                    sample.token_ids.extend(out.token_ids)
                    if out.logprobs and sample.logprobs is not None:
                        sample.logprobs.extend(out.logprobs)
                    if out.finished:
                        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
                        last = out
                    num_cached = max(num_cached, out.num_cached_tokens)
        finally:
            await stream.aclose()
        return Completion(samples, len(req.prompt_token_ids), num_cached,
                          sum(len(s.token_ids) for s in samples), last)


class _Ticket:
    """One admitted request's slot, its key's quota lease and its hold on the model;
    released exactly once."""

    __slots__ = ("_service", "_req", "_lease", "_held")

    def __init__(self, service: GenerationService, req: GenerateRequest, lease: Lease) -> None:
        self._service, self._req, self._lease, self._held = service, req, lease, True
        # NOTE: the stream holds the model itself, so the caller can let go of its own
        # hold as soon as the stream exists; the model stays until the stream ends.
        service.residency.retain(req.model)

    def release(self, output_tokens: int | None = None) -> None:
        """output_tokens None: the request never ran (its key is not charged for it)."""
        if self._held:
            self._held = False
            if output_tokens is None:
                self._lease.cancel()
            else:
                self._lease.finish(output_tokens)
            self._service._release(self._req.model)
            self._service.residency.release(self._req.model, self._req.keep_alive)


def _aborted(req: GenerateRequest, last: RequestOutput | None) -> RequestOutput:
    """The summary of a request whose caller left (or that failed) before it finished."""
    return RequestOutput(request_id=req.request_id, index=0, text="", token_ids=[], finished=True,
                         finish_reason="abort", num_prompt_tokens=len(req.prompt_token_ids),
                         num_cached_tokens=last.num_cached_tokens if last else 0,
                         timings=last.timings if last else None,
                         produced_at=last.produced_at if last else time.monotonic())


async def run_until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the HTTP client disconnects first (non-streamed requests).

    `receive` is the ASGI receive callable; once the body has been read its next message
    is `http.disconnect`, which is how a client that hangs up is noticed while the
    response is still being computed.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
