"""W3C Trace Context for every request, always on, no dependency.

A request that carries one valid ``traceparent`` continues its trace: the same trace id, a
new span id of keygate's own as the parent the upstream sees, the sampled flag kept, and
``tracestate`` passed unchanged. A missing, malformed or repeated ``traceparent`` starts a new
trace (and the ``tracestate`` of a trace keygate did not continue is dropped); the client's
``traceparent`` is never forwarded as is. The access log carries the trace id.

The cost is a header lookup, one regular-expression match and a random span id: about a
microsecond (``bench/trace_context.py``).

``Tracer.start(request)`` → ``Trace``; ``Trace.step(name)`` is a context manager around a
pipeline step and ``Trace.end(...)`` closes the request. Here both do nothing: with
``tracing.otlp_endpoint`` set, ``gateway.otel`` replaces them with spans exported over OTLP.
"""

from __future__ import annotations

import re
from random import getrandbits
from typing import Any, Mapping

# version 00 exactly; a later version may append fields after a "-" (W3C Trace Context §3.2)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Seconds a stop waits for batched spans to reach the collector (an exporting tracer's close;
# deploy/k8s/deployment.yaml's grace period covers it).
SPAN_FLUSH_TIMEOUT = 15
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_FLAGS = ("00", "01", "02", "03")  # the bits W3C defines: sampled (01) and random (02)


# bytes.hex() rather than "%032x": a third of the time, the same lowercase, zero-padded hex
def new_trace_id() -> str:
    return (getrandbits(128) or 1).to_bytes(16, "big").hex()


def new_span_id() -> str:
    return (getrandbits(64) or 1).to_bytes(8, "big").hex()


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` of a valid ``traceparent``, else None."""
    if len(value) != 55:
        # a future version may be longer, its 4 first fields laid out the same
        if len(value) < 55 or value[55] != "-" or value.startswith("00"):
            return None
        value = value[:55]
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, _FLAGS[int(flags, 16) & 3]


class _NoStep:
    """A pipeline step nobody records."""
    __slots__ = ()

    def __enter__(self) -> "_NoStep":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set(self, name: str, value: Any) -> None:
        pass


NO_STEP = _NoStep()


class Trace:
    """One request's trace context.

    ``span_id`` is the span the upstream sees as its parent; ``parent_id`` the client's span
    (None when keygate started the trace); ``tracestate`` the client's values, to pass on."""
    __slots__ = ("trace_id", "span_id", "flags", "parent_id", "tracestate")

    def __init__(self, trace_id: str, span_id: str, flags: str, parent_id: str | None = None,
                 tracestate: tuple[str, ...] = ()) -> None:
        self.trace_id, self.span_id, self.flags = trace_id, span_id, flags
        self.parent_id, self.tracestate = parent_id, tracestate

    def traceparent(self) -> str:
        """The ``traceparent`` to send upstream."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def step(self, name: str) -> Any:
        """A context manager around one pipeline step (authenticate, authorise, forward)."""
        return NO_STEP

    def end(self, request: Any, response: Any, outcome: Any, request_id: str) -> None:
        """The request is answered."""


def incoming(headers: Mapping[str, str]) -> tuple[tuple[str, str, str] | None, tuple[str, ...]]:
    """The client's trace context: ``(trace_id, parent_id, flags)`` or None, and its
    ``tracestate`` values (empty unless the ``traceparent`` was valid)."""
    values = headers.getall("traceparent", None)  # type: ignore[attr-defined]
    if values is None or len(values) != 1:  # repeated: which one would the upstream read?
        return None, ()
    parent = parse_traceparent(values[0])
    if parent is None:
        return None, ()
    return parent, tuple(headers.getall("tracestate", ()))  # type: ignore[attr-defined]


class Tracer:
    """Trace context only: nothing recorded, nothing exported."""

    # Sampled flag of a trace keygate starts: set, so an upstream with a parent-based sampler
    # (the OpenTelemetry SDK's default) keeps recording as it did without keygate in front.
    new_flags = "01"

    def start(self, request: Any) -> Trace:
        headers = request.headers
        if "traceparent" not in headers:  # the common case, inline: a new trace's two ids
            ids = getrandbits(192).to_bytes(24, "big").hex()  # from one draw
            trace_id, span_id = ids[:32], ids[32:]
            if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
                return Trace(trace_id, span_id, self.new_flags)
        parent, tracestate = incoming(headers)
        if parent is None:
            return Trace(new_trace_id(), new_span_id(), self.new_flags)
        trace_id, parent_id, flags = parent
        return Trace(trace_id, new_span_id(), flags, parent_id, tracestate)

    async def close(self) -> None:
        pass
