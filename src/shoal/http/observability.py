"""Follows every HTTP request to its end and hands its record to the sinks.

The sinks (each a callable taking a finished RequestRecord) are the access log, the audit
log, the per-key metrics and the tracer. A record is finished when both its HTTP exchange
is over and every generation it started has ended: a generation can outlive its response
(a client that hangs up mid-stream leaves its generator to be closed later), and its
tokens belong in the record all the same.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.access.principal import current_principal
from shoal.core.errors import ShoalError
from shoal.http.audit import AuditLog
from shoal.http.logs import log_access
from shoal.http.origins import OriginPolicy, allowed_origins
from shoal.http.requestid import RequestIdMiddleware, current_request_id
from shoal.http.tracing import tracer_from_settings
from shoal.serving.records import RequestRecord, current_record, dialect_of

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shoal.serving.generate import GenerationService
    from shoal.serving.request import GenerateRequest, GenerationEnd
    from shoal.serving.settings import ServerSettings
    from shoal.serving.residency import ResidencyManager

log = logging.getLogger(__name__)

Sink = Callable[[RequestRecord], None]

# A refused request's body is read for the model it names only up to this size.
_BODY_PEEK_BYTES = 64 << 10
# nginx's status for a request whose client hung up before its answer was complete.
CLIENT_CLOSED_REQUEST = 499


class Recorder:
    """Open records, the generation hook that fills them, and the sinks they go to."""

    def __init__(self, sinks: list[Sink], *, with_text: bool = False,
                 closers: list[Callable[[], None]] | None = None) -> None:
        self.sinks = sinks
        self.with_text = with_text          # gather prompt and completion text (content audit)
        # canonical name of a model a request names, None when no such model (set by the app)
        self.resolve_model: Callable[[str], str | None] = lambda name: None
        self._closers = closers or []
        self._open: set[RequestRecord] = set()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Recorder:
        """The access log, and the audit log and tracer when the settings turn them on.
        Raises InvalidParameterError for an audit file that cannot be opened or a tracer
        that cannot be built, so `serve` can fail before loading any model."""
        sinks: list[Sink] = [log_access]
        closers: list[Callable[[], None]] = []
        if settings.audit_log:
            audit = AuditLog(settings.audit_log, int(settings.audit_max_bytes),
                             settings.audit_backups, settings.audit_content)
            sinks.append(audit)
            closers.append(audit.close)
        tracer = tracer_from_settings(settings.otel)
        if tracer is not None:
            sinks.append(tracer)
            closers.append(tracer.close)
        return cls(sinks, with_text=settings.audit_content and bool(settings.audit_log),
                   closers=closers)

    # ---- the HTTP side (RecordingMiddleware) ----------------------------------------------

    def open(self, record: RequestRecord) -> None:
        self._open.add(record)

    def http_done(self, record: RequestRecord) -> None:
        record.http_done = True
        self._finish_if_done(record)

    # ---- the generation side (GenerationService.observers) --------------------------------

    def generation_started(self, req: GenerateRequest) -> Callable[[GenerationEnd], None]:
        """Called when a generation's stream starts, in its HTTP request's context; returns
        the callback for its end. NOTE: the end may come after the response, from another
        context: a stream abandoned by a client is closed later by the event loop."""
        record = current_record.get()
        if record is None:
            return _ignore
        record.open_generations += 1

        def ended(end: GenerationEnd) -> None:
            try:
                record.add_generation(end, self.with_text)
            except Exception:  # noqa: BLE001 - recording must never break serving
                log.exception("could not record the end of generation %s", end.request.request_id)
            record.open_generations -= 1
            self._finish_if_done(record)

        return ended

    # ---- finishing -------------------------------------------------------------------------

    def _finish_if_done(self, record: RequestRecord) -> None:
        if record.http_done and record.open_generations <= 0 and record in self._open:
            self._open.discard(record)
            self._emit(record)

    def _emit(self, record: RequestRecord) -> None:
        if record.model is None and record.requested_model is not None:
            record.model = self.resolve_model(record.requested_model)
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001 - one failing sink must not stop the others
                log.exception("request record sink %r failed", sink)

    def close(self) -> None:
        """Emits the records still open (generations cut off by the shutdown), then closes the
        sinks that hold files or exporters."""
        for record in list(self._open):
            self._open.discard(record)
            self._emit(record)
        for close in self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001
                log.exception("closing %r failed", close)


class RecordingMiddleware:
    """Opens each HTTP request's record and notes what only the HTTP exchange shows: the
    status, the caller once authenticated, the trace context, and the model a refused
    request named."""

    def __init__(self, app: ASGIApp, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        client = scope.get("client")
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        record = RequestRecord(
            request_id=current_request_id.get() or "", method=scope.get("method", ""), path=path,
            client=client[0] if client else None, dialect=dialect_of(path),
            trace_headers={name: headers[key].decode("latin-1")
                           for name, key in (("traceparent", b"traceparent"), ("tracestate", b"tracestate"))
                           if key in headers})
        current_record.set(record)  # NOTE: not reset, as the request id (see requestid.py)
        self.recorder.open(record)
        body: list[bytes] = []
        body_size = 0
        answered = client_left = False

        async def receive_and_keep() -> Message:
            # keeps the head of the body: the model a refused request named is read from it
            nonlocal body_size, client_left
            message = await receive()
            if message["type"] == "http.request" and body_size <= _BODY_PEEK_BYTES:
                chunk = message.get("body", b"")
                body_size += len(chunk)
                body.append(chunk)
            elif message["type"] == "http.disconnect" and not answered:
                client_left = True      # before its answer's last byte: a 499, not a 200
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                record.status = message["status"]
                # NOTE: read here, inside the app: authentication sets it further in.
                record.principal = current_principal.get()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_and_note)
        except BaseException as exc:
            if record.status is None:
                if isinstance(exc, asyncio.CancelledError):
                    record.status, record.reason = CLIENT_CLOSED_REQUEST, "the client disconnected"
                else:
                    record.status, record.reason = 500, f"internal error ({type(exc).__name__})"
            raise
        finally:
            record.ended = time.monotonic()
            # NOTE: 499, as nginx logs it: the client left (the app sent nothing, or not all of
            # a stream); the status a streamed answer began with is not how it ended.
            if record.status is None or (client_left and not answered):
                record.status, record.reason = CLIENT_CLOSED_REQUEST, "the client disconnected"
            if not record.generated and record.is_model_request and body_size <= _BODY_PEEK_BYTES:
                record.requested_model = _model_named(b"".join(body))
            self.recorder.http_done(record)


def attach(app: FastAPI, recorder: Recorder, service: GenerationService, residency: ResidencyManager,
           origins: str | None, refuse: Callable[[str, str], Response]) -> None:
    """Wires the recorder into the app: the generation hook, the per-key metrics, model names,
    and the middleware: request ids (outermost), recording, then the origin policy (CORS).
    Middleware added to `app` before this call runs inside all three."""
    service.observers.append(recorder.generation_started)
    service.keep_text = recorder.with_text
    recorder.sinks.append(service.metrics.observe_request)

    def resolve_model(name: str) -> str | None:
        try:
            return residency.resolve(name).name
        except ShoalError:
            return None

    recorder.resolve_model = resolve_model
    app.state.recorder = recorder
    app.add_middleware(OriginPolicy, origins=allowed_origins(origins), refuse=refuse)
    app.add_middleware(RecordingMiddleware, recorder=recorder)
    app.add_middleware(RequestIdMiddleware)


def note_refusal(reason: str) -> None:
    """Records why the request being served is refused (the app's error renderer calls it)."""
    record = current_record.get()
    if record is not None:
        record.reason = reason


def _model_named(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):   # a hostile body names no model
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def _ignore(_end: GenerationEnd) -> None:
    return None
