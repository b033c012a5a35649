"""GenerationService: the one internal generate path both dialects translate onto.

It composes the steps a request takes, each kept in its own module: the server's limits
(limits.py) and the engine's validation (EngineLimits, through the engine), then admission
(ticket.py: the key's quota, then the bounded queue of its model and priority class; else
503 + Retry-After), then the engine's events, acted on once here (metrics, observers, the
SHOAL_QUEUE_TIMEOUT a request may wait to be scheduled) and read through a RequestStream
(stream.py). Closing a stream, or a caller that goes away, aborts its request.
"""
from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from shoal.access.principal import BATCH, Principal, current_principal
from shoal.core.errors import (InvalidParameterError, ServerBusyError, ServerShuttingDownError, ShoalError,
                               TokenLimitError)
from shoal.engine.events import EngineEvent, Scheduled
from shoal.engine.outputs import RequestOutput
from shoal.engine.request import FinishReason
from shoal.serving.admission import AdmissionCollector, AdmissionControl, QueueLimits
from shoal.serving.completion import Completion, collect
from shoal.serving.disconnect import run_until_disconnect
from shoal.serving.limits import apply_server_limits, check_prompt_tokens
from shoal.serving.metrics import PREFIX, RequestMeter, ServerMetrics
from shoal.serving.quotas import KeyQuotas
from shoal.serving.request import GenerateRequest, GenerationEnd, GenerationObserver
from shoal.serving.residency import ResidencyManager
from shoal.serving.served import ServedModel
from shoal.serving.server_state import ServerLifecycle
from shoal.serving.settings import ServerSettings
from shoal.serving.stream import RequestStream, all_scheduled
from shoal.serving.ticket import AdmissionTicket


class GenerationService:
    """Admission, streaming and accounting for every generate request of the server."""

    def __init__(self, residency: ResidencyManager, metrics: ServerMetrics,
                 settings: ServerSettings, lifecycle: ServerLifecycle | None = None) -> None:
        self.residency = residency
        self.metrics = metrics
        self.settings = settings
        self.quotas = KeyQuotas()       # per-key limits (serving/quotas.py)
        self.observers: list[GenerationObserver] = []
        self.keep_text = False          # gather each sample's text for the observers
        self.lifecycle = lifecycle or ServerLifecycle()
        self.admission = AdmissionControl(
            QueueLimits(settings.max_queue, settings.max_queue_batch, settings.max_queued_tokens),
            metrics.mean_latency)
        metrics.registry.register(AdmissionCollector(self.admission, PREFIX))
        self._tickets: set[AdmissionTicket] = set()
        self._aborting = False          # the drain ran out of time: nothing new may start

    def num_in_flight(self) -> int:
        """Requests admitted and not yet ended, over every model (what a drain waits for)."""
        return self.admission.in_flight()

    def admitted_principals(self) -> list[Principal]:
        """The caller of each request admitted and not yet ended (the dashboard's per-key
        concurrency)."""
        return [ticket.request.principal for ticket in self._tickets]

    def abort_all(self) -> None:
        """Aborts every admitted request (the end of a drain); none starts afterwards."""
        self._aborting = True
        for ticket in list(self._tickets):
            ticket.abort()

    def check_prompt_count(self, model: ServedModel, count: int) -> None:
        """400 for more prompts in one request than could ever be admitted together: they are
        all admitted or none, so the queue's 503 (retry later) would never turn into a yes."""
        principal = current_principal.get()
        max_num_seqs = model.engine.limits.max_num_seqs
        limit, setting = self.admission.most_at_once(max_num_seqs, principal.priority_class)
        why = f"the model runs {max_num_seqs} at once and {setting} lets {limit - max_num_seqs} more wait"
        quotas = principal.limits
        if quotas is not None:      # each prompt is one request to the key's quotas
            for cap, what in ((quotas.max_concurrent, "concurrent requests"),
                              (quotas.requests_per_minute, "requests per minute")):
                if cap is not None and cap < limit:
                    limit, why = cap, f"the API key allows {cap} {what}"
        if count > limit:
            raise InvalidParameterError("prompt", f"{count} prompts in one request are more than this server "
                                                  f"can take at once ({limit}: {why})")

    def start(self, req: GenerateRequest) -> RequestStream:
        """Validates and admits a request now; returns the stream of its merged updates.

        Raises typed errors (InvalidParameterError, ContextLengthExceededError,
        TokenLimitError -> 400, ServerBusyError -> 503) here, before a streaming response
        has started. The stream yields at most one update per sample per read until every
        sample ends; the first read submits the request to the engine, and closing the
        stream early aborts it. A request still waiting to be scheduled after
        SHOAL_QUEUE_TIMEOUT raises ServerBusyError from the stream.
        """
        return self.start_all([req])[0]

    def start_all(self, reqs: list[GenerateRequest]) -> list[RequestStream]:
        """start() for several prompts of one HTTP request: all are admitted, or none."""
        try:
            if self.lifecycle.draining or self._aborting:
                raise ServerShuttingDownError()
            if len(reqs) > 1:
                self.check_prompt_count(reqs[0].model, len(reqs))
            for req in reqs:
                apply_server_limits(req, self.settings.max_prompt_tokens, self.settings.max_tokens)
                req.model.engine.validate(req.prompt_token_ids, req.params)
            tickets: list[AdmissionTicket] = []
            try:
                for req in reqs:
                    tickets.append(AdmissionTicket.admit(req, self.quotas, self.admission,
                                                         self.residency, self._tickets.discard))
                    self._tickets.add(tickets[-1])
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
            events = self._events(req, ticket)
            # NOTE: a generator that is never started never runs its `finally`; if the
            # client leaves before the first read, garbage collection returns the ticket.
            weakref.finalize(events, ticket.release)
            streams.append(RequestStream(events))
        return streams

    def start_embedding(self, req: GenerateRequest) -> RequestStream:
        """start() for an embedding request (req.embed_inputs): the inputs are checked against
        the server's and the engine's limits (400 naming the field), then the request is
        admitted as one request, through the same quotas, queues and residency as any."""
        inputs = req.embed_inputs
        assert inputs is not None
        try:
            if self.lifecycle.draining or self._aborting:
                raise ServerShuttingDownError()
            limit = self.settings.max_embedding_inputs
            if len(inputs) > limit:
                raise InvalidParameterError("input", f"{len(inputs)} inputs are more than this "
                                            f"server takes in one request ({limit}, "
                                            "SHOAL_MAX_EMBEDDING_INPUTS)")
            for ids in inputs:
                check_prompt_tokens(len(ids), self.settings.max_prompt_tokens)
            req.model.engine.validate_embedding(inputs)
            ticket = AdmissionTicket.admit(req, self.quotas, self.admission, self.residency,
                                           self._tickets.discard)
            self._tickets.add(ticket)
        except (ServerBusyError, TokenLimitError) as exc:
            reason = exc.reason if isinstance(exc, ServerBusyError) else "too_many_tokens"
            self.metrics.rejected.labels(req.model.name, reason).inc()
            raise
        events = self._events(req, ticket)
        weakref.finalize(events, ticket.release)
        return RequestStream(events)

    async def wait_scheduled(self, streams: Sequence[RequestStream],
                             receive: Callable[[], Awaitable[dict]]) -> None:
        """Submits started requests and waits until the engine has scheduled every one.

        A streamed response commits to its status with its first byte, so a route that
        waits here first can still answer a refusal while queued (queue timeout, shutdown,
        engine failure) with a plain 503 instead of an error inside a 200 stream. A client
        that leaves meanwhile aborts them; on any failure every stream is closed.
        """
        try:
            await run_until_disconnect(receive, all_scheduled(streams))
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

    async def complete(self, req: GenerateRequest) -> Completion:
        """Runs a request to the end and gathers its samples (for non-streamed responses)."""
        return await collect(req, self.start(req))

    async def _events(self, req: GenerateRequest, ticket: AdmissionTicket
                      ) -> AsyncIterator[EngineEvent]:
        """The engine's events for one admitted request, acted on here once: Scheduled moves
        its slot out of the queue, each Update is metered. However the request ends, its
        ticket is released and the metrics and the observers learn how it ended."""
        name = req.model.name
        meter = RequestMeter(self.metrics, name, req.arrival_time)
        generated = 0
        final: RequestOutput | None = None
        last_seen: RequestOutput | None = None
        rejected = False
        count = req.params.n if req.embed_inputs is None else len(req.embed_inputs)
        texts: list[list[str]] | None = [[] for _ in range(count)] if self.keep_text else None
        # NOTE: at the first read, so in the HTTP request's context; a stream never read
        # never started, and never ends, for the observers.
        on_end = [observe(req) for observe in self.observers]
        # NOTE: embed_inputs only for embedding requests: generation keeps the engine's
        # original call (test engines implement just that)
        extra = {} if req.embed_inputs is None else {"embed_inputs": req.embed_inputs}
        events = req.model.engine.generate(
            req.request_id, req.prompt_token_ids, req.params, req.priority,
            batch=req.principal.priority_class == BATCH, batch_aging_s=self.settings.batch_aging,
            **extra)
        try:
            if self._aborting:
                raise ServerShuttingDownError()
            while True:
                try:
                    event = await self._next_event(events, ticket)
                except StopAsyncIteration:
                    break
                if isinstance(event, Scheduled):
                    ticket.slot.scheduled()
                    yield event
                    continue
                if ticket.slot.is_waiting and self._aborting \
                        and all(o.finish_reason == FinishReason.ABORT for o in event.outputs):
                    raise ServerShuttingDownError()      # aborted by the drain while queued
                for out in event.outputs:
                    last_seen = out
                    generated += len(out.token_ids)
                    if texts is not None:
                        texts[out.index].append(out.text)
                    meter.observe(out)
                    if out.finished and out.finish_reason != FinishReason.ABORT:
                        final = out
                yield event
        except ShoalError as exc:
            rejected = last_seen is None    # refused (by the engine, the queue timeout): it never ran
            if isinstance(exc, ServerBusyError):
                self.metrics.rejected.labels(name, exc.reason).inc()
            raise
        finally:
            await events.aclose()
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

    async def _next_event(self, events: AsyncIterator[EngineEvent],
                          ticket: AdmissionTicket) -> EngineEvent:
        """The engine's next event; while the request waits, within SHOAL_QUEUE_TIMEOUT."""
        if not ticket.slot.is_waiting or math.isinf(self.settings.queue_timeout):
            return await events.__anext__()
        left = ticket.admitted_at + self.settings.queue_timeout - time.monotonic()
        try:
            # NOTE: on timeout the engine's generator is cancelled mid-read, and its
            # cleanup aborts the request in the engine.
            async with asyncio.timeout(left):
                return await events.__anext__()
        except TimeoutError:
            model = ticket.request.model
            raise ServerBusyError(
                f"server busy: the request waited {self.settings.queue_timeout:g}s without being "
                "scheduled (SHOAL_QUEUE_TIMEOUT); try again later",
                self.admission.retry_after(model.name, model.engine.limits.max_num_seqs),
                "queue_timeout") from None


def _aborted(req: GenerateRequest, last: RequestOutput | None) -> RequestOutput:
    """The summary of a request whose caller left (or that failed) before it finished."""
    return RequestOutput(request_id=req.request_id, index=0, text="", token_ids=[], finished=True,
                         finish_reason=FinishReason.ABORT, num_prompt_tokens=len(req.prompt_token_ids),
                         num_cached_tokens=last.num_cached_tokens if last else 0,
                         timings=last.timings if last else None,
                         produced_at=last.produced_at if last else time.monotonic())
