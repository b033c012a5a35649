"""OpenTelemetry traces of model requests (the optional `otel` extra).

Each finished model request becomes a server span (continuing the caller's `traceparent`)
with three children built from the engine's own timings: `queue` (arrival → first
scheduled), `prefill` (→ first token) and `decode` (→ last token). Spans are made after
the request ends, with explicit timestamps, so tracing adds nothing to the engine's path.

On when SHOAL_OTEL=1, or when OTEL_EXPORTER_OTLP_ENDPOINT is set and SHOAL_OTEL is not 0.
The exporter follows the standard variables: OTEL_TRACES_EXPORTER ('otlp', the default,
over HTTP; or 'console'), OTEL_EXPORTER_OTLP_* for where to send, OTEL_SERVICE_NAME.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shoal.core.errors import InvalidParameterError
from shoal.serving.records import RequestRecord

INSTALL_HINT = "pip install 'shoal[otel]'"


def tracing_requested(otel: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return otel if otel is not None else bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class RequestTracer:
    """A request-record sink that turns model requests into spans of `provider`."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider = provider
        self._tracer = provider.get_tracer("shoal")
        self._propagator = TraceContextTextMapPropagator()

    def __call__(self, record: RequestRecord) -> None:
        if not record.is_model_request:
            return
        trace = self._trace
        parent = self._propagator.extract(record.trace_headers)
        attributes = {key: value for key, value in {
            "http.request.method": record.method,
            "url.path": record.path,
            "http.response.status_code": record.status,
            "gen_ai.request.model": record.model or record.requested_model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else None,
            "shoal.request_id": record.request_id,
            "shoal.key_id": record.key_id,
            "shoal.priority_class": record.priority_class,
            "shoal.cached_tokens": record.cached_tokens,
            "shoal.reason": record.reason,
        }.items() if value is not None}
        span = self._tracer.start_span(f"{record.method} {record.path}", context=parent,
                                       kind=trace.SpanKind.SERVER, attributes=attributes,
                                       start_time=record.wall_ns(record.started))
        t = record.timeline
        if t is not None:
            inside = trace.set_span_in_context(span)
            for name, begin, end in (("queue", t.arrival, t.scheduled),
                                     ("prefill", t.scheduled, t.first_token),
                                     ("decode", t.first_token, t.finished)):
                if begin is not None and end is not None:
                    child = self._tracer.start_span(name, context=inside,
                                                    start_time=record.wall_ns(begin))
                    child.end(end_time=record.wall_ns(end))
        if record.status is None or record.status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.reason))
        span.end(end_time=record.wall_ns(record.ended if record.ended is not None else record.started))

    def close(self) -> None:
        """Exports what is still batched, then stops the exporter."""
        self._provider.shutdown()


def tracer_from_settings(otel: bool | None, environ: Mapping[str, str] | None = None) -> RequestTracer | None:
    """The tracer the settings ask for (None when tracing is off); a clear error when the
    `otel` extra or the chosen exporter is missing."""
    env = os.environ if environ is None else environ
    if not tracing_requested(otel, env):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise _missing(exc) from None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "shoal"}))   # OTEL_SERVICE_NAME wins
    provider = TracerProvider(resource=resource)
    kind = (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise InvalidParameterError("otel", f"OTLP protocol {protocol!r} is not supported; "
                                                "shoal exports OTLP over HTTP ('http/protobuf')")
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise _missing(exc) from None
        exporter = OTLPSpanExporter()
    else:
        raise InvalidParameterError("otel", f"OTEL_TRACES_EXPORTER={kind!r} is not supported; "
                                            "use 'otlp' (OTLP over HTTP) or 'console'")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return RequestTracer(provider)


def _missing(exc: ImportError) -> InvalidParameterError:
    return InvalidParameterError(
        "otel", "tracing is on (SHOAL_OTEL=1 or OTEL_EXPORTER_OTLP_ENDPOINT is set) but the "
                f"OpenTelemetry packages are not installed ({exc.name or exc}); install them "
                f"with {INSTALL_HINT}, or set SHOAL_OTEL=0")
