"""OpenTelemetry export: spans arrive at a real OTLP/HTTP receiver, decoded from protobuf."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest)

from gateway.config import TracingConfig, load_config  # noqa: E402
from tests.harness import gateway_under_test, make_config, serving  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
async def receiver(aiohttp_server):
    """An OTLP/HTTP traces receiver: ``receiver.spans`` (decoded, with their resource's
    attributes under ``"resource"``) and ``receiver.raw`` (every body as received)."""
    spans: list[dict] = []
    raw: list[bytes] = []

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        raw.append(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for rs in message.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                        "status": s.status.code, "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano, "resource": resource,
                        "attributes": {a.key: _value(a.value) for a in s.attributes}})
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    server = await aiohttp_server(app)
    server.spans, server.raw = spans, raw
    return server


def _value(v):
    return getattr(v, v.WhichOneof("value"))


def traced_config(upstream, receiver, **tracing):
    return make_config(str(upstream.make_url("")), tracing=TracingConfig(
        str(receiver.make_url("")), **{"service_name": "edge-gw", **tracing}))


def by_name(spans, trace_id=None):
    return {s["name"]: s for s in spans if trace_id is None or s["trace_id"] == trace_id}


async def test_request_and_step_spans_are_exported_with_http_and_keygate_attributes(
        upstream, receiver, redis_url, monkeypatch):
    async with gateway_under_test(traced_config(upstream, receiver), redis_url,
                                  monkeypatch) as gw:
        await gw.workspace("acme")
        token, key = await gw.key("acme")
        async with gw.proxy.get("/people/42?q=1", headers={
                "Authorization": f"Bearer {token}", "User-Agent": "probe/1",
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as r:
            assert r.status == 200
    # leaving the gateway flushed the batch
    spans = by_name(receiver.spans, TRACE_ID)
    assert set(spans) == {"GET /people/**", "authenticate", "authorise", "forward"}
    root = spans["GET /people/**"]
    assert root["parent"] == PARENT and root["kind"] == 2  # SERVER
    assert root["resource"]["service.name"] == "edge-gw"
    a = root["attributes"]
    assert a["http.request.method"] == "GET" and a["url.path"] == "/people/42"
    assert a["http.route"] == "/people/**" and a["http.response.status_code"] == 200
    assert a["url.scheme"] == "http" and a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "probe/1"
    assert a["keygate.workspace"] == "acme" and a["keygate.key_id"] == key["id"]
    assert a["keygate.decision"] == "allowed"
    for step in ("authenticate", "authorise", "forward"):
        assert spans[step]["parent"] == root["span_id"]
        assert root["start"] <= spans[step]["start"] <= spans[step]["end"] <= root["end"]
    forward = spans["forward"]
    assert forward["kind"] == 3  # CLIENT
    assert forward["attributes"]["server.address"] == "127.0.0.1"
    assert forward["attributes"]["server.port"] == upstream.port
    assert forward["attributes"]["http.response.status_code"] == 200
    # the upstream's parent is the forward span
    [sent] = [v for k, v in upstream.requests[-1]["headers"] if k == "traceparent"]
    assert sent == f"00-{TRACE_ID}-{forward['span_id']}-01"


async def test_refused_request_span_carries_the_decision_and_never_a_token(
        upstream, receiver, redis_url, monkeypatch):
    async with gateway_under_test(traced_config(upstream, receiver), redis_url,
                                  monkeypatch) as gw:
        await gw.workspace("acme")
        token, key = await gw.key("acme")
        revoked, rkey = await gw.key("acme", name="old")
        assert (await gw.admin_json("POST", f"/workspaces/acme/keys/{rkey['id']}/revoke"))[0] \
            == 200
        async with gw.proxy.get(f"/people/{token}", headers={"X-Api-Key": revoked}) as r:
            assert r.status == 401
        async with gw.proxy.get(f"/people/{token}", headers={"X-Api-Key": token}) as r:
            assert r.status == 200
        async with gw.proxy.post("/people", headers={"X-Api-Key": token}) as r:
            assert r.status == 403
    spans = receiver.spans
    roots = [s for s in spans if s["kind"] == 2]
    decisions = [s["attributes"]["keygate.decision"] for s in roots]
    assert decisions == ["revoked_key", "allowed", "insufficient_scope"]
    assert roots[0]["attributes"]["url.path"] == "/people/***"
    assert all(s["status"] != 2 for s in roots)  # 4xx is not a server error
    refused = by_name(spans, roots[0]["trace_id"])
    assert "forward" not in refused
    assert refused["authorise"]["attributes"]["error.type"] == "revoked_key"
    blob = b"".join(receiver.raw)
    for secret in (token, revoked, token.split("_")[-1][12:44], revoked.split("_")[-1][12:44]):
        assert secret.encode() not in blob


async def test_sample_ratio_zero_exports_only_traces_the_caller_sampled(
        upstream, receiver, redis_url, monkeypatch):
    config = traced_config(upstream, receiver, sample_ratio=0.0)
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health") as r:
            assert r.status == 200
        [own] = [v for k, v in upstream.requests[-1]["headers"] if k == "traceparent"]
        assert int(own[-2:], 16) & 1 == 0  # not sampled, and the upstream is told so
        async with gw.proxy.get("/health", headers={
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as r:
            assert r.status == 200
    assert {s["trace_id"] for s in receiver.spans} == {TRACE_ID}
    spans = by_name(receiver.spans)
    assert set(spans) == {"GET /health", "forward"}
    assert spans["GET /health"]["attributes"]["keygate.decision"] == "public"


async def test_a_dead_collector_costs_no_request(upstream, redis_url, monkeypatch):
    from conftest import free_port
    config = make_config(str(upstream.make_url("")), tracing=TracingConfig(
        f"http://127.0.0.1:{free_port()}"))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        for _ in range(20):
            async with gw.proxy.get("/health") as r:
                assert r.status == 200


def test_config_names_the_missing_extra_or_accepts_the_section(tmp_path):
    from gateway.config import load_config
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: {api: {url: 'http://127.0.0.1:9'}}\n"
                    "routes: [{path: /x, upstream: api}]\n"
                    "tracing: {otlp_endpoint: 'http://127.0.0.1:4318', sample_ratio: 0.25}\n")
    assert load_config(path).tracing == TracingConfig("http://127.0.0.1:4318", "keygate", 0.25)


async def test_keygate_serve_with_two_workers_signs_and_exports_every_request(
        tmp_path, upstream, receiver, redis_url, monkeypatch):
    """The real CLI, forked workers: each worker's exporter runs after the fork, and a SIGTERM
    flushes what every worker still had batched."""
    import asyncio

    import yaml
    from aiohttp import ClientSession

    from gateway.signature import verify
    from served import TIMEOUT, Served, new_key, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    doc = yaml.safe_load(config.read_text())
    doc["identity_signature"] = {"secret_env": "KG_SERVE_SIGNING"}
    doc["tracing"] = {"otlp_endpoint": str(receiver.make_url("")), "service_name": "served"}
    config.write_text(yaml.safe_dump(doc))
    secret = "serve-secret-" + "s" * 32
    monkeypatch.setenv("KG_SERVE_SIGNING", secret)  # inherited by the serve process
    gw = Served(config, pport, aport, "--workers", "2")
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
        sent = []
        for i in range(8):  # a new connection each time, so both workers get some
            trace_id = "%032x" % (0xabc000 + i)
            sent.append(trace_id)
            async with ClientSession(timeout=TIMEOUT) as fresh:
                async with fresh.get(gw.proxy + f"/people/{i}", headers={
                        "Authorization": f"Bearer {token}", "Connection": "close",
                        "traceparent": f"00-{trace_id}-{PARENT}-01"}) as r:
                    assert r.status == 200
        assert await asyncio.to_thread(gw.terminate) == 0
        assert "Traceback" not in gw.stderr()
    finally:
        gw.close()
    for record in upstream.requests:
        headers = dict(record["headers"])
        assert verify(headers, record["method"], record["raw_path"], secret)
    roots = [s for s in receiver.spans if s["kind"] == 2]
    assert sorted(s["trace_id"] for s in roots) == sorted(sent)
    assert {s["resource"]["service.name"] for s in roots} == {"served"}
    assert all(s["attributes"]["keygate.decision"] == "allowed" for s in roots)


async def test_an_unreachable_upstream_marks_the_request_and_forward_spans_as_errors(
        receiver, redis_url, monkeypatch):
    from conftest import free_port
    config = make_config(f"http://127.0.0.1:{free_port()}", tracing=TracingConfig(
        str(receiver.make_url(""))))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health") as r:
            assert r.status == 502
    spans = by_name(receiver.spans)
    root, forward = spans["GET /health"], spans["forward"]
    assert root["status"] == 2 and forward["status"] == 2  # ERROR
    assert root["attributes"]["error.type"] == "upstream_unavailable"
    assert root["attributes"]["keygate.decision"] == "upstream_unavailable"
    assert forward["attributes"]["error.type"] == "upstream_unavailable"
    assert forward["parent"] == root["span_id"]


async def test_client_address_is_the_client_behind_a_trusted_proxy(upstream, receiver,
                                                                    redis_url, monkeypatch):
    import dataclasses
    config = traced_config(upstream, receiver)
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("127.0.0.0/8",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
            assert r.status == 200
    [root] = [s for s in receiver.spans if s["kind"] == 2]
    assert root["attributes"]["client.address"] == "203.0.113.7"
    assert root["attributes"]["network.peer.address"] == "127.0.0.1"


async def test_a_token_pasted_into_user_agent_or_tracestate_is_never_exported(
        upstream, receiver, redis_url, monkeypatch):
    """The span recorded ``User-Agent`` as sent, and the caller's ``tracestate`` rode along
    in every span's trace state: a key pasted into either (a script that puts its key in its
    agent string, a vendor's tracestate member) was shipped to the trace collector whole."""
    async with gateway_under_test(traced_config(upstream, receiver), redis_url,
                                  monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key("acme")
        async with gw.proxy.get("/people/1", headers={
                "Authorization": f"Bearer {token}", "User-Agent": f"sync-job/2 ({token})",
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01",
                "tracestate": f"vendor=abc,leak={token}"}) as r:
            assert r.status == 200
    spans = by_name(receiver.spans, TRACE_ID)
    root = spans["GET /people/**"]
    assert root["attributes"]["user_agent.original"] == "sync-job/2 (***)"
    blob = b"".join(receiver.raw)
    assert b"vendor=abc" in blob or b"abc" in blob  # the rest of the trace state is kept
    for secret in (token, token.split("_")[-1][12:44]):
        assert secret.encode() not in blob


async def test_the_operator_token_sent_to_the_proxy_listener_is_never_exported(
        upstream, receiver, redis_url, monkeypatch):
    """Regression: the spans masked API keys only, so a script sending the operator token to
    the proxy port in its path or User-Agent had it exported to the collector whole
    (``url.path``, ``user_agent.original``). The spans mask it as the access log does."""
    from tests.harness import ADMIN_TOKEN
    async with gateway_under_test(traced_config(upstream, receiver), redis_url,
                                  monkeypatch) as gw:
        async with gw.proxy.get(f"/people/{ADMIN_TOKEN}", headers={
                "User-Agent": f"ops-script/1 ({ADMIN_TOKEN})",
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01",
                "tracestate": f"vendor=abc,op={ADMIN_TOKEN}"}) as r:
            assert r.status == 401
    root = [s for s in receiver.spans if s["trace_id"] == TRACE_ID and "url.path" in
            s["attributes"]][0]
    assert root["attributes"]["url.path"] == "/people/***"
    assert root["attributes"]["user_agent.original"] == "ops-script/1 (***)"
    assert ADMIN_TOKEN.encode() not in b"".join(receiver.raw)


async def test_a_collector_that_stays_down_is_logged_once_not_per_batch(
        upstream, redis_url, monkeypatch, caplog):
    """The exporter logged a warning and an error for every batch it could not send: with the
    collector down, about one line a second for as long as it stayed down (at low traffic,
    lines for every request). Now: the first failure, one keygate line, and one when it is
    back, with the count of the spans lost in between."""
    import asyncio
    import logging

    from conftest import free_port
    port = free_port()
    config = make_config(str(upstream.make_url("")), tracing=TracingConfig(
        f"http://127.0.0.1:{port}"))
    caplog.set_level(logging.INFO)
    got: list[bytes] = []

    async def export(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            for _ in range(8):  # a batch every second, each one refused
                async with gw.proxy.get("/health") as r:
                    assert r.status == 200
                await asyncio.sleep(0.5)
            otel = [r for r in caplog.records if r.name.startswith("opentelemetry")]
            ours = [r for r in caplog.records if r.name == "keygate.tracing"]
            assert len(otel) <= 3, [r.getMessage() for r in otel]  # the first batch's only
            assert len(ours) == 1 and ours[0].levelno == logging.WARNING
            assert f"127.0.0.1:{port}" in ours[0].getMessage()
            await web.TCPSite(runner, "127.0.0.1", port).start()  # the collector is back
            async with gw.proxy.get("/health") as r:
                assert r.status == 200
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.1)
            assert got
            back = [r for r in caplog.records if r.name == "keygate.tracing"][1:]
            assert len(back) == 1 and "dropped" in back[0].getMessage()
    finally:
        await runner.cleanup()


async def test_the_spans_lost_while_the_collector_stalled_are_all_counted(
        upstream, redis_url, monkeypatch, caplog):
    """gateway/otel.py: when the collector is down "spans are dropped, logged once when the
    sending fails and once when it works again (with the count lost between)".

    The count is only of the spans in batches the exporter failed to send
    (``_Reported.export``). A collector that stalls (accepts, does not answer: an overloaded
    collector, a stuck balancer in front of it) holds the SDK's export thread for the
    exporter's 3 s timeout per batch; meanwhile the BatchSpanProcessor's queue fills and every
    further span is dropped *there* ("Queue full, dropping Span.", logged by the SDK at most
    once per 20 s), never counted. At the default queue (2048 spans; a keyed request makes 4)
    ~45 keyed requests/s already overflow it, so the operator is told "16 spans were dropped"
    when thousands were. The queue is made small here (the SDK's own OTEL_BSP_* variables,
    which keygate leaves in force) so a few dozen requests show it.
    Expected: the reported count plus the spans that reached the collector is every span
    made. And while the collector fails, the SDK's "Queue full" warning is not repeated
    (its own filter lets it through every 20 s: forgotten here, to see keygate's mute)."""
    import asyncio
    import logging
    import re

    import gateway.otel

    state = {"up": False}
    arrived: list[int] = []

    async def export(request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)
        body = await request.read()
        if not state["up"]:
            await asyncio.sleep(10)  # past the exporter's 3 s timeout: that batch fails
            return web.Response(status=503)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        arrived.append(sum(len(ss.spans) for rs in message.resource_spans
                           for ss in rs.scope_spans))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    monkeypatch.setattr(gateway.otel, "SPAN_FLUSH_TIMEOUT", 2)
    config = make_config(str(upstream.make_url("")),
                         tracing=TracingConfig(f"http://127.0.0.1:{port}"))
    caplog.set_level(logging.INFO)

    def ours() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "keygate.tracing"]

    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            for _ in range(60):  # 120 spans (the request's and its forward step's)
                async with gw.proxy.get("/health") as r:
                    assert r.status == 200
            for _ in range(200):  # the first batch's export timed out
                if ours():
                    break
                await asyncio.sleep(0.1)
            assert ours(), "no export failure was reported"
            failed_at = time.time()
            for f in logging.getLogger("opentelemetry.sdk._shared_internal").filters:
                monkeypatch.delattr(f, "last_log", raising=False)  # the SDK's 20 s window
            for _ in range(20):  # 40 spans more, into the full queue
                async with gw.proxy.get("/health") as r:
                    assert r.status == 200
            state["up"] = True
            for _ in range(300):  # a batch went through, and what was queued after it
                if len(ours()) >= 2 and arrived and sum(arrived) >= 0:
                    await asyncio.sleep(2.5)
                    break
                await asyncio.sleep(0.1)
            said = ours()
    finally:
        await runner.cleanup()
    assert len(said) >= 2, said
    dropped = int(re.search(r"; (\d+) spans were dropped", said[1]).group(1))
    assert dropped + sum(arrived) == 160, (said, arrived)
    repeated = [r for r in caplog.records
                if r.getMessage().startswith("Queue full") and r.created > failed_at]
    assert repeated == []


async def test_the_collector_password_in_otlp_endpoint_never_reaches_the_log(
        tmp_path, upstream, redis_url, monkeypatch, caplog):
    """``tracing.otlp_endpoint`` accepts a URL with credentials (``https://user:pass@...``,
    which the OTLP exporter's ``requests`` session does send as Basic auth to a collector
    behind an authenticating proxy; ``${ENV}`` expansion makes it the natural place for a
    secret), and when the collector cannot be reached ``_Reported.export`` logs
    ``"tracing: spans could not be sent to <the whole URL>"`` (gateway/otel.py:269, and
    again at :262 when it is back): the collector's password in keygate's log.
    Everywhere else keygate keeps credentials out of its lines (SPEC: a store that refuses
    the credentials is "a start-up error (one line, no password in it)"; an upstream URL with
    ``user:password@`` is refused at load; docs/operations.md: "No token, secret or credential
    header is ever logged"). Expected: such an endpoint is refused at load, or its
    credentials are masked wherever it is logged. It is accepted (the SPEC sets no rule on
    it, and Basic credentials are how such a collector is reached), so masked: and the same
    secret in the URL's query, which the exporter's own line for the first failed batch
    names (urllib3's "url: /v1/traces?..."), is masked there too."""
    import asyncio
    import logging

    from conftest import free_port
    from gateway.config import load_config

    secret = "c0llect0r-S3cret"
    monkeypatch.setenv("OTEL_COLLECTOR_PASSWORD", secret)
    path = tmp_path / "keygate.yaml"
    path.write_text(
        f"upstreams: {{api: {{url: '{upstream.make_url('')}'}}}}\n"
        "routes: [{path: /health, upstream: api, public: true}]\n"
        f"tracing: {{otlp_endpoint: 'http://keygate:${{OTEL_COLLECTOR_PASSWORD}}"
        f"@127.0.0.1:{free_port()}/v1/traces?token=${{OTEL_COLLECTOR_PASSWORD}}'}}\n")
    loaded = load_config(path)
    config = make_config(str(upstream.make_url("")), tracing=loaded.tracing)
    caplog.set_level(logging.DEBUG)
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health") as r:
            assert r.status == 200
        for _ in range(100):  # the first batch goes out after ~1 s, and fails
            if any(r.name == "keygate.tracing" for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records]
    assert any("could not be sent" in line for line in lines), lines[-5:]
    leaked = [line for line in lines if secret in line]
    assert leaked == []
    assert any("/v1/traces?***" in line for line in lines), lines[-5:]  # the exporter's line


async def test_a_collector_that_never_finishes_its_answer_holds_up_no_stop(
        upstream, redis_url, monkeypatch):
    """The stop's wait for the spans was bounded (``SPAN_FLUSH_TIMEOUT``), but the SDK's
    shutdown went on in the event loop's default executor, which ``asyncio.run`` joins before
    the process exits: a collector that answers a byte at a time (each read within the
    exporter's timeout) kept a SIGTERM'd keygate alive past the bound, up to the SDK's own 30 s
    and more. What a stop leaves running now holds up no exit."""
    import asyncio
    import time

    import gateway.otel

    async def trickle(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(200):
                await asyncio.sleep(0.5)
                writer.write(b"X")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    collector = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = collector.sockets[0].getsockname()[1]
    monkeypatch.setattr(gateway.otel, "SPAN_FLUSH_TIMEOUT", 2)
    config = make_config(str(upstream.make_url("")), tracing=TracingConfig(
        f"http://127.0.0.1:{port}"))
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            async with gw.proxy.get("/health") as r:
                assert r.status == 200
            await asyncio.sleep(1.5)  # the batch is on its way, its answer never ends
            started = time.monotonic()
        assert time.monotonic() - started < 4
        # what asyncio.run does before the process exits
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 3)
    finally:
        collector.close()


@pytest.mark.parametrize("tracestate", [
    "vendor=abc,{token}",                                   # a member that is no key=value
    "vendor=abc,Leak={token}",                              # a key in capitals
    ",".join(f"v{i}=x" for i in range(33)) + ",leak={token}",  # over the 32 members
])
async def test_a_malformed_tracestate_is_never_logged(upstream, receiver, redis_url,
                                                      monkeypatch, caplog, tracestate):
    """OpenTelemetry's own tracestate parser logged a warning quoting a malformed member (or
    each pair, past 32 of them) for every such request: anyone could write a line per request
    into keygate's log, a key pasted in the header included. It is passed on as sent and
    dropped from the spans without a word."""
    async with gateway_under_test(traced_config(upstream, receiver), redis_url,
                                  monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key("acme")
        caplog.clear()
        with caplog.at_level("DEBUG"):
            for _ in range(3):
                async with gw.proxy.get("/people/1", headers={
                        "Authorization": f"Bearer {token}",
                        "traceparent": f"00-{TRACE_ID}-{PARENT}-01",
                        "tracestate": tracestate.format(token=token)}) as r:
                    assert r.status == 200
        # (other warnings, e.g. the argon2 pool's under a loaded machine, are not this test's)
        said = [r.getMessage() for r in caplog.records if r.levelno >= 30 and (
            r.name.startswith("opentelemetry") or token in r.getMessage()
            or "tracestate" in r.getMessage().lower())]
    assert upstream.requests[-1]["headers"].count(["tracestate", tracestate.format(
        token=token)]) == 1  # the upstream still gets it as sent
    assert said == []
    assert token.encode() not in b"".join(receiver.raw)


async def test_a_bare_collector_endpoint_with_a_query_gets_the_traces_path_before_it(
        upstream, receiver, redis_url, monkeypatch):
    """``http://collector:4318?tenant=acme`` (a query some collectors and gateways route by):
    the traces path was appended to the whole string, ``...?tenant=acme/v1/traces``, so every
    batch went to ``/`` with a mangled query and no span arrived. The path goes before the
    query, which is kept."""
    config = make_config(str(upstream.make_url("")), tracing=TracingConfig(
        str(receiver.make_url("")).rstrip("/") + "?tenant=acme"))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health") as r:
            assert r.status == 200
    assert set(by_name(receiver.spans)) == {"GET /health", "forward"}


def test_the_traces_path_is_added_to_a_bare_endpoint_only():
    from gateway.otel import traces_url
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318?tenant=a") == "http://c:4318/v1/traces?tenant=a"
    assert traces_url("http://c:4318/?tenant=a#x") == "http://c:4318/v1/traces?tenant=a#x"
    assert traces_url("http://c:4318/otlp/v1/traces?t=1") == "http://c:4318/otlp/v1/traces?t=1"


# --- across a reload --------------------------------------------------------------------------

def reloadable_doc(upstream_url: str, receiver, **changes: Any) -> dict[str, Any]:
    """A config file's content, traced to ``receiver``, with a public route (``/hooks/**``)."""
    doc = {
        "server": {"host": "127.0.0.1", "port": 18080},
        "admin": {"host": "127.0.0.1", "port": 18081},
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}},
        "plans": {"starter": {"monthly_requests": 1000, "max_keys": 5}},
        "default_plan": "starter",
        "upstreams": {"api": {"url": upstream_url, "timeout": 5}},
        "routes": [{"path": "/hooks/**", "methods": ["GET"], "upstream": "api",
                    "public": True}],
        "tracing": {"otlp_endpoint": str(receiver.make_url("")), "service_name": "gw"},
    }
    doc.update(changes)
    return doc


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(doc))


async def test_spans_mask_tokens_of_the_key_prefix_a_reload_set(tmp_path, upstream, receiver,
                                                                redis_url, monkeypatch):
    """Regression: the tracer's mask closed over the key prefix read at start, so after a
    reload to ``keys.prefix: xy`` every ``xy_live_...`` token in a path or the User-Agent was
    exported whole (``url.path``, ``user_agent.original``). The spans mask as the access log
    does, with the config in force."""
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    write_doc(path, reloadable_doc(url, receiver))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                  config_path=str(path)) as gw:
        await gw.workspace("acme")
        old, _ = await gw.key("acme")
        write_doc(path, reloadable_doc(url, receiver, keys={
            "prefix": "xy", "argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}}))
        status, body = await gw.admin_json("POST", "/reload")
        assert status == 200, body
        token, _ = await gw.key("acme")
        assert token.startswith("xy_live_")
        async with gw.proxy.get(f"/hooks/{token}",
                                headers={"User-Agent": f"sync/1 ({token})"}) as r:
            assert r.status == 200
        async with gw.proxy.get(f"/hooks/{old}") as r:  # the prefix the reload replaced
            assert r.status == 200
    assert receiver.spans, "no span was exported"
    for sent in (token, old):
        secret = sent.rsplit("_", 1)[1][12:44]
        assert secret.encode() not in b"".join(receiver.raw), \
            [s["attributes"].get("url.path") for s in receiver.spans]
    paths = [s["attributes"]["url.path"] for s in receiver.spans if "url.path" in s["attributes"]]
    assert paths[-2:] == ["/hooks/***", "/hooks/***"], paths


async def test_forward_span_names_the_upstream_a_reload_moved(tmp_path, upstream, receiver,
                                                               redis_url, monkeypatch):
    """Regression: the tracer was given the upstreams' addresses once, at start, so after a
    reload that moved ``api`` to another address every ``forward`` span still named the old
    one in ``server.address``/``server.port`` (and an upstream a reload added got none)."""
    async def other(request: web.Request) -> web.Response:
        return web.json_response({"upstream": "other"})

    path = tmp_path / "keygate.yaml"
    write_doc(path, reloadable_doc(str(upstream.make_url("")), receiver))
    async with serving(other) as other_url:
        async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                      config_path=str(path)) as gw:
            write_doc(path, reloadable_doc(other_url, receiver))
            status, body = await gw.admin_json("POST", "/reload")
            assert status == 200, body
            async with gw.proxy.get("/hooks/1") as r:
                assert r.status == 200
                assert (await r.json()) == {"upstream": "other"}  # the reload took
    forward = [s for s in receiver.spans if s["name"] == "forward"]
    assert forward, receiver.spans
    host, port = other_url.rsplit("/", 1)[-1].rsplit(":", 1)
    assert forward[-1]["attributes"].get("server.port") == int(port), forward[-1]["attributes"]
    assert forward[-1]["attributes"].get("server.address") == host, forward[-1]["attributes"]
