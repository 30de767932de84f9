"""Key controls beyond the basics, through the whole gateway on a real Redis: per-key monthly
caps and rate limits, workspace limit overrides, disabling, metadata, IP allow-lists, daily
usage, the scope catalogue, and finding (and deleting) keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import secrets
import threading
import time

import pytest
import redis

from gateway.config import FailureLimits, StoreConfig
from gateway.models import rfc3339
from gateway.store.admin_keys import LIST_STEP
from harness import Clock, bearer, eventually, gateway_under_test, make_config, wrong_secret


async def call(g, token: str, path: str = "/people/1", **headers: str) -> tuple[int, str | None,
                                                                               dict]:
    async with g.proxy.get(path, headers={**bearer(token), **headers}) as r:
        body = await r.read()
        code = json.loads(body)["error"]["code"] if r.status >= 400 else None
        return r.status, code, dict(r.headers)


async def statuses(g, token: str, n: int) -> list[tuple[int, str | None]]:
    results = await asyncio.gather(*(call(g, token) for _ in range(n)))
    return [(s, c) for s, c, _ in results]


# --- per-key monthly cap -----------------------------------------------------------------------

async def test_a_keys_monthly_cap_is_429_key_quota_exceeded_and_counts_nothing(gut):
    await gut.workspace()
    token, key = await gut.key(monthly_requests=2)
    assert key["monthly_requests"] == 2 and key["used_this_month"] == 0
    first = await call(gut, token)
    assert first[0] == 200
    assert '"key-monthly";q=2;' in first[2]["RateLimit-Policy"]
    assert '"key-monthly";r=1;' in first[2]["RateLimit"]
    assert (await call(gut, token))[0] == 200
    status, code, headers = await call(gut, token)
    assert (status, code) == (429, "key_quota_exceeded")
    assert int(headers["Retry-After"]) > 0 and '"key-monthly";r=0;' in headers["RateLimit"]
    assert len(gut.upstream.requests) == 2
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert usage["used"] == 2  # the refused request counted nowhere
    assert gut.counter("keygate_auth_failures_total", reason="key_quota_exceeded") == 1
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
    assert read["used_this_month"] == 2
    # raising the cap acts on the very next request
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                        {"monthly_requests": 3})
    assert status == 200 and body["monthly_requests"] == 3 and body["used_this_month"] == 2
    assert (await call(gut, token))[0] == 200
    assert (await call(gut, token))[:2] == (429, "key_quota_exceeded")
    # null: back to the workspace's quota alone
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"monthly_requests": None})
    assert (await call(gut, token))[0] == 200


async def test_the_keys_cap_is_exact_across_two_gateways_under_concurrency(redis_url, upstream,
                                                                           monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme", plan="starter")
        token, _ = await a.key(monthly_requests=5)
        other, _ = await a.key(name="other")
        results = await asyncio.gather(statuses(a, token, 12), statuses(b, token, 12),
                                       statuses(a, other, 3))
        capped = results[0] + results[1]
        assert capped.count((200, None)) == 5, capped
        assert capped.count((429, "key_quota_exceeded")) == 19
        assert results[2] == [(200, None)] * 3  # the workspace's other keys are not capped
        assert len(upstream.requests) == 8


async def test_served_replicas_admit_exactly_the_limits_and_count_what_the_upstream_got(
        tmp_path, redis_url):
    """``serve --workers 2`` and a second ``serve`` on one Redis, 200 requests at once with a
    key of 50/m and its own cap of 80: exactly 50 reach the upstream and are answered 200,
    each with its own "rate" remaining (49 down to 0); the workspace's month, the key's month
    and both days all say what the upstream received. A workspace override and disabling the
    key then act on the very next request at each process."""
    import yaml
    from aiohttp import ClientSession, web
    from conftest import free_port
    from harness import serving
    from served import TIMEOUT, Served, admin_json, write_config
    received = []

    async def upstream(request: web.Request) -> web.Response:
        received.append(request.headers.get("X-Api-Key-Id"))
        return web.json_response({})

    async def get(s: ClientSession, base: str, token: str) -> tuple[int, str | None, dict]:
        async with s.get(base + "/people/1", headers=bearer(token)) as r:
            body = await r.read()
            return (r.status, json.loads(body)["error"]["code"] if r.status >= 400 else None,
                    dict(r.headers))

    async with serving(upstream) as url:
        config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                            plan={"monthly_requests": 100000, "max_keys": 5,
                                                  "rate_limit": None})
        second = yaml.safe_load(config.read_text())
        second["server"]["port"], second["admin"]["port"] = free_port(), free_port()
        (tmp_path / "second.yaml").write_text(yaml.safe_dump(second))
        a = Served(config, pport, aport, "--workers", "2")
        b = Served(tmp_path / "second.yaml", second["server"]["port"], second["admin"]["port"])
        try:
            await a.ready()
            await b.ready()
            async with ClientSession(timeout=TIMEOUT) as s:
                await admin_json(s, a.admin, "POST", "/workspaces", {"id": "acme", "name": "A"})
                status, body = await admin_json(s, b.admin, "POST", "/workspaces/acme/keys",
                                                {"name": "it", "scopes": ["people:read"],
                                                 "rate_limit": "50/m", "monthly_requests": 80})
                assert status == 201, body
                token, key_id = body["token"], body["key"]["id"]
                answers = await asyncio.gather(*(get(s, (a, b)[i % 2].proxy, token)
                                                 for i in range(200)))
                admitted = [h for status, _, h in answers if status == 200]
                assert len(admitted) == 50 == len(received), [a[:2] for a in answers]
                assert sorted(a[:2] for a in answers if a[0] != 200) == \
                    [(429, "rate_limited")] * 150
                left = sorted(int(h["RateLimit"].split('"rate";r=')[1].split(";")[0])
                              for h in admitted)
                assert left == list(range(50)), left
                _, usage = await admin_json(s, a.admin, "GET", "/workspaces/acme/usage")
                _, key = await admin_json(s, b.admin, "GET", f"/workspaces/acme/keys/{key_id}")
                _, days = await admin_json(s, a.admin, "GET", "/workspaces/acme/usage/daily"
                                                              "?days=1")
                _, key_days = await admin_json(s, b.admin, "GET", f"/workspaces/acme/keys/"
                                                                  f"{key_id}/usage/daily?days=1")
                assert usage["used"] == key["used_this_month"] == len(received) \
                    == days["items"][0]["requests"] == key_days["items"][0]["requests"]
                # the workspace's own limits, then disabling, on the next request at each
                await admin_json(s, b.admin, "PATCH", "/workspaces/acme",
                                 {"limits": {"monthly_requests": 50}})
                await admin_json(s, b.admin, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                 {"rate_limit": None})
                for served in (a, b, a, b):
                    assert (await get(s, served.proxy, token))[:2] == (429, "quota_exceeded")
                await admin_json(s, a.admin, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                 {"enabled": False})
                for served in (a, b, a, b):
                    assert (await get(s, served.proxy, token))[:2] == (401, "disabled_key")
                    assert (await get(s, served.proxy, wrong_secret(token)))[:2] == \
                        (401, "invalid_key")
                await admin_json(s, a.admin, "PATCH", "/workspaces/acme", {"limits": None})
                await admin_json(s, b.admin, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                 {"enabled": True})
                for served in (a, b, a, b):
                    assert (await get(s, served.proxy, token))[0] == 200
                assert len(received) == 54
        finally:
            a.close()
            b.close()

async def test_a_keys_rate_limit_can_be_changed_and_acts_at_once(gut):
    await gut.workspace()
    token, key = await gut.key(rate_limit="2/m")
    assert [s for s, _ in await statuses(gut, token, 3)].count(429) == 1
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                        {"rate_limit": "100/s"})
    assert status == 200 and body["rate_limit"] == "100/s"
    status, _, headers = await call(gut, token)
    assert status == 200 and '"rate";q=100;w=1' in headers["RateLimit-Policy"]
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"rate_limit": None})
    status, _, headers = await call(gut, token)
    assert status == 200 and '"rate"' not in headers["RateLimit-Policy"]  # starter: none


@pytest.mark.parametrize("fields, mention", [
    ({"monthly_requests": -1}, "monthly_requests"),
    ({"monthly_requests": "10"}, "monthly_requests"),
    ({"monthly_requests": True}, "monthly_requests"),
    ({"rate_limit": 5}, "rate_limit"),
    ({"enabled": "false"}, "enabled"),
    ({"enabled": None}, "enabled"),
    ({"meta": []}, "meta"),
    ({"meta": "x"}, "meta"),
    ({"meta": {"blob": "x" * 4100}}, "meta"),
    ({"allowed_ips": "10.0.0.0/8"}, "allowed_ips"),
    ({"allowed_ips": []}, "allowed_ips"),
    ({"allowed_ips": ["10.0.0.0/33"]}, "allowed_ips"),
    ({"allowed_ips": ["example.com"]}, "allowed_ips"),
    ({"allowed_ips": [" 10.0.0.1"]}, "allowed_ips"),
    ({"allowed_ips": [7]}, "allowed_ips"),
    ({"meta": functools.reduce(lambda inner, _: {"a": inner}, range(32), {})}, "32 levels"),
    ({"meta": {"a": functools.reduce(lambda inner, _: [inner], range(40), [])}}, "32 levels"),
    # a zone is one host's interface, and ipaddress keeps any text there: escapes, bidi marks
    ({"allowed_ips": ["fe80::1%eth0/128"]}, "allowed_ips"),
    ({"allowed_ips": ["fe80::1%\x1b[2J/128"]}, "allowed_ips"),
    ({"allowed_ips": ["fe80::1%\u202e"]}, "allowed_ips"),
])
async def test_bad_key_controls_are_400_naming_the_field(gut, fields, mention):
    await gut.workspace()
    _, key = await gut.key()
    for method, path, body in (("POST", "/workspaces/acme/keys", {"name": "x", **fields}),
                               ("PATCH", f"/workspaces/acme/keys/{key['id']}", fields)):
        status, answer = await gut.admin_json(method, path, body)
        assert status == 400 and answer["error"]["code"] == "bad_request", answer
        assert mention in answer["error"]["message"]


# --- workspace limits ----------------------------------------------------------------------------

async def test_workspace_limits_override_the_plan_and_act_at_once(gut):
    await gut.workspace(plan="starter")  # 1000 a month, 5 keys, no rate limit
    token, _ = await gut.key()
    assert (await call(gut, token))[0] == 200
    status, ws = await gut.admin_json("PATCH", "/workspaces/acme",
                                      {"limits": {"monthly_requests": 2, "rate_limit": "50/s"}})
    assert status == 200
    assert ws["limits"] == {"monthly_requests": 2, "max_keys": 5, "rate_limit": "50/s"}
    assert ws["custom_limits"] == {"monthly_requests": 2, "rate_limit": "50/s"}
    status, _, headers = await call(gut, token)
    assert status == 200 and '"monthly";q=2;' in headers["RateLimit-Policy"]
    assert '"rate";q=50;w=1' in headers["RateLimit-Policy"]
    assert (await call(gut, token))[:2] == (429, "quota_exceeded")
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert (usage["limit"], usage["remaining"]) == (2, 0)
    assert usage["limits"] == ws["limits"]
    # fields merge: a second PATCH keeps the first's other overrides; null is unlimited
    _, ws = await gut.admin_json("PATCH", "/workspaces/acme",
                                 {"limits": {"monthly_requests": None, "max_keys": 1}})
    assert ws["limits"] == {"monthly_requests": None, "max_keys": 1, "rate_limit": "50/s"}
    assert (await call(gut, token))[0] == 200
    status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                        {"name": "two", "scopes": ["people:read"]})
    assert (status, body["error"]["code"]) == (409, "key_limit_reached")
    assert "cap of 1 active keys (set by the workspace's own limits)" in body["error"]["message"]
    # null drops every override: the plan's limits again
    _, ws = await gut.admin_json("PATCH", "/workspaces/acme", {"limits": None})
    assert ws["limits"] == {"monthly_requests": 1000, "max_keys": 5, "rate_limit": None}
    assert ws["custom_limits"] == {}
    _, read = await gut.admin_json("GET", "/workspaces/acme")
    assert read == ws
    _, audit = await gut.admin_json("GET", "/workspaces/acme/audit")
    assert audit["items"][0]["action"] == "workspace.update"
    assert audit["items"][0]["details"] == {"limits": None}


async def test_a_keys_own_rate_never_exceeds_the_workspaces_rate_in_force(redis_url, upstream,
                                                                           monkeypatch):
    """An operator who moves a customer to a smaller plan (or lowers its own rate limit) holds
    every key to it on the next request at every replica, however big a rate the key was given
    under the bigger plan: a key set to 10/s on a 1000/s plan kept 10/s on a 3/s plan. The
    tighter of the two rules, compared in both windows; the key object keeps the key's own."""
    clock = Clock()  # one window until moved
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as a, \
            gateway_under_test(config, redis_url, monkeypatch, clock=clock) as b:
        await a.workspace(plan="metered")  # 1000/s
        token, key = await a.key(rate_limit="10/s")
        for g in (a, b):  # cached at both replicas
            status, _, headers = await call(g, token)
            assert status == 200 and '"rate";q=10;w=1' in headers["RateLimit-Policy"]

        async def judged(g, n: int) -> tuple[list, str]:
            clock.now += 61  # a fresh window
            got = [await call(g, token) for _ in range(n)]
            return [s for s, _, _ in got], got[0][2]["RateLimit-Policy"]

        await a.admin_json("PATCH", "/workspaces/acme", {"plan": "limited"})  # 3/s
        for g in (a, b):
            got, policy = await judged(g, 5)
            assert got == [200] * 3 + [429] * 2 and '"rate";q=3;w=1' in policy
        _, read = await a.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert read["rate_limit"] == "10/s"  # its own setting, as set
        # a workspace override lowers it the same way; 1/m is tighter than 10/s in both windows
        await a.admin_json("PATCH", "/workspaces/acme", {"limits": {"rate_limit": "1/m"}})
        got, policy = await judged(b, 3)
        assert got == [200, 429, 429] and '"rate";q=1;w=60' in policy
        # 15/m against 10/s: neither is within the other (15 in one second; 600 a minute).
        # Both are in force: at most 10 in any second and 15 in any minute
        await a.admin_json("PATCH", "/workspaces/acme", {"limits": {"rate_limit": "15/m"}})
        got, policy = await judged(b, 12)
        assert got == [200] * 10 + [429] * 2
        assert '"rate";q=15;w=60, "rate-burst";q=10;w=1' in policy
        status, _, headers = await call(b, token)
        assert (status, headers["Retry-After"]) == (429, "1")  # the second's cap: 1 s
        assert headers["RateLimit"].startswith('"rate";r=0;t=1')
        clock.now += 1.5
        got = [(await call(a, token))[0] for _ in range(7)]
        assert got == [200] * 5 + [429] * 2  # the minute's 15
        status, _, headers = await call(b, token)
        assert status == 429 and int(headers["Retry-After"]) > 50
        # the override dropped: the plan's 3/s again; a bigger plan: the key's own 10/s
        await a.admin_json("PATCH", "/workspaces/acme", {"limits": None})
        got, policy = await judged(a, 4)
        assert got == [200] * 3 + [429] and '"rate";q=3;w=1' in policy
        await a.admin_json("PATCH", "/workspaces/acme", {"plan": "metered"})
        got, policy = await judged(b, 11)
        assert got == [200] * 10 + [429] and '"rate";q=10;w=1' in policy
        # a key's own rate tighter than the plan's stays the key's
        await a.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"rate_limit": "2/s"})
        got, policy = await judged(a, 3)
        assert got == [200, 200, 429] and '"rate";q=2;w=1' in policy


@pytest.mark.parametrize("limits", [{"monthly": 5}, {"monthly_requests": -1}, [],
                                    {"rate_limit": "fast"}, {"max_keys": 1.5}, "unlimited"])
async def test_bad_workspace_limits_are_400(gut, limits):
    await gut.workspace()
    status, body = await gut.admin_json("PATCH", "/workspaces/acme", {"limits": limits})
    assert status == 400 and "limits" in body["error"]["message"]


async def test_workspace_limit_metrics_agree_with_the_usage_endpoint(gut):
    await gut.workspace()
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": 77}})
    async with gut.admin.get("/metrics") as r:
        text = await r.text()
    assert 'keygate_workspace_month_limit{workspace="acme"} 77.0' in text
    # and its HELP (what an operator reading /metrics goes by) says so: it claimed the plan's
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP keygate_workspace_month_limit "))
    assert "override" in help_line and "plan's" in help_line, help_line
    assert "workspace plan's monthly" not in help_line, help_line


# --- disable without revoking ------------------------------------------------------------------

async def test_a_disabled_key_is_401_on_the_next_request_at_every_replica_and_comes_back(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace()
        token, key = await a.key()
        assert (await call(a, token))[0] == 200 and (await call(b, token))[0] == 200
        status, body = await a.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                          {"enabled": False})
        assert status == 200 and body["enabled"] is False and body["status"] == "active"
        for g in (a, b):
            status, code, headers = await call(g, token)
            assert (status, code) == (401, "disabled_key")
            assert headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_token"'
        # not disclosed to a wrong secret (a valid checksum: it runs argon2 and fails there)
        assert (await call(a, wrong_secret(token)))[:2] == (401, "invalid_key")
        _, usage = await a.admin_json("GET", "/workspaces/acme/usage")
        assert usage["used"] == 2  # refused requests are not counted
        await a.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"enabled": True})
        assert (await call(a, token))[0] == 200 and (await call(b, token))[0] == 200


async def test_a_key_created_disabled_is_refused_and_revoked_stays_revoked(gut):
    await gut.workspace()
    token, key = await gut.key(enabled=False)
    assert key["enabled"] is False
    assert (await call(gut, token))[:2] == (401, "disabled_key")
    assert gut.counter("keygate_auth_failures_total", reason="disabled_key") == 1
    await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"enabled": True})
    assert (await call(gut, token))[:2] == (401, "revoked_key")


# --- metadata ----------------------------------------------------------------------------------

async def test_meta_is_returned_with_the_key_and_by_the_usage_endpoint_never_forwarded(gut):
    await gut.workspace()
    meta = {"customer": "cus_4Q2mZ", "tier": ["gold"], "note": "ünïcode ✓"}
    token, key = await gut.key(meta=meta)
    assert key["meta"] == meta
    async with gut.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
        body = await r.json()
    assert body["key"]["meta"] == meta and body["key"]["used_this_month"] == 0
    assert (await call(gut, token))[0] == 200
    forwarded = json.dumps(gut.upstream.requests[-1]["headers"])
    assert "cus_4Q2mZ" not in forwarded and "gold" not in forwarded
    _, read = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                   {"meta": {"customer": "cus_other"}})
    assert read["meta"] == {"customer": "cus_other"}  # replaced, not merged
    async with gut.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
        body = await r.json()
    assert body["key"]["meta"] == {"customer": "cus_other"}
    assert body["key"]["used_this_month"] == 1


async def test_meta_of_exactly_4_kib_is_accepted(gut):
    await gut.workspace()
    blob = {"b": "x" * (4096 - len('{"b":""}'))}
    _, key = await gut.key(meta=blob)
    assert key["meta"] == blob
    status, _ = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                     {"meta": {"b": blob["b"] + "x"}})
    assert status == 400


def strict_json(raw: bytes):
    """JSON as RFC 8259 has it (as JavaScript's JSON.parse and jq read it): no NaN/Infinity."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(raw, parse_constant=refuse)


def test_a_deeply_nested_body_gets_the_same_answer_however_deep_the_stack_it_is_read_on():
    """Python's JSON reader nests by recursing: a body nested ~900 deep was 'not valid JSON'
    when read on a deep stack (a test runner's worker) and 'nested more than 32 levels'
    otherwise. Its depth is now judged before it is read."""
    from gateway.admin.validate import parse_body
    from gateway.errors import BadRequest
    body = b'{"name": "deep", "meta": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}"

    def answer(depth: int) -> str:
        if depth:
            return answer(depth - 1)
        with pytest.raises(BadRequest) as caught:
            parse_body(body, ("name", "meta"))
        return str(caught.value)

    shallow, deep = answer(0), answer(900)
    assert shallow == deep and "32 levels" in shallow
    # as deep as meta may be, and a string holding brackets, still read
    ok = b'{"meta": ' + b'{"a": ' * 31 + b'"[[[{{"' + b"}" * 31 + b"}"
    assert parse_body(ok, ("meta",))["meta"]


async def test_meta_nested_as_deep_as_4_kib_allows_is_400_and_listings_still_answer(gut):
    # 4 KiB of '[' nests ~938 deep: the request's reader took it, but a listing read back on a
    # deeper call stack (self-service, on the proxy listener) answered 500 for every key
    await gut.workspace()
    token, _ = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    for depth in (33, 500, 938):
        body = ('{"name": "deep", "scopes": ["people:read"], "meta": {"a": '
                + "[" * depth + "]" * depth + "}}")
        async with gut.proxy.post("/_keygate/v1/keys", data=body, headers={
                **bearer(token), "Content-Type": "application/json"}) as r:
            assert r.status == 400, (depth, await r.text())
            assert "32 levels" in (await r.json())["error"]["message"]
    async with gut.proxy.get("/_keygate/v1/keys", headers=bearer(token)) as r:
        assert r.status == 200 and len((await r.json())["items"]) == 1


@pytest.mark.parametrize("number", ["1e309", "-1e999", "9" * 5000, "-" + "1" * 4301])
async def test_a_number_out_of_range_is_said_to_be_so_not_to_be_invalid_json(gut, number):
    """`1e309` and an integer of thousands of digits are JSON by RFC 8259's grammar; refusing
    them is right (no reader keeps them whole), but the answer said "The request body is not
    valid JSON.", sending the caller to look for a syntax error that is not there."""
    await gut.workspace()
    async with gut.admin.patch("/admin/v1/workspaces/acme",
                               data=('{"limits": {"max_keys": %s}}' % number).encode(),
                               headers={"Content-Type": "application/json"}) as r:
        body = strict_json(await r.read())
        assert r.status == 400 and body["error"]["code"] == "bad_request"
    message = body["error"]["message"]
    assert "out of range" in message and "not valid JSON" not in message, message
    assert len(message) < 200, message  # the number is not echoed whole


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_a_body_with_a_number_json_cannot_hold_is_400_and_never_stored(gut, number):
    """Python's json reads NaN, Infinity and 1e999 (a float overflowing to inf); RFC 8259 has
    none of them. ``meta`` took them and every later answer about the key (its create, read and
    the workspace's listing) carried a bare ``NaN``: not JSON, so the console (JSON.parse), jq
    and strict clients could no longer read the workspace's key listing at all."""
    await gut.workspace()
    _, key = await gut.key()
    path = f"/admin/v1/workspaces/acme/keys/{key['id']}"
    for method, url, body in (
            ("POST", "/admin/v1/workspaces/acme/keys",
             '{"name": "n", "scopes": ["people:read"], "meta": {"x": %s}}' % number),
            ("PATCH", path, '{"meta": {"x": [%s]}}' % number)):
        async with gut.admin.request(method, url, data=body.encode(),
                                     headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
            assert r.status == 400, raw
            assert strict_json(raw)["error"]["code"] == "bad_request"
    async with gut.admin.get("/admin/v1/workspaces/acme/keys") as r:
        listing = strict_json(await r.read())
    assert [k["meta"] for k in listing["items"]] == [{}]


async def test_keys_sharing_equal_limits_and_allow_lists_in_the_cache_still_change_alone(gut):
    """The key cache shares equal values between keys (a workspace, its plan with overrides,
    a key's own rate limit, an allow-list): a change to one workspace or key must reach every
    key it applies to and no other."""
    same = {"limits": {"monthly_requests": 50, "rate_limit": "50/s"}}
    for ws in ("acme", "beta"):
        await gut.workspace(ws)
        await gut.admin_json("PATCH", f"/workspaces/{ws}", same)
    own = {"allowed_ips": ["127.0.0.0/8"], "rate_limit": "40/s"}
    (a1, k1), (a2, k2) = await gut.key(name="a1", **own), await gut.key(name="a2", **own)
    b1, _ = await gut.key("beta", name="b1", **own)

    async def policies() -> list[str]:
        answers = [await call(gut, token) for token in (a1, a2, b1)]
        assert [status for status, _, _ in answers] == [200, 200, 200], answers
        return [headers["RateLimit-Policy"] for _, _, headers in answers]

    assert all('"monthly";q=50;' in p and '"rate";q=40;w=1' in p for p in await policies())
    # one workspace's limits change for every key of that workspace, and only there
    await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": 60}})
    in_a1, in_a2, in_b1 = await policies()
    assert '"monthly";q=60;' in in_a1 and '"monthly";q=60;' in in_a2
    assert '"monthly";q=50;' in in_b1
    # a plan change likewise
    await gut.admin_json("PATCH", "/workspaces/acme", {"plan": "metered", "limits": None})
    in_a1, in_a2, in_b1 = await policies()
    assert '"monthly";q=100000;' in in_a1 and '"monthly";q=100000;' in in_a2
    assert '"monthly";q=50;' in in_b1
    # one key's own rate limit and allow-list change for that key alone
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{k2['id']}", {"rate_limit": "7/s"})
    in_a1, in_a2, in_b1 = await policies()
    assert '"rate";q=40;w=1' in in_a1 and '"rate";q=7;w=1' in in_a2 and '"rate";q=40;' in in_b1
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{k1['id']}",
                         {"allowed_ips": ["10.0.0.0/8"]})
    assert (await call(gut, a1))[:2] == (403, "ip_not_allowed")
    assert (await call(gut, a2))[0] == 200 and (await call(gut, b1))[0] == 200


# --- IP allow-list -----------------------------------------------------------------------------

async def test_a_key_bound_to_addresses_is_403_from_elsewhere_only_after_its_secret(gut):
    await gut.workspace()
    token, key = await gut.key(allowed_ips=["10.0.0.0/8", "2001:db8::/32"])
    assert key["allowed_ips"] == ["10.0.0.0/8", "2001:db8::/32"]
    status, code, headers = await call(gut, token)
    assert (status, code) == (403, "ip_not_allowed")
    assert gut.counter("keygate_auth_failures_total", reason="ip_not_allowed") == 1
    assert "insufficient_scope" not in headers.get("WWW-Authenticate", "")
    assert (await call(gut, wrong_secret(token)))[:2] == (401, "invalid_key")
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert usage["used"] == 0 and not gut.upstream.requests
    # a bare address is a /32; the change acts on the next request
    _, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                   {"allowed_ips": ["127.0.0.1", "10.1.2.3/8"]})
    assert body["allowed_ips"] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert (await call(gut, token))[0] == 200
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"allowed_ips": None})
    assert (await call(gut, token))[0] == 200
    # an IPv4-mapped entry names the IPv4 client it maps
    _, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                   {"allowed_ips": ["::ffff:127.0.0.0/104"]})
    assert body["allowed_ips"] == ["127.0.0.0/8"]
    assert (await call(gut, token))[0] == 200


async def test_the_allow_list_sees_the_client_as_the_failure_throttle_does(redis_url, upstream,
                                                                         monkeypatch):
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(base, server=dataclasses.replace(
        base.server, trusted_proxies=("127.0.0.1/32",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key(allowed_ips=["198.51.100.0/24"])
        # behind our trusted proxy: the nearest untrusted hop is the client
        assert (await call(g, token, **{"X-Forwarded-For": "198.51.100.7"}))[0] == 200
        assert (await call(g, token, **{"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}))[0] == 200
        # a client cannot claim an allowed address left of the hop our proxy wrote
        assert (await call(g, token, **{"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}))[:2] \
            == (403, "ip_not_allowed")
        assert (await call(g, token))[:2] == (403, "ip_not_allowed")


async def test_an_untrusted_peers_forwarded_for_is_ignored_by_the_allow_list(gut):
    await gut.workspace()
    token, _ = await gut.key(allowed_ips=["198.51.100.0/24"])
    assert (await call(gut, token, **{"X-Forwarded-For": "198.51.100.7"}))[:2] == \
        (403, "ip_not_allowed")


# --- daily usage -------------------------------------------------------------------------------

async def test_daily_usage_for_workspace_and_key_oldest_first_with_zero_days(gut, redis_url):
    await gut.workspace()
    token, key = await gut.key()
    other, _ = await gut.key(name="other")
    for t in (token, token, other):
        assert (await call(gut, t))[0] == 200
    status, ws_days = await gut.admin_json("GET", "/workspaces/acme/usage/daily")
    assert status == 200 and len(ws_days["items"]) == 30
    dates = [d["date"] for d in ws_days["items"]]
    assert dates == sorted(dates) and len(set(dates)) == 30
    assert ws_days["items"][-1]["requests"] == 3
    assert sum(d["requests"] for d in ws_days["items"]) == 3
    _, key_days = await gut.admin_json("GET",
                                       f"/workspaces/acme/keys/{key['id']}/usage/daily?days=7")
    assert len(key_days["items"]) == 7 and key_days["items"][-1] == \
        {"date": dates[-1], "requests": 2}
    _, one = await gut.admin_json("GET", "/workspaces/acme/usage/daily?days=90")
    assert len(one["items"]) == 90
    r = redis.Redis.from_url(redis_url)
    daily = list(r.scan_iter("kg:*daily:*"))
    assert len(daily) == 3  # the workspace's day, each key's day
    assert all(90 * 86400 < r.ttl(k) <= 100 * 86400 for k in daily)
    r.close()


@pytest.mark.parametrize("query", ["days=0", "days=91", "days=x", "days=", "day=3"])
async def test_daily_usage_refuses_bad_days(gut, query):
    await gut.workspace()
    _, key = await gut.key()
    for path in ("/workspaces/acme/usage/daily", f"/workspaces/acme/keys/{key['id']}/usage/daily"):
        status, body = await gut.admin_json("GET", f"{path}?{query}")
        assert status == 400 and body["error"]["code"] == "bad_request"


async def test_daily_usage_of_unknown_workspace_or_key_is_404(gut):
    await gut.workspace()
    assert (await gut.admin_json("GET", "/workspaces/ghost/usage/daily"))[0] == 404
    assert (await gut.admin_json("GET", "/workspaces/acme/keys/AAAAAAAAAAAA/usage/daily"))[0] \
        == 404


async def test_a_request_the_upstream_never_received_is_taken_off_every_counter(redis_url,
                                                                             monkeypatch):
    from conftest import free_port
    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, key = await g.key(monthly_requests=2, rate_limit="2/m")
        for _ in range(3):  # never capped: nothing was forwarded
            assert (await call(g, token))[:2] == (502, "upstream_unavailable")
        # a rotated key's requests are taken back from the budget it shares with the old key
        _, body = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                     {"grace_seconds": 60})
        for t in (body["token"], token, body["token"]):
            assert (await call(g, t))[:2] == (502, "upstream_unavailable")
        for key_id in (key["id"], body["key"]["id"]):
            _, read = await g.admin_json("GET", f"/workspaces/acme/keys/{key_id}")
            assert read["used_this_month"] == 0
        _, days = await g.admin_json("GET", "/workspaces/acme/usage/daily?days=1")
        assert days["items"][0]["requests"] == 0
        r = redis.Redis.from_url(redis_url)
        assert all(r.ttl(k) > 0 for k in r.scan_iter("kg:*usage:*"))
        assert all(r.ttl(k) > 0 for k in r.scan_iter("kg:*daily:*"))


async def test_fail_open_counts_reach_the_keys_and_days_counters(redis_url, upstream,
                                                                 monkeypatch):
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch, ledger_retry=0.05) as g:
        await g.workspace()
        _, old = await g.key()
        # a rotated key: its counts go where the old key's do (they share one month count)
        _, body = await g.admin_json("POST", f"/workspaces/acme/keys/{old['id']}/rotate",
                                     {"grace_seconds": 60})
        token, key = body["token"], body["key"]
        assert (await call(g, token))[0] == 200
        redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1500")
        for _ in range(2):
            assert (await call(g, token))[0] == 200

        async def key_read():  # paused, then written back by the ledger's retry
            status, read = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
            return status == 200 and read["used_this_month"] >= 3
        await eventually(key_read)
        for key_id in (key["id"], old["id"]):
            _, read = await g.admin_json("GET", f"/workspaces/acme/keys/{key_id}")
            assert read["used_this_month"] == 3
        _, days = await g.admin_json("GET", "/workspaces/acme/usage/daily?days=1")
        assert days["items"][0]["requests"] == 3


# --- scope catalogue ---------------------------------------------------------------------------

@pytest.fixture
async def catalogued(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")), scopes={
        "people:read": "Read people", "people:write": "Create and change people",
        "companies:read": "Read companies", "keys:admin": "Manage the workspace's keys"})
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        yield g


async def test_scope_catalogue_is_listed_and_refuses_other_scopes(catalogued):
    g = catalogued
    status, body = await g.admin_json("GET", "/scopes")
    assert status == 200
    assert body["items"][0] == {"name": "people:read", "description": "Read people"}
    assert len(body["items"]) == 4
    await g.workspace()
    status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                      {"name": "typo", "scopes": ["people:raed"]})
    assert status == 400 and "people:raed" in body["error"]["message"]
    status, body = await g.admin_json("PUT", "/workspaces/acme/roles/custom",
                                      {"scopes": ["people:read", "people:raed"]})
    assert status == 400 and "people:raed" in body["error"]["message"]
    _, key = await g.key(scopes=["people:read", "ALL"])
    status, body = await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                      {"scopes": ["people:delete"]})
    assert status == 400


async def test_without_a_catalogue_scopes_lists_what_the_config_uses(gut):
    status, body = await gut.admin_json("GET", "/scopes")
    names = [i["name"] for i in body["items"]]
    assert status == 200 and "people:read" in names and "people:write" in names
    assert all(i["description"] is None for i in body["items"])


def test_config_check_names_scopes_outside_the_catalogue(tmp_path):
    from gateway.config import check_config
    path = tmp_path / "k.yaml"
    path.write_text(
        "scopes:\n"
        "  people:read: Read people\n"
        "  ALL: everything\n"
        "roles:\n"
        "  reader: [people:read, people:raed]\n"
        "  root: [ALL]\n"
        "upstreams:\n"
        "  api: {url: 'http://127.0.0.1:9'}\n"
        "routes:\n"
        "  - {path: /people/**, upstream: api, scopes: [people:read]}\n"
        "  - {path: /x/**, upstream: api, scopes: [companies:read]}\n")
    problems = "\n".join(check_config(path))
    assert "k.yaml:3: scopes.ALL" in problems
    assert "k.yaml:5: roles.reader" in problems and "people:raed" in problems
    assert "k.yaml:11: routes[1].scopes" in problems and "companies:read" in problems
    assert "routes[0]" not in problems and "roles.root" not in problems


# --- finding and deleting keys -----------------------------------------------------------------

async def test_listing_filters_unused_sorts_and_pages_with_a_cursor(gut, redis_url):
    await gut.workspace("acme", plan="unlimited")
    ids = {}
    for name in ("delta", "alpha", "charlie", "bravo", "echo"):
        token, key = await gut.key(name=name)
        ids[name] = (token, key["id"])
    for name in ("charlie", "alpha"):
        assert (await call(gut, ids[name][0]))[0] == 200
    # 'charlie' was last used 40 days ago
    r = redis.Redis.from_url(redis_url)
    r.hset(f"kg:key:{{acme}}:{ids['charlie'][1]}", "last_used_at", "1000000000.000")
    r.close()
    _, body = await gut.admin_json("GET", "/workspaces/acme/keys?unused_days=30&sort=name")
    assert [k["name"] for k in body["items"]] == ["bravo", "charlie", "delta", "echo"]
    _, body = await gut.admin_json("GET", "/workspaces/acme/keys?sort=last_used")
    assert [k["name"] for k in body["items"]][-2:] == ["charlie", "alpha"]
    seen, cursor = [], None
    while True:
        path = "/workspaces/acme/keys?sort=name&limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body = await gut.admin_json("GET", path)
        assert status == 200 and len(body["items"]) <= 2
        seen += [k["name"] for k in body["items"]]
        cursor = body.get("next_cursor")
        if cursor is None:
            break
    assert seen == ["alpha", "bravo", "charlie", "delta", "echo"]
    _, body = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert "next_cursor" not in body and len(body["items"]) == 5


def copies_of_a_key(redis_url: str, ws: str, key_id: str, n: int) -> list[dict]:
    """``n`` more keys in ``ws``: copies of the stored key ``key_id`` (its record as written,
    so no format is restated here) with their own id, name, creation, last use and state.
    Far quicker than ``n`` creates (an argon2 hash each). Returns what each copy differs in."""
    import random
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        record = r.hgetall(f"kg:key:{{{ws}}}:{key_id}")
        rng = random.Random(7)
        made, pipe = [], r.pipeline(transaction=False)
        for i in range(n):
            copy = dict(record, id=f"c{i:011d}", name=f"key-{rng.randrange(n // 3):05d}",
                        created_at=f"{1_700_000_000 + rng.randrange(10 ** 6)}.000",
                        last_used_at=rng.choice(["", f"{1_700_000_000 + 86400 * i}.500"]),
                        revoked_at=rng.choice(["", "", "", "1700000000.000"]))
            made.append(copy)
            pipe.hset(f"kg:key:{{{ws}}}:{copy['id']}", mapping=copy)
            pipe.sadd(f"kg:ws:{{{ws}}}:keys", copy["id"])
        pipe.execute()
        return made
    finally:
        r.close()


def commands_run(redis_url: str) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (INFO commandstats)."""
    r = redis.Redis.from_url(redis_url)
    try:
        return {name.removeprefix("cmdstat_"): stats["calls"]
                for name, stats in r.info("commandstats").items()}
    finally:
        r.close()


async def test_a_listing_page_of_a_large_workspace_reads_only_its_page_of_key_records(
        gut, redis_url):
    """Every listing page read every key record of the workspace (HGETALL each, argon2 hash
    and all, each parsed into a key object) to show ``limit`` of them: with 5,000 keys a page
    of 10 cost 5,000 record reads, a self-service script paging through them the square of
    that. The listing now reads what ordering and filtering need of each key in one call and
    the full records of the page only; the pages, their order and cursors are unchanged."""
    await gut.workspace("acme", plan="unlimited")
    _, first = await gut.key(name="key-00000")
    made = copies_of_a_key(redis_url, "acme", first["id"], 5000)
    r = redis.Redis.from_url(redis_url)
    r.config_resetstat()
    r.close()
    started = time.monotonic()
    status, body = await gut.admin_json("GET", "/workspaces/acme/keys?sort=name&limit=10"
                                               "&status=active")
    took = time.monotonic() - started
    assert status == 200 and len(body["items"]) == 10 and body["next_cursor"]
    calls = commands_run(redis_url)
    assert calls.get("hgetall", 0) <= 10 + 3, calls  # the page's records (and the workspace's)
    # and a script reads what ordering needs of each key (an HMGET each, run in Redis), a
    # step of ~LIST_STEP keys per call (an SSCAN step each): never all of them in one call,
    # which held Redis for as long as the workspace is big (tests/test_admin_scale.py)
    steps = calls.get("sscan", 0)
    assert calls.get("hmget", 0) <= 5001 and 5001 // LIST_STEP <= steps <= 3 * 5001 // LIST_STEP
    assert sum(calls.values()) - calls["hmget"] - 2 * steps <= 60, calls
    print(f"a page of 10 of 5,001 keys: {took * 1000:.0f} ms, {calls}")
    # the same pages, order and cursors as judging every whole key object: every sort,
    # filtered or not, paged through
    active = [c for c in made if not c["revoked_at"]] + [{"id": first["id"],
                                                         "name": "key-00000", "last_used_at": "",
                                                         "created_at": str(first["created_at"])}]
    by_name = sorted(active, key=lambda c: (c["name"], c["id"]))
    seen, cursor = [], None
    while True:
        path = "/workspaces/acme/keys?status=active&sort=name&limit=1000" + \
            (f"&cursor={cursor}" if cursor else "")
        status, body = await gut.admin_json("GET", path)
        assert status == 200, body
        seen += [k["id"] for k in body["items"]]
        if (cursor := body.get("next_cursor")) is None:
            break
    assert seen == [c["id"] for c in by_name]
    for sort in ("created", "last_used"):
        _, whole = await gut.admin_json("GET", f"/workspaces/acme/keys?sort={sort}&limit=1000"
                                               "&unused_days=400")
        _, next_page = await gut.admin_json(
            "GET", f"/workspaces/acme/keys?sort={sort}&limit=7&unused_days=400"
                   f"&cursor={whole['next_cursor']}")
        ids = [k["id"] for k in whole["items"] + next_page["items"]]
        keys = {k["id"]: k for k in whole["items"] + next_page["items"]}
        assert len(set(ids)) == 1007
        order = [(keys[i]["created_at"] if sort == "created" else
                  keys[i]["last_used_at"] or "", i) for i in ids]
        assert order == sorted(order), sort


@pytest.mark.parametrize("query", ["sort=age", "limit=0", "limit=1001", "limit=two",
                                   "unused_days=-1", "cursor=garbage", "status=disabled"])
async def test_listing_refuses_bad_parameters(gut, query):
    await gut.workspace()
    status, body = await gut.admin_json("GET", f"/workspaces/acme/keys?{query}")
    assert status == 400 and body["error"]["code"] == "bad_request"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_a_forged_cursor_with_a_number_json_cannot_hold_is_400(gut, value):
    """A cursor is base64 JSON; Python's reader takes NaN and Infinity, and a NaN cursor
    compared below every key: a forged cursor answered 200 with an empty page, as if the
    listing had ended, instead of 400."""
    await gut.workspace()
    await gut.key(name="k")
    raw = f'["created",{value},"x"]'.encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    status, body = await gut.admin_json("GET", f"/workspaces/acme/keys?limit=1&cursor={cursor}")
    assert status == 400 and body["error"]["code"] == "bad_request", body


async def test_a_cursor_belongs_to_its_sort(gut):
    await gut.workspace("acme", plan="unlimited")
    for i in range(3):
        await gut.key(name=f"k{i}")
    _, body = await gut.admin_json("GET", "/workspaces/acme/keys?sort=name&limit=1")
    status, _ = await gut.admin_json("GET",
                                     f"/workspaces/acme/keys?limit=1&cursor={body['next_cursor']}")
    assert status == 400


async def test_delete_removes_a_dead_key_from_listings_keeps_its_audit_refuses_active(gut):
    await gut.workspace()
    token, key = await gut.key()
    async with gut.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
    assert (await call(gut, token))[0] == 200
    await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
    async with gut.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
        assert r.status == 200 and (await r.json())["id"] == key["id"]
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert listing["items"] == []
    assert (await gut.admin_json("GET", f"/workspaces/acme/keys/{key['id']}"))[0] == 404
    async with gut.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
        assert r.status == 404
    # answered as before the delete (never as an unknown key's failed guess)
    assert (await call(gut, token))[:2] == (401, "revoked_key")
    _, audit = await gut.admin_json("GET", "/workspaces/acme/audit")
    actions = [e["action"] for e in audit["items"]]
    assert actions[:3] == ["key.delete", "key.revoke", "key.create"]


async def test_an_expired_key_can_be_deleted(redis_url, upstream, monkeypatch):
    clock = Clock(time.time())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as gut:
        await gut.workspace()
        _, key = await gut.key(expires_in=1)
        clock.now += 1.2
        _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert read["status"] == "expired"
        async with gut.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
            assert r.status == 200


# --- self-service --------------------------------------------------------------------------------

async def test_self_service_keys_follow_the_same_rules_within_their_scopes(gut):
    await gut.workspace()
    admin_token, _ = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    _, wide = await gut.key(name="wide", scopes=["people:read", "people:write"])
    _, narrow = await gut.key(name="narrow", scopes=["people:read"], monthly_requests=10)
    h = bearer(admin_token)

    async def ss(method: str, path: str, body=None):
        async with gut.proxy.request(method, "/_keygate/v1/keys" + path, json=body,
                                     headers=h) as r:
            return r.status, await r.json()

    # disabling any key of the workspace is fine (less than revoking it)
    assert (await ss("PATCH", f"/{wide['id']}", {"enabled": False}))[0] == 200
    # but giving back access to a key wider than itself is not
    status, body = await ss("PATCH", f"/{wide['id']}", {"enabled": True})
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    # within its scopes: caps, addresses and metadata
    status, body = await ss("PATCH", f"/{narrow['id']}",
                            {"monthly_requests": 50, "allowed_ips": ["10.0.0.0/8"],
                             "meta": {"team": "ops"}})
    assert status == 200 and body["monthly_requests"] == 50 and body["meta"] == {"team": "ops"}
    status, body = await ss("PATCH", f"/{wide['id']}", {"monthly_requests": 5})
    assert status == 200  # tightening a wider key is fine
    assert (await ss("PATCH", f"/{wide['id']}", {"monthly_requests": None}))[0] == 403
    status, body = await ss("GET", "?sort=name&limit=2")
    assert status == 200 and [k["name"] for k in body["items"]] == ["admin", "narrow"]
    assert "next_cursor" in body
    status, body = await ss("GET", f"/{narrow['id']}/usage/daily?days=3")
    assert status == 200 and len(body["items"]) == 3
    assert (await ss("DELETE", f"/{narrow['id']}"))[0] == 409
    await ss("POST", f"/{narrow['id']}/revoke")
    assert (await ss("DELETE", f"/{narrow['id']}"))[0] == 200
    status, body = await ss("POST", "", {"name": "x", "scopes": ["people:read"],
                                         "rate_limit": "5/s", "monthly_requests": 3})
    assert status == 201 and body["key"]["monthly_requests"] == 3


async def test_a_workspace_admin_key_cannot_loosen_its_own_limits(gut):
    await gut.workspace()
    token, me = await gut.key(name="admin", scopes=["people:read", "keys:admin"],
                              monthly_requests=100, rate_limit="2/s",
                              allowed_ips=["127.0.0.0/8"])
    path = f"/_keygate/v1/keys/{me['id']}"
    for loosen in ({"monthly_requests": None}, {"monthly_requests": 101},
                   {"rate_limit": None}, {"rate_limit": "3/s"},
                   {"allowed_ips": None}, {"allowed_ips": ["0.0.0.0/0"]}):
        for session, url in ((gut.proxy, path), (gut.admin, "/admin/v1/workspaces/acme/keys/"
                                                             + me["id"])):
            async with session.patch(url, json=loosen, headers=bearer(token)) as r:
                assert r.status == 403, (loosen, await r.text())
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{me['id']}")
    assert (read["monthly_requests"], read["rate_limit"], read["allowed_ips"]) == \
        (100, "2/s", ["127.0.0.0/8"])
    # tightening itself is fine, and the operator may loosen it
    async with gut.proxy.patch(path, json={"monthly_requests": 50, "rate_limit": "1/s",
                                           "meta": {"team": "ops"}},
                               headers=bearer(token)) as r:
        assert r.status == 200
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{me['id']}",
                                        {"monthly_requests": None, "allowed_ips": None})
    assert status == 200 and body["monthly_requests"] is None


async def test_a_restricted_workspace_admin_key_cannot_mint_a_less_restricted_admin_key(gut):
    """A keys:admin key bound to the office network (and capped) created, re-scoped or rotated
    keys holding keys:admin with no allow-list or cap, and managed the workspace's keys from
    anywhere with them. A key that self-service gives keys:admin must be at least as
    restricted as the acting key; ordinary keys stay free of the acting key's limits."""
    await gut.workspace(plan="unlimited")
    office = {"allowed_ips": ["127.0.0.0/8"], "monthly_requests": 100, "rate_limit": "2/s"}
    token, me = await gut.key(name="office-admin", scopes=["people:read", "keys:admin"],
                              **office)
    status, _ = await gut.admin_json("PUT", "/workspaces/acme/roles/ws-admin",
                                     {"scopes": ["keys:admin"]})
    assert status == 200
    h = bearer(token)

    async def ss(method: str, path: str, body=None, via_admin_api: bool = False):
        session, prefix = ((gut.admin, "/admin/v1/workspaces/acme/keys") if via_admin_api
                           else (gut.proxy, "/_keygate/v1/keys"))
        while True:
            async with session.request(method, prefix + path, json=body, headers=h) as r:
                if r.status != 429:  # else over the bound on a key's /_keygate/ calls (20/s)
                    return r.status, await r.json()
                await asyncio.sleep(int(r.headers["Retry-After"]))

    def looser(**change):
        return {**office, **change}

    # creating: an admin key looser in any limit is refused, on both listeners
    for binding in ({"scopes": ["keys:admin"]}, {"role": "ws-admin"}):
        for limits in ({}, looser(allowed_ips=None), looser(allowed_ips=["0.0.0.0/0"]),
                       looser(allowed_ips=["127.0.0.0/8", "10.0.0.0/8"]),
                       looser(monthly_requests=None), looser(monthly_requests=101),
                       looser(rate_limit=None), looser(rate_limit="3/s")):
            for via_admin_api in (False, True):
                status, body = await ss("POST", "", {"name": "escape", **binding, **limits},
                                        via_admin_api)
                assert (status, body["error"]["code"]) == (403, "insufficient_scope"), \
                    (binding, limits, body)
                assert "keys:admin" in body["error"]["message"]
    _, listed = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert [k["name"] for k in listed["items"]] == ["office-admin"]
    # as restricted or more: fine
    status, body = await ss("POST", "", {"name": "deputy", "scopes": ["keys:admin"],
                                         "allowed_ips": ["127.0.0.1/32"], "monthly_requests": 50,
                                         "rate_limit": "1/s"})
    assert status == 201, body
    deputy = body["key"]
    status, body = await ss("POST", "", {"name": "twin", "role": "ws-admin", **office},
                            via_admin_api=True)
    assert status == 201, body
    # an ordinary service key, used from the servers elsewhere, is none of the acting key's
    # business: no allow-list, no cap
    status, body = await ss("POST", "", {"name": "service", "scopes": ["people:read"]})
    assert status == 201 and body["key"]["allowed_ips"] is None, body
    service = body["key"]

    # PATCH: giving keys:admin to an unrestricted key, or loosening an admin key, is refused
    for change in ({"scopes": ["people:read", "keys:admin"]}, {"role": "ws-admin"}):
        status, body = await ss("PATCH", f"/{service['id']}", change)
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), (change, body)
    status, body = await ss("PATCH", f"/{service['id']}", {"scopes": ["keys:admin"], **office})
    assert status == 200 and body["scopes"] == ["keys:admin"], body
    for loosen in ({"allowed_ips": None}, {"monthly_requests": None}, {"rate_limit": "5/s"}):
        status, body = await ss("PATCH", f"/{deputy['id']}", loosen)
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), (loosen, body)
    status, body = await ss("PATCH", f"/{deputy['id']}", {"monthly_requests": 100})
    assert status == 200, body  # looser than it was, no looser than the acting key
    # an admin key the operator made unrestricted: the acting key may rename or tighten it,
    # not loosen it nor rotate it (the rotation would hand over an unrestricted admin token)
    _, free = await gut.key(name="free-admin", scopes=["keys:admin"], monthly_requests=10)
    assert (await ss("PATCH", f"/{free['id']}", {"name": "renamed"}))[0] == 200
    assert (await ss("PATCH", f"/{free['id']}", {"allowed_ips": ["127.0.0.0/8"]}))[0] == 200
    status, body = await ss("PATCH", f"/{free['id']}", {"monthly_requests": 20})
    assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
    for via_admin_api in (False, True):
        status, body = await ss("POST", f"/{free['id']}/rotate", via_admin_api=via_admin_api)
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{free['id']}")
    assert read["status"] == "active"
    status, body = await ss("POST", f"/{deputy['id']}/rotate")
    assert status == 201 and body["key"]["allowed_ips"] == ["127.0.0.1/32"], body
    status, body = await ss("POST", f"/{me['id']}/rotate", {"grace_seconds": 60})
    assert status == 201, body  # itself: exactly as restricted

    # the operator is never held to a key's limits
    status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                        {"name": "root", "scopes": ["ALL"]})
    assert status == 201, body
    status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{free['id']}/rotate")
    assert status == 201, body


async def test_an_unrestricted_workspace_admin_key_still_mints_admin_keys(gut):
    await gut.workspace()
    token, _ = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    async with gut.proxy.post("/_keygate/v1/keys", json={"name": "a2", "scopes": ["keys:admin"]},
                              headers=bearer(token)) as r:
        assert r.status == 201, await r.text()


async def test_a_self_service_patch_is_refused_if_the_key_changed_after_it_was_judged(
        gut, monkeypatch):
    """The acting key narrows a key it lacks scopes for (any address -> 10.0.0.0/8: a
    tightening, allowed); the operator narrows the same key further (10.1.0.0/16) between the
    self-service read and its write. The write, judged against the old state, widened the
    operator's allow-list back to 10.0.0.0/8. Now it is written only on the rev it was judged
    on: 409 conflict, and the operator's narrowing stays."""
    await gut.workspace()
    token, me = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    _, wide = await gut.key(name="wide", scopes=["people:read", "people:write"])
    store = gut.gw.store
    real_update = store.update_key
    writes = []

    async def operator_writes_first(ws, key_id, **fields):
        if fields.get("actor") == me["id"] and not writes:
            # the operator's change lands between the self-service read and its write
            writes.append(await real_update(ws, key_id, allowed_ips=["10.1.0.0/16"]))
        return await real_update(ws, key_id, **fields)

    monkeypatch.setattr(store, "update_key", operator_writes_first)
    for session, url in ((gut.proxy, f"/_keygate/v1/keys/{wide['id']}"),
                         (gut.admin, f"/admin/v1/workspaces/acme/keys/{wide['id']}")):
        writes.clear()
        await gut.admin_json("PATCH", f"/workspaces/acme/keys/{wide['id']}",
                             {"allowed_ips": None})
        async with session.patch(url, json={"allowed_ips": ["10.0.0.0/8"]},
                                 headers=bearer(token)) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (409, "conflict"), body
            assert "changed" in body["error"]["message"]
        assert writes, "the hook never ran"
        _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{wide['id']}")
        assert read["allowed_ips"] == ["10.1.0.0/16"]
        # judged again on the key as it is now, the same change is a loosening: 403
        async with session.patch(url, json={"allowed_ips": ["10.0.0.0/8"]},
                                 headers=bearer(token)) as r:
            assert r.status == 403, await r.text()
    monkeypatch.undo()
    # with nothing in between, self-service and the operator PATCH as before
    async with gut.proxy.patch(f"/_keygate/v1/keys/{wide['id']}", json={"name": "w2"},
                               headers=bearer(token)) as r:
        assert r.status == 200, await r.text()
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{wide['id']}",
                                        {"allowed_ips": None})
    assert status == 200 and body["allowed_ips"] is None


async def test_a_self_service_rate_is_written_only_on_the_plan_it_was_judged_by(
        gut, monkeypatch):
    """A workspace key's PATCH of a rate_limit is judged against the workspace's plan (never
    faster); the operator moves the workspace to a slower plan between that judging and the
    write: the write, judged on the old plan, gave the key a rate above the new plan's. Now it
    is written only on the plan and limits it was judged by: 409 conflict, nothing written;
    judged again on the plan as it is, 403."""
    await gut.workspace("acme", plan="metered")  # 1000/s
    token, me = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    _, target = await gut.key(name="target", scopes=["people:read"])
    store = gut.gw.store
    real_update = store.update_key
    moved = []

    async def operator_moves_plan_first(ws, key_id, **fields):
        if fields.get("actor") == me["id"] and not moved:
            moved.append(await store.update_workspace(ws, plan="limited"))  # 3/s
        return await real_update(ws, key_id, **fields)

    monkeypatch.setattr(store, "update_key", operator_moves_plan_first)
    for session, url in ((gut.proxy, f"/_keygate/v1/keys/{target['id']}"),
                         (gut.admin, f"/admin/v1/workspaces/acme/keys/{target['id']}")):
        moved.clear()
        await store.update_workspace("acme", plan="metered")
        async with session.patch(url, json={"rate_limit": "500/s"}, headers=bearer(token)) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (409, "conflict"), body
            assert "plan or limits" in body["error"]["message"]
        assert moved, "the hook never ran"
        _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{target['id']}")
        assert read["rate_limit"] is None
        async with session.patch(url, json={"rate_limit": "500/s"}, headers=bearer(token)) as r:
            assert r.status == 403, await r.text()
    monkeypatch.undo()
    await store.update_workspace("acme", plan="metered")
    async with gut.proxy.patch(f"/_keygate/v1/keys/{target['id']}", json={"rate_limit": "500/s"},
                               headers=bearer(token)) as r:
        assert r.status == 200 and (await r.json())["rate_limit"] == "500/s", await r.text()


async def test_a_self_service_create_is_made_only_on_the_plan_its_rate_was_judged_by(
        gut, monkeypatch):
    """As for a PATCH: a create's rate_limit judged against the plan, the plan slowed while
    the create waited its turn to hash: 409 conflict and no key; the operator's creates are
    not held to a plan's rate."""
    await gut.workspace("acme", plan="metered")  # 1000/s
    token, _ = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    store = gut.gw.store
    real_new_token = store._new_token
    moved = []

    async def plan_moved_meanwhile(*args, **kwargs):
        made = await real_new_token(*args, **kwargs)
        if not moved:
            moved.append(await store.update_workspace("acme", plan="limited"))  # 3/s
        return made

    monkeypatch.setattr(store, "_new_token", plan_moved_meanwhile)
    async with gut.proxy.post("/_keygate/v1/keys", headers=bearer(token),
                              json={"name": "fast", "scopes": ["people:read"],
                                    "rate_limit": "500/s"}) as r:
        body = await r.json()
        assert (r.status, body["error"]["code"]) == (409, "conflict"), body
    assert moved, "the hook never ran"
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert [k["name"] for k in listing["items"]] == ["admin"]
    status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                        {"name": "fast", "rate_limit": "500/s"})
    assert status == 201, body


async def _open(gut, listener: str):
    port = gut.proxy_server.port if listener == "proxy" else gut.admin_server.port
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, json.loads(body) if body else {}


async def _start_held_body(gut, listener: str, method: str, path: str, token: str,
                           body: bytes):
    """Send a request's head with ``Expect: 100-continue``; return once keygate has admitted
    the caller and asked for the body (its ``100 Continue``), the body still unsent."""
    reader, writer = await _open(gut, listener)
    writer.write((f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  f"Expect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return reader, writer


def _prefix(listener: str) -> str:
    return "/_keygate/v1/keys" if listener == "proxy" else "/admin/v1/workspaces/acme/keys"


async def _answer_after(held, change, body: bytes = b"{}") -> tuple[int, dict]:
    """The held call's answer (``_start_held_body``) once ``change``, an operator's call
    ((status, answer), which must succeed), ran between its admission and its body."""
    reader, writer = held
    try:
        status, answer = await change
        assert status == 200, answer
        writer.write(body)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize("change", ["revoke", "descope", "disable"])
async def test_a_patch_by_an_admin_key_revoked_or_narrowed_in_flight_grants_nothing(
        gut, listener, change):
    """The acting key (keys:admin, people:read, people:write) is authenticated and judged when
    its PATCH's head arrives; its body is read afterwards. The operator revokes it (or takes
    keys:admin and people:write from it, or disables it) before the body comes: the PATCH
    re-bound another key to people:write. Now its write checks the acting key again, as a
    create's or rotation's does (lua/_acting_key.lua): 409 conflict, nothing written."""
    await gut.workspace("acme", plan="unlimited")
    token, me = await gut.key(name="admin",
                              scopes=["keys:admin", "people:read", "people:write"])
    _, target = await gut.key(name="target", scopes=["people:read"])
    body = json.dumps({"scopes": ["people:read", "people:write"]}).encode()
    held = await _start_held_body(gut, listener, "PATCH",
                                  f"{_prefix(listener)}/{target['id']}", token, body)
    if change == "revoke":
        operator = gut.admin_json("POST", f"/workspaces/acme/keys/{me['id']}/revoke")
    elif change == "descope":
        operator = gut.admin_json("PATCH", f"/workspaces/acme/keys/{me['id']}",
                                  {"scopes": ["people:read"]})
    else:
        operator = gut.admin_json("PATCH", f"/workspaces/acme/keys/{me['id']}",
                                  {"enabled": False})
    status, answer = await _answer_after(held, operator, body)
    _, now = await gut.admin_json("GET", f"/workspaces/acme/keys/{target['id']}")
    assert now["scopes"] == ["people:read"], (
        f"a key that no longer may ({change}) widened another key: {status} {answer}")
    assert (status, answer["error"]["code"]) == (409, "conflict"), (status, answer)


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_a_revoked_admin_keys_held_requests_cannot_revoke_the_workspaces_keys(
        gut, listener):
    """The same window, for a leaked admin key the operator revokes: requests it opened before
    the revocation (each admitted at its head, the body held back up to server.timeouts.body,
    60 s) revoked the workspace's integration keys afterwards. Now nothing is changed by a
    key that was revoked before the change was written (as for creates and rotations: 409
    conflict, nothing written)."""
    await gut.workspace("acme", plan="unlimited")
    token, me = await gut.key(name="leaked", scopes=["keys:admin", "people:read"])
    _, prod = await gut.key(name="production", scopes=["people:read"])
    held = await _start_held_body(gut, listener, "POST",
                                  f"{_prefix(listener)}/{prod['id']}/revoke", token, b"{}")
    status, answer = await _answer_after(
        held, gut.admin_json("POST", f"/workspaces/acme/keys/{me['id']}/revoke"))
    _, now = await gut.admin_json("GET", f"/workspaces/acme/keys/{prod['id']}")
    assert now["status"] == "active", (
        f"a revoked key revoked the production key: {status} {answer.get('error', '')}")
    assert (status, answer["error"]["code"]) == (409, "conflict"), (status, answer)


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_a_patch_by_an_admin_key_whose_role_was_narrowed_in_flight_grants_nothing(
        gut, listener):
    """The acting key is bound to a workspace role; the operator redefines the role without
    people:write while the PATCH's body is held (a role edit changes no key's rev): the
    PATCH, judged on the role as it was, gives another key nothing (409), as a create or a
    rotation would not. With the role as it is now, a PATCH within it still goes through."""
    await gut.workspace("acme", plan="unlimited")
    status, _ = await gut.admin_json("PUT", "/workspaces/acme/roles/ws-admin",
                                     {"scopes": ["keys:admin", "people:read", "people:write"]})
    assert status == 200
    token, me = await gut.key(name="admin", role="ws-admin")
    _, target = await gut.key(name="target", scopes=["people:read"])
    body = json.dumps({"scopes": ["people:read", "people:write"]}).encode()
    reader, writer = await _start_held_body(gut, listener, "PATCH",
                                            f"{_prefix(listener)}/{target['id']}", token, body)
    try:
        status, answer = await gut.admin_json("PUT", "/workspaces/acme/roles/ws-admin",
                                              {"scopes": ["keys:admin", "people:read"]})
        assert status == 200, answer
        writer.write(body)
        await writer.drain()
        status, answer = await _read_response(reader)
    finally:
        writer.close()
    assert (status, answer["error"]["code"]) == (409, "conflict"), answer
    _, now = await gut.admin_json("GET", f"/workspaces/acme/keys/{target['id']}")
    assert now["scopes"] == ["people:read"]
    session = gut.proxy if listener == "proxy" else gut.admin
    async with session.patch(f"{_prefix(listener)}/{target['id']}", json={"name": "renamed"},
                             headers=bearer(token)) as r:
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_a_delete_by_an_admin_key_changed_since_it_was_judged_deletes_nothing(
        gut, listener):
    """A DELETE's body (none needed, but a 400 for unknown fields) is read after its head was
    judged: an acting key revoked meanwhile deletes nothing (409 conflict), as it revokes and
    patches nothing; the operator's delete is not held to any acting key."""
    await gut.workspace("acme", plan="unlimited")
    token, me = await gut.key(name="admin", scopes=["keys:admin", "people:read"])
    _, old = await gut.key(name="old", scopes=["people:read"])
    status, _ = await gut.admin_json("POST", f"/workspaces/acme/keys/{old['id']}/revoke")
    assert status == 200
    held = await _start_held_body(gut, listener, "DELETE",
                                  f"{_prefix(listener)}/{old['id']}", token, b"{}")
    status, answer = await _answer_after(
        held, gut.admin_json("POST", f"/workspaces/acme/keys/{me['id']}/revoke"))
    assert (status, answer["error"]["code"]) == (409, "conflict"), answer
    assert "was revoked, disabled, changed or expired" in answer["error"]["message"]
    status, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{old['id']}")
    assert (status, read["status"]) == (200, "revoked")
    status, _ = await gut.admin_json("DELETE", f"/workspaces/acme/keys/{old['id']}")
    assert status == 200
    status, _ = await gut.admin_json("GET", f"/workspaces/acme/keys/{old['id']}")
    assert status == 404


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_rotating_a_key_in_its_grace_again_never_leaves_the_workspace_over_its_cap(
        gut, listener):
    """Plan 'starter': max_keys 5. A keys:admin key fills the cap, rotates one key with a grace
    (one over the cap for the grace: documented) and then rotates the same old key again
    without a grace. The add script took the old key for an active key being replaced (no
    cap check): the old key was revoked and BOTH successors stayed active for good, 6 active
    keys under a cap of 5 (docs/api.md: "the workspace may go one key over its cap, never
    more", "for a while"). A key whose successor is active now meets the cap as a create
    does: 409 key_limit_reached, and the grace runs on; revoking the old key still works."""
    await gut.workspace("acme", plan="starter")
    token, me = await gut.key(name="admin", scopes=["keys:admin", "people:read"])
    prefix = _prefix(listener)
    session = gut.proxy if listener == "proxy" else gut.admin
    headers = bearer(token)

    async def post(path: str, body: dict) -> tuple[int, dict]:
        async with session.post(prefix + path, json=body, headers=headers) as r:
            return r.status, await r.json()

    ids = []
    for i in range(4):
        status, made = await post("", {"name": f"k{i}", "scopes": ["people:read"]})
        assert status == 201, made
        ids.append(made["key"]["id"])
    status, answer = await post("", {"name": "over", "scopes": ["people:read"]})
    assert (status, answer["error"]["code"]) == (409, "key_limit_reached")
    victim = ids[-1]
    status, first = await post(f"/{victim}/rotate", {"grace_seconds": 3600})
    assert status == 201, first
    status, second = await post(f"/{victim}/rotate", {"grace_seconds": 0})
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys?status=active")
    active = listing["items"]
    in_grace = [k for k in active if k["id"] == victim]
    assert len(active) - len(in_grace) <= 5, (
        f"second rotation answered {status}; {len(active)} active keys under a cap of 5, "
        f"none in a grace: {[(k['name'], k['expires_at']) for k in active]}")
    assert (status, second["error"]["code"]) == (409, "key_limit_reached"), second
    assert len(active) == 6 and in_grace, active  # the first rotation's grace runs on
    # with a grace asked, refused as well (it was already: the workspace is over its cap)
    status, third = await post(f"/{victim}/rotate", {"grace_seconds": 60})
    assert (status, third["error"]["code"]) == (409, "key_limit_reached"), third
    # the old key can be revoked (the integration moved to its successor): back at the cap
    status, _ = await post(f"/{victim}/revoke", {})
    assert status == 200
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys?status=active")
    assert len(listing["items"]) == 5


async def test_a_key_in_its_grace_is_held_to_the_cap_while_its_successor_is_active(gut):
    """The operator's rotations meet the same cap: a key in its grace whose successor is
    active is rotated again only within the cap, also once a rename has cleared the
    rotation's 'rotated_to' mark; with its successor revoked it is the integration's only key
    again, and a rotation without a grace replaces it as before, at the cap."""
    await gut.workspace("acme", plan="starter")  # max_keys 5
    ids = [(await gut.key(name=f"k{i}"))[1]["id"] for i in range(5)]
    old = ids[-1]
    keys = "/workspaces/acme/keys"
    status, first = await gut.admin_json("POST", f"{keys}/{old}/rotate", {"grace_seconds": 3600})
    assert status == 201, first
    status, _ = await gut.admin_json("PATCH", f"{keys}/{old}", {"name": "renamed"})
    assert status == 200
    status, body = await gut.admin_json("POST", f"{keys}/{old}/rotate", {"grace_seconds": 0})
    assert (status, body["error"]["code"]) == (409, "key_limit_reached"), body
    status, _ = await gut.admin_json("POST", f"{keys}/{first['key']['id']}/revoke")
    assert status == 200
    status, second = await gut.admin_json("POST", f"{keys}/{old}/rotate", {"grace_seconds": 0})
    assert status == 201, second
    _, listing = await gut.admin_json("GET", f"{keys}?status=active")
    assert sorted(k["id"] for k in listing["items"]) == sorted(ids[:4] + [second["key"]["id"]])


async def test_a_restricted_admin_key_cannot_revive_an_expired_unrestricted_admin_key(
        redis_url, upstream, monkeypatch):
    """The operator bound the workspace's admin key to the office network (A), and the old,
    unrestricted admin key X has expired. Self-service refuses to let A rotate X (a fresh
    unrestricted admin token) or enable X if it were disabled ("loosens (enabling it
    included)"), but A could give X a new expiry: X, expired, was active again, with no
    allow-list, and its old token managed the workspace from anywhere. Reviving an expired
    key is an enabling in all but name (docs/security.md: "Without this, an admin key the
    operator bound to the office network ... could ... manage the workspace's keys from
    anywhere"): now 403 insufficient_scope, as for rotating it. An expired admin key as
    restricted as A is still revived by A, and an active wider one still re-dated."""
    clock = Clock(time.time())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as gut:
        await gut.workspace("acme", plan="unlimited")
        x_token, x = await gut.key(name="old-admin", scopes=["keys:admin", "people:read"],
                                   expires_in=60)
        a_token, a = await gut.key(name="office-admin", scopes=["keys:admin", "people:read"],
                                   allowed_ips=["127.0.0.0/8"], monthly_requests=100)
        clock.now += 120
        _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{x['id']}")
        assert read["status"] == "expired"
        path = f"/_keygate/v1/keys/{x['id']}"
        async with gut.proxy.post(path + "/rotate", json={}, headers=bearer(a_token)) as r:
            assert r.status == 403, await r.text()  # rotating it: refused, as documented
        async with gut.proxy.patch(path, json={"expires_at": "2099-01-01T00:00:00Z"},
                                   headers=bearer(a_token)) as r:
            status, body = r.status, await r.json()
        async with gut.proxy.get("/_keygate/v1/keys", headers=bearer(x_token)) as r:
            revived = r.status
        assert (status, revived) == (403, 401), (
            f"re-dating the expired unrestricted admin key answered {status}; its old token "
            f"now answers {revived} on /_keygate/v1/keys ({body.get('status')}, "
            f"allowed_ips={body.get('allowed_ips')})")
        assert body["error"]["code"] == "insufficient_scope", body
        # on the admin listener too
        async with gut.admin.patch(f"/admin/v1/workspaces/acme/keys/{x['id']}",
                                   json={"expires_at": None}, headers=bearer(a_token)) as r:
            assert r.status == 403, await r.text()
        _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{x['id']}")
        assert read["status"] == "expired"
        # an expired admin key within A's limits: A brings it back
        _, y = await gut.key(name="office-deputy", scopes=["keys:admin"], expires_in=60,
                             allowed_ips=["127.0.0.1/32"], monthly_requests=50)
        clock.now += 120
        async with gut.proxy.patch(f"/_keygate/v1/keys/{y['id']}",
                                   json={"expires_at": "2099-01-01T00:00:00Z"},
                                   headers=bearer(a_token)) as r:
            assert r.status == 200 and (await r.json())["status"] == "active", await r.text()
        # X brought back by the operator: A may still re-date it (an active key)
        status, _ = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{x['id']}",
                                         {"expires_at": "2099-01-01T00:00:00Z"})
        assert status == 200
        async with gut.proxy.patch(path, json={"expires_at": "2098-01-01T00:00:00Z"},
                                   headers=bearer(a_token)) as r:
            assert r.status == 200, await r.text()


# --- days, months and rotation ------------------------------------------------------------------

async def test_days_and_the_keys_month_turn_over_at_midnight_utc(redis_url, upstream,
                                                                 monkeypatch):
    clock = Clock("2026-11-30T23:59:59")
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace()
        token, key = await g.key(monthly_requests=1)
        assert (await call(g, token))[0] == 200
        assert (await call(g, token))[:2] == (429, "key_quota_exceeded")
        clock.set("2026-12-01T00:00:00")
        assert (await call(g, token))[0] == 200  # a new month: the key's cap starts over
        _, days = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}/usage/daily"
                                            "?days=2")
        assert days["items"] == [{"date": "2026-11-30", "requests": 1},
                                 {"date": "2026-12-01", "requests": 1}]


async def test_rotation_keeps_the_keys_controls(gut):
    await gut.workspace()
    _, key = await gut.key(monthly_requests=9, allowed_ips=["10.0.0.0/8"], meta={"a": 1},
                           rate_limit="3/s")
    status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate")
    assert status == 201
    new = body["key"]
    assert (new["monthly_requests"], new["allowed_ips"], new["meta"], new["rate_limit"],
            new["enabled"]) == (9, ["10.0.0.0/8"], {"a": 1}, "3/s", True)
    assert (await call(gut, body["token"]))[:2] == (403, "ip_not_allowed")


async def test_a_rotated_key_goes_on_from_its_months_count_not_a_fresh_cap(gut):
    await gut.workspace()
    token, key = await gut.key(name="admin", scopes=["people:read", "keys:admin"],
                               monthly_requests=3)
    assert [(await call(gut, token))[0] for _ in range(2)] == [200, 200]
    # a workspace admin key rotating itself (or the operator rotating a leaked key) gets the
    # same integration's cap, not another 3 requests
    async with gut.proxy.post(f"/_keygate/v1/keys/{key['id']}/rotate", json={},
                              headers=bearer(token)) as r:
        assert r.status == 201
        body = await r.json()
    assert body["key"]["used_this_month"] == 2
    new = body["token"]
    assert [(await call(gut, new))[:2] for _ in range(2)] == [(200, None),
                                                            (429, "key_quota_exceeded")]
    status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{body['key']['id']}"
                                                "/rotate", {"grace_seconds": 60})
    assert status == 201 and body["key"]["used_this_month"] == 3
    assert (await call(gut, body["token"]))[:2] == (429, "key_quota_exceeded")


async def test_a_rotated_key_goes_on_in_its_rate_window_not_a_fresh_one(redis_url, upstream,
                                                                         monkeypatch):
    """A key at its rate limit that rotates itself gets no fresh window: a workspace admin key
    held to 3/m rotated whenever it was refused and sent 3 more each time, in the same
    minute, as often as it liked."""
    clock = Clock()  # the same instant until moved: one window
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace(plan="unlimited")
        token, key = await g.key(name="admin", scopes=["people:read", "keys:admin"],
                                 rate_limit="3/m")
        assert [(await call(g, token))[:2] for _ in range(4)] == \
            [(200, None)] * 3 + [(429, "rate_limited")]
        async with g.proxy.post(f"/_keygate/v1/keys/{key['id']}/rotate", json={},
                                headers=bearer(token)) as r:
            assert r.status == 201
            body = await r.json()
        assert (await call(g, body["token"]))[:2] == (429, "rate_limited")
        status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{body['key']['id']}"
                                                  "/rotate", {"grace_seconds": 60})
        assert status == 201
        assert (await call(g, body["token"]))[:2] == (429, "rate_limited")
        clock.now += 60  # the window moves on for the new key as for the old
        assert [(await call(g, body["token"]))[:2] for _ in range(4)] == \
            [(200, None)] * 3 + [(429, "rate_limited")]
        assert len(upstream.requests) == 6
        r = redis.Redis.from_url(redis_url)
        assert all(r.pttl(k) > 0 for k in r.scan_iter("kg:rate:*"))


async def test_keys_in_a_rotations_grace_share_one_rate_and_one_monthly_cap(redis_url, upstream,
                                                                           monkeypatch):
    """During a grace the old and the new key are one integration: a client holding both got
    the full rate limit on each (twice the rate for the whole grace) and the key's own
    monthly cap twice over (each key counted on its own from the count at the rotation)."""
    clock = Clock()  # one window until moved
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as a, \
            gateway_under_test(config, redis_url, monkeypatch, clock=clock) as b:
        await a.workspace(plan="unlimited")
        old, key = await a.key(rate_limit="4/m", monthly_requests=6)
        assert (await call(a, old))[0] == 200
        status, body = await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                          {"grace_seconds": 3600})
        assert status == 201
        new, new_id = body["token"], body["key"]["id"]
        got = [(await call(g, t))[:2] for g, t in ((a, old), (b, new), (b, old), (a, new),
                                                    (b, old), (a, new))]
        assert got == [(200, None)] * 3 + [(429, "rate_limited")] * 3  # 4 a minute in all
        clock.now += 61
        got = [(await call(g, t))[:2] for g, t in ((b, new), (a, old), (a, new), (b, old))]
        assert got == [(200, None)] * 2 + [(429, "key_quota_exceeded")] * 2  # 6 a month in all
        assert len(upstream.requests) == 6
        for key_id in (key["id"], new_id):
            _, read = await a.admin_json("GET", f"/workspaces/acme/keys/{key_id}")
            assert read["used_this_month"] == 6
        # each key's day history is its own requests
        for key_id, requests in ((key["id"], 4), (new_id, 2)):
            _, days = await a.admin_json("GET",
                                         f"/workspaces/acme/keys/{key_id}/usage/daily?days=1")
            assert days["items"][0]["requests"] == requests
        # a rotation of the new key within the grace: all three share it
        await a.admin_json("PATCH", f"/workspaces/acme/keys/{new_id}", {"monthly_requests": 7})
        status, body = await a.admin_json("POST", f"/workspaces/acme/keys/{new_id}/rotate",
                                          {"grace_seconds": 60})
        assert status == 201 and body["key"]["used_this_month"] == 6
        got = [(await call(g, t))[:2] for g, t in ((b, body["token"]), (a, old), (a, new))]
        assert got == [(200, None)] + [(429, "key_quota_exceeded")] * 2
        assert len(upstream.requests) == 7


async def test_no_message_about_a_key_control_echoes_a_token(gut):
    await gut.workspace()
    token, key = await gut.key()
    for method, path, body in (
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"allowed_ips": [token]}),
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"rate_limit": token}),
            ("POST", "/workspaces/acme/keys", {"name": "n", "scopes": ["a"],
                                               "rate_limit": token}),
            ("POST", "/workspaces/acme/keys", {"name": "n", "scopes": ["a"],
                                               "rate_limit": f"{token}/s"}),
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"monthly_requests": token}),
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"enabled": token}),
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"meta": token}),
            ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"expires_at": token}),
            ("PATCH", "/workspaces/acme", {"limits": {"rate_limit": token}}),
            ("PATCH", "/workspaces/acme", {"limits": {"max_keys": token}}),
            ("PATCH", "/workspaces/acme", {"plan": token}),
            ("PATCH", "/workspaces/acme", {"limits": {token: 1}}),
            ("DELETE", f"/workspaces/acme/keys/{token}", None),
            ("GET", f"/workspaces/acme/keys/{token}/usage/daily", None)):
        status, answer = await gut.admin_json(method, path, body)
        assert status in (400, 404), answer
        assert token not in json.dumps(answer) and token[8:40] not in json.dumps(answer)


async def test_a_catalogue_refusal_never_echoes_a_token(catalogued):
    await catalogued.workspace()
    token, _ = await catalogued.key(scopes=["people:read"])
    status, answer = await catalogued.admin_json("POST", "/workspaces/acme/keys",
                                                 {"name": "x", "scopes": [token]})
    assert status == 400 and token[8:40] not in json.dumps(answer)


async def test_concurrent_limit_changes_of_different_fields_both_stay(gut):
    await gut.workspace()
    changes = [{"monthly_requests": 10 + i} if i % 2 else {"max_keys": 20 + i}
               for i in range(20)]
    results = await asyncio.gather(*(gut.admin_json("PATCH", "/workspaces/acme", {"limits": c})
                                     for c in changes))
    assert all(status == 200 for status, _ in results)
    _, ws = await gut.admin_json("GET", "/workspaces/acme")
    assert set(ws["custom_limits"]) == {"monthly_requests", "max_keys"}


async def test_large_limits_keep_every_digit_through_the_merge(gut):
    """The limits are merged in the store's script (so concurrent changes of different fields
    both stay), and its JSON encoder writes numbers with 14 significant digits: a cap of
    123456789012345 (15 digits, within the 10**15 the API takes) was stored as
    1.2345678901234e+14, and shown, and enforced, as 123456789012340.0 from then on."""
    await gut.workspace()
    big, top = 123456789012345, 10**15
    status, _ = await gut.admin_json("PATCH", "/workspaces/acme",
                                     {"limits": {"monthly_requests": big}})
    assert status == 200
    status, ws = await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"max_keys": top}})
    assert status == 200
    async with gut.admin.get("/admin/v1/workspaces/acme") as r:
        text = await r.text()
    assert json.loads(text)["custom_limits"] == ws["custom_limits"] == {
        "monthly_requests": big, "max_keys": top}
    assert f'"monthly_requests": {big},' in text and f'"max_keys": {top}' in text
    _, usage = await gut.admin_json("GET", "/workspaces/acme/usage")
    assert (usage["limit"], usage["remaining"]) == (big, big)


async def test_creates_waiting_their_turn_to_hash_obey_a_cap_lowered_meanwhile(gut, redis_url):
    """A create read the workspace's cap, then waited its turn to hash the secret (one at a
    time), then ran the script with the cap it had read: creates queued behind others (a
    workspace admin sending many at once) while the operator lowered ``max_keys`` all went
    through, leaving the workspace far over its new cap."""
    await gut.workspace("acme", plan="unlimited")
    store = gut.gw.store
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with store._hashing:  # the hash queue is busy: every create waits there
            creates = [asyncio.create_task(gut.admin_json(
                "POST", "/workspaces/acme/keys", {"name": f"k{i}", "scopes": []}))
                for i in range(6)]
            # each has read the workspace and reserved its key id, and waits to hash
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 6)
            status, _ = await gut.admin_json("PATCH", "/workspaces/acme",
                                             {"limits": {"max_keys": 2}})
            assert status == 200
        results = await asyncio.gather(*creates)
    finally:
        r.close()
    assert sorted(status for status, _ in results) == [201] * 2 + [409] * 4
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys?status=active")
    assert len(listing["items"]) == 2
    # a rotation with a grace, likewise: at the cap it may go one over; not once it is lowered
    key_id = listing["items"][0]["id"]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with store._hashing:
            rotation = asyncio.create_task(gut.admin_json(
                "POST", f"/workspaces/acme/keys/{key_id}/rotate", {"grace_seconds": 60}))
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 3)  # its new key id
            assert (await gut.admin_json("PATCH", "/workspaces/acme",
                                         {"limits": {"max_keys": 1}}))[0] == 200
    finally:
        r.close()
    status, body = await rotation
    assert (status, body["error"]["code"]) == (409, "key_limit_reached"), body


@pytest.mark.parametrize("listener", ["admin", "proxy"])
@pytest.mark.parametrize("change", ["revoke", "disable", "narrow", "role-demoted",
                                    "role-narrowed"])
async def test_a_workspace_admin_key_revoked_while_its_calls_wait_to_hash_mints_nothing(
        gut, redis_url, listener, change):
    """A workspace admin key's creates and rotations were judged when they arrived, then waited
    their turn to hash (one at a time for the whole process: seconds behind a burst), then
    wrote whatever the acting key had become meanwhile. An operator revoking a leaked admin key
    (or disabling it, or taking keys:admin from it) still saw keys minted by it afterwards,
    from calls it had queued: new tokens in the holder's hands after the revoke. Now the write
    checks, in the same step, that the acting key is still the key that was judged, and that
    the workspace role it is bound to (here one defined over the configured role it was
    bound to) still grants it keys:admin and the new key's scopes."""
    await gut.workspace("acme", plan="unlimited")
    admin_token, admin_key = await gut.key(role="admin")
    _, target = await gut.key(name="target")
    store = gut.gw.store
    if listener == "admin":
        session, prefix = gut.admin, "/admin/v1/workspaces/acme/keys"
    else:
        session, prefix = gut.proxy, "/_keygate/v1/keys"

    async def call(path: str, body: dict) -> tuple[int, dict]:
        async with session.post(prefix + path, json=body, headers=bearer(admin_token)) as r:
            return r.status, await r.json()

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with store._hashing:  # the hash queue is busy: the calls wait there, judged
            calls = [asyncio.create_task(call("", {"name": f"k{i}", "scopes": ["people:read"]}))
                     for i in range(3)]
            calls.append(asyncio.create_task(call(f"/{target['id']}/rotate",
                                                  {"grace_seconds": 0})))
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 2 + 4)
            if change.startswith("role"):
                scopes = ["people:read"] if change == "role-demoted" else ["keys:admin"]
                status, answer = await gut.admin_json("PUT", "/workspaces/acme/roles/admin",
                                                      {"scopes": scopes})
            else:
                body = {"enabled": False} if change == "disable" \
                    else {"scopes": ["people:read"]}
                status, answer = await gut.admin_json(
                    "POST" if change == "revoke" else "PATCH",
                    f"/workspaces/acme/keys/{admin_key['id']}" + (
                        "/revoke" if change == "revoke" else ""),
                    None if change == "revoke" else body)
            assert status == 200, answer
        results = await asyncio.gather(*calls)
    finally:
        r.close()
    assert [(s, b["error"]["code"]) for s, b in results] == [(409, "conflict")] * 4, results
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert sorted(k["name"] for k in listing["items"]) == ["integration", "target"]
    assert all(k["status"] == "active" for k in listing["items"] if k["name"] == "target")


@pytest.mark.parametrize("listener", ["admin", "proxy"])
@pytest.mark.parametrize("call", ["create", "rotate"])
async def test_a_create_or_rotation_whose_caller_left_while_it_waited_writes_nothing(
        gut, redis_url, listener, call):
    """A create or rotation waits its turn to hash (one at a time for the whole process:
    seconds behind a burst); a caller that gave up meanwhile (the CLI's 10 s timeout, a
    script's) got no answer, yet the key was written: an active key whose token nobody ever
    saw, counted against the cap, and a rotation without a grace revoked the old key the
    integration still used while its successor's token was thrown away. Now a call whose
    caller has gone by the time its hash is ready writes nothing. Both listeners are served as
    ``keygate serve`` serves them (a handler is not cancelled when its client goes)."""
    from aiohttp import web

    from gateway.proxying.server import AdminRunner
    await gut.workspace("acme", plan="unlimited")
    admin_token, _ = await gut.key(name="admin", role="admin")
    _, old = await gut.key(name="old")
    store = gut.gw.store
    runner = AdminRunner(gut.gw.admin_app, handle_signals=False, access_log=None)  # as app.py
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    if listener == "admin":
        port, prefix = runner.addresses[0][1], "/admin/v1/workspaces/acme/keys"
    else:
        port, prefix = gut.proxy_server.port, "/_keygate/v1/keys"
    path, body = prefix, b'{"name": "lost", "scopes": ["people:read"]}'
    if call == "rotate":
        path, body = f"{prefix}/{old['id']}/rotate", b"{}"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with store._hashing:  # the hash queue is busy: the call waits there
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         f"{admin_token}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 3)  # its new id
            writer.close()  # the caller gives up
            await asyncio.sleep(0.2)  # the listener reads that
        assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 2)  # the id let go
    finally:
        r.close()
        await runner.cleanup()
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert sorted((k["name"], k["status"]) for k in listing["items"]) == [
        ("admin", "active"), ("old", "active")]
    _, audit = await gut.admin_json("GET", "/workspaces/acme/audit")
    assert [e["action"] for e in audit["items"]] == ["key.create"] * 2 + ["workspace.create"]


async def test_one_workspaces_burst_of_creates_does_not_hold_up_another_workspaces(gut,
                                                                                    redis_url):
    """New keys' secrets are hashed one at a time for the whole process, first come first
    served: a workspace (its admin key, its automation) sending a burst of creates put every
    other workspace's create or rotation, and the operator's emergency rotation of a leaked
    key, behind all of them (120 creates: ~3 s at the shipped argon2 cost; long enough for
    the CLI's 10 s timeout at a few hundred). Turns now go round the workspaces waiting, so
    another workspace waits for one hash of each workspace ahead of it, not for their bursts."""
    await gut.workspace("acme", plan="unlimited")
    await gut.workspace("beta", plan="unlimited")
    store, done = gut.gw.store, []

    async def create(ws: str, name: str) -> None:
        status, body = await gut.admin_json("POST", f"/workspaces/{ws}/keys", {"name": name,
                                                                                "scopes": []})
        assert status == 201, body
        done.append(ws)

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with store._hashing:  # the hash queue is busy: the burst queues behind
            burst = [asyncio.create_task(create("acme", f"k{i}")) for i in range(30)]
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 30)
            other = asyncio.create_task(create("beta", "urgent"))
            assert await eventually(lambda: len(r.keys("kg:keyid:*")) == 31)
        await asyncio.gather(other, *burst)
    finally:
        r.close()
    assert done.index("beta") <= 2, done


async def test_hash_turns_pass_on_past_callers_cancelled_while_waiting_or_when_handed_one():
    """A caller cancelled while it waits (its client gone, under handler cancellation) leaves
    the round; one cancelled just as it was handed the turn hands it on: neither holds up
    those behind it for ever."""
    from gateway.store.admin_base import FairTurns
    turns, order = FairTurns(), []

    async def take(party: str, name: str) -> None:
        async with turns.turn(party):
            order.append(name)
            await asyncio.sleep(0)

    async with turns:
        gone = asyncio.create_task(take("a", "gone"))
        kept = [asyncio.create_task(take("a", "a2")), asyncio.create_task(take("b", "b1"))]
        await asyncio.sleep(0)
        gone.cancel()  # waiting: it leaves the round
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*kept), 2)
    assert order == ["a2", "b1"]
    async with turns:
        handed = asyncio.create_task(take("a", "handed"))
        after = asyncio.create_task(take("b", "after"))
        await asyncio.sleep(0)
    handed.cancel()  # the release just handed it the turn; it has not run yet
    await asyncio.wait_for(after, 2)
    assert order[-1] == "after" and handed.cancelled()
    await asyncio.wait_for(take("c", "free"), 2)  # nobody holds it now
    async with turns:  # one cancelled and passed by a release before it runs again
        passed = asyncio.create_task(take("a", "passed"))
        last = asyncio.create_task(take("b", "last"))
        await asyncio.sleep(0)
        passed.cancel()
    await asyncio.wait_for(last, 2)
    assert (await asyncio.gather(passed, return_exceptions=True))[0].__class__ \
        is asyncio.CancelledError  # not a ValueError from leaving a round it was not in
    assert order[-1] == "last"


async def test_a_key_edited_again_and_again_while_in_use_is_never_a_503(gut):
    """Every change of a key (its meta, name or description included) moved its rev, and a
    request whose check meets a rev other than the one it read re-reads the key and checks
    again. After 3 such tries it answered 503 store_unavailable from a healthy store: a script
    updating a key's meta while the key served traffic had ~1 request in 6 refused so (SPEC:
    no burst of concurrent work may turn into store_unavailable). Each try that finds the key
    changed has read it as it is, so trying more often costs only the requests that meet
    changes; now 16 tries. On a loaded machine 8 editors still made all 16 stale now and then:
    an edit of meta, name or description now moves no rev (nothing cached holds them), so
    these requests meet no change at all."""
    await gut.workspace("acme", plan="unlimited")
    token, key = await gut.key()
    done, edits = asyncio.Event(), []

    async def edit(i: int) -> None:
        while not done.is_set():
            status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                                {"meta": {"edit": i}})
            assert status == 200, body
            edits.append(i)

    async def use() -> tuple[int, bytes]:
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            return r.status, await r.read()

    editors = [asyncio.create_task(edit(i)) for i in range(8)]
    try:
        await eventually(lambda: len(edits) >= 8)
        got = []
        for _ in range(10):
            got += await asyncio.gather(*(use() for _ in range(50)))
    finally:
        done.set()
        await asyncio.gather(*editors)
    assert [(s, b) for s, b in got if s != 200] == []


@contextlib.contextmanager
def monitored(redis_url: str):
    """The commands Redis runs meanwhile, as MONITOR shows them (a script's own: 'lua:...')."""
    seen: list[str] = []
    started, marker = threading.Event(), f"stop-monitor-{secrets.token_hex(4)}"

    def watch() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            with client.monitor() as m:
                started.set()
                for event in m.listen():
                    if marker in event["command"]:
                        return
                    seen.append(("lua:" if event.get("client_type") == "lua" else "")
                                + event["command"])
        finally:
            client.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield seen
    finally:
        r = redis.Redis.from_url(redis_url)
        r.echo(marker)
        r.close()
        thread.join(5)


async def test_a_keys_name_description_or_meta_edit_makes_no_replica_read_it_again(
        redis_url, upstream, monkeypatch):
    """A key's name, description and meta are in no cached key (answers that show them read
    the key from the store), yet an edit of any of them moved the key's rev: every replica's
    next request of the key met a 'stale' check, read the key again and checked again, three
    round trips instead of one; a script editing meta while the key served traffic made most
    requests do that, some of them 16 times and then 503 store_unavailable (SPEC: no burst of
    concurrent work may turn into store_unavailable). A workspace's name the same. Such edits
    now leave the revs, and every answer that shows them shows them as edited."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace("acme", plan="unlimited")
        token, key = await a.key(name="crm", description="first", meta={"crm": "c-1"})
        for g in (a, b):  # cached at both replicas
            assert (await call(g, token))[0] == 200
        path = f"/workspaces/acme/keys/{key['id']}"
        for change in ({"meta": {"crm": "c-2"}}, {"name": "crm-2"}, {"description": "second"},
                       {"name": "crm-3", "description": "third", "meta": {"crm": "c-3"}}):
            status, body = await a.admin_json("PATCH", path, change)
            assert status == 200, body
        status, body = await a.admin_json("PATCH", "/workspaces/acme", {"name": "Acme Inc"})
        assert status == 200, body
        key_hash = f"kg:key:{{acme}}:{key['id']}"
        with monitored(redis_url) as seen:
            for g in (a, b):
                for _ in range(3):
                    assert (await call(g, token))[0] == 200
        # one round trip a request (its check), naming the key; no read of the key
        calls = [c for c in seen if not c.startswith("lua:") and key_hash in c]
        assert len(calls) == 6, calls
        assert not [c for c in seen if c.startswith("lua:") and "HGETALL" in c.upper()], seen
        # shown as edited: by the key's own usage endpoint, at either replica, and the admin API
        for g in (a, b):
            async with g.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
                assert r.status == 200
                shown = (await r.json())["key"]
            assert (shown["name"], shown["description"], shown["meta"]) == \
                ("crm-3", "third", {"crm": "c-3"})
        _, read = await b.admin_json("GET", path)
        assert (read["name"], read["description"], read["meta"]) == \
            ("crm-3", "third", {"crm": "c-3"})
        _, ws = await b.admin_json("GET", "/workspaces/acme")
        assert ws["name"] == "Acme Inc"


async def test_a_change_that_decides_requests_acts_on_the_next_request_at_every_replica(
        redis_url, upstream, monkeypatch):
    """A name, description or meta edit leaves a key's rev; every change that can decide a
    request still moves it: scopes, enabled, expiry, the IP allow-list, its limits, and the
    workspace's plan, each in force at the other replica's very next request, however many
    meta edits came between."""
    clock = Clock()
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as a, \
            gateway_under_test(config, redis_url, monkeypatch, clock=clock) as b:
        await a.workspace("acme", plan="unlimited")
        token, key = await a.key(meta={"crm": "c-1"})
        for g in (a, b):
            assert (await call(g, token))[0] == 200
        path = f"/workspaces/acme/keys/{key['id']}"

        async def then(change: dict, ws: bool = False) -> tuple[int, str | None]:
            status, body = await a.admin_json("PATCH", path, {"meta": {"at": clock.now}})
            assert status == 200, body
            status, body = await a.admin_json("PATCH", "/workspaces/acme" if ws else path,
                                              change)
            assert status == 200, body
            return (await call(b, token))[:2]

        assert await then({"scopes": ["other:read"]}) == (403, "insufficient_scope")
        assert await then({"scopes": ["people:read"]}) == (200, None)
        assert await then({"enabled": False}) == (401, "disabled_key")
        assert await then({"enabled": True}) == (200, None)
        assert await then({"allowed_ips": ["10.0.0.0/8"]}) == (403, "ip_not_allowed")
        assert await then({"allowed_ips": None}) == (200, None)
        assert await then({"expires_at": rfc3339(clock.now + 60)}) == (200, None)
        clock.now += 120
        assert (await call(b, token))[:2] == (401, "expired_key")
        assert await then({"expires_at": rfc3339(clock.now + 3600)}) == (200, None)
        assert await then({"monthly_requests": 1}) == (429, "key_quota_exceeded")
        assert await then({"monthly_requests": None}) == (200, None)
        clock.now += 120  # a rate window of its own
        assert await then({"rate_limit": "1/m"}) == (200, None)
        assert (await call(b, token))[:2] == (429, "rate_limited")
        assert await then({"rate_limit": None}) == (200, None)
        assert await then({"limits": {"monthly_requests": 1}}, ws=True) == \
            (429, "quota_exceeded")
        assert await then({"limits": None}, ws=True) == (200, None)


async def test_a_rotation_copies_a_name_description_or_meta_edited_while_it_was_written(
        gut, monkeypatch):
    """A rotation copies the old key's name, description and meta into the new key from its
    read of the old key; an edit of them between that read and the write no longer moves the
    key's rev, so the write itself finds the copy out of date, reads the key again and copies
    it as edited: the new key never carries what the edit replaced."""
    await gut.workspace("acme", plan="unlimited")
    _, key = await gut.key(name="crm", description="first", meta={"crm": "c-1"})
    path = f"/workspaces/acme/keys/{key['id']}"
    store = gut.gw.store
    real_run = store._run
    edits = []

    async def edited_first(name, keys, args, **kw):
        if name == "add_key" and not edits:  # the operator edits it meanwhile
            edits.append(await gut.admin_json("PATCH", path, {
                "name": "crm-2", "description": "second", "meta": {"crm": "c-2"}}))
        return await real_run(name, keys, args, **kw)

    monkeypatch.setattr(store, "_run", edited_first)
    status, body = await gut.admin_json("POST", path + "/rotate", {"grace_seconds": 3600})
    assert status == 201, body
    assert [s for s, _ in edits] == [200]
    new = body["key"]
    assert (new["name"], new["description"], new["meta"]) == ("crm-2", "second", {"crm": "c-2"})
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{new['id']}")
    assert (read["name"], read["description"], read["meta"]) == \
        ("crm-2", "second", {"crm": "c-2"})


async def test_a_write_that_meets_a_workspace_edited_again_and_again_hashes_once(
        gut, redis_url, monkeypatch):
    """A rotation (or a create) whose workspace is edited between its read and its write is
    written again, and is refused once that happens time after time. It hashed the new secret
    again for every try (argon2, one at a time for the whole process) and, out of tries,
    answered 503 store_unavailable for a healthy store, logging 'could not find a free key
    id'. Now: one hash however often the write is tried, and a 409 conflict that says the
    workspace kept changing and nothing was written."""
    await gut.workspace("acme", plan="unlimited")
    _, key = await gut.key()
    store = gut.gw.store
    hashes, edits = [], []
    real_hash, real_run = store.hasher.hash, store._run

    def counting_hash(secret):
        hashes.append(1)
        return real_hash(secret)

    async def edited_first(name, keys, args, **kw):
        if name == "add_key" and len(edits) < edit_times:  # the operator edits it meanwhile
            edits.append(await gut.admin_json(  # its cap, which the write is judged on
                "PATCH", "/workspaces/acme", {"limits": {"max_keys": 1000 + len(edits)}}))
        return await real_run(name, keys, args, **kw)

    monkeypatch.setattr(store.hasher, "hash", counting_hash)
    monkeypatch.setattr(store, "_run", edited_first)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ids_before = set(r.keys("kg:keyid:*"))
    # edited a few times in a row: written on a later try, hashed once
    edit_times = 3
    status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate", {})
    assert status == 201, body
    assert (len(hashes), len(edits)) == (1, 3)
    assert (await call(gut, body["token"]))[0] == 200
    key = body["key"]
    # edited before every try: refused, saying so, nothing written, the reserved id freed
    for path in (f"/workspaces/acme/keys/{key['id']}/rotate", "/workspaces/acme/keys"):
        hashes.clear(), edits.clear()
        edit_times = 100
        ids_before = set(r.keys("kg:keyid:*"))
        status, body = await gut.admin_json("POST", path, {"name": "k", "scopes": []}
                                            if path.endswith("/keys") else {})
        assert (status, body["error"]["code"]) == (409, "conflict"), body
        message = body["error"]["message"]
        assert "workspace 'acme' changed" in message.lower() and "retry" in message.lower()
        assert "free key id" not in message
        assert len(hashes) == 1 and len(edits) > 1
        assert set(r.keys("kg:keyid:*")) == ids_before
    r.close()
    _, listing = await gut.admin_json("GET", "/workspaces/acme/keys?status=active")
    assert [k["id"] for k in listing["items"]] == [key["id"]]


async def test_a_reloaded_scope_catalogue_applies_to_the_next_admin_call(tmp_path, redis_url,
                                                                        upstream, monkeypatch):
    from gateway.config import load_config
    from test_reload import config_doc, write
    path = tmp_path / "keygate.yaml"
    write(path, config_doc(str(upstream.make_url(""))))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                  config_path=str(path)) as g:
        await g.workspace()
        status, _ = await g.admin_json("POST", "/workspaces/acme/keys",
                                       {"name": "a", "scopes": ["people:raed"]})
        assert status == 201  # no catalogue: any well-formed scope
        write(path, config_doc(str(upstream.make_url("")),
                               scopes={"people:read": "Read people"}))
        status, body = await g.admin_json("POST", "/reload")
        assert status == 200, body
        status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                          {"name": "b", "scopes": ["people:raed"]})
        assert status == 400
        _, listed = await g.admin_json("GET", "/scopes")
        assert listed["items"] == [{"name": "people:read", "description": "Read people"}]


async def test_a_workspace_role_holding_a_scope_a_reloaded_catalogue_dropped(tmp_path, redis_url,
                                                                           upstream,
                                                                           monkeypatch):
    """A catalogue reloaded in after a workspace role was defined: keys already bound to the
    role act as keys holding the dropped scope explicitly do (the scope matches no route, the
    others still work); binding a key to the role anew is a 400, as naming the scope
    explicitly is (it used to be created), until the role is redefined within the catalogue."""
    from gateway.config import load_config
    from test_reload import config_doc, write
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    write(path, config_doc(url))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                  config_path=str(path)) as g:
        await g.workspace()
        status, _ = await g.admin_json("PUT", "/workspaces/acme/roles/custom",
                                       {"scopes": ["people:read", "people:raed"]})
        assert status == 200
        role_token, role_key = await g.key(name="by-role", role="custom")
        scope_token, scope_key = await g.key(name="by-scopes",
                                             scopes=["people:read", "people:raed"])
        admin_token, _ = await g.key(name="admin", scopes=["people:read", "people:raed",
                                                           "keys:admin"])
        write(path, config_doc(url, scopes={"people:read": "Read people",
                                            "keys:admin": "Manage keys"}))
        status, body = await g.admin_json("POST", "/reload")
        assert status == 200, body

        # request time: the same for both, the dropped scope just matches no route
        for token in (role_token, scope_token, admin_token):
            assert (await call(g, token))[0] == 200
        # the API: naming the dropped scope, directly or through the role, is a 400
        for binding in ({"scopes": ["people:read", "people:raed"]}, {"role": "custom"}):
            status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                              {"name": "new", **binding})
            assert (status, body["error"]["code"]) == (400, "bad_request"), (binding, body)
            assert "people:raed" in body["error"]["message"]
            status, body = await g.admin_json("PATCH", f"/workspaces/acme/keys/{role_key['id']}",
                                              binding)
            assert status == 400, (binding, body)
            async with g.proxy.post("/_keygate/v1/keys", json={"name": "new", **binding},
                                    headers=bearer(admin_token)) as r:
                assert r.status == 400, (binding, await r.text())
        # what does not re-bind stays open for both: renaming, rotating
        for key in (role_key, scope_key):
            status, _ = await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                           {"name": "renamed"})
            assert status == 200
        status, _ = await g.admin_json("POST", f"/workspaces/acme/keys/{role_key['id']}/rotate")
        assert status == 201
        # redefined within the catalogue, the role binds again
        status, _ = await g.admin_json("PUT", "/workspaces/acme/roles/custom",
                                       {"scopes": ["people:read"]})
        assert status == 200
        status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                          {"name": "new", "role": "custom"})
        assert status == 201, body


async def test_verify_only_mode_applies_every_key_control(redis_url, upstream, monkeypatch):
    from harness import VERIFY, verify_config
    async with gateway_under_test(verify_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace()
        token, key = await g.key(monthly_requests=1)
        h = {**bearer(token), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/people/1"}

        async def verify() -> tuple[int, str | None]:
            async with g.proxy.get(VERIFY, headers=h) as r:
                body = await r.read()
                return r.status, json.loads(body)["error"]["code"] if r.status >= 400 else None

        assert await verify() == (200, None)
        assert await verify() == (429, "key_quota_exceeded")
        await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                           {"monthly_requests": None, "allowed_ips": ["10.0.0.0/8"]})
        assert await verify() == (403, "ip_not_allowed")
        await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                           {"allowed_ips": None, "enabled": False})
        assert await verify() == (401, "disabled_key")
        _, days = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}/usage/daily"
                                            "?days=1")
        assert days["items"][0]["requests"] == 1 and upstream.requests == []


def test_the_openapi_document_describes_the_key_controls():
    from gateway.admin.openapi import document
    doc = document()
    paths = doc["paths"]
    assert "delete" in paths["/admin/v1/workspaces/{ws}/keys/{key}"]
    assert "delete" in paths["/_keygate/v1/keys/{key}"]
    for path in ("/admin/v1/workspaces/{ws}/usage/daily", "/admin/v1/scopes",
                 "/admin/v1/workspaces/{ws}/keys/{key}/usage/daily",
                 "/_keygate/v1/keys/{key}/usage/daily"):
        assert "get" in paths[path], path
    schemas = doc["components"]["schemas"]
    assert {"monthly_requests", "used_this_month", "enabled", "meta", "allowed_ips"} <= \
        set(schemas["Key"]["properties"])
    assert {"monthly_requests", "enabled", "meta", "allowed_ips", "rate_limit"} <= \
        set(schemas["KeyPatch"]["properties"])
    assert "limits" in schemas["WorkspacePatch"]["properties"]
    assert "limits" in schemas["Usage"]["properties"]
    listed = {p["name"] for p in paths["/admin/v1/workspaces/{ws}/keys"]["get"]["parameters"]}
    assert listed == {"status", "unused_days", "sort", "limit", "cursor"}


async def test_self_service_compares_rates_over_both_windows_not_per_second(gut):
    """A sliding 60/m admits 60 requests in one second, a 1/s only one: 60/m is looser than
    1/s though both are 1 per second. Compared per second only, a key capped at 1/s set itself
    to 60/m (loosening its own limit) and minted an admin key bursting 60 a second."""
    await gut.workspace(plan="unlimited")
    token, me = await gut.key(name="admin", scopes=["people:read", "keys:admin"],
                              rate_limit="1/s")
    h = bearer(token)
    for session, url in ((gut.proxy, f"/_keygate/v1/keys/{me['id']}"),
                         (gut.admin, f"/admin/v1/workspaces/acme/keys/{me['id']}")):
        async with session.patch(url, json={"rate_limit": "60/m"}, headers=h) as r:
            assert r.status == 403, await r.text()
    async with gut.proxy.post("/_keygate/v1/keys", json={
            "name": "deputy", "scopes": ["keys:admin"], "rate_limit": "60/m"}, headers=h) as r:
        assert r.status == 403, await r.text()
    # no looser in any window: 1/m, 1/s (as it is), and 1/s under a 60/m key
    for rate in ("1/m", "1/s"):
        async with gut.proxy.post("/_keygate/v1/keys", json={
                "name": "deputy", "scopes": ["keys:admin"], "rate_limit": rate},
                headers=h) as r:
            assert r.status == 201, await r.text()
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{me['id']}")
    assert read["rate_limit"] == "1/s"


async def test_a_workspace_key_cannot_set_a_rate_that_bursts_past_the_plans(gut):
    """The plan's rate binds a key a workspace key sets up, in both windows: on a 3/s plan a
    keys:admin key set its own key, or a new one, to 180/m (3 a second on average, so it
    passed a per-second check) and then sent 180 requests in one second."""
    await gut.workspace(plan="limited")  # 3/s
    token, me = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    _, other = await gut.key(name="service", scopes=["people:read"])
    h = bearer(token)
    for session, prefix in ((gut.proxy, "/_keygate/v1/keys"),
                            (gut.admin, "/admin/v1/workspaces/acme/keys")):
        for key in (me, other):
            async with session.patch(f"{prefix}/{key['id']}", json={"rate_limit": "180/m"},
                                     headers=h) as r:
                assert r.status == 403, await r.text()
        async with session.post(prefix, json={"name": "burst", "scopes": ["people:read"],
                                              "rate_limit": "180/m"}, headers=h) as r:
            assert r.status == 403, await r.text()
    assert sorted(await statuses(gut, token, 4)) == [(200, None)] * 3 + [
        (429, "rate_limited")]  # still the plan's 3/s
    # within the plan in every window: fine (1/s, 3/s, 2/m)
    for rate in ("1/s", "3/s", "2/m"):
        async with gut.proxy.post("/_keygate/v1/keys", json={
                "name": "ok", "scopes": ["people:read"], "rate_limit": rate}, headers=h) as r:
            assert r.status == 201, await r.text()


async def test_a_workspace_key_may_set_a_rate_slower_than_the_plans_on_average(gut):
    """On a 3/s plan, a keys:admin key could not hold a CI key to 10 a minute: "10/m" was 403
    "may not exceed the plan's rate limit (3/s)", because a sliding 10/m admits 10 in one
    second. But a key's rate is held within its workspace's in force (both windows: 10/m
    with at most 3 in any second), so 10/m exceeds the plan nowhere, and it is the tenant
    slowing its own key. Refused still: a rate the plan's binds in every window, which no
    tighter (180/m: the plan's 3 a second on average and a larger burst; 4/s; 181/m)."""
    await gut.workspace(plan="limited")  # 3/s
    token, _ = await gut.key(name="admin", scopes=["people:read", "keys:admin"])
    h = bearer(token)
    made = {}
    for rate in ("10/m", "179/m", "1/s"):
        async with gut.proxy.post("/_keygate/v1/keys", json={
                "name": "ci", "scopes": ["people:read"], "rate_limit": rate}, headers=h) as r:
            body = await r.json()
            assert r.status == 201, body
            made[rate] = body
    for rate in ("180/m", "181/m", "4/s", "1000/s"):
        async with gut.admin.post("/admin/v1/workspaces/acme/keys", json={
                "name": "fast", "scopes": ["people:read"], "rate_limit": rate}, headers=h) as r:
            assert r.status == 403, (rate, await r.text())
    # in force, 10/m bursts no more than the plan's 3 in one second
    assert sorted(await statuses(gut, made["10/m"]["token"], 5)) == [(200, None)] * 3 + [
        (429, "rate_limited")] * 2


async def test_a_restricted_admin_key_cannot_enable_a_less_restricted_admin_key(gut):
    """Enabling is loosening (a disabled key can do nothing): an unrestricted admin key the
    operator disabled was enabled again by a workspace admin bound to the office network."""
    await gut.workspace(plan="unlimited")
    token, _ = await gut.key(name="office-admin", scopes=["people:read", "keys:admin"],
                             allowed_ips=["127.0.0.0/8"])
    _, free = await gut.key(name="free-admin", scopes=["keys:admin"], enabled=False)
    _, deputy = await gut.key(name="deputy", scopes=["keys:admin"], enabled=False,
                              allowed_ips=["127.0.0.1/32"])
    _, service = await gut.key(name="service", scopes=["people:read"], enabled=False)
    for session, prefix in ((gut.proxy, "/_keygate/v1/keys"),
                            (gut.admin, "/admin/v1/workspaces/acme/keys")):
        async with session.patch(f"{prefix}/{free['id']}", json={"enabled": True},
                                 headers=bearer(token)) as r:
            assert r.status == 403, await r.text()
            assert "keys:admin" in (await r.json())["error"]["message"]
    _, read = await gut.admin_json("GET", f"/workspaces/acme/keys/{free['id']}")
    assert read["enabled"] is False
    # an admin key as restricted as the acting key, and a key without keys:admin: fine
    for key in (deputy, service):
        async with gut.proxy.patch(f"/_keygate/v1/keys/{key['id']}", json={"enabled": True},
                                   headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
    # the operator may
    status, _ = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{free['id']}",
                                     {"enabled": True})
    assert status == 200


async def test_deleting_a_revoked_key_from_listings_does_not_turn_its_use_into_failures(
        redis_url, upstream, monkeypatch):
    """SPEC: ``DELETE /workspaces/{ws}/keys/{id}`` "removes a revoked or expired key from
    listings" (docs/cli.md: "from listings"; revoked stays permanent). A revoked key's token,
    still sent by a forgotten integration, is 401 ``revoked_key`` after its secret verified:
    no failed verification, nothing counted. Once an operator tidies the listing, the same
    requests are 401 ``invalid_key`` and each counts against the address as a failed guess
    (the key record and its ``kg:keyid`` index are deleted, ``store/admin_keys.py``), so the
    forgotten integration locks every *new* key of its address (a NAT, a shared egress) out
    with 429 ``too_many_failures``, window after window."""
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, failures=FailureLimits(per_ip=3, per_key=None, window_seconds=60)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        old, key = await g.key(name="forgotten")
        status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200, body
        seen = []
        for _ in range(3):
            async with g.proxy.get("/people/1", headers=bearer(old)) as r:
                seen.append((await r.json())["error"]["code"])
        assert seen == ["revoked_key"] * 3  # counted as nothing
        status, body = await g.admin_json("DELETE", f"/workspaces/acme/keys/{key['id']}")
        assert status in (200, 204), body
        seen = []
        for _ in range(4):
            async with g.proxy.get("/people/1", headers=bearer(old)) as r:
                seen.append((await r.json())["error"]["code"])
        new, _ = await g.key(name="new integration")  # same address, never used yet
        async with g.proxy.get("/people/1", headers=bearer(new)) as r:
            got = r.status, await r.text()
        assert got[0] == 200, (seen, got)  # was 429: the deleted key's uses counted as guesses


async def test_a_deleted_key_leaves_every_listing_and_its_id_is_not_found_but_its_token_answers_as_before(
        redis_url, upstream, monkeypatch):
    """``DELETE .../keys/{id}`` removes a revoked or expired key from listings: it is in no
    listing, count or key cap, and its id is 404 to every call (GET, PATCH, revoke, rotate,
    usage, DELETE again); its token keeps its answer (``revoked_key``, ``expired_key``), and
    counts no failure, at a replica that had it cached and at one that never saw it."""
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, failures=FailureLimits(per_ip=2, per_key=None, window_seconds=60)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        revoked, key = await g.key(name="revoked")
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
        expired, short = await g.key(name="expired", expires_at=expires)
        async with g.proxy.get("/people/1", headers=bearer(revoked)) as r:
            assert r.status == 200  # cached here
        status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200, body
        await asyncio.sleep(2.2)  # the second one expires
        for k in (key, short):
            status, body = await g.admin_json("DELETE", f"/workspaces/acme/keys/{k['id']}")
            assert status == 200, body
            base = f"/workspaces/acme/keys/{k['id']}"
            for method, path, payload in (("GET", base, None), ("PATCH", base, {"name": "x"}),
                                          ("POST", base + "/revoke", None),
                                          ("POST", base + "/rotate", None),
                                          ("GET", base + "/usage/daily", None),
                                          ("DELETE", base, None)):
                status, body = await g.admin_json(method, path, payload)
                assert status == 404, (method, path, status, body)
        for listing in ("", "?status=revoked", "?status=expired"):
            status, body = await g.admin_json("GET", "/workspaces/acme/keys" + listing)
            assert status == 200, body
            assert {k["id"] for k in body["items"]} & {key["id"], short["id"]} == set(), body
        # a replica that never saw either token, and this one (the revoked one cached here)
        g.gw.pipeline.auth.cache.clear()
        for token, code in ((revoked, "revoked_key"), (expired, "expired_key")) * 3:
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (401, code)
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.keys("kg:fail:*") == []
            gone = client.hgetall(f"kg:gone:{{acme}}:{key['id']}")
            assert b"name" not in gone and b"hash" in gone  # what verification needs only
        finally:
            client.close()


async def test_a_rotation_refused_over_a_lowered_cap_names_the_cap_and_no_grace_that_is_not_there(
        gut):
    """An operator lowers a customer's key cap with a workspace override (``limits.max_keys``)
    below the keys it already has. Rotating one of them with a grace is then refused 409
    ``key_limit_reached`` (right), but the message says the cap is "the 2 active keys its plan
    allows" (the plan 'starter' allows 5; the 2 is the workspace's own override) and that "a
    rotation's grace period is running" (none is: the workspace is over because its cap was
    lowered). A create at the same moment names the source correctly ("set by the
    workspace's own limits"), so the two answers about one cap disagree, and the operator is
    sent looking for a grace period that does not exist."""
    await gut.workspace("acme", plan="starter")  # 5 keys
    keys = [(await gut.key(name=f"k{i}"))[1] for i in range(4)]
    status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"limits": {"max_keys": 2}})
    assert status == 200
    status, create = await gut.admin_json("POST", "/workspaces/acme/keys",
                                          {"name": "five", "scopes": ["people:read"]})
    assert (status, create["error"]["code"]) == (409, "key_limit_reached")
    assert "set by the workspace's own limits" in create["error"]["message"]  # as it should
    status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{keys[0]['id']}/rotate",
                                        {"grace_seconds": 60})
    assert (status, body["error"]["code"]) == (409, "key_limit_reached"), body
    message = body["error"]["message"]
    assert "grace period is running" not in message, message
    assert "its plan allows" not in message and "workspace's own limits" in message, message


async def test_rotating_an_expired_key_at_an_overridden_cap_names_the_override(redis_url,
                                                                               upstream,
                                                                               monkeypatch):
    """The same for an expired key's rotation: refused at a cap set by the workspace's own
    limits, the message blames "the active keys its plan allows"."""
    clock = Clock(time.time())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme", plan="starter")  # 5 keys
        _, old = await g.key(name="old", expires_in=60)
        await g.key(name="a")
        await g.key(name="b")
        clock.now += 120
        status, _ = await g.admin_json("PATCH", "/workspaces/acme", {"limits": {"max_keys": 2}})
        assert status == 200
        status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{old['id']}/rotate")
        assert (status, body["error"]["code"]) == (409, "key_limit_reached"), body
        message = body["error"]["message"]
        assert "its plan allows" not in message and "workspace's own limits" in message, message


async def test_a_garbled_cursor_is_400_not_read_as_the_cursor_it_was_garbled_from(gut):
    """A cursor is read with ``base64.urlsafe_b64decode``, which silently drops every character
    outside the base64 alphabet: a cursor with characters inserted (``*!~.``, a copy-paste
    accident, a truncating/expanding log) is read as the cursor it came from and answered 200.
    The listing says a cursor it did not give is 400 ("is not a cursor this listing gave"),
    and 'garbage' is; a garbled one of ours must be too."""
    await gut.workspace("acme", plan="unlimited")
    for i in range(3):
        await gut.key(name=f"k{i}")
    _, first = await gut.admin_json("GET", "/workspaces/acme/keys?limit=1")
    cursor = first["next_cursor"]
    garbled = cursor[:8] + "*!~." + cursor[8:]
    assert garbled != cursor
    status, body = await gut.admin_json("GET", f"/workspaces/acme/keys?limit=1&cursor={garbled}")
    assert status == 400 and body["error"]["code"] == "bad_request", body
