"""``/metrics`` after real traffic: every metric INTERFACES.md lists, with the values the traffic
implies, parsed the way Prometheus parses them; the Grafana dashboard only asks for names that
exist; ``promtool check metrics`` is happy with the exposition."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Route, StoreConfig

from conftest import DOCUMENTED_METRICS, STANDARD_METRICS
from harness import (bearer, eventually, gateway_under_test, make_config, raw_upstream,
                     redis_answers, wrong_secret)

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/keygate.json"

METRICS = DOCUMENTED_METRICS  # name → type


class Scrape:
    """One parsed exposition: sample lookups by full sample name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def type_of(self, sample_name: str) -> str | None:
        for family in self.families:
            if any(s.name == sample_name for s in family.samples) or family.name == sample_name:
                return family.type
        return None


async def scrape(g) -> Scrape:
    async with g.admin.get("/metrics", headers={"Authorization": ""}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(await r.text())


async def status_of(g, method: str, path: str, **kw) -> int:
    async with g.proxy.request(method, path, **kw) as r:
        await r.read()
        return r.status


@pytest.fixture
async def traffic(redis_url, upstream, monkeypatch):
    """A gateway after a known mix of requests (sequential, so every count is exact)."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="starter")
        await g.workspace("open", plan="unlimited")
        token, _ = await g.key("acme", scopes=["people:read"])
        expected = [
            ("GET", "/people/1", bearer(token), 200),           # cache miss, argon2 ok
            ("GET", "/people/2", bearer(token), 200),           # hit
            ("GET", "/people/3", bearer(token), 200),           # hit
            ("POST", "/people", bearer(token), 403),            # hit, insufficient_scope
            ("GET", "/people/1", bearer(wrong_secret(token)), 401),  # miss, argon2 fail
            ("GET", "/people/1", {}, 401),                      # missing_key
            ("GET", "/people/1", {"Authorization": "Basic eA=="}, 401),  # malformed_key
            ("GET", "/nowhere", {}, 404),                       # no_route
            ("GET", "/health", {}, 200),                        # public
            ("GET", "/_keygate/v1/usage", bearer(token), 200),  # hit; not counted in usage
        ]
        for method, path, headers, status in expected:
            assert await status_of(g, method, path, headers=headers) == status, (method, path)
        g.token = token
        yield g


async def test_every_agreed_metric_is_exported_with_its_type(traffic):
    s = await scrape(traffic)
    for name, kind in METRICS.items():
        sample = name + ("_count" if kind == "histogram" else "")
        assert s.type_of(sample) == kind, (name, s.type_of(sample))


async def test_build_info_and_the_standard_process_series(traffic):
    from gateway import __version__
    s = await scrape(traffic)
    assert s.value("keygate_build_info", version=__version__) == 1
    for name, kind in STANDARD_METRICS.items():
        assert s.type_of(name) in (kind, "unknown", "info"), (name, s.type_of(name))
        assert s.labelsets(name), name
    assert s.value("process_resident_memory_bytes") > 0


async def test_store_call_latency_histogram_times_the_request_path(traffic):
    s = await scrape(traffic)
    h = "keygate_store_call_duration_seconds"
    # authorize ran for every request whose key verified (3 reads, the 403, the usage call)
    assert s.value(h + "_count", call="authorize") == 5
    assert s.value(h + "_sum", call="authorize") > 0
    assert s.value(h + "_count", call="record_failure") == 1   # the wrong secret
    # the two first requests (right and wrong secret) each read the key, on the same connection
    assert s.value(h + "_count", call="key_workspace") == 2
    assert s.value(h + "_count", call="read_key") == 2
    # each scrape reads usage once, timed too (this scrape's read is recorded after it)
    assert (await scrape(traffic)).value(h + "_count", call="usage_scrape") >= 1


async def test_requests_in_flight(redis_url, monkeypatch, aiohttp_server):
    from aiohttp import web
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    server = await aiohttp_server(app)
    async with gateway_under_test(make_config(str(server.make_url(""))), redis_url,
                                  monkeypatch) as g:
        assert (await scrape(g)).value("keygate_requests_in_flight") == 0
        pending = asyncio.create_task(status_of(g, "GET", "/health"))
        await asyncio.wait_for(arrived.wait(), 10)
        assert (await scrape(g)).value("keygate_requests_in_flight") == 1
        release.set()
        assert await pending == 200
        assert (await scrape(g)).value("keygate_requests_in_flight") == 0


async def test_upstream_errors_are_counted_per_upstream(redis_url, monkeypatch):
    from conftest import free_port
    dead = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    async with gateway_under_test(make_config(dead), redis_url, monkeypatch) as g:
        for _ in range(2):
            assert await status_of(g, "GET", "/health") == 502
        s = await scrape(g)
        assert s.value("keygate_upstream_errors_total", upstream="api",
                       code="upstream_unavailable") == 2


async def test_usage_gauges_cover_many_workspaces_with_pipelined_store_reads(
        redis_url, upstream, monkeypatch):
    """A scrape used to make two store round trips per workspace; now the workspace set is
    scanned and the fields each gauge needs and the counters travel in pipelines of many
    workspaces (tests/test_scrape_stall.py: how long each holds the loop)."""
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        for i in range(30):
            await g.workspace(f"ws{i:02d}")
        first = await scrape(g)
        assert len(first.labelsets("keygate_workspace_month_requests")) == 30
        client = redis.Redis.from_url(redis_url)
        before = client.info("commandstats")
        s = await scrape(g)
        after = client.info("commandstats")
        client.close()
        calls = {name.removeprefix("cmdstat_"): after[name]["calls"] -
                 before.get(name, {}).get("calls", 0) for name in after}
        calls = {name: n for name, n in calls.items() if n and name != "info"}
        assert calls == {"sscan": 1, "hmget": 30, "mget": 1}, calls
        assert s.value("keygate_workspace_month_limit", workspace="ws29") == 1000


async def test_request_counters_by_route_method_and_status_class(traffic):
    s = await scrape(traffic)
    req = "keygate_requests_total"
    assert s.value(req, route="/people/**", method="GET", status_class="2xx") == 3
    assert s.value(req, route="/people/**", method="GET", status_class="4xx") == 3
    # POST /people matches the first POST route in file order, "/people/**" ("**" may be empty)
    assert s.value(req, route="/people/**", method="POST", status_class="4xx") == 1
    assert s.value(req, route="/health", method="GET", status_class="2xx") == 1
    assert s.value(req, route="/_keygate/v1/usage", method="GET", status_class="2xx") == 1
    assert sum(s.value(req, **labels) for labels in s.labelsets(req)) == 10
    # bounded cardinality: the route glob, never the raw path
    assert not any(labels["route"] in ("/people/1", "/people/2", "/nowhere")
                   for labels in s.labelsets(req))


async def test_auth_failures_by_reason(traffic):
    s = await scrape(traffic)
    fail = "keygate_auth_failures_total"
    assert s.value(fail, reason="insufficient_scope") == 1
    assert s.value(fail, reason="invalid_key") == 1
    assert s.value(fail, reason="missing_key") == 1
    assert s.value(fail, reason="malformed_key") == 1
    assert s.value(fail, reason="no_route") is None  # a 404 is not an auth failure
    assert sum(s.value(fail, **labels) for labels in s.labelsets(fail)) == 4


async def test_latency_histograms_count_every_request_and_forward(traffic):
    s = await scrape(traffic)
    assert s.value("keygate_request_duration_seconds_count", route="/people/**") == 7
    assert s.value("keygate_request_duration_seconds_count", route="/health") == 1
    assert s.value("keygate_request_duration_seconds_bucket", route="/people/**", le="+Inf") == 7
    # forwarded: three allowed /people/* reads and the public /health
    assert s.value("keygate_upstream_duration_seconds_count", upstream="api") == 4
    assert s.value("keygate_upstream_duration_seconds_sum", upstream="api") > 0


async def test_key_cache_and_argon2_counters(traffic):
    s = await scrape(traffic)
    assert s.value("keygate_key_cache_total", result="hit") == 4
    assert s.value("keygate_key_cache_total", result="miss") == 2
    assert s.value("keygate_argon2_verifications_total", result="ok") == 1
    assert s.value("keygate_argon2_verifications_total", result="fail") == 1


async def test_workspace_month_gauges_are_read_from_the_store(traffic):
    s = await scrape(traffic)
    assert s.value("keygate_workspace_month_requests", workspace="acme") == 3
    assert s.value("keygate_workspace_month_limit", workspace="acme") == 1000
    assert s.value("keygate_workspace_month_requests", workspace="open") == 0
    assert s.value("keygate_workspace_month_limit", workspace="open") is None  # unlimited
    assert s.value("keygate_store_errors_total") == 0
    assert s.value("keygate_degraded_decisions_total") == 0
    # read at scrape time: the next scrape sees the next forwarded request
    assert await status_of(traffic, "GET", "/people/9", headers=bearer(traffic.token)) == 200
    s = await scrape(traffic)
    assert s.value("keygate_workspace_month_requests", workspace="acme") == 4
    _, usage = await traffic.admin_json("GET", "/workspaces/acme/usage")
    assert usage["used"] == 4


async def test_store_errors_are_counted_and_metrics_still_served(own_redis, upstream,
                                                                 monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        assert await status_of(g, "GET", "/people/1", headers=bearer(token)) == 200
        assert (await scrape(g)).value("keygate_store_errors_total") == 0
        own_redis.stop()
        try:
            assert await status_of(g, "GET", "/people/1", headers=bearer(token)) == 503
            first = (await scrape(g)).value("keygate_store_errors_total")
            assert first >= 1
            assert await status_of(g, "GET", "/people/1", headers=bearer(token)) == 503
            s = await scrape(g)  # the process's own metrics are served with the store down
            assert s.value("keygate_store_errors_total") >= first + 1
            assert s.value("keygate_requests_total", route="/people/**", method="GET",
                           status_class="5xx") == 2
        finally:
            own_redis.start()


def _store_errors(exposition: str) -> float:
    m = re.search(r"^keygate_store_errors_total (\S+)$", exposition, re.M)
    assert m, "keygate_store_errors_total missing from /metrics"
    return float(m.group(1))


async def test_a_redis_outage_with_no_traffic_reaching_keygate_fires_the_store_alert(
        tmp_path, own_redis):
    """Redis down on Kubernetes: every pod's /readyz answers 503, so after the readiness
    probe's 2 failures (10 s) the Service has no endpoints and no request reaches keygate
    any more (the same happens at any quiet hour). keygate_store_errors_total then grows only
    by the scrape's own failed usage read, one per scrape (readiness probes count nothing):
    1 per 15 s = 0.067/s, which KeygateStoreUnavailable's former `> 0.1` never reached; `up`
    stays 1 (the admin listener answers) and no request means no 5xx ratio: a total Redis
    outage paged nobody. Measured live here, then fed to the shipped rule with promtool
    (deploy/prometheus/alerts-test.yml holds the outage with traffic and the single blip)."""
    from aiohttp import ClientSession, ClientTimeout
    from served import Served, write_config
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    config, proxy_port, admin_port = write_config(tmp_path, redis_url=own_redis.url)
    served = Served(config, proxy_port, admin_port)
    try:
        await served.ready()
        own_redis.stop()  # Redis gone; nothing is sent to the proxy listener
        async with ClientSession(timeout=ClientTimeout(total=10)) as s:
            readings = []
            for _ in range(4):
                for _ in range(3):  # the kubelet's readiness probe, every 5 s
                    async with s.get(served.admin + "/readyz") as r:
                        assert r.status == 503
                async with s.get(served.admin + "/metrics") as r:
                    readings.append(_store_errors(await r.text()))
    finally:
        served.close()
    per_scrape = (readings[-1] - readings[0]) / (len(readings) - 1)
    assert per_scrape == 1, readings  # the scrape's own read, and nothing else
    # the interval both shipped scrape configs use (ServiceMonitor, the compose Prometheus)
    monitor = yaml.safe_load((deploy / "k8s" / "servicemonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    prom = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    assert endpoint["interval"] == prom["global"]["scrape_interval"]
    interval = int(endpoint["interval"].rstrip("s"))
    # 10 minutes of that outage, as Prometheus would store it; the rule must fire by 8 min.
    # (exp_alerts [] so that promtool prints what fired, whatever its annotations say)
    steps = 600 // interval
    test = {
        "rule_files": [str(deploy / "prometheus" / "alerts.yml")],
        "evaluation_interval": f"{interval}s",
        "tests": [{
            "interval": f"{interval}s",
            "input_series": [{
                "series": 'keygate_store_errors_total{job="keygate", instance="gw-1"}',
                "values": f"0+{per_scrape:g}x{steps}"}],
            "alert_rule_test": [{"eval_time": "8m", "alertname": "KeygateStoreUnavailable",
                                 "exp_alerts": []}],
        }],
    }
    path = tmp_path / "outage-test.yml"
    path.write_text(yaml.safe_dump(test))
    result = await asyncio.to_thread(subprocess.run, [promtool, "test", "rules", str(path)],
                                     capture_output=True, text=True, timeout=60)
    # promtool reports what fired, unexpected here, as a failure (on stderr or stdout)
    fired = 'alertname="KeygateStoreUnavailable", instance="gw-1"' in (result.stdout +
                                                                        result.stderr)
    assert fired, (f"Redis down for 8 minutes with no traffic reaching keygate: store errors "
                   f"grow {per_scrape:g} per {interval} s scrape "
                   f"({per_scrape / interval:.3f}/s), and KeygateStoreUnavailable does not "
                   f"fire:\n{result.stdout}{result.stderr}")


async def test_degraded_decisions_are_counted_when_failing_open(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        assert await status_of(g, "GET", "/people/1", headers=bearer(token)) == 200
        before = await scrape(g)
        assert before.value("keygate_degraded_decisions_total") == 0
        client = redis.Redis.from_url(redis_url)
        client.execute_command("CLIENT", "PAUSE", "1500")  # the store stops answering
        try:
            for _ in range(2):
                assert await status_of(g, "GET", "/people/1", headers=bearer(token)) == 200
            s = await scrape(g)
            assert s.value("keygate_degraded_decisions_total") == 2
            assert s.value("keygate_store_errors_total") >= 2
        finally:
            # let the pause end before the next test flushes Redis
            assert await eventually(redis_answers(redis_url))
            client.close()



async def test_a_503_on_the_usage_endpoint_is_no_degraded_decision(own_redis, upstream,
                                                                   monkeypatch):
    """docs/operations.md: keygate_degraded_decisions_total counts "requests let through with
    the store down (on_store_error: open)". With Redis stopped, a cached key's call to
    /_keygate/v1/usage cannot be answered (its usage lives in Redis): 503
    store_unavailable, nothing let through, so the counter must not move."""
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        async with g.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
            assert r.status == 200  # the key is verified and cached in this process
        own_redis.stop()
        for _ in range(3):
            async with g.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "store_unavailable"
        degraded = g.counter("keygate_degraded_decisions_total")
    assert degraded == 0, f"{degraded:g} requests answered 503 counted as let through"


async def test_degraded_decisions_count_only_requests_let_through(own_redis, upstream,
                                                                  monkeypatch):
    """With on_store_error: open and Redis stopped, a body over max_body_bytes is refused 413
    (rate and quotas peeked at, then refused: nothing let through) and a keys:admin key's
    call to the admin listener is no proxy request let through: neither is a degraded
    decision. The one forwarded request is, and the upstream saw exactly it."""
    import dataclasses
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_body_bytes=1000))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(role="admin")  # every scope, keys:admin included
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200  # verified and cached in this process
        async with g.admin.get("/admin/v1/workspaces/acme/keys", headers=bearer(token)) as r:
            assert r.status == 200
        own_redis.stop()
        async with g.proxy.post("/people", data=b"x" * 2000, headers=bearer(token)) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"
        async with g.admin.get("/admin/v1/workspaces/acme/keys", headers=bearer(token)) as r:
            assert r.status == 503  # the listing lives in Redis
        assert g.counter("keygate_degraded_decisions_total") == 0
        async with g.proxy.get("/people/2", headers=bearer(token)) as r:
            assert r.status == 200  # let through on the cached key
        degraded = g.counter("keygate_degraded_decisions_total")
    assert [r["raw_path"] for r in upstream.requests] == ["/people/1", "/people/2"]
    assert degraded == 1



async def test_a_failed_key_read_of_a_key_let_through_is_a_store_error(own_redis, upstream,
                                                                       monkeypatch):
    """docs/operations.md: keygate_store_errors_total counts "store calls that failed: a
    request's (its key's reads and check, ...; whether it was then answered 503 or let
    through with `on_store_error: open`)". A cached key past its cache_ttl verifies again,
    which reads its key; with Redis down and failing open it is let through from its cached
    state, and the read that failed went uncounted: only the check (authorize) was."""
    import dataclasses
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    config = dataclasses.replace(config, keys=dataclasses.replace(config.keys, cache_ttl=1.0))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200  # verified and cached in this process
        own_redis.stop()
        await asyncio.sleep(1.2)  # its cache_ttl runs out: the next request reads its key
        async with g.proxy.get("/people/2", headers=bearer(token)) as r:
            assert r.status == 200  # let through on its cached state
        errors = g.counter("keygate_store_errors_total")
        degraded = g.counter("keygate_degraded_decisions_total")
    assert [r["raw_path"] for r in upstream.requests] == ["/people/1", "/people/2"]
    assert degraded == 1
    assert errors == 2, f"{errors:g} store errors: the key's read and its check failed"


async def test_a_failed_failure_reset_read_is_a_store_error(own_redis, upstream, monkeypatch):
    """A request refused 429 too_many_failures reads when its counter resets (its
    Retry-After, ``failure_resets`` in keygate_store_call_duration_seconds); when that read
    fails the refusal says the whole window instead, and the failed call went uncounted in
    keygate_store_errors_total. Redis is made to refuse the read's PEXPIRE (a counter with
    no TTL gets one), as a real fault of that call alone."""
    import redis as sync_redis
    from gateway.store.keyspace import fail_ip_key
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        admin = sync_redis.Redis.from_url(own_redis.url)
        try:
            admin.set(fail_ip_key("127.0.0.1"), 1000)  # over per_ip, and without a TTL
            admin.execute_command("ACL", "SETUSER", "default", "-pexpire")
            before = g.counter("keygate_store_errors_total")
            async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "too_many_failures"
                assert r.headers["Retry-After"] == str(config.keys.failures.window_seconds)
            errors = g.counter("keygate_store_errors_total") - before
        finally:
            admin.execute_command("ACL", "SETUSER", "default", "+@all")
            admin.close()
    assert errors == 1



async def _slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers its head at once, then a chunked body over ~1.5 s (an SSE-like stream)."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        for _ in range(6):
            await asyncio.sleep(0.25)
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_request_duration_of_a_streamed_answer_ends_at_its_head_not_its_last_byte(
        redis_url, monkeypatch, capfd):
    """docs/operations.md: keygate_request_duration_seconds is "request to response headers"
    (its HELP says so too). A streamed answer whose head came at once observes well under a
    second, not the 1.5 s its body took to trickle through; the access line's duration_ms
    keeps running to the body's last byte, as documented."""
    server, url = await raw_upstream(_slow_stream)
    public = (Route("/public/**", "api", ("GET",), (), True),)
    try:
        async with gateway_under_test(make_config(url, routes=public), redis_url,
                                      monkeypatch) as g:
            g.logs(capfd)
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with g.proxy.get("/public/stream") as r:
                assert r.status == 200
                headers_at = loop.time() - started
                body = await r.read()
            assert body == b"hello" * 6
            assert headers_at < 0.5  # the head reached the client promptly
            total = g.counter("keygate_request_duration_seconds_sum", route="/public/**")
            count = g.counter("keygate_request_duration_seconds_count", route="/public/**")
            under_half_second = g.counter("keygate_request_duration_seconds_bucket",
                                          route="/public/**", le="0.5")
            _, err = g.logs(capfd)
    finally:
        server.close()
    assert count == 1
    assert under_half_second == 1, f"observed {total:.3f} s: the body's time, not the head's"
    (line,) = [json.loads(x) for x in err.splitlines()
               if x.startswith("{") and '"/public/stream"' in x]
    assert line["duration_ms"] >= 1400, line  # six chunks 0.25 s apart: to the last byte



async def test_a_single_process_scrape_serves_no_family_the_metrics_table_leaves_out(
        redis_url, upstream, monkeypatch):
    """docs/operations.md's metrics table is the list of what /metrics serves. A
    single-process scrape also served a `<name>_created` gauge family for every counter and
    histogram (prometheus-client's default), which the table does not list and `serve
    --workers N` does not serve (the multiprocess collector has none): a series set that
    changed with the worker count."""
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        async with g.admin.get("/metrics") as r:
            text = await r.text()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert "keygate_requests_total" in families, families
    undocumented = sorted(name for name in families if name not in DOCUMENTED_METRICS
                          and not name.startswith("process_") and name != "python_info")
    assert undocumented == [], undocumented
    assert not [line for line in text.splitlines() if "_created" in line.split("{")[0]]


# --- the dashboard and the linter --------------------------------------------------------------

def dashboard_metric_names() -> set[str]:
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    names.update(re.findall(r"\bkeygate_[a-z0-9_]+\b", value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return names


async def test_dashboard_queries_only_metrics_the_gateway_exports(traffic):
    s = await scrape(traffic)
    live = {sample.name for sample in s.samples}
    used = dashboard_metric_names()
    assert used, "the dashboard queries no keygate metric"
    missing = sorted(n for n in used if n not in live)
    assert not missing, f"dashboard queries metrics /metrics does not export: {missing}"
    # and every agreed metric has a panel
    assert {re.sub(r"_(bucket|sum|count)$", "", n) for n in used} >= set(METRICS)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promtool_accepts_the_exposition(traffic):
    s = await scrape(traffic)
    result = subprocess.run(["promtool", "check", "metrics"], input=s.text, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0.0, .001, .0025, .005, .01, 1.0, 30.0, 31.0]),
                          st.floats(min_value=0, max_value=60, allow_nan=False)),
                max_size=40),
       st.integers(min_value=0, max_value=3))
def test_tallied_observations_expose_exactly_what_observe_would(values, flushes_between):
    """Requests are tallied and brought into prometheus-client's values in one go; a scrape
    must read the same buckets (bounds included: a value equal to a bound is in that bucket),
    count and sum as if each had been observed one by one, however often flushes ran."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import LATENCY_BUCKETS, Metrics

    m = Metrics()
    reference = CollectorRegistry()
    h = Histogram("keygate_request_duration_seconds", "x", ["route"],
                  buckets=LATENCY_BUCKETS, registry=reference)
    step = max(1, len(values) // (flushes_between + 1))
    for i, v in enumerate(values):
        m.observe_request("/people/*", "GET", 200, None, v)
        h.labels("/people/*").observe(v)
        if (i + 1) % step == 0:
            m.flush()

    def series(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                if f.name == "keygate_request_duration_seconds"
                for s in f.samples if not s.name.endswith("_created")}

    ours = series(generate_latest(m.registry).decode())
    theirs = series(generate_latest(reference).decode())
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(v), k
    count = Scrape(generate_latest(m.registry).decode()).value(
        "keygate_requests_total", route="/people/*", method="GET", status_class="2xx")
    assert count == (len(values) or None)


async def test_under_workers_a_quota_that_went_away_leaves_the_limit_gauge(tmp_path, upstream,
                                                                           redis_url):
    """operations.md: ``keygate_workspace_month_limit`` is absent when the workspace is
    unlimited. Under ``serve --workers N`` the gauge lives in prometheus-client's shared files,
    which ``clear()`` does not touch: after a move to an unlimited plan every scrape still
    served the old limit, so KeygateWorkspaceQuotaExhausted kept firing for a workspace that
    can no longer run out."""
    import yaml
    from prometheus_client.parser import text_string_to_metric_families
    from aiohttp import ClientSession
    from served import Served, admin_json, new_key, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    doc = yaml.safe_load(config.read_text())
    doc["plans"]["unlimited"] = {"monthly_requests": None, "max_keys": None, "rate_limit": None}
    config.write_text(yaml.safe_dump(doc))
    gw = Served(config, pport, aport, "--workers", "2")

    async def limits() -> list[set[float]]:
        seen = []
        for _ in range(6):  # any worker may answer
            async with ClientSession() as fresh:
                async with fresh.get(gw.admin + "/metrics",
                                     headers={"Connection": "close"}) as r:
                    text = await r.text()
            seen.append({s.value for f in text_string_to_metric_families(text)
                         for s in f.samples if s.name == "keygate_workspace_month_limit"
                         and s.labels.get("workspace") == "acme"})
        return seen
    try:
        await gw.ready()
        async with ClientSession() as s:
            await new_key(s, gw.admin)
            assert await limits() == [{1000.0}] * 6
            status, body = await admin_json(s, gw.admin, "PATCH", "/workspaces/acme",
                                            {"plan": "unlimited"})
            assert status == 200, body
            assert await limits() == [set()] * 6
    finally:
        gw.close()


async def test_a_prometheus_multiproc_dir_in_the_environment_is_ignored(tmp_path, upstream,
                                                                       redis_url):
    """``PROMETHEUS_MULTIPROC_DIR`` is keygate's own business (``serve --workers`` sets it for
    its workers). One inherited from the environment (a convention of other Python services)
    made a single ``serve`` keep its metrics in files there: a directory that did not exist
    stopped it at start with a traceback, and one that did summed every earlier run's values
    into the new process's (``keygate_build_info`` of the old version included)."""
    from aiohttp import ClientSession
    from served import Served, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    kept = tmp_path / "multiproc"
    kept.mkdir()
    for directory in (tmp_path / "missing", kept, kept):
        gw = Served(config, pport, aport, environ={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
        try:
            await gw.ready()
            async with ClientSession() as s:
                for _ in range(3):
                    async with s.get(gw.proxy + "/health") as r:
                        assert r.status == 200
                async with s.get(gw.admin + "/metrics") as r:
                    text = await r.text()
            counts = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "keygate_requests_total" and s.labels["route"] == "/health"]
            assert counts == [3.0], (directory, counts)
            assert gw.terminate() == 0
        finally:
            gw.close()
    assert not list(kept.iterdir())


def documented_metric_tables() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """page → {metric: (type, label names)} from each `| metric | type | labels |` table of
    README.md and docs/operations.md (a label's values and notes in brackets, and what follows
    a dash, left out; an optional `workspace` label written "(+ `workspace` ...)" too)."""
    root = Path(__file__).resolve().parent.parent
    found = {}
    for page in ("README.md", "docs/operations.md"):
        rows: dict[str, tuple[str, frozenset[str]]] = {}
        in_table = False
        for line in (root / page).read_text().splitlines():
            if line.startswith("| metric | type | labels"):
                in_table = True
                continue
            if in_table and not line.startswith("|"):
                in_table = False
            if not in_table or line.startswith("|---"):
                continue
            cells = [c.strip() for c in line.replace("\\|", "¦").strip("|").split("|")]
            if not cells[0].startswith("`keygate_"):
                continue   # the standard process_* and python_info series
            labels = re.sub(r"\([^)]*\)", "", cells[2]).split("—")[0].split("=")[0]
            rows[cells[0].strip("`")] = (cells[1], frozenset(re.findall(r"`([a-z_]+)`", labels)))
        found[page] = rows
    return found


async def test_the_metric_tables_of_the_docs_are_what_metrics_serves(traffic):
    """README.md and docs/operations.md each have a table of the metrics: every metric there is
    exported, with that type and exactly those labels, and every metric exported is there."""
    s = await scrape(traffic)
    tables = documented_metric_tables()
    compared = 0
    for page, rows in tables.items():
        assert set(rows) == set(METRICS), (page, set(rows) ^ set(METRICS))
        for name, (kind, labels) in rows.items():
            assert kind == METRICS[name], (page, name, kind)
            sample = name + ("_count" if kind == "histogram" else "")
            served = {label for ls in s.labelsets(sample) for label in ls if label != "le"}
            if served:
                compared += 1
                assert labels == served, (page, name, sorted(labels), sorted(served))
    assert compared > 20
