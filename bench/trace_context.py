#!/usr/bin/env python3
"""Micro-benchmark: what tracing and signing add to one request, in µs of CPU.

    .venv/bin/python bench/trace_context.py [--n 50000]

Times, on a real ``aiohttp`` request object, the per-request work each feature adds to the
pipeline, one at a time (best of 5 runs of ``--n`` iterations; no sockets, so it runs on a busy
machine without a quiet CPU):

- ``trace context``: ``Tracer.start`` (header lookup, parse, new span id), the ``traceparent``
  string, three steps and ``end`` — what every request pays, tracing configured or not;
  with and without a valid incoming ``traceparent``;
- ``signature``: one ``gateway.signature.sign`` (HMAC-SHA256), paid with ``identity_signature``;
- ``otel``: the same with ``tracing`` configured (``keygate[otel]``): four spans made and handed
  to the batch processor (the exporter here discards them; export runs on the SDK's thread),
  sampled at 1.0 and at 0.0.

Prints one line per case and a JSON object at the end.
"""
from __future__ import annotations

import argparse
import json
import time

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.signature import sign
from gateway.tracing import Tracer

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Outcome:
    route, upstream, workspace, key_id, code = "/people/**", "api", "acme", "k" * 12, None


class _Response:
    status = 200


def request(traceparent: bool):
    headers = CIMultiDict({"Host": "api.example", "Authorization": "Bearer x" * 8,
                           "User-Agent": "bench/1", "Accept": "*/*"})
    if traceparent:
        headers["traceparent"] = TRACEPARENT
        headers["tracestate"] = "congo=t61rcWkgMzE"
    return make_mocked_request("GET", "/people/42?x=1", headers=headers)


def per_request(tracer, req, n: int) -> float:
    outcome, response = _Outcome(), _Response()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            trace = tracer.start(req)
            with trace.step("authenticate"):
                pass
            with trace.step("authorise"):
                pass
            with trace.step("forward"):
                trace.traceparent()
            trace.end(req, response, outcome, "rid")
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def signing(n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            sign(b"0123456789abcdef0123456789abcdef", "GET", "/people/42?x=1",
                 "1a2b3c4d000000000001", "acme", "k" * 12, "companies:read people:read",
                 "starter")
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50000, help="iterations per run (best of 5)")
    args = parser.parse_args()
    results: dict[str, float] = {}
    results["trace context, no traceparent"] = per_request(Tracer(), request(False), args.n)
    results["trace context, valid traceparent"] = per_request(Tracer(), request(True), args.n)
    results["signature (HMAC-SHA256)"] = signing(args.n)
    try:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from gateway.config import TracingConfig
        from gateway.otel import OtelTracer

        class Discard(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        for ratio in (1.0, 0.0):
            tracer = OtelTracer(TracingConfig("http://127.0.0.1:9", sample_ratio=ratio),
                                {"api": ("127.0.0.1", 9000)}, exporter=Discard())
            n = max(1000, args.n // 10)
            results[f"otel spans, sample_ratio {ratio:g}"] = per_request(tracer, request(False),
                                                                         n)
            tracer.provider.shutdown()
    except ImportError:
        print("(keygate[otel] not installed: OpenTelemetry cases skipped)")
    for name, us in results.items():
        print(f"{name:40s} {us:8.2f} µs/request")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
