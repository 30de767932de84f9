"""Adversarial review (rlimits): per-key rate limits, monthly quotas, their headers, and the
reload path, through the whole gateway on a real Redis and real loopback upstreams."""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web

from gateway.config import load_config
from gateway.store.request import READ_KEY
from harness import (Clock, HeldReplies, bearer, eventually, gateway_under_test, make_config,
                     serving)


def _doc(upstream_url: str, **changes: Any) -> dict[str, Any]:
    doc = {
        "server": {"host": "127.0.0.1", "port": 18080},
        "admin": {"host": "127.0.0.1", "port": 18081},
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}},
        "plans": {"starter": {"monthly_requests": 1000, "max_keys": 5, "rate_limit": "100/s"}},
        "default_plan": "starter",
        "roles": {"reader": ["people:read"]},
        "upstreams": {"api": {"url": upstream_url, "timeout": 5}},
        "routes": [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]}],
    }
    doc.update(changes)
    return doc


@pytest.fixture
def clock() -> Clock:
    return Clock("2026-11-10T12:00:00")


@pytest.fixture
async def gut(redis_url, upstream, monkeypatch, clock):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        g.upstream = upstream
        yield g


async def _call(g, token: str) -> tuple[int, str | None, dict]:
    async with g.proxy.get("/people/1", headers=bearer(token)) as r:
        code = (await r.json())["error"]["code"] if r.status >= 400 else None
        return r.status, code, dict(r.headers)


async def test_a_rate_lowered_from_per_second_to_per_minute_forgets_the_minute_it_admitted(
        gut, clock):
    """A key's rate is lowered (PATCH: 'takes effect on the next request') while its log holds
    more than the new limit. For a lowering within one period (10/m → 2/m) the log's history
    counts against the new limit (tests/test_limits.py, lua/authorize.lua: 'a log can hold more
    than a lowered limit'). Lowered from 5/s to 8/m, a key that was just admitted 15 requests
    in 3 s is admitted 3 more at once: 18 in one minute under an 8/m limit. Every call of the
    5/s log trimmed it to the last second (and PEXPIREd it to 1 s), so the minute the new limit
    looks at was thrown away."""
    await gut.workspace("acme", plan="unlimited")
    token, key = await gut.key(rate_limit="5/s")
    for _ in range(3):  # 5 a second for 3 seconds: all admitted
        for _ in range(5):
            status, code, _ = await _call(gut, token)
            assert status == 200, code
        clock.now += 1
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                        {"rate_limit": "8/m"})
    assert status == 200, body
    clock.now -= 0.5  # 2.5 s after the first: 15 admitted in the last minute, 8 allowed
    admitted = []
    for _ in range(3):
        status, code, headers = await _call(gut, token)
        admitted.append(status)
    assert admitted == [429, 429, 429], (
        f"{15 + admitted.count(200)} requests admitted within one minute under an 8/m limit "
        f"(after the PATCH: {admitted})")


async def test_requests_never_forwarded_make_a_quota_429_that_says_wait_a_month(
        redis_url, monkeypatch):
    """SPEC: 'the monthly counter counts requests that were forwarded'; 429 quota_exceeded is
    for a quota 'used up'. A workspace on 3 a month: one request is forwarded (the upstream
    is slow), two more wait for the upstream's one connection (max_connections: 1) and will
    never be sent (504, taken back). A request arriving meanwhile is answered 429
    quota_exceeded, 'used up; it resets at <next month>', Retry-After: the rest of the month,
    though only 1 of the 3 was ever used, and 2 are left once the waiting ones are taken
    back. A client that obeys Retry-After stops for weeks. (Whatever the fix, reserving or
    not, such a refusal must not claim the month is used up: a short Retry-After at most.)"""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/people/slow":  # a long download: holds the connection
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

    async with serving(handler) as url:
        from gateway.config import Upstream
        config = make_config(url, upstreams={"api": Upstream("api", url, 1.5,
                                                             max_connections=1)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme", plan="tiny")  # 3 requests a month
            token, _ = await g.key()

            async def get(path: str):
                async with g.proxy.get(path, headers=bearer(token)) as r:
                    body = await r.json()
                    return r.status, body, dict(r.headers)

            slow = asyncio.ensure_future(get("/people/slow"))
            await asyncio.sleep(0.3)  # forwarded and counted: it holds the one connection
            waiting = [asyncio.ensure_future(get("/people/1")) for _ in range(2)]
            await asyncio.sleep(0.4)  # both counted, waiting for the upstream's connection
            status, body, headers = await get("/people/2")
            outcomes = [await w for w in waiting]
            release.set()
            await slow
            used = await g.used()
    assert [s for s, _, _ in outcomes] == [504, 504]  # never sent: taken back
    assert used == 1, used
    assert not (status == 429 and body["error"]["code"] == "quota_exceeded"
                and int(headers["Retry-After"]) > 60), (
        f"answered 429 quota_exceeded ('{body['error']['message']}', Retry-After "
        f"{headers['Retry-After']} s) while 1 of 3 requests was used this month")



async def test_an_upstream_that_is_down_starves_a_workspaces_quota_it_never_uses(
        redis_url, monkeypatch):
    """150 concurrent requests of one workspace with 20 requests left this month: half to a
    route whose upstream is down (connection refused: 502, never forwarded, taken back),
    half to a healthy one. The down route's requests hold quota while they fail, so most of
    the healthy route's requests are answered 429 quota_exceeded ('used up', Retry-After: the
    rest of the month); when the burst is over only part of the 20 was ever used: the month
    is not used up, but every client was told it is. (Refusing while requests in flight hold
    the rest may be right; saying 'used up, come back next month' is not.)"""
    from collections import Counter

    from conftest import free_port
    from gateway.config import Route, Upstream

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
    served = tally[("people", 200, None)]
    assert used == served  # what was forwarded is what is counted
    told_a_month = [w for w in waits if w > 60]
    assert used == 20 or not told_a_month, (
        f"{len(told_a_month)} requests to the healthy upstream were refused 'quota used up' "
        f"(Retry-After up to {max(told_a_month)} s) while only {used} of the 20 requests left "
        f"were ever used ({dict(tally)})")
