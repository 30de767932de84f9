"""Monthly quotas and per-key rate limits through the whole gateway, on a real Redis."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from gateway.cli import main
from harness import Clock, bearer, gateway_under_test, get_all, make_config


@pytest.fixture
def clock() -> Clock:
    return Clock("2026-11-30T23:59:00")


@pytest.fixture
async def gut(redis_url, upstream, monkeypatch, clock):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        g.upstream = upstream
        yield g


async def statuses(g, token: str, n: int, path: str = "/people/1") -> list[int]:
    async def one() -> int:
        async with g.proxy.get(path, headers=bearer(token)) as r:
            await r.read()
            return r.status
    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_quota_is_exact_across_two_gateways(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme", plan="tiny")  # 3 requests a month
        token, _ = await a.key()
        results = await asyncio.gather(statuses(a, token, 5), statuses(b, token, 4))
        flat = results[0] + results[1]
        assert flat.count(200) == 3 and flat.count(429) == 6
        assert len(upstream.requests) == 3


async def test_quota_429_says_when_the_month_resets(gut, clock):
    await gut.workspace("acme", plan="tiny")
    token, _ = await gut.key()
    assert await statuses(gut, token, 3) == [200, 200, 200]
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "quota_exceeded"
        assert r.headers["Retry-After"] == "60"  # 23:59 → midnight, 1 December
        assert r.headers["RateLimit-Policy"] == '"monthly";q=3;w=2592000'
        assert r.headers["RateLimit"] == '"monthly";r=0;t=60'
    assert len(gut.upstream.requests) == 3


async def test_month_rollover_resets_the_quota(gut, clock):
    await gut.workspace("acme", plan="tiny")
    token, _ = await gut.key()
    assert await statuses(gut, token, 4) == [200, 200, 200, 429]
    clock.set("2026-12-01T00:00:01")
    assert await statuses(gut, token, 1) == [200]
    status, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert status == 200
    assert (usage["period"], usage["used"], usage["limit"], usage["remaining"]) == \
        ("2026-12", 1, 3, 2)
    assert usage["resets_at"] == "2027-01-01T00:00:00Z"


async def test_plan_upgrade_keeps_the_months_count_and_applies_at_once(gut):
    await gut.workspace("acme", plan="tiny")
    token, _ = await gut.key()
    assert await statuses(gut, token, 4) == [200, 200, 200, 429]
    status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"plan": "starter"})
    assert status == 200
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 200
        assert r.headers["RateLimit"].startswith('"monthly";r=996;')
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert usage["used"] == 4 and usage["limit"] == 1000


async def test_rotation_keeps_the_workspaces_usage(gut):
    await gut.workspace("acme", plan="tiny")
    token, key = await gut.key()
    assert await statuses(gut, token, 2) == [200, 200]
    status, rotated = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate", {})
    assert status == 201
    assert await statuses(gut, rotated["token"], 2) == [200, 429]
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"


async def test_rate_limit_is_429_with_retry_after_and_fields(gut):
    await gut.workspace("acme", plan="limited")  # 3/s, unlimited month
    token, _ = await gut.key()
    got = []
    for _ in range(4):
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            got.append((r.status, dict(r.headers)))
    assert [s for s, _ in got] == [200, 200, 200, 429]
    assert got[0][1]["RateLimit-Policy"] == '"rate";q=3;w=1'
    assert got[0][1]["RateLimit"] == '"rate";r=2;t=1'
    limited = got[3][1]
    assert limited["Retry-After"] == "1"
    assert limited["RateLimit"] == '"rate";r=0;t=1'


async def test_a_rate_429_reports_the_monthly_quota_actually_left(gut):
    await gut.workspace("acme")
    token, _ = await gut.key(rate_limit="2/m")  # acme is on starter: 1000 a month
    got = await get_all(gut, token, 3)
    assert [s for s, _ in got] == [200, 200, 429]
    assert got[1][1]["RateLimit"].startswith('"rate";r=0;t=60, "monthly";r=998;t=')
    # the refusal counted nothing: the month still has 998 left, not 1000
    assert got[2][1]["RateLimit"].startswith('"rate";r=0;t=60, "monthly";r=998;t=')


async def test_a_quota_429_reports_the_rate_actually_left(gut):
    await gut.workspace("acme")
    await gut.admin_json("PATCH", "/workspaces/acme", {"plan": "tiny"})  # 3 a month
    token, _ = await gut.key(rate_limit="10/m")
    got = await get_all(gut, token, 4)
    assert [s for s, _ in got] == [200, 200, 200, 429]
    assert got[2][1]["RateLimit"].startswith('"rate";r=7;t=60, "monthly";r=0;t=')
    # refused by the quota, the request used no rate: 7 remain, not 0
    assert got[3][1]["RateLimit"].startswith('"rate";r=7;t=60, "monthly";r=0;t=')


async def test_rate_limit_admits_n_per_second_over_three_seconds(gut, clock):
    await gut.workspace("acme", plan="limited")
    token, _ = await gut.key()
    admitted = 0
    for step in range(60):  # 20 attempts a second for 3 s of the injected clock
        clock.now += 0.05
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            admitted += r.status == 200
    assert abs(admitted - 9) <= 3


async def test_key_rate_limit_overrides_the_plans(gut):
    await gut.workspace("acme", plan="unlimited")
    token, key = await gut.key(rate_limit="2/m")
    assert key["rate_limit"] == "2/m"
    assert await statuses(gut, token, 3) == [200, 200, 429]


async def test_retry_after_after_a_rate_downgrade_is_when_a_request_is_admitted(gut, clock):
    """A workspace's rate is lowered (a plan downgrade, a `limits` override) while its key's
    log holds more requests than the new limit. The 429's Retry-After must say when one more
    request is admitted; a client that waits exactly that long must not get 429 again.
    (Before: it said when the log's oldest entry leaves, right only for a log of exactly
    `limit` entries: 10 s here, then 429 again, and again.)"""
    clock.set("2026-11-10T12:00:00")  # a minute and more inside one month
    await gut.workspace("acme", plan="unlimited")
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"rate_limit": "10/m"}})
    token, _ = await gut.key()

    async def call() -> tuple[int, str | None, dict]:
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            code = (await r.json())["error"]["code"] if r.status >= 400 else None
            await r.read()
            return r.status, code, dict(r.headers)

    for _ in range(10):  # one every 5 s: t = 0, 5, ..., 45
        status, _, _ = await call()
        assert status == 200
        clock.now += 5
    status, body = await gut.admin_json("PATCH", "/workspaces/acme",
                                        {"limits": {"rate_limit": "2/m"}})
    assert status == 200, body
    # t = 50: 10 requests in the last minute, 2 allowed: one more is admitted once 9 have
    # left the window, i.e. when the one sent at t = 40 leaves it, at t = 100
    status, code, headers = await call()
    assert (status, code) == (429, "rate_limited")
    assert headers["Retry-After"] == "50"
    # the RateLimit fields say the same: none left, one more in 50 s
    assert headers["RateLimit-Policy"] == '"rate";q=2;w=60'
    assert headers["RateLimit"] == '"rate";r=0;t=50'
    clock.now += 49
    status, code, headers = await call()
    assert (status, code) == (429, "rate_limited")
    assert headers["Retry-After"] == "1" and headers["RateLimit"] == '"rate";r=0;t=1'
    clock.now += 1
    status, code, headers = await call()
    assert status == 200, (
        f"Retry-After said 50 s, but a request sent then is refused again ({code})")
    # t = 100: the one of t = 45 and this one are in the window; the next leaves at t = 105
    assert headers["RateLimit"] == '"rate";r=0;t=5'


async def test_a_rate_moved_from_per_second_to_per_minute_starts_from_the_last_seconds_history(
        gut, clock):
    """Documented (README, key controls): a lowered limit counts what the key's rate log
    still holds, and a per-second log holds the last second only. A key at 5/s admitted 15
    in 3 s; PATCHed to 8/m, its first minute starts from the 5 of its last second: 3 more
    are admitted, then 429 with Retry-After until the oldest of those 8 leaves the minute.
    (A minute of history per per-second log would cost 60 times its memory in Redis.)
    Its log expires a second after its last request, in Redis's own time: the PATCH and
    the next request follow within milliseconds."""
    clock.set("2026-11-10T12:00:00")
    await gut.workspace("acme", plan="unlimited")
    token, key = await gut.key(rate_limit="5/s")
    for _ in range(3):  # 5 a second for 3 seconds: all admitted
        assert await statuses(gut, token, 5) == [200] * 5
        clock.now += 1
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                        {"rate_limit": "8/m"})
    assert status == 200, body
    clock.now -= 0.5  # 2.5 s after the first of the 15; the last 5 were sent at 2 s
    admitted = []
    for _ in range(4):
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            admitted.append(r.status)
            retry_after = r.headers.get("Retry-After")
    assert admitted == [200, 200, 200, 429]
    assert retry_after == "60"  # the 5 sent at 2 s leave the minute at 62 s: 59.5 s, rounded up


async def test_usage_endpoint_counts_nothing_and_matches_admin_and_cli(gut, capsys):
    await gut.workspace("acme", plan="tiny")
    token, key = await gut.key()
    await statuses(gut, token, 2)
    for _ in range(3):
        async with gut.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
            assert r.status == 200
            mine = await r.json()
    _, admin = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert mine.pop("key")["id"] == key["id"]
    assert mine == admin
    assert admin["used"] == 2 and admin["remaining"] == 1 and admin["workspace"] == "acme"
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["usage", "--workspace", "acme", "--json", "--admin-url",
                                          str(gut.admin_server.make_url("")).rstrip("/")])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == admin


async def test_usage_endpoint_405_says_which_methods_are_allowed(gut):
    async with gut.proxy.post("/_keygate/v1/usage") as r:
        assert r.status == 405
        assert (await r.json())["error"]["code"] == "method_not_allowed"
        assert r.headers["Allow"] == "GET, HEAD"  # RFC 9110 15.5.6: a 405 MUST carry Allow
        assert r.headers["X-Request-Id"]


async def test_every_counter_keeps_an_expiry(gut, redis_url):
    await gut.workspace("acme", plan="limited")
    token, _ = await gut.key()
    await statuses(gut, token, 5)
    async with gut.proxy.get("/people/1", headers=bearer(token[:-7] + "x" * 7)) as r:
        await r.read()
    r = redis.Redis.from_url(redis_url)
    counters = [k for k in r.scan_iter("kg:*") if k.startswith((
        b"kg:usage:", b"kg:rate:", b"kg:fail:", b"kg:kusage:", b"kg:daily:", b"kg:kdaily:"))]
    assert {k.split(b":")[1] for k in counters} >= {b"usage", b"rate", b"kusage", b"daily",
                                                    b"kdaily"}
    assert all(r.pttl(k) > 0 for k in counters), [(k, r.pttl(k)) for k in counters]


async def test_a_plan_gone_from_the_config_falls_back_to_the_default_plan(redis_url, upstream,
                                                                         monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as before:
        await before.workspace("acme", plan="unlimited")
        token, _ = await before.key()
    renamed = {k: v for k, v in config.plans.items() if k != "unlimited"}
    after_config = make_config(str(upstream.make_url("")), plans=renamed)
    async with gateway_under_test(after_config, redis_url, monkeypatch) as after:
        async with after.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
            assert r.headers["RateLimit-Policy"].startswith('"monthly";q=1000;')  # starter's
        _, usage = await after.admin_json("GET", "/workspaces/acme/usage")
        assert usage["limit"] == 1000


async def test_a_request_the_upstream_never_received_does_not_count(redis_url, monkeypatch):
    """Connection refused: nothing reached the upstream, so the request is not counted in any
    of the counters a forwarded request adds to: the workspace's month (and its quota, here 3),
    the key's own month, and both daily histories."""
    from conftest import free_port
    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="tiny")
        token, key = await g.key(monthly_requests=3)
        for _ in range(4):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 502
                assert (await r.json())["error"]["code"] == "upstream_unavailable"
        _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
        assert usage["used"] == 0
        _, record = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert record["used_this_month"] == 0
        for path in ("/workspaces/acme", f"/workspaces/acme/keys/{key['id']}"):
            _, daily = await g.admin_json("GET", path + "/usage/daily?days=1")
            assert [day["requests"] for day in daily["items"]] == [0]


async def test_a_refund_at_the_turn_of_the_month_goes_to_the_month_that_counted(
        redis_url, monkeypatch):
    import redis as sync_redis
    from conftest import free_port
    from gateway.store import usage_key

    clock = Clock("2026-11-30T23:59:59.900000")
    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        r = sync_redis.Redis.from_url(redis_url)
        r.set(usage_key("acme", "2026-12"), 5)  # (December already has some use)
        forwarder = g.gw.pipeline.forwarder
        real_forward = forwarder.forward

        async def forward_after_midnight(*args, **kwargs):
            clock.now += 0.2  # the connect attempt ends in December
            return await real_forward(*args, **kwargs)
        monkeypatch.setattr(forwarder, "forward", forward_after_midnight)
        async with g.proxy.get("/people/1", headers=bearer(token)) as resp:
            assert resp.status == 502
        assert int(r.get(usage_key("acme", "2026-11")) or 0) == 0  # November's count taken back
        assert int(r.get(usage_key("acme", "2026-12"))) == 5       # December's untouched


# --- a quota held by requests in flight that may be taken back -----------------------------


def _slow_and_fast(release: asyncio.Event):
    """An upstream whose ``/people/slow`` streams a long answer (its head at once) until
    ``release``; every other path answers at once."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/people/slow":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b"[")
            while not release.is_set():
                await response.write(b" ")
                await asyncio.sleep(0.2)
            await response.write(b"]")
            await response.write_eof()
            return response
        return web.json_response({"path": request.path})
    return handler


async def _held_quota_refusal(redis_url, monkeypatch, key_cap: bool):
    """3 a month (the workspace's, or the key's own ``key_cap``): one request forwarded (a
    long download: it holds the upstream's one connection), two counted and waiting for that
    connection (they end 504, never sent: taken back). Returns the answer to a request sent
    meanwhile, the two waiting ones' statuses, and the workspace's and key's use after."""
    from gateway.config import Upstream
    from harness import serving

    release = asyncio.Event()
    async with serving(_slow_and_fast(release)) as url:
        config = make_config(url, upstreams={"api": Upstream("api", url, 1.5,
                                                             max_connections=1)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme", plan="unlimited" if key_cap else "tiny")
            token, key = await g.key(**({"monthly_requests": 3} if key_cap else {}))

            async def get(path: str):
                async with g.proxy.get(path, headers=bearer(token)) as r:
                    return r.status, await r.json(), dict(r.headers)

            slow = asyncio.ensure_future(get("/people/slow"))
            await asyncio.sleep(0.3)  # forwarded and counted: it holds the one connection
            waiting = [asyncio.ensure_future(get("/people/1")) for _ in range(2)]
            await asyncio.sleep(0.4)  # both counted, waiting for the upstream's connection
            refused = await get("/people/2")
            outcomes = [(await w)[0] for w in waiting]
            release.set()
            await slow
            after = await get("/people/3")  # the two taken back: the quota has 2 left
            _, record = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
            return refused, outcomes, after, await g.used(), record["used_this_month"]


async def test_a_quota_held_by_requests_that_may_be_taken_back_is_not_used_up(
        redis_url, monkeypatch):
    """SPEC: the monthly counter counts requests that were forwarded. A workspace on 3 a
    month, 1 forwarded and 2 counted while they wait for the upstream (then taken back): a
    request meanwhile was answered 'used up; it resets at <next month>' with weeks of
    Retry-After, though only 1 of 3 was used. It is still 429 quota_exceeded (the counter is
    full), but says the last of the quota is held by requests in flight, and to retry in the
    upstream's timeout; once they are taken back, a request is admitted."""
    (status, body, headers), outcomes, after, used, _ = await _held_quota_refusal(
        redis_url, monkeypatch, key_cap=False)
    assert outcomes == [504, 504]  # never sent: taken back
    assert (status, body["error"]["code"]) == (429, "quota_exceeded")
    assert headers["Retry-After"] == "2"  # the upstream's 1.5 s timeout, rounded up
    assert "held by 2 request(s) in flight" in body["error"]["message"], body
    assert 'r=0' in headers["RateLimit"]  # none left right now
    assert after[0] == 200
    assert used == 2


async def test_a_keys_cap_held_by_requests_that_may_be_taken_back_is_not_used_up(
        redis_url, monkeypatch):
    """The same for a key's own monthly cap: 429 key_quota_exceeded with a short
    Retry-After while its last requests are held by requests in flight."""
    (status, body, headers), outcomes, after, _, key_used = await _held_quota_refusal(
        redis_url, monkeypatch, key_cap=True)
    assert outcomes == [504, 504]
    assert (status, body["error"]["code"]) == (429, "key_quota_exceeded")
    assert headers["Retry-After"] == "2"
    assert "held by 2 request(s) in flight" in body["error"]["message"], body
    assert after[0] == 200
    assert key_used == 2


async def test_a_quota_used_by_a_request_still_streaming_is_used_up_for_the_month(
        redis_url, monkeypatch):
    """A request whose answer is still streaming reached its upstream: it can no longer be
    taken back, so it holds nothing. With the quota used up by it and two answered ones, a
    request is told the month is used up (Retry-After: the rest of the month), not to retry
    in seconds."""
    from harness import serving

    release = asyncio.Event()
    async with serving(_slow_and_fast(release)) as url:
        async with gateway_under_test(make_config(url), redis_url, monkeypatch) as g:
            await g.workspace("acme", plan="tiny")
            token, _ = await g.key()
            slow = asyncio.ensure_future(g.proxy.get("/people/slow", headers=bearer(token)))
            assert await statuses(g, token, 2) == [200, 200]
            await asyncio.sleep(0.3)  # the slow one's head came back: it is forwarded
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                body = await r.json()
                assert (r.status, body["error"]["code"]) == (429, "quota_exceeded")
                assert int(r.headers["Retry-After"]) > 3600, r.headers
                assert "used up" in body["error"]["message"]
            release.set()
            async with await slow as r:
                await r.read()


async def test_an_upstream_that_is_down_does_not_tell_a_healthy_routes_clients_to_wait_a_month(
        redis_url, monkeypatch):
    """150 concurrent requests of a workspace with 20 left this month: half to a route whose
    upstream is down (connection refused: 502, taken back), half to a healthy one. The down
    route's requests hold quota while they fail; a healthy route's request refused meanwhile
    is told to retry in seconds, never 'used up' for the month while the month is not."""
    import dataclasses
    from collections import Counter

    from aiohttp import web

    from conftest import free_port
    from gateway.config import Route, Upstream
    from harness import serving

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async with serving(handler) as url:
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        config = make_config(url)
        config = dataclasses.replace(
            config, upstreams={"api": Upstream("api", url, 5.0),
                               "dead": Upstream("dead", dead, 5.0)},
            routes=(Route("/dead/**", "dead", ("GET",), ("people:read",)),) + config.routes)
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            status, body = await g.admin_json("PATCH", "/workspaces/acme",
                                              {"limits": {"monthly_requests": 20}})
            assert status == 200, body
            token, _ = await g.key()
            waits: list[int] = []  # Retry-After of each quota_exceeded to the healthy route

            async def get(path: str):
                async with g.proxy.get(path, headers=bearer(token)) as r:
                    body = await r.json()
                    code = (body.get("error") or {}).get("code")
                    if code == "quota_exceeded" and path.startswith("/people"):
                        waits.append(int(r.headers["Retry-After"]))
                    return path.split("/")[1], r.status, code

            results = await asyncio.gather(*(get(p) for _ in range(75)
                                             for p in ("/dead/1", "/people/1")))
            used = await g.used()
    tally = Counter(results)
    assert used == tally[("people", 200, None)]  # what was forwarded is what is counted
    told_a_month = [w for w in waits if w > 60]
    assert used == 20 or not told_a_month, (
        f"{len(told_a_month)} requests refused 'used up' for the month with {used} of 20 "
        f"used ({dict(tally)})")
