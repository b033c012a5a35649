"""The one internal generate path both dialects translate onto.

GenerationService checks a request against the server's limits, admits it into the
bounded queue of its model and priority class (guard/admission.py; else 503 +
Retry-After), streams it from the engine, merges updates a slow reader has not yet
taken, records metrics, and aborts the request when the caller goes away or when it
waited longer than SHOAL_QUEUE_TIMEOUT to be scheduled.
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from shoal.api.metrics import PREFIX, ServerMetrics
from shoal.api.models import ResidencyManager, ServedModel
from shoal.api.settings import ServerSettings
from shoal.engine.outputs import RequestOutput, TokenLogprob
from shoal.errors import ServerBusyError, ServerShuttingDownError, ShoalError, TokenLimitError
from shoal.guard.admission import AdmissionCollector, AdmissionControl, QueueLimits, QueueSlot
from shoal.guard.context import BATCH, Principal, current_principal
from shoal.guard.lifecycle import ServerLifecycle
from shoal.guard.limits import cap_max_tokens, check_prompt_tokens
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
    # False: the client set no max_tokens and the dialect filled in the room left (Ollama's
    # num_predict <= 0), so SHOAL_MAX_TOKENS caps it instead of refusing it
    max_tokens_given: bool = True
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
                 settings: ServerSettings, lifecycle: ServerLifecycle | None = None) -> None:
        self.residency = residency
        self.metrics = metrics
        self.settings = settings
        self.quotas = KeyQuotas()       # per-key limits (guard/quotas.py)
        self.observers: list[GenerationObserver] = []
        self.keep_text = False          # gather each sample's text for the observers
        self.lifecycle = lifecycle or ServerLifecycle()
        self.admission = AdmissionControl(
            QueueLimits(settings.max_queue, settings.max_queue_batch, settings.max_queued_tokens),
            metrics.mean_latency)
        metrics.registry.register(AdmissionCollector(self.admission, PREFIX))
        self._tickets: set[_Ticket] = set()
        self._aborting = False          # the drain ran out of time: nothing new may start

    def num_in_flight(self) -> int:
        """Requests admitted and not yet ended, over every model (what a drain waits for)."""
        return self.admission.in_flight()

    def abort_all(self) -> None:
        """Aborts every admitted request (the end of a drain); none starts afterwards."""
        self._aborting = True
        for ticket in list(self._tickets):
            ticket.abort()

    def start(self, req: GenerateRequest) -> "RequestStream":
        """Validates and admits a request now; returns the iterator of its merged updates.

        Raises typed errors (InvalidParameterError, ContextLengthExceededError,
        TokenLimitError -> 400, ServerBusyError -> 503) here, before a streaming response
        has started. The iterator yields at most one update per sample per read until every
        sample ends; the first read submits the request to the engine, and closing the
        iterator early aborts it. A request still waiting to be scheduled after
        SHOAL_QUEUE_TIMEOUT raises ServerBusyError from the iterator.
        """
        return self.start_all([req])[0]

    def start_all(self, reqs: list[GenerateRequest]) -> list["RequestStream"]:
        """start() for several prompts of one HTTP request: all are admitted, or none."""
        try:
            if self.lifecycle.draining or self._aborting:
                raise ServerShuttingDownError()
            for req in reqs:
                self._apply_limits(req)
                req.model.engine.core.check_request(req.prompt_token_ids, req.params)
            tickets: list[_Ticket] = []
            try:
                for req in reqs:
                    lease = self.quotas.admit(req)      # 403/429 for the caller's key first
                    try:
                        scheduler = req.model.engine.core.scheduler.config
                        slot = self.admission.admit(req.model.name, scheduler.max_num_seqs,
                                                    req.principal.priority_class,
                                                    len(req.prompt_token_ids))
                    except BaseException:
                        lease.cancel()
                        raise
                    tickets.append(_Ticket(self, req, slot, lease))
            except BaseException:
                for ticket in tickets:
                    ticket.release()
                raise
        except (ServerBusyError, TokenLimitError) as exc:
            reason = exc.reason if isinstance(exc, ServerBusyError) else "too_many_tokens"
            self.metrics.rejected.labels(reqs[0].model.name, reason).inc()
            raise
        streams = []
        for req, ticket in zip(reqs, tickets):
            updates = self._stream(req, ticket)
            # NOTE: a generator that is never started never runs its `finally`; if the
            # client leaves before the first read, garbage collection returns the slot.
            weakref.finalize(updates, ticket.release)
            streams.append(RequestStream(updates))
        return streams

    def _apply_limits(self, req: GenerateRequest) -> None:
        """SHOAL_MAX_PROMPT_TOKENS and SHOAL_MAX_TOKENS (400 over them; an unset max_tokens is capped)."""
        num_prompt = len(req.prompt_token_ids)
        check_prompt_tokens(num_prompt, self.settings.max_prompt_tokens)
        req.params = cap_max_tokens(
            req.params, self.settings.max_tokens, given=req.max_tokens_given,
            room=req.model.engine.core.max_model_len - num_prompt,
            param="options.num_predict" if req.dialect == "ollama" else "max_tokens")

    async def wait_scheduled(self, streams: Sequence["RequestStream"],
                             receive: Callable[[], Awaitable[dict]]) -> None:
        """Submits started requests and waits until the engine has scheduled every one.

        A streamed response commits to its status with its first byte, so a route that
        waits here first can still answer a refusal while queued (queue timeout, shutdown,
        engine failure) with a plain 503 instead of an error inside a 200 stream. A client
        that leaves meanwhile aborts them; on any failure every stream is closed.
        """
        try:
            await run_until_disconnect(receive, _all_scheduled(streams))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise

    async def stream(self, req: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """start() as an async generator: the errors start() raises come at the first read."""
        stream = self.start(req)
        try:
            async for batch in stream:
                yield batch
        finally:
            await stream.aclose()

    async def _stream(self, req: GenerateRequest, ticket: "_Ticket") -> AsyncIterator[object]:
        """The engine's updates for one request, led by _SCHEDULED once the engine takes it."""
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
        updates = model.engine.generate_batches(
            req.request_id, req.prompt_token_ids, req.params, req.priority,
            batch=req.principal.priority_class == BATCH, batch_aging_s=self.settings.batch_aging)
        try:
            if self._aborting:
                raise ServerShuttingDownError()
            while True:
                try:
                    batch = await self._next_update(updates, ticket)
                except StopAsyncIteration:
                    break
                if ticket.slot.is_waiting:
                    if self._aborting and batch and all(o.finish_reason == "abort" for o in batch):
                        raise ServerShuttingDownError()      # aborted by the drain while queued
                    ticket.slot.scheduled()
                    yield _SCHEDULED
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
                if batch:
                    yield merge_updates(batch)
        except ShoalError as exc:
            rejected = last_seen is None    # refused (by the engine, the queue timeout): it never ran
            if isinstance(exc, ServerBusyError):
                self.metrics.rejected.labels(name, exc.reason).inc()
            raise
        finally:
            await updates.aclose()
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

    async def _next_update(self, updates: AsyncIterator[list[RequestOutput]],
                           ticket: "_Ticket") -> list[RequestOutput]:
        """The next engine batch; while the request waits, within SHOAL_QUEUE_TIMEOUT."""
        if not ticket.slot.is_waiting or math.isinf(self.settings.queue_timeout):
            return await updates.__anext__()
        left = ticket.admitted_at + self.settings.queue_timeout - time.monotonic()
        try:
            # NOTE: on timeout the engine's generator is cancelled mid-read, and its
            # cleanup aborts the request in the engine.
            async with asyncio.timeout(left):
                return await updates.__anext__()
        except TimeoutError:
            config = ticket.model.engine.core.scheduler.config
            raise ServerBusyError(
                f"server busy: the request waited {self.settings.queue_timeout:g}s without being "
                "scheduled (SHOAL_QUEUE_TIMEOUT); try again later",
                self.admission.retry_after(ticket.model.name, config.max_num_seqs),
                "queue_timeout") from None

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


# What GenerationService._stream yields once the engine has scheduled the request.
_SCHEDULED = object()


class RequestStream:
    """One admitted request's updates: lists of merged RequestOutputs until every sample ends."""

    __slots__ = ("_updates",)

    def __init__(self, updates: AsyncIterator[object]) -> None:
        self._updates = updates

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[RequestOutput]:
        while True:
            item = await self._updates.__anext__()
            if item is not _SCHEDULED:
                return item  # type: ignore[return-value]

    async def wait_scheduled(self) -> None:
        """Returns once the engine has scheduled the request (call before the first read)."""
        # NOTE: _stream yields _SCHEDULED before any update, so this read takes only that.
        try:
            await self._updates.__anext__()
        except StopAsyncIteration:
            return

    async def aclose(self) -> None:
        await self._updates.aclose()  # type: ignore[attr-defined]


async def _all_scheduled(streams: Sequence[RequestStream]) -> None:
    """Waits for every stream's wait_scheduled(); the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(stream.wait_scheduled()) for stream in streams]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Ticket:
    """One admitted request's queue slot, its key's quota lease and its hold on the model;
    released exactly once."""

    __slots__ = ("_service", "_req", "slot", "_lease", "admitted_at", "_held")

    def __init__(self, service: GenerationService, req: GenerateRequest, slot: QueueSlot,
                 lease: Lease) -> None:
        self._service, self._req, self.slot, self._lease, self._held = service, req, slot, lease, True
        self.admitted_at = time.monotonic()
        # NOTE: the stream holds the model itself, so the caller can let go of its own
        # hold as soon as the stream exists; the model stays until the stream ends.
        service.residency.retain(req.model)
        service._tickets.add(self)

    @property
    def model(self) -> ServedModel:
        return self._req.model

    def abort(self) -> None:
        self._req.model.engine.abort(self._req.request_id)

    def release(self, output_tokens: int | None = None) -> None:
        """output_tokens None: the request never ran (its key is not charged for it)."""
        if self._held:
            self._held = False
            if output_tokens is None:
                self._lease.cancel()
            else:
                self._lease.finish(output_tokens)
            self.slot.release()
            self._service._tickets.discard(self)
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
