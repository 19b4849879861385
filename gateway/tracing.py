"""OpenTelemetry tracing: a server span per request, W3C `traceparent` carried to the upstreams.

With tracing off (the default) the API's no-op tracer costs next to nothing, and a caller's own
`traceparent` is still passed on to the edge (gRPC metadata) and the core (a Triton request
parameter), so traces that start in the client stay joined.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from opentelemetry import context, propagate, trace

from gateway.config import TracingConfig

_tracer = trace.get_tracer("meridian.gateway")
_enabled = False


def configure(config: TracingConfig) -> None:
    """Install the SDK with an OTLP/HTTP exporter when tracing is on."""
    global _enabled
    if not config.enabled:
        return
    _enabled = True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint) if config.otlp_endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def server_span(name: str, headers: dict[str, str]):
    """A span for one request, child of the caller's `traceparent` when it sent one.

    With tracing off and no `traceparent` there is nothing to record or carry: no span at all.
    """
    if not _enabled and "traceparent" not in headers:
        return _NO_SPAN
    return _span(name, headers)


class _NoSpan:
    def __enter__(self):
        return trace.INVALID_SPAN

    def __exit__(self, *exc) -> None:
        return None


_NO_SPAN = _NoSpan()


@contextmanager
def _span(name: str, headers: dict[str, str]) -> Iterator[trace.Span]:
    parent = propagate.extract(headers) if "traceparent" in headers else None
    token = context.attach(parent) if parent is not None else None
    try:
        with _tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER) as span:
            yield span
    finally:
        if token is not None:
            context.detach(token)


def current_traceparent(fallback: str | None = None) -> str | None:
    """The `traceparent` to send upstream: the current span's, else the caller's own."""
    if not _enabled and fallback is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent") or fallback
