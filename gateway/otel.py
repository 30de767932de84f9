"""OpenTelemetry spans exported over OTLP/HTTP: opt-in, behind the ``keygate[otel]`` extra.

With ``tracing: {otlp_endpoint, service_name, sample_ratio}`` every request gets a SERVER span
(named ``METHOD route``) with child spans for the pipeline's steps: ``authenticate`` (the
credential checked, argon2 or the cache), ``authorise`` (the store round trip: state, scopes,
rate, quota) and ``forward`` (a CLIENT span; its id is the parent the upstream sees in
``traceparent``). Attributes follow the OpenTelemetry HTTP semantic conventions
(``http.request.method``, ``url.path``, ``http.route``, ``http.response.status_code``,
``client.address``, ``server.address``/``server.port`` of the upstream, ``error.type``) plus
``keygate.workspace``, ``keygate.key_id``, ``keygate.decision`` (``allowed``, ``public`` or
the error code), ``keygate.request_id`` and ``user_agent.original``. Never a token: paths and
the User-Agent are masked as in the access log, a caller's ``tracestate`` member that holds a
key is left out of the spans' trace state; no other header value and no query string is
recorded.

Sampling: a caller's sampled flag is followed (parent-based); a trace keygate starts is kept
with probability ``sample_ratio``. Spans are batched and sent from the SDK's own thread, so
the event loop never waits for the collector; when the collector is down, spans are dropped,
logged once when the sending fails and once when it works again (with the count lost between:
the failed batches' spans and those the SDK's full queue pushed out, _CountedBatch).
The exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables for anything else (headers,
certificates, compression).

The SDK's own tracer provider is kept here, never installed as the process's global one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .closing import bounded
from .config import TracingConfig
from .models import HTTP_METHODS
from .tracing import SPAN_FLUSH_TIMEOUT, Trace, Tracer, incoming

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status,
                                     StatusCode, TraceFlags, TraceState)
except ImportError as exc:  # pragma: no cover - exercised by installs without the extra
    raise ImportError("tracing.otlp_endpoint needs OpenTelemetry: pip install "
                      "'keygate[otel]'") from exc

from . import __version__

log = logging.getLogger("keygate.tracing")

_METHODS = frozenset(HTTP_METHODS)  # span names: a known method, else "HTTP"


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL gets the traces path (``/v1/traces``) appended; a URL with a path
    is used as given (like ``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``..._TRACES_ENDPOINT``)."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):  # before any query (``http://c:4318?tenant=a``), which stays
        return urlunsplit(parts._replace(path="/v1/traces"))
    return endpoint


def shown_endpoint(url: str) -> str:
    """``url`` fit for log lines: without its user info (``user:password@``, which the
    exporter sends as Basic credentials) and its query and fragment, on one line."""
    for unsafe in "\t\r\n":
        url = url.replace(unsafe, "")
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _method_attributes(method: str) -> dict[str, Any]:
    if method in _METHODS:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method[:32]}


class _Step:
    """A child span around one pipeline step."""
    __slots__ = ("trace", "name", "span", "ended_at")

    def __init__(self, trace: "OtelTrace", name: str) -> None:
        self.trace, self.name = trace, name
        self.span: Any = None
        self.ended_at: int | None = None

    def __enter__(self) -> "_Step":
        t = self.trace
        forward = self.name == "forward"
        self.span = t.tracer.start_span(
            self.name, context=t.context, kind=SpanKind.CLIENT if forward else SpanKind.INTERNAL)
        if forward:  # the upstream's parent is this span
            t.span_id = "%016x" % self.span.get_span_context().span_id
            t.forward = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        span = self.span
        if exc is not None:
            code = getattr(exc, "code", None) or type(exc).__name__
            span.set_attribute("error.type", code)
            if getattr(exc, "status", 500) >= 500:
                span.set_status(Status(StatusCode.ERROR))
        if self.name == "forward" and exc is None:
            self.ended_at = time.time_ns()  # ended by OtelTrace.end, once the status is known
        else:
            span.end()

    def set(self, name: str, value: Any) -> None:
        self.span.set_attribute(name, value)


class OtelTrace(Trace):
    __slots__ = ("tracer", "span", "context", "forward", "upstream")

    def step(self, name: str) -> _Step:
        return _Step(self, name)

    def end(self, request: Any, response: Any, outcome: Any, request_id: str) -> None:
        span = self.span
        status = response.status
        route = outcome.route
        attributes: dict[str, Any] = {"http.response.status_code": status,
                                      "keygate.request_id": request_id}
        if route is not None:
            attributes["http.route"] = route
            span.update_name(f"{request.method if request.method in _METHODS else 'HTTP'} "
                             f"{route}")
        if outcome.workspace is not None:
            attributes["keygate.workspace"] = outcome.workspace
            attributes["keygate.key_id"] = outcome.key_id
        if outcome.code is not None:
            attributes["keygate.decision"] = outcome.code
            attributes["error.type"] = outcome.code if status >= 500 else None
        else:
            attributes["keygate.decision"] = "allowed" if outcome.workspace else "public"
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        forward = self.forward
        if forward is not None and forward.ended_at is not None:
            where = self.upstream.get(outcome.upstream)
            forward.span.set_attributes({
                **_method_attributes(request.method), "http.response.status_code": status,
                "keygate.upstream": outcome.upstream or "",
                **({"server.address": where[0], "server.port": where[1]} if where else {})})
            if status >= 500:
                forward.span.set_status(Status(StatusCode.ERROR))
            forward.span.end(end_time=forward.ended_at)
        span.end()


class OtelTracer(Tracer):
    """Spans for every request, exported over OTLP/HTTP in batches."""

    def __init__(self, config: TracingConfig, upstream_hosts: dict[str, tuple[str, int]],
                 *, mask_path: Any = None, client_address: Any = None,
                 exporter: Any = None) -> None:
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource.create({"service.name": config.service_name,
                                      "service.version": __version__}),
            shutdown_on_exit=False)
        url = traces_url(config.otlp_endpoint)
        exporter = _Reported(exporter or OTLPSpanExporter(endpoint=url, timeout=3), url)
        self.exporter = exporter
        processor = _CountedBatch(exporter, schedule_delay_millis=1000)
        exporter.queue_lost = processor.lost
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("keygate", __version__)
        self.upstream_hosts = upstream_hosts
        self.mask_path = mask_path or (lambda p: p)
        # the client behind server.trusted_proxies, as the failure throttle reads it
        self.client_address = client_address or (lambda request: request.remote or "")

    def start(self, request: Any) -> OtelTrace:
        parent, tracestate = incoming(request.headers)
        context = None
        if parent is not None:
            trace_id, parent_id, flags = parent
            remote = SpanContext(int(trace_id, 16), int(parent_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(int(flags, 16)),
                                 trace_state=_trace_state(tracestate, self.mask_path))
            context = otel_trace.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(request.method if request.method in _METHODS else "HTTP",
                                      context=context, kind=SpanKind.SERVER)
        ctx = span.get_span_context()
        if not span.is_recording():  # sampled out: trace context only, no child spans
            return Trace("%032x" % ctx.trace_id, "%016x" % ctx.span_id,
                         "%02x" % (int(ctx.trace_flags) & 3), parent[1] if parent else None,
                         tracestate)
        attributes = _method_attributes(request.method)
        attributes.update({"url.path": self.mask_path(request.raw_path.partition("?")[0]),
                           "url.scheme": request.scheme,
                           "network.protocol.version": "%d.%d" % request.version,
                           "client.address": self.client_address(request),
                           "network.peer.address": request.remote or ""})
        agent = request.headers.get("User-Agent")
        if agent:  # masked before it is cut: a cut would leave part of a key unrecognised
            attributes["user_agent.original"] = self.mask_path(agent)[:256]
        span.set_attributes(attributes)
        trace = OtelTrace("%032x" % ctx.trace_id, "%016x" % ctx.span_id,
                          "%02x" % (int(ctx.trace_flags) & 3),
                          parent[1] if parent else None, tracestate)
        trace.tracer = self.tracer
        trace.span = span
        trace.context = otel_trace.set_span_in_context(span)
        trace.forward = None
        trace.upstream = self.upstream_hosts
        return trace

    async def close(self) -> None:
        """Send what is batched (bounded: a dead collector must not hold up a stop).

        The SDK's shutdown runs in a daemon thread of its own, not the loop's executor:
        ``asyncio.run`` joins that executor's threads before the process exits, so a shutdown
        still waiting on the collector past the bound (the SDK waits up to 30 s, and an export
        whose answer trickles in has no end) kept the process alive all the same."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_set_done, done)

        threading.Thread(target=shut_down, name="keygate-span-flush", daemon=True).start()
        try:
            if not await bounded(done, SPAN_FLUSH_TIMEOUT, None):
                log.warning("tracing: spans still queued at shutdown were not exported")
        finally:
            self.exporter.unmute()


# the logger the OTLP/HTTP span exporter reports each failed batch on (two or three lines)
_EXPORTER_LOG = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
# the logger of the SDK's batch processor, which says "Queue full, dropping Span." (at most
# every 20 s) while its queue is full: muted while the collector is failing, its drops counted
_QUEUE_LOG = logging.getLogger("opentelemetry.sdk._shared_internal")


class _CountedBatch(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops because its queue is full.

    While the collector is down or stalls, the SDK's export thread waits on each batch (up
    to the exporter's timeout) and the queue fills: every span ended then pushes out one
    queued span (the queue is a bounded deque), which the exporter never sees. Those are
    counted here (``lost``), so that _Reported tells the whole count. On the request path
    this costs what the SDK's own ``on_end`` does, and a length check."""

    def __init__(self, exporter: Any, **options: Any) -> None:
        super().__init__(exporter, **options)
        self.full = 0  # spans pushed out of the full queue; only the event loop adds
        batch = getattr(self, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        if batch is None or getattr(queue, "maxlen", None) is None:  # another SDK: not counted
            return
        self._queue, self._max, self._emit = queue, queue.maxlen, batch.emit
        self.on_end = self._on_end  # type: ignore[method-assign]

    def _on_end(self, span: Any) -> None:
        if span.context.trace_flags.sampled:
            if len(self._queue) == self._max:
                self.full += 1
            self._emit(span)

    def lost(self) -> int:
        return self.full


class _Reported:
    """The span exporter, its failures logged once per outage rather than per batch: the
    exporter's own lines for the first failed batch (they say why), one line of keygate's,
    then nothing until a batch goes through again, which is logged with the count of spans
    dropped in between. Without this a collector that is down filled the log with a warning
    and an error a second, for as long as it stayed down."""

    def __init__(self, exporter: Any, url: str) -> None:
        self.exporter, self.url = exporter, shown_endpoint(url)
        # the exporter's own lines for the first failed batch name the URL's path and query
        # (urllib3's "url: /v1/traces?..."): a query is masked there
        self.query = urlsplit(url).query
        self.dropped = 0  # spans of batches the exporter failed to send, this outage
        self.failing = False
        # spans the batch processor dropped with its queue full (_CountedBatch.lost, a count
        # since start); those since the last batch sent are lost to this outage too
        self.queue_lost: Any = lambda: 0
        self.queue_lost_before = 0
        _EXPORTER_LOG.addFilter(self)
        _QUEUE_LOG.addFilter(self.queue_full_filter)

    def queue_full_filter(self, record: logging.LogRecord) -> bool:
        return not (self.failing and str(record.msg).startswith("Queue full"))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.failing:
            return False
        if self.query:
            message = record.getMessage()
            if self.query in message:
                record.msg, record.args = message.replace(self.query, "***"), None
        return True

    def unmute(self) -> None:
        _EXPORTER_LOG.removeFilter(self)
        _QUEUE_LOG.removeFilter(self.queue_full_filter)

    def export(self, spans: Any) -> Any:
        result = self.exporter.export(spans)
        if result is SpanExportResult.SUCCESS:
            queue_lost = self.queue_lost()
            if self.failing:
                self.failing = False
                log.warning("tracing: the collector at %s takes spans again; %d spans were "
                            "dropped while it did not", self.url,
                            self.dropped + queue_lost - self.queue_lost_before)
                self.dropped = 0
            # dropped while the collector took batches: the SDK said so ("Queue full")
            self.queue_lost_before = queue_lost
        else:
            self.dropped += len(spans)
            if not self.failing:
                self.failing = True
                log.warning("tracing: spans could not be sent to %s; they are dropped until "
                            "it takes them again (logged once)", self.url)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _set_done(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


# A W3C Trace Context tracestate list-member (the grammar OpenTelemetry's TraceState checks):
# key "=" value, the key simple or multi-tenant, the value printable ASCII without "," and "=".
_TRACESTATE_MEMBER = re.compile(
    r"([a-z][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])")
_TRACESTATE_MAX = 32  # list-members (W3C Trace Context 3.3.1.1)


def _trace_state(values: tuple[str, ...], mask: Any) -> TraceState:
    """The caller's ``tracestate`` as the spans carry it (and export it): without a member
    that holds a key (``mask`` changes it). The upstream still gets the header as sent.

    Parsed here rather than by ``TraceState.from_header``, which logs a warning quoting a
    malformed member (or one per request past 32 members): a line a request in keygate's log
    for anyone who sends one, and a key pasted into the header with it. A malformed, repeated
    or over-long list is dropped from the spans, as OpenTelemetry drops it, silently."""
    if not values:
        return TraceState()
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for header in values:
        for member in header.split(","):
            member = member.strip(" \t")  # optional whitespace (RFC 9110 5.6.3)
            if not member:
                continue
            match = _TRACESTATE_MEMBER.fullmatch(member)
            if match is None or match.group(1) in seen or len(seen) == _TRACESTATE_MAX:
                return TraceState()
            key, value = match.groups()
            seen.add(key)
            if mask(member) == member:
                kept.append((key, value))
    return TraceState(kept)
