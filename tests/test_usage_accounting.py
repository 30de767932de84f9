"""Usage accounting as a paying customer and an attacker probe it: every number keygate counts
and reports (the monthly count, the key's own count, the daily history, the RateLimit fields,
the usage endpoints, the month gauges) agrees with what the upstream really received."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from gateway.config import Upstream
from harness import Clock, bearer, gateway_under_test, make_config, serving, tampered


async def call(g, token: str, path: str = "/people/1", method: str = "GET",
               **kw) -> tuple[int, str | None, dict]:
    headers = {**bearer(token), **kw.pop("headers", {})}
    async with g.proxy.request(method, path, headers=headers, **kw) as r:
        body = await r.read()
        code = None
        if r.status >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
            code = json.loads(body).get("error", {}).get("code")
        return r.status, code, dict(r.headers)


async def numbers(g, ws: str, key_id: str) -> dict:
    """Every count keygate reports for the workspace and the key."""
    _, usage = await g.admin_json("GET", f"/workspaces/{ws}/usage")
    _, key = await g.admin_json("GET", f"/workspaces/{ws}/keys/{key_id}")
    _, ws_days = await g.admin_json("GET", f"/workspaces/{ws}/usage/daily?days=3")
    _, key_days = await g.admin_json("GET", f"/workspaces/{ws}/keys/{key_id}/usage/daily?days=3")
    async with g.admin.get("/metrics") as r:
        text = await r.text()
    gauge = None
    for line in text.splitlines():
        if line.startswith(f'keygate_workspace_month_requests{{workspace="{ws}"}}'):
            gauge = int(float(line.split()[-1]))
    return {"used": usage["used"], "key_used": key["used_this_month"],
            "ws_days": sum(d["requests"] for d in ws_days["items"]),
            "key_days": sum(d["requests"] for d in key_days["items"]),
            "gauge": gauge}


def all_equal(n: int) -> dict:
    return {"used": n, "key_used": n, "ws_days": n, "key_days": n, "gauge": n}


# --- exactness under concurrency --------------------------------------------------------------

async def test_a_workspace_quota_is_exact_under_240_concurrent_requests_on_two_replicas(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme")
        status, _ = await a.admin_json("PATCH", "/workspaces/acme",
                                       {"limits": {"monthly_requests": 57}})
        assert status == 200
        token, key = await a.key()
        results = await asyncio.gather(*(call(g, token) for _ in range(120) for g in (a, b)))
        got = [(s, c) for s, c, _ in results]
        assert got.count((200, None)) == 57
        assert got.count((429, "quota_exceeded")) == 240 - 57
        assert len(upstream.requests) == 57
        assert await numbers(a, "acme", key["id"]) == all_equal(57)
        assert await numbers(b, "acme", key["id"]) == all_equal(57)
        # remaining on the answers: each of 56..0 exactly once among those admitted
        remaining = sorted(int(h["RateLimit"].split("r=")[1].split(";")[0])
                           for s, _, h in results if s == 200)
        assert remaining == list(range(57))


async def test_a_keys_cap_is_exact_under_240_concurrent_requests_on_two_replicas(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme")
        token, key = await a.key(monthly_requests=23)
        results = await asyncio.gather(*(call(g, token) for _ in range(120) for g in (a, b)))
        got = [(s, c) for s, c, _ in results]
        assert got.count((200, None)) == 23
        assert got.count((429, "key_quota_exceeded")) == 240 - 23
        assert len(upstream.requests) == 23
        assert await numbers(a, "acme", key["id"]) == all_equal(23)


# --- what counts -------------------------------------------------------------------------------

async def test_refusals_before_forwarding_count_nowhere(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")), server=dataclasses_replace_server(
        make_config("http://x").server, max_body_bytes=100))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(monthly_requests=1000, rate_limit="100/s")
        narrow, _ = await g.key(name="narrow", scopes=["companies:read"])
        refused = [
            await call(g, token, "/people//1"),                             # 400 bad_path
            await call(g, token, "/nowhere"),                               # 404 no_route
            await call(g, narrow, "/people/1"),                             # 403 scope
            await call(g, token, "/people", "POST", data=b"x"),             # 403 scope
            await call(g, tampered(token)),                                 # 401
            await call(g, token, "/people/1", "GET", data=b"x" * 101),      # 413 declared
        ]

        async def chunks():
            for _ in range(5):
                yield b"y" * 60
        refused.append(await call(g, token, "/people/1", "GET", data=chunks()))  # 413 chunked
        assert [s for s, _, _ in refused] == [400, 404, 403, 403, 401, 413, 413], refused
        assert len(upstream.requests) == 0
        assert await numbers(g, "acme", key["id"]) == all_equal(0)


def dataclasses_replace_server(server, **kw):
    import dataclasses
    return dataclasses.replace(server, **kw)


async def test_rate_and_quota_429s_count_nowhere(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(rate_limit="2/m", monthly_requests=1000)
        got = [(await call(g, token))[:2] for _ in range(4)]
        assert got == [(200, None)] * 2 + [(429, "rate_limited")] * 2
        assert await numbers(g, "acme", key["id"]) == all_equal(2)


async def test_an_upstream_5xx_or_a_timeout_after_it_was_reached_is_counted(redis_url,
                                                                           monkeypatch):
    seen = []

    async def handler(request):
        seen.append(request.path)
        if request.path == "/people/slow":
            await asyncio.sleep(1.0)
        return web.Response(status=500 if request.path == "/people/boom" else 200)

    async with serving(handler) as url:
        config = make_config(url, upstreams={"api": Upstream("api", url, 0.3)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, key = await g.key()
            assert (await call(g, token, "/people/boom"))[0] == 500
            assert (await call(g, token, "/people/slow"))[:2] == (504, "upstream_timeout")
            assert seen == ["/people/boom", "/people/slow"]
            assert await numbers(g, "acme", key["id"]) == all_equal(2)


async def test_the_usage_and_key_endpoints_count_nothing(gut):
    await gut.workspace("acme", plan="tiny")
    token, key = await gut.key(role="admin", rate_limit="2/m")
    for _ in range(4):  # 9 calls in all here: within the 10 a second these take (reserved.py)
        assert (await call(gut, token, "/_keygate/v1/usage"))[0] == 200
        assert (await call(gut, token, "/_keygate/v1/keys"))[0] == 200
    assert await numbers(gut, "acme", key["id"]) == all_equal(0)
    # nor spend the rate; and a key whose rate or month is used up still reads its usage
    assert [(await call(gut, token))[:2] for _ in range(3)] == \
        [(200, None)] * 2 + [(429, "rate_limited")]
    async with gut.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
        mine = await r.json()
    assert r.status == 200 and (mine["used"], mine["remaining"]) == (2, 1)
    assert mine["key"]["used_this_month"] == 2
    assert await numbers(gut, "acme", key["id"]) == all_equal(2)


# --- the numbers a customer sees agree -----------------------------------------------------------

async def test_remaining_on_the_last_admitted_and_the_first_refused_request(redis_url, upstream,
                                                                            monkeypatch):
    clock = Clock("2026-11-30T23:59:58.5")
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme", plan="tiny")  # 3 a month
        token, key = await g.key(monthly_requests=2)
        s, _, h = await call(g, token)
        assert s == 200
        assert h["RateLimit-Policy"] == '"monthly";q=3;w=2592000, "key-monthly";q=2;w=2592000'
        assert h["RateLimit"] == '"monthly";r=2;t=2, "key-monthly";r=1;t=2'
        s, _, h = await call(g, token)
        assert s == 200 and h["RateLimit"] == '"monthly";r=1;t=2, "key-monthly";r=0;t=2'
        s, c, h = await call(g, token)
        assert (s, c) == (429, "key_quota_exceeded")
        assert h["RateLimit"] == '"monthly";r=1;t=2, "key-monthly";r=0;t=2'
        assert h["Retry-After"] == "2"
        s, _, _ = await call(g, token, "/_keygate/v1/usage")
        async with g.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
            mine = await r.json()
        assert (mine["used"], mine["remaining"], mine["key"]["used_this_month"]) == (2, 1, 2)
        # the month turns: a fresh month, its own length
        clock.set("2026-12-01T00:00:00")
        s, _, h = await call(g, token)
        assert s == 200
        assert h["RateLimit-Policy"] == '"monthly";q=3;w=2678400, "key-monthly";q=2;w=2678400'
        assert h["RateLimit"] == '"monthly";r=2;t=2678400, "key-monthly";r=1;t=2678400'
        _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
        assert (usage["period"], usage["used"], usage["remaining"]) == ("2026-12", 1, 2)
        assert usage["resets_at"] == "2027-01-01T00:00:00Z"
        _, days = await g.admin_json("GET", "/workspaces/acme/usage/daily?days=2")
        assert days["items"] == [{"date": "2026-11-30", "requests": 2},
                                 {"date": "2026-12-01", "requests": 1}]


# --- limits changed under load ---------------------------------------------------------------

async def test_raising_and_lowering_limits_act_on_the_next_request(gut):
    await gut.workspace("acme")
    token, key = await gut.key()
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": 3}})
    got = [(await call(gut, token))[:2] for _ in range(4)]
    assert got == [(200, None)] * 3 + [(429, "quota_exceeded")]
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": 4}})
    s, _, h = await call(gut, token)
    assert s == 200 and '"monthly";r=0;' in h["RateLimit"]
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": 2}})
    s, c, h = await call(gut, token)
    assert (s, c) == (429, "quota_exceeded") and '"monthly";r=0;' in h["RateLimit"]
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert (usage["used"], usage["limit"], usage["remaining"]) == (4, 2, 0)
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"monthly_requests": 4})
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": None})
    assert (await call(gut, token))[:2] == (429, "key_quota_exceeded")


# --- daily history ---------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["days=0", "days=91", "days=1.5", "days=-1", "days=+3",
                                   "days=3&days=4", "days=%203", "days=0x10", "days=030"])
async def test_daily_history_bounds(gut, query):
    await gut.workspace("acme")
    _, key = await gut.key()
    for path in ("/workspaces/acme/usage/daily", f"/workspaces/acme/keys/{key['id']}/usage/daily"):
        async with gut.admin.get(f"/admin/v1{path}?{query}") as r:
            body = await r.json()
        if query == "days=030":
            assert r.status == 200 and len(body["items"]) == 30
        else:
            assert r.status == 400 and body["error"]["code"] == "bad_request", (query, body)


# --- clients that go away -------------------------------------------------------------------

async def test_a_client_gone_mid_body_is_not_counted_one_gone_after_forwarding_is(
        redis_url, monkeypatch):
    seen = []
    answered = asyncio.Event()

    async def handler(request):
        body = await request.read()
        seen.append((request.path, len(body)))
        await asyncio.sleep(0.5)
        answered.set()
        return web.Response(text="ok")

    async with serving(handler) as url:
        config = make_config(url)
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, key = await g.key(role="editor")
            # gone halfway through its declared body: never whole upstream, never counted
            reader, writer = await g.raw_connection()
            writer.write(b"POST /people HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + token.encode() + b"\r\nContent-Length: 100\r\n\r\n" + b"a" * 40)
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()
            # gone while the upstream works on it: it was forwarded, so it counts
            reader, writer = await g.raw_connection()
            writer.write(b"GET /people/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + token.encode() + b"\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.wait_for(answered.wait(), 5)
            await asyncio.sleep(0.2)
            assert seen == [("/people/1", 0)]
            assert await numbers(g, "acme", key["id"]) == all_equal(1)


async def test_a_chunked_body_over_the_limit_or_stalled_past_the_prefetch_is_not_counted(
        redis_url, upstream, monkeypatch):
    import dataclasses
    from gateway.config import Timeouts
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(base, server=dataclasses.replace(
        base.server, max_body_bytes=100_000, timeouts=Timeouts(header=5.0, body=0.5, idle=5.0)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(role="editor")

        async def too_much():
            for _ in range(30):
                yield b"z" * 8192
                await asyncio.sleep(0.005)
        s, c, _ = await call(g, token, "/people", "POST", data=too_much())
        assert (s, c) == (413, "body_too_large")
        reader, writer = await g.raw_connection()
        writer.write(b"POST /people HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % 80_000 + b"q" * 80_000 + b"\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        await asyncio.sleep(0.2)
        assert len(upstream.requests) == 0
        assert await numbers(g, "acme", key["id"]) == all_equal(0)


# --- what never reached the upstream spends no rate either -----------------------------------

async def test_requests_that_never_reached_the_upstream_spend_none_of_the_keys_rate(
        redis_url, upstream, monkeypatch):
    """A request taken back because it never reached the upstream (a connect error, a chunked
    body over the limit, a client gone mid-body) is not counted anywhere: the per-key rate
    included, as for an over-long declared body (tests/test_proxy_order.py)."""
    import dataclasses
    from conftest import free_port
    from gateway.config import Route
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        base, server=dataclasses.replace(base.server, max_body_bytes=1000),
        upstreams={**base.upstreams,
                   "dead": Upstream("dead", f"http://127.0.0.1:{free_port()}", 2.0)},
        routes=(Route("/dead/**", "dead", ("GET",), ("people:read",)),) + base.routes)
    async with gateway_under_test(config, redis_url, monkeypatch, clock=Clock()) as g:
        await g.workspace("acme")
        token, key = await g.key(role="editor", rate_limit="3/s")
        assert (await call(g, token, "/dead/1"))[:2] == (502, "upstream_unavailable")

        async def too_much():
            for _ in range(3):
                yield b"z" * 600
        assert (await call(g, token, "/people", "POST", data=too_much()))[:2] == \
            (413, "body_too_large")
        reader, writer = await g.raw_connection()   # gone halfway through its body
        writer.write(b"POST /people HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nContent-Length: 100\r\n\r\n" + b"a" * 40)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.2)
        got = [await call(g, token) for _ in range(4)]
        assert [(s, c) for s, c, _ in got] == [(200, None)] * 3 + [(429, "rate_limited")]
        assert got[0][2]["RateLimit"].startswith('"rate";r=2;')
        assert len(upstream.requests) == 3
        assert await numbers(g, "acme", key["id"]) == all_equal(3)


# --- real processes ----------------------------------------------------------------------------

async def test_two_served_replicas_with_two_workers_each_count_exactly(redis_url, tmp_path):
    """Two ``keygate serve --workers 2`` processes on one Redis: a workspace quota of 61 and
    a key's cap of 17 under 240 concurrent requests each; the upstream's own count is every
    number keygate reports, at both replicas."""
    from aiohttp import ClientSession
    from served import Served, admin_json, write_config
    received = []

    async def handler(request):
        received.append(request.headers["X-Api-Key-Id"])
        return web.Response(text="ok")

    async with serving(handler) as url:
        replicas = []
        try:
            for name in ("a.yaml", "b.yaml"):
                path, proxy, admin = write_config(tmp_path, redis_url=redis_url,
                                                  upstream_url=url, name=name)
                replicas.append(Served(path, proxy, admin, "--workers", "2"))
            for r in replicas:
                await r.ready()
            a, b = replicas
            async with ClientSession() as s:
                assert (await admin_json(s, a.admin, "POST", "/workspaces",
                                         {"id": "acme", "name": "Acme"}))[0] == 201
                assert (await admin_json(s, a.admin, "PATCH", "/workspaces/acme",
                                         {"limits": {"monthly_requests": 61}}))[0] == 200
                tokens = {}
                for name, fields in (("capped", {"monthly_requests": 17}), ("open", {})):
                    status, body = await admin_json(
                        s, a.admin, "POST", "/workspaces/acme/keys",
                        {"name": name, "scopes": ["people:read"], **fields})
                    assert status == 201, body
                    tokens[name] = (body["token"], body["key"]["id"])
                sem = asyncio.Semaphore(64)

                async def one(base: str, token: str) -> tuple[int, str | None]:
                    async with sem, s.get(base + "/people/1", headers=bearer(token)) as r:
                        body = await r.read()
                        return r.status, (json.loads(body)["error"]["code"]
                                          if r.status != 200 else None)
                capped = await asyncio.gather(*(one(r.proxy, tokens["capped"][0])
                                                for _ in range(120) for r in replicas))
                assert capped.count((200, None)) == 17
                assert capped.count((429, "key_quota_exceeded")) == 240 - 17
                rest = await asyncio.gather(*(one(r.proxy, tokens["open"][0])
                                              for _ in range(120) for r in replicas))
                assert rest.count((200, None)) == 61 - 17
                assert rest.count((429, "quota_exceeded")) == 240 - 44
                assert len(received) == 61
                assert received.count(tokens["capped"][1]) == 17
                for r in replicas:
                    _, usage = await admin_json(s, r.admin, "GET", "/workspaces/acme/usage")
                    assert (usage["used"], usage["remaining"]) == (61, 0)
                    _, keys = await admin_json(s, r.admin, "GET", "/workspaces/acme/keys")
                    assert sorted(k["used_this_month"] for k in keys["items"]) == [17, 44]
                    _, days = await admin_json(s, r.admin, "GET",
                                               "/workspaces/acme/usage/daily?days=1")
                    assert days["items"][0]["requests"] == 61
                    async with s.get(r.admin + "/metrics") as m:
                        text = await m.text()
                    assert 'keygate_workspace_month_requests{workspace="acme"} 61.0' in text
        finally:
            for r in replicas:
                r.close()


async def test_a_503_whose_late_reply_says_redis_counted_it_spends_no_rate(
        upstream, redis_url, monkeypatch):
    """Redis ran the call in time and stalled before replying: the gateway answered 503, and
    takes the count back when the reply comes. The rate that call spent goes back too."""
    from gateway.config import StoreConfig
    from harness import HeldReplies, eventually
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="closed"))
    async with HeldReplies(redis_url) as relay:
        async with gateway_under_test(config, relay.url, monkeypatch, ledger_retry=0.05) as g:
            await g.workspace("acme", plan="unlimited")
            token, key = await g.key(rate_limit="2/m")
            assert (await call(g, token))[:2] == (200, None)
            relay.hold()  # Redis runs the next call, counts it and adds it to the rate log
            assert (await call(g, token))[:2] == (503, "store_unavailable")
            relay.release()

            async def settled():
                return not g.gw.pipeline.ledger and (await g.used()) == 1
            assert await eventually(settled, timeout=3)
            await asyncio.sleep(0.2)
            got = [(await call(g, token))[:2] for _ in range(2)]
            assert got == [(200, None), (429, "rate_limited")]
            assert await numbers(g, "acme", key["id"]) == all_equal(2)


async def test_a_keys_rate_is_exact_under_240_concurrent_requests_on_two_replicas(
        redis_url, upstream, monkeypatch):
    # One instant: the whole burst falls in one rate window. The window is a minute, not a
    # second: Redis expires the rate log after the window in its own (real) time, and on a
    # loaded machine the burst (a cold key: argon2 on each replica first) takes over a second
    # of it, after which a 50/s log had expired under the frozen clock and let 19 more in.
    clock = Clock()
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as a, \
            gateway_under_test(config, redis_url, monkeypatch, clock=clock) as b:
        await a.workspace("acme")
        token, key = await a.key(rate_limit="50/m")
        results = await asyncio.gather(*(call(g, token) for _ in range(120) for g in (a, b)))
        got = [(s, c) for s, c, _ in results]
        assert got.count((200, None)) == 50
        assert got.count((429, "rate_limited")) == 190
        assert len(upstream.requests) == 50
        assert await numbers(a, "acme", key["id"]) == all_equal(50)
        rates = sorted(int(h["RateLimit"].split("r=")[1].split(";")[0])
                       for s, _, h in results if s == 200)
        assert rates == list(range(50))
        clock.now += 60.0  # the window has passed: the whole rate again
        got = [(await call(g, token))[0] for g in (a, b)]
        assert got == [200, 200]


async def test_a_quota_lowered_mid_load_refuses_every_request_sent_after_the_patch(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme")
        token, key = await a.key()
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(16)
        patched_at = [float("inf")]
        log: list[tuple[float, int, str | None]] = []

        async def one(g) -> None:
            async with sem:
                sent = loop.time()
                status, code, _ = await call(g, token)
                log.append((sent, status, code))

        async def patch_when_busy() -> None:
            while len(log) < 60:
                await asyncio.sleep(0.001)
            status, _ = await b.admin_json("PATCH", "/workspaces/acme",
                                           {"limits": {"monthly_requests": 1}})
            assert status == 200
            patched_at[0] = loop.time()
        await asyncio.gather(patch_when_busy(), *(one(g) for _ in range(120) for g in (a, b)))
        after = [(s, c) for sent, s, c in log if sent > patched_at[0]]
        assert after and all(x == (429, "quota_exceeded") for x in after)
        admitted = sum(1 for _, s, _ in log if s == 200)
        assert admitted == len(upstream.requests) >= 60
        assert await numbers(a, "acme", key["id"]) == all_equal(admitted)
        await a.admin_json("PATCH", "/workspaces/acme", {"limits": None})  # raised: at once
        assert (await call(b, token))[0] == 200


async def test_pipelined_requests_from_a_client_that_hangs_up_count_what_was_forwarded(
        redis_url, monkeypatch):
    seen = []

    async def handler(request):
        seen.append(request.path)
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    async with serving(handler) as url:
        async with gateway_under_test(make_config(url), redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, key = await g.key()
            reader, writer = await g.raw_connection()
            one = (b"GET /people/%d HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + token.encode() + b"\r\n\r\n")
            writer.write(b"".join(one % i for i in range(3)))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            await asyncio.sleep(1.0)
            assert 1 <= len(seen) <= 3
            assert await numbers(g, "acme", key["id"]) == all_equal(len(seen))
