"""OpenTelemetry traces of generation requests, exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Off (the default) nothing here is imported beyond this module and a request pays one `None` check. On, each
generation request becomes one span, written once at the request's end (`record`) with explicit times: from its
arrival at Envoy to the processor's last answer, with events where its time went (`queued`, `admitted`,
`first_token`) and the GenAI conventions' attributes (gen_ai.operation.name, gen_ai.request.model,
gen_ai.response.model, gen_ai.usage.input_tokens / output_tokens, gen_ai.response.finish_reasons, error.type).
The span continues Envoy's trace: Envoy's tracer puts the ext_proc call's span context on the gRPC stream's
metadata (`traceparent`), and that span is this one's parent. Prompt and answer text are never put in a span.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

__all__ = ["TRACEPARENT", "configure", "enabled", "epoch_ns", "record", "shutdown"]

TRACEPARENT = "traceparent"  # W3C trace context, as Envoy's OpenTelemetry tracer sends it
SERVICE_NAME = "shimmy-extproc"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str) -> None:
    """Export spans to the OTLP/gRPC collector at `endpoint` (`http://host:4317`; `https://` for TLS); "" is off."""
    global _tracer, _provider
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # a thread of its own: never on the event loop
    _provider, _tracer = provider, provider.get_tracer("extproc")


def shutdown() -> None:
    """Export the spans still buffered (the processor is stopping)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def epoch_ns(monotonic: float) -> int:
    """A `time.monotonic()` reading as wall-clock nanoseconds, the time spans carry."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def record(
    name: str,
    parent: str,
    start: float,
    attributes: Mapping[str, str | int | float | Sequence[str]],
    events: Sequence[tuple[str, float]] = (),
    error: str = "",
) -> None:
    """One finished request's span: `start` and the `events`' times are `time.monotonic()` readings, the end is
    now; `parent` is the `traceparent` Envoy sent ("": a trace of its own); `error` the error.type, if any."""
    tracer = _tracer
    if tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context: Any = TraceContextTextMapPropagator().extract({TRACEPARENT: parent}) if parent else None
    span = tracer.start_span(name, context, SpanKind.SERVER, attributes, start_time=epoch_ns(start))
    for event, at in events:
        span.add_event(event, timestamp=epoch_ns(at))
    if error:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
