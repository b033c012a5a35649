"""What is recorded about one HTTP request: who asked, what it cost, how it ended.

A RequestRecord is opened when a request arrives and filled in as the request runs: the
response status when it starts, the caller as authentication left it, and each generation
(prompt and output tokens, the engine's timings) as it ends. The finished record is what
the access log, the audit log, the per-key metrics and the traces are written from.
"""
from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from shoal.access.principal import ANONYMOUS, Principal
from shoal.serving.request import GenerationEnd

# The endpoints that run a model: their requests are audited and counted per key whatever
# their outcome. Other requests count there only when refused by the guardrails (below).
MODEL_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/generate",
                             "/api/chat"})
# Refusals of who is asking or how much they ask: audited on every endpoint.
ACCESS_REFUSALS = frozenset({401, 403, 429})


@dataclass(slots=True)
class Timeline:
    """time.monotonic() moments of a request's generation, merged over its prompts and samples:
    the earliest arrival, scheduling and first token, and the latest end."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def merge(self, other: Timeline) -> None:
        self.arrival = min(self.arrival, other.arrival)
        self.scheduled = _earliest(self.scheduled, other.scheduled)
        self.first_token = _earliest(self.first_token, other.first_token)
        self.finished = _latest(self.finished, other.finished)

    def queue_seconds(self) -> float | None:
        return _span(self.arrival, self.scheduled)

    def prefill_seconds(self) -> float | None:
        return _span(self.scheduled, self.first_token)

    def decode_seconds(self) -> float | None:
        return _span(self.first_token, self.finished)

    def e2e_seconds(self) -> float | None:
        return _span(self.arrival, self.finished)


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One HTTP request, from arrival to its last byte and the end of its generations."""

    request_id: str
    method: str
    path: str
    client: str | None
    started_at: float = field(default_factory=time.time)      # wall clock, for people
    started: float = field(default_factory=time.monotonic)    # the same moment, for durations
    ended: float | None = None
    status: int | None = None
    reason: str | None = None               # why a request was refused or failed
    principal: Principal = ANONYMOUS
    model: str | None = None                # the served model's canonical name
    requested_model: str | None = None      # the name a refused request asked for
    dialect: str = "openai"
    trace_headers: dict[str, str] = field(default_factory=dict)   # traceparent / tracestate
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    timeline: Timeline | None = None
    prompts: list[str] | None = None        # texts, when the audit asks for content
    completions: list[str] | None = None
    open_generations: int = 0               # admitted generations that have not ended yet
    http_done: bool = False

    @property
    def key_id(self) -> str | None:
        return self.principal.key_id

    @property
    def priority_class(self) -> str:
        return self.principal.priority_class

    @property
    def generated(self) -> bool:
        """Whether the request reached the engine (some generation was admitted and ran)."""
        return self.timeline is not None

    @property
    def is_model_request(self) -> bool:
        """Requests the audit log and the per-key counters cover."""
        return self.generated or self.path in MODEL_ENDPOINTS or self.status in ACCESS_REFUSALS

    def duration_seconds(self) -> float | None:
        return _span(self.started, self.ended)

    def add_generation(self, end: GenerationEnd, with_text: bool) -> None:
        """Folds one ended generation (one prompt of the request, all its samples) in."""
        req = end.request
        self.model = req.model.name
        self.dialect = req.dialect
        self.principal = req.principal
        final = end.final
        if final is None:           # refused by the engine, or never read: nothing ran
            return
        self.prompt_tokens += len(req.prompt_token_ids)
        self.completion_tokens += end.num_output_tokens
        self.cached_tokens += final.num_cached_tokens
        if self.finish_reason in (None, "stop", "length"):
            self.finish_reason = final.finish_reason    # NOTE: an "abort" among prompts sticks
        t = final.timings
        timeline = Timeline(req.arrival_time, t.scheduled if t else None,
                            t.first_token if t else None,
                            (t.finished if t and t.finished is not None else final.produced_at))
        if self.timeline is None:
            self.timeline = timeline
        else:
            self.timeline.merge(timeline)
        if with_text and end.texts is not None:
            prompt = req.prompt_text
            if prompt is None:
                prompt = req.model.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
            self.prompts = [*(self.prompts or []), prompt]
            self.completions = [*(self.completions or []), *end.texts]

    def access_fields(self) -> dict[str, Any]:
        """The fields of the access log line (and of the audit line, which adds a few)."""
        fields: dict[str, Any] = {
            "method": self.method, "endpoint": self.path, "status": self.status,
            "duration_s": _round(self.duration_seconds()), "client": self.client,
            "key_id": self.key_id, "class": self.priority_class,
        }
        if self.is_model_request:
            fields.update(dialect=self.dialect, model=self.model)
            if self.requested_model is not None and self.requested_model != self.model:
                fields["requested_model"] = self.requested_model
            fields.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                          cached_tokens=self.cached_tokens, finish_reason=self.finish_reason)
            t = self.timeline
            if t is not None:
                fields.update(queue_s=_round(t.queue_seconds()), prefill_s=_round(t.prefill_seconds()),
                              decode_s=_round(t.decode_seconds()), e2e_s=_round(t.e2e_seconds()))
        if self.reason is not None:
            fields["reason"] = self.reason
        return fields

    def wall_ns(self, moment: float) -> int:
        """A time.monotonic() moment of this request as Unix-epoch nanoseconds."""
        return int((self.started_at + (moment - self.started)) * 1e9)


current_record: ContextVar[RequestRecord | None] = ContextVar("shoal_request_record", default=None)


def dialect_of(path: str) -> str:
    return "ollama" if path.startswith("/api/") else "openai"


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
