"""The proxy pipeline end to end: real Redis, real upstream, the gateway's real listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import types

import pytest
import redis

from gateway.auth import token_digest
from gateway.config import FailureLimits, ServerConfig, StoreConfig
from gateway.errors import TooManyRequests
from gateway.tokens import checksum
from gateway.trust import throttle_client

from harness import (Clock, HeldReplies, bearer, eventually, gateway_under_test, make_config,
                     redis_answers, refusal_costs, tampered, wrong_secret)

REALM = 'Bearer realm="keygate"'


@pytest.fixture
async def gut(gut):
    """conftest's gateway under test, with workspace acme made."""
    await gut.workspace("acme")
    return gut


def headers_seen(upstream) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in upstream.requests[-1]["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


async def error_of(response) -> tuple[int, str, dict]:
    body = await response.json()
    return response.status, body["error"]["code"], body


# --- happy path --------------------------------------------------------------------------------

async def test_allowed_request_reaches_upstream_with_identity_and_without_credential(gut):
    token, key = await gut.key(scopes=["people:read"])
    async with gut.proxy.get("/people/1?expand=company", headers=bearer(token)) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "echo"
        assert r.headers["X-Request-Id"]
        assert r.headers["RateLimit-Policy"].startswith('"monthly";q=1000;w=')
        assert r.headers["RateLimit"].startswith('"monthly";r=999;t=')
    seen = headers_seen(gut.upstream)
    assert gut.upstream.requests[-1]["raw_path"] == "/people/1?expand=company"
    assert seen["x-workspace-id"] == ["acme"]
    assert seen["x-api-key-id"] == [key["id"]]
    assert seen["x-api-scopes"] == ["people:read"]
    assert seen["x-workspace-plan"] == ["starter"]
    assert "authorization" not in seen
    assert token not in json.dumps(gut.upstream.requests[-1])


async def test_public_route_needs_no_key_and_gets_no_identity(gut):
    async with gut.proxy.get("/health", headers={"X-Workspace-Id": "evil"}) as r:
        assert r.status == 200
    assert "x-workspace-id" not in headers_seen(gut.upstream)


async def test_x_api_key_header_works_like_bearer(gut):
    token, _ = await gut.key()
    async with gut.proxy.get("/people/1", headers={"X-Api-Key": token}) as r:
        assert r.status == 200
    assert "x-api-key" not in headers_seen(gut.upstream)


async def test_same_key_in_both_headers_is_fine(gut):
    token, _ = await gut.key()
    async with gut.proxy.get("/people/1", headers={**bearer(token), "X-Api-Key": token}) as r:
        assert r.status == 200


# --- 4xx rows of the table, in order -----------------------------------------------------------

async def test_missing_key_is_401_with_plain_bearer_challenge(gut):
    async with gut.proxy.get("/people/1") as r:
        status, code, body = await error_of(r)
        assert (status, code) == (401, "missing_key")
        assert r.headers["WWW-Authenticate"] == REALM
        assert body["error"]["request_id"] == r.headers["X-Request-Id"]
    assert gut.upstream.requests == []


@pytest.mark.parametrize("auth", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer kg_live_garbage",
                                  "Token abc"])
async def test_malformed_credentials_are_401_malformed_key(gut, auth):
    async with gut.proxy.get("/people/1", headers={"Authorization": auth}) as r:
        assert (await error_of(r))[:2] == (401, "malformed_key")
        assert r.headers["WWW-Authenticate"] == REALM + ', error="invalid_token"'


async def test_checksum_typo_is_malformed_and_never_touches_the_store(gut):
    token, _ = await gut.key()
    typo = token[:-1] + ("a" if token[-1] != "a" else "b")
    async with gut.proxy.get("/people/1", headers=bearer(typo)) as r:
        assert (await error_of(r))[:2] == (401, "malformed_key")
    assert gut.counter("keygate_key_cache_total", result="miss") == 0


async def test_environment_not_accepted_is_malformed(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key(environment="test")
    only_live = dataclasses.replace(config, keys=dataclasses.replace(config.keys,
                                                                     environments=("live",)))
    async with gateway_under_test(only_live, redis_url, monkeypatch) as g:
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            status, code, body = await error_of(r)
            assert (status, code) == (401, "malformed_key")
            assert "environment" in body["error"]["message"]


async def test_two_different_keys_are_ambiguous(gut):
    a, _ = await gut.key(name="a")
    b, _ = await gut.key(name="b")
    async with gut.proxy.get("/people/1", headers={**bearer(a), "X-Api-Key": b}) as r:
        assert (await error_of(r))[:2] == (400, "ambiguous_key")
        assert r.headers["WWW-Authenticate"] == REALM + ', error="invalid_request"'


async def test_a_repeated_key_header_is_ambiguous(gut):
    token, _ = await gut.key()
    async with gut.proxy.get("/people/1", headers=[("X-Api-Key", token),
                                                   ("X-Api-Key", token)]) as r:
        assert (await error_of(r))[:2] == (400, "ambiguous_key")


async def test_unknown_key_and_wrong_secret_are_invalid_key(gut):
    token, _ = await gut.key()
    head = "kg_live_" + "Q" * 44
    for bad in (head + checksum(head), wrong_secret(token)):
        async with gut.proxy.get("/people/1", headers=bearer(bad)) as r:
            assert (await error_of(r))[:2] == (401, "invalid_key")
            assert r.headers["WWW-Authenticate"] == REALM + ', error="invalid_token"'
    assert gut.upstream.requests == []


async def test_an_unknown_key_id_costs_what_a_wrong_secret_costs(redis_url, upstream,
                                                                  monkeypatch):
    """A well-formed token whose key id does not exist (or exists in another environment) was
    refused without argon2, in well under a millisecond, while a real key id with a wrong
    secret paid the argon2 run: one request's latency told whether a key id exists. Every
    refused verification now runs argon2 (against a decoy hash when there is no key), so
    the three look alike; the failure throttle bounds these runs as it bounds wrong secrets."""
    from gateway.config import Argon2Config
    config = make_config(str(upstream.make_url("")))
    # the shipped argon2 parameters: the difference is what this is about
    keys = dataclasses.replace(config.keys, argon2=Argon2Config(2, 19456, 1),
                               failures=FailureLimits(100, 100, 60))
    async with gateway_under_test(dataclasses.replace(config, keys=keys), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        costs = await refusal_costs(g, token)
        # before, an unknown id cost well under 1 ms against the wrong secret's 20+ ms of
        # argon2. Compared by the work (argon2 CPU, read in the verification's thread) and by
        # a floor under what the client sees: the fastest wall-clock times of the kinds were
        # compared, and under load (the argon2 threads in the idle class waiting for a CPU)
        # the fastest of 7 wrong secrets came out at 1.37 s against an unknown id's 0.09 s,
        # every run the same work
        wrong = costs["wrong secret"]
        for kind in ("unknown id", "other environment"):
            assert costs[kind].argon2_cpu > wrong.argon2_cpu * 2 / 3, (kind, costs)
            assert costs[kind].fastest > wrong.argon2_cpu / 2, (kind, costs)

async def test_revoked_key_is_rejected_on_next_request(gut):
    token, key = await gut.key()
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 200
    status, _ = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
    assert status == 200
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert (await error_of(r))[:2] == (401, "revoked_key")
    assert len(gut.upstream.requests) == 1


async def test_revocation_reaches_every_replica_on_the_next_request(redis_url, upstream,
                                                                    monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as a, \
            gateway_under_test(config, redis_url, monkeypatch) as b:
        await a.workspace()
        token, key = await a.key()
        for g in (a, b):  # both replicas have the key verified and cached
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200
        await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        async with b.proxy.get("/people/1", headers=bearer(token)) as r:
            assert (await error_of(r))[:2] == (401, "revoked_key")


async def test_revoked_status_is_not_disclosed_without_the_right_secret(gut):
    token, key = await gut.key()
    await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
    async with gut.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
        assert (await error_of(r))[:2] == (401, "invalid_key")


async def test_expired_key_is_401_expired_key_and_extension_acts_at_once(redis_url, upstream,
                                                                         monkeypatch):
    clock = Clock(time.time())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as gut:
        await gut.workspace("acme")
        token, key = await gut.key(expires_in=1)
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        clock.now += 1.1
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert (await error_of(r))[:2] == (401, "expired_key")
        status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                            {"expires_at": "2099-01-01T00:00:00Z"})
        assert status == 200, body
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200


async def test_a_key_both_expired_and_revoked_is_expired_key_as_the_table_orders(
        redis_url, upstream, monkeypatch):
    clock = Clock(1_795_000_000.0)
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme")
        token, key = await g.key(expires_in=60)
        revoked, rkey = await g.key(name="other")
        clock.now += 120
        for k in (key, rkey):
            status, _ = await g.admin_json("POST", f"/workspaces/acme/keys/{k['id']}/revoke")
            assert status == 200
        for t, want in ((token, "expired_key"), (revoked, "revoked_key")):
            async with g.proxy.get("/people/1", headers=bearer(t)) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == want
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_token"'


async def test_missing_scope_is_403_naming_the_scope(gut):
    token, _ = await gut.key(scopes=["people:read"])
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert (await error_of(r))[:2] == (403, "insufficient_scope")
        assert r.headers["WWW-Authenticate"] == \
            REALM + ', error="insufficient_scope", scope="people:write"'
    assert gut.upstream.requests == []


async def test_rescoping_acts_on_the_next_request_both_ways(gut):
    token, key = await gut.key(scopes=["people:read"])
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 403
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                         {"scopes": ["people:read", "people:write"]})
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 200
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"scopes": ["people:write"]})
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 403


async def test_role_edit_acts_on_the_next_request(gut):
    token, _ = await gut.key(role="reader")
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 403
    status, body = await gut.admin_json("PUT", "/workspaces/acme/roles/reader",
                                        {"scopes": ["people:read", "people:write"]})
    assert status in (200, 201), body
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 200


async def test_a_role_the_workspace_drops_falls_back_to_the_configured_one(gut):
    """A workspace role shadows the configured role of the same name, for keys verified
    before and after it changes; deleted, the configured role applies again."""
    status, body = await gut.admin_json("PUT", "/workspaces/acme/roles/reader",
                                        {"scopes": ["people:read", "people:write"]})
    assert status in (200, 201), body
    token, _ = await gut.key(role="reader")   # first request: read with the workspace role
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 200
    status, body = await gut.admin_json("DELETE", "/workspaces/acme/roles/reader")
    assert status in (200, 204), body
    async with gut.proxy.post("/people", headers=bearer(token), json={}) as r:
        assert r.status == 403                # the configured reader cannot write
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 200


async def test_a_role_nobody_defines_grants_nothing(gut, redis_url):
    token, key = await gut.key(role="reader")
    # the configured role disappears from under a stored key (as after a config change)
    redis.Redis.from_url(redis_url).hset(f"kg:key:{{acme}}:{key['id']}", "role", "ghost")
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert (await error_of(r))[:2] == (403, "insufficient_scope")


async def test_a_malformed_workspace_role_in_the_store_is_503_never_a_grant(gut, redis_url):
    token, _ = await gut.key(role="reader")
    redis.Redis.from_url(redis_url).hset("kg:ws:{acme}:roles", "reader", "not json")
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
        assert (await error_of(r))[:2] == (503, "store_unavailable")


async def test_all_scope_grants_every_route(gut):
    token, _ = await gut.key(role="admin")
    async with gut.proxy.delete("/people/7", headers=bearer(token)) as r:
        assert r.status == 200


async def test_unknown_route_is_404_no_route(gut):
    token, _ = await gut.key()
    async with gut.proxy.get("/nowhere", headers=bearer(token)) as r:
        assert (await error_of(r))[:2] == (404, "no_route")


@pytest.mark.parametrize("path", ["/people/../admin", "/people/%2e%2e/x", "/people/a%2Fb",
                                  "/people/a%5Cb", "/people//1", "/people/1;v=2", "/people/%00",
                                  "/people/%252e%252e", "/people/%61", "/people/./1"])
async def test_path_variants_never_reach_the_upstream(gut, path):
    token, _ = await gut.key()
    reader, writer = await asyncio.open_connection(gut.proxy_server.host, gut.proxy_server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert b'"bad_path"' in response
    assert gut.upstream.requests == []


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
])
async def test_ambiguous_framing_is_a_json_400_and_never_forwarded(gut, framing):
    token, _ = await gut.key(scopes=["people:write"])
    reader, writer = await asyncio.open_connection(gut.proxy_server.host, gut.proxy_server.port)
    writer.write(b"POST /people HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
                 + b"\r\n" + framing + b"\r\n0\r\n\r\n")
    response = await reader.read()
    writer.close()
    assert response.split(b" ", 2)[1] == b"400", response[:100]
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "bad_request"
    assert gut.upstream.requests == []


async def test_key_in_query_is_refused_and_never_logged(gut, capfd):
    token, _ = await gut.key()
    async with gut.proxy.get(f"/people/1?api_key={token}") as r:
        assert (await error_of(r))[:2] == (400, "key_in_url")
    assert gut.upstream.requests == []
    out, err = gut.logs(capfd)
    assert token not in out + err
    assert "key_in_url" in err  # the access log saw the request, masked


async def test_spoofed_identity_headers_never_reach_upstream(gut):
    token, key = await gut.key()
    spoof = [("X-Workspace-Id", "evil"), ("x-workspace-id", "evil2"), ("X_Workspace_Id", "evil3"),
             ("X-Api-Key-Id", "evil"), ("X-Api-Scopes", "ALL"), ("X-Workspace-Plan", "enterprise"),
             ("Connection", "X-Workspace-Id"), *bearer(token).items()]
    async with gut.proxy.get("/people/1", headers=spoof) as r:
        assert r.status == 200
    seen = headers_seen(gut.upstream)
    assert seen["x-workspace-id"] == ["acme"]
    assert seen["x-api-key-id"] == [key["id"]]
    assert seen["x-api-scopes"] == ["people:read"]
    assert seen["x-workspace-plan"] == ["starter"]
    assert "x_workspace_id" not in seen


# --- failures throttle -------------------------------------------------------------------------

async def test_failed_verifications_are_throttled_before_argon2_runs(gut):
    token, _ = await gut.key()
    bad = wrong_secret(token)
    for _ in range(10):  # per_key limit in the harness config
        async with gut.proxy.get("/people/1", headers=bearer(bad)) as r:
            assert r.status == 401
    verifications = gut.counter("keygate_argon2_verifications_total", result="fail")
    async with gut.proxy.get("/people/1", headers=bearer(bad)) as r:
        status, code, _ = await error_of(r)
        assert (status, code) == (429, "too_many_failures")
        assert int(r.headers["Retry-After"]) > 0
    assert gut.counter("keygate_argon2_verifications_total", result="fail") == verifications


async def test_concurrent_wrong_secrets_cannot_run_argon2_past_the_failure_limit(gut):
    from gateway.tokens import checksum, random_base62
    token, _ = await gut.key()
    guesses = []
    for _ in range(40):  # one key id, forty different wrong secrets, all well-formed
        head = token[:-38] + random_base62(32)
        guesses.append(head + checksum(head))

    async def one(t: str) -> tuple[int, str]:
        async with gut.proxy.get("/people/1", headers=bearer(t)) as r:
            return r.status, (await r.json())["error"]["code"]
    results = await asyncio.gather(*(one(t) for t in guesses))
    ran = gut.counter("keygate_argon2_verifications_total", result="fail")
    assert ran <= 10, ran  # per_key = 10: the rest were refused before argon2
    assert sum(code == "invalid_key" for _, code in results) == ran
    assert all(code in ("invalid_key", "too_many_failures") for _, code in results)


async def test_others_failures_do_not_lock_out_a_token_this_process_already_verified(
        redis_url, upstream, monkeypatch):
    """Per ``keys.cache_ttl`` a cached key verifies again, and that re-verification went
    through the failure throttle like a guess: anyone sharing the client's address (a NAT, an
    office, a proxy not in ``trusted_proxies``) who sent ``per_ip`` bad keys, or anyone at all
    who sent ``per_key`` wrong secrets for its public key id, had the working integration
    refused 429 ``too_many_failures`` every ``cache_ttl``. A token whose digest already verified
    in this process is not a guess: its re-verification is not throttled (guesses still are)."""
    from gateway.tokens import make_token
    url = str(upstream.make_url(""))
    config = make_config(url)
    config = make_config(url, keys=dataclasses.replace(config.keys, cache_ttl=1.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        guesses = [wrong_secret(token)] * 10 + [make_token("kg", "live")[0] for _ in range(10)]
        for guess in guesses:  # per_key (10) for its key id, then per_ip (20) for the address
            async with g.proxy.get("/people/1", headers=bearer(guess)) as r:
                assert r.status == 401
        for guess in (wrong_secret(token), make_token("kg", "live")[0]):
            async with g.proxy.get("/people/1", headers=bearer(guess)) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")
        await asyncio.sleep(1.2)  # the verification's cache_ttl runs out
        for _ in range(2):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200, await r.text()
        assert g.counter("keygate_argon2_verifications_total", result="ok") == 2
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")



def failures_config(upstream, failures: FailureLimits):
    """The test config with ``keys.failures`` set to ``failures``."""
    config = make_config(str(upstream.make_url("")))
    return dataclasses.replace(config, keys=dataclasses.replace(config.keys,
                                                                failures=failures))


async def key_failed_twice(g) -> str:
    """A key of a new workspace whose token was then sent twice with a wrong secret (401)."""
    await g.workspace("acme")
    token, _ = await g.key()
    for _ in range(2):
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert r.status == 401
    return token


async def test_too_many_failures_retry_after_is_the_time_left_in_the_window(
        redis_url, upstream, monkeypatch):
    """The failure counters are a fixed window from the first failure (a TTL): the 429 said
    ``Retry-After: <window_seconds>`` however little of the window was left, so a client doing
    as told waited up to a whole window longer than it had to. It answers the seconds until
    the counter resets, rounded up, and a request that waited them is verified again."""
    config = failures_config(upstream, FailureLimits(per_ip=2, per_key=None, window_seconds=4))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        token = await key_failed_twice(g)
        await asyncio.sleep(1.6)
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")
            retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after < 4, retry_after
        await asyncio.sleep(retry_after)
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (401, "invalid_key")
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200


async def test_a_failure_window_lowered_by_a_reload_ends_lockouts_within_the_new_window(
        redis_url, upstream, monkeypatch):
    """A failure counter takes its TTL at its first failure and keeps it (lua/add_usage.lua),
    and an address over its limit records no more failures. An operator who lowered
    ``keys.failures.window_seconds`` with a reload (a day was too long) left every address
    already locked out locked out, 429 ``Retry-After: 86400``, for the rest of the old
    window. A counter whose reset lies past the window in force is brought within it when
    a refusal reads it (as is one without a TTL: counters never lose their expiry)."""
    config = failures_config(upstream, FailureLimits(per_ip=2, per_key=None,
                                                     window_seconds=86400))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        token = await key_failed_twice(g)
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")
            assert int(r.headers["Retry-After"]) > 86000
        lowered = dataclasses.replace(config, keys=dataclasses.replace(
            config.keys, failures=FailureLimits(per_ip=2, per_key=None, window_seconds=2)))
        g.gw.pipeline.auth.reconfigure(lowered)  # what a reload hands it
        async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")
            assert int(r.headers["Retry-After"]) <= 2, r.headers["Retry-After"]
        client = redis.Redis.from_url(redis_url)
        try:
            (counter,) = client.keys("kg:fail:ip:*")
            assert 0 < client.pttl(counter) <= 2000
            client.persist(counter)  # a counter that lost its expiry gets one back as well
            await asyncio.sleep(2.1)
            async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
                assert (await r.json())["error"]["code"] == "too_many_failures"
                assert int(r.headers["Retry-After"]) <= 2
            assert 0 < client.pttl(counter) <= 2000
            await asyncio.sleep(2.1)
        finally:
            client.close()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200, await r.text()


async def test_a_flood_of_refused_guesses_asks_the_store_when_its_window_resets_once(
        redis_url, upstream, monkeypatch):
    """A 429 ``too_many_failures`` reads when the counters over their limit reset (one call
    per counter: on a Cluster they live in different slots), after the counts. Asked for
    every refused request, an attacker past the limit tripled the store calls each of its
    guesses costs (and held a verification turn through them): the reset is a fixed instant,
    so it is asked once per counter and window, and later refusals answer from it."""
    from gateway.store.request import RequestStore
    asked = []
    real = RequestStore.failure_resets_ms

    async def counting(self, ip, key_id, window_seconds):
        asked.append((ip, key_id))
        return await real(self, ip, key_id, window_seconds)
    monkeypatch.setattr(RequestStore, "failure_resets_ms", counting)
    config = failures_config(upstream, FailureLimits(per_ip=2, per_key=2, window_seconds=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        token = await key_failed_twice(g)
        waits = []
        for _ in range(20):  # over both limits: the IP's and the key id's
            async with g.proxy.get("/people/1", headers=bearer(wrong_secret(token))) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (429, "too_many_failures")
                waits.append(int(r.headers["Retry-After"]))
        assert all(28 <= w <= 30 for w in waits), waits
        assert len(asked) <= 2, asked  # at most once per counter (here: both in one call)


async def test_with_per_key_off_no_per_key_failure_counter_is_written(
        redis_url, upstream, monkeypatch):
    """``keys.failures.per_key`` off (the default): failed verifications were still counted
    per key id in Redis, one ``kg:fail:key:*`` counter per key id an attacker guessed at,
    written (and read back) for a limit that is not there. Off writes nothing per key."""
    config = failures_config(upstream, FailureLimits(per_ip=5, per_key=None, window_seconds=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await key_failed_twice(g)
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.keys("kg:fail:ip:*")  # the per-IP throttle still counts
            assert client.keys("kg:fail:key:*") == []
        finally:
            client.close()


# --- cost of the hot path ----------------------------------------------------------------------

def monitor_commands(url: str, started: threading.Event, stop_marker: str, out: list[str]) -> None:
    client = redis.Redis.from_url(url)
    with client.monitor() as m:
        started.set()
        for event in m.listen():
            if stop_marker in event["command"]:
                return
            out.append(event["command"] if event.get("client_type") != "lua" else "lua:" + event["command"])


async def test_cached_key_costs_one_round_trip_and_no_argon2(gut, redis_url):
    await gut.workspace("metered", plan="metered")  # a monthly quota and a rate limit apply
    # and every key control that acts on requests: its own cap, an IP allow-list, metadata;
    # the workspace has limits of its own (the daily counters are written on every request)
    await gut.admin_json("PATCH", "/workspaces/metered", {"limits": {"monthly_requests": 90000}})
    token, key = await gut.key("metered", monthly_requests=500,
                               allowed_ips=["127.0.0.0/8", "::1"], meta={"crm": "c-1"})
    async with gut.proxy.get("/people/1", headers=bearer(token)) as r:  # cold: verifies once
        assert r.status == 200
    verified = gut.counter("keygate_argon2_verifications_total", result="ok")
    assert verified == 1
    commands: list[str] = []
    started = threading.Event()
    t = threading.Thread(target=monitor_commands,
                         args=(redis_url, started, "stop-monitor-marker", commands))
    t.start()
    started.wait(5)
    await asyncio.sleep(0.1)
    for _ in range(5):
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
            assert '"rate";q=1000;w=1' in r.headers["RateLimit-Policy"]
            assert '"monthly";q=90000' in r.headers["RateLimit-Policy"]
            assert '"key-monthly";q=500' in r.headers["RateLimit-Policy"]
    redis.Redis.from_url(redis_url).echo("stop-monitor-marker")
    t.join(5)
    top_level = [c for c in commands if not c.startswith(("lua:", "HELLO", "CLIENT"))]
    assert len(top_level) == 5, top_level
    assert all(c.startswith(("EVALSHA", "EVAL")) for c in top_level), top_level
    assert gut.counter("keygate_argon2_verifications_total", result="ok") == 1
    _, days = await gut.admin_json("GET", f"/workspaces/metered/keys/{key['id']}/usage/daily"
                                          "?days=1")
    assert days["items"][0]["requests"] == 6  # counted in that one round trip


async def test_a_stream_of_new_keys_does_not_push_a_key_in_use_out_of_the_cache(gut):
    """The cache is bounded (100k keys a process). When it was full, the entry verified
    longest ago was dropped whatever its use: a client or an attacker verifying more new keys
    within ``keys.cache_ttl`` than the cache holds (valid throwaway keys: create, use once,
    revoke; or just many keys) made every key in steady use pay argon2 again, behind the
    stream in the verify queue. A key used since the cache last made room is kept."""
    await gut.workspace("many", plan="unlimited")
    auth = gut.gw.pipeline.auth
    auth.capacity = 10
    hot, _ = await gut.key("many", name="hot")
    throwaway = [(await gut.key("many", name=f"once-{i}"))[0] for i in range(30)]
    async with gut.proxy.get("/people/1", headers=bearer(hot)) as r:
        assert r.status == 200
    for token in throwaway:
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        async with gut.proxy.get("/people/1", headers=bearer(hot)) as r:
            assert r.status == 200
    assert len(auth.cache) <= 10
    # one verification each: the hot key's first request and each throwaway key's
    assert gut.counter("keygate_argon2_verifications_total", result="ok") == 31


async def test_a_full_cache_of_keys_in_use_makes_room_for_a_hundredth_at_once(gut):
    """When every key the cache looked at was in use (more keys in steady use than it holds),
    making room dropped one entry after looking at 8 % of the cache: every next new key looked
    at 8 % again (8000 entries at 100k, on the event loop), not the hundredth at once the
    cache's design promises. The oldest make up the hundredth now."""
    import copy
    await gut.workspace("many", plan="unlimited")
    auth = gut.gw.pipeline.auth
    hot, _ = await gut.key("many", name="hot")
    async with gut.proxy.get("/people/1", headers=bearer(hot)) as r:
        assert r.status == 200
    (model,) = auth.cache.values()
    auth.capacity = 1000  # a hundredth: 10
    auth.cache.clear()

    def clone(i: int):
        entry = copy.copy(model)
        entry.secret_digest = i.to_bytes(8, "big")
        return entry

    for i in range(1000):
        auth._remember(clone(i), auth.generation)
    for entry in auth.cache.values():
        entry.used = True  # every key in the cache served again since it was verified
    auth._remember(clone(1000), auth.generation)
    assert len(auth.cache) == 1000 - 10 + 1  # room for the next nine without looking again
    assert 1000 .to_bytes(8, "big") in auth.cache


# --- store down --------------------------------------------------------------------------------

async def test_store_down_is_503_never_401(own_redis, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        cold, _ = await g.key(name="cold")
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        own_redis.stop()
        for t in (token, cold):
            async with g.proxy.get("/people/1", headers=bearer(t)) as r:
                status, code, body = await error_of(r)
                assert (status, code) == (503, "store_unavailable")
                assert "Retry-After" in r.headers
                assert "redis" not in json.dumps(body).lower()
        own_redis.start()


async def test_a_store_error_reading_a_first_key_is_503_and_never_a_failed_attempt(gut, redis_url):
    """The cold path's read of the key (after the throttle check passed) fails in Redis: the
    answer is 503 store_unavailable, and the attempt is not counted against the caller's
    address or the key id (a store fault must not lock legitimate callers out)."""
    token, key = await gut.key()
    r = redis.Redis.from_url(redis_url)
    stored = f"kg:key:{{acme}}:{key['id']}"
    fields = r.hgetall(stored)
    r.delete(stored)
    r.set(stored, "not a hash")          # HGETALL inside the read script: WRONGTYPE
    async with gut.proxy.get("/people/1", headers=bearer(token)) as resp:
        assert (await error_of(resp))[:2] == (503, "store_unavailable")
    assert r.get("kg:fail:ip:127.0.0.1") is None
    assert r.get(f"kg:fail:key:{key['id']}") is None
    r.delete(stored)
    r.hset(stored, mapping=fields)       # the store mended: the same key verifies
    async with gut.proxy.get("/people/1", headers=bearer(token)) as resp:
        assert resp.status == 200


async def test_fail_open_lets_verified_keys_through_and_counts_them_later(redis_url, upstream,
                                                                          monkeypatch):
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        cold, _ = await g.key(name="cold")
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "2500")  # unresponsive
        for _ in range(3):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200
        async with g.proxy.get("/people/1", headers=bearer(cold)) as r:
            assert (await error_of(r))[:2] == (503, "store_unavailable")
        assert g.counter("keygate_degraded_decisions_total") == 3
        assert await eventually(redis_answers(redis_url))  # the pause is over
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200

        async def usage_read():  # the local counts are flushed in the background
            status, usage = await g.admin_json("GET", "/workspaces/acme/usage")
            return status == 200 and usage["used"] >= 5
        await eventually(usage_read)
        _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
        assert usage["used"] == 5


# --- logs --------------------------------------------------------------------------------------

async def test_tokens_and_secrets_never_appear_in_logs(gut, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    token, _ = await gut.key()
    for headers in (bearer(token), bearer(wrong_secret(token)), {"X-Api-Key": tampered(token)}):
        async with gut.proxy.get("/people/1", headers=headers) as r:
            await r.read()
    async with gut.proxy.get(f"/people/1?token={token}") as r:
        await r.read()
    out, err = gut.logs(capfd)
    everything = out + err + caplog.text
    secret = token[-38:-6]
    assert token not in everything and secret not in everything
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) >= 4 and all("request_id" in line for line in lines)


async def test_error_bodies_hold_no_internals(gut):
    async with gut.proxy.get("/people/1", headers={"Authorization": "Bearer " + "x" * 500}) as r:
        text = await r.text()
        assert "Traceback" not in text and "Error(" not in text


async def test_concurrent_first_requests_share_one_verification(gut):
    token, _ = await gut.key()

    async def one() -> int:
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            await r.read()
            return r.status
    assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20
    assert gut.counter("keygate_argon2_verifications_total", result="ok") == 1


async def _first_requests_from_a_throttled_and_a_clean_address(redis_url, upstream, monkeypatch,
                                                               throttled: str, clean: str):
    """One valid key, cold, sent at once from a throttled address (its failure count at the
    limit) and from another that joins the verification the throttled one started. Their
    answers (status, error code), the throttled one's first."""
    c = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        c, keys=dataclasses.replace(c.keys, failures=FailureLimits(20, None, 60)),
        server=ServerConfig(host="127.0.0.1", access_log="off",
                            trusted_proxies=("127.0.0.1/32",)))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        auth = g.gw.pipeline.auth
        r = redis.Redis.from_url(redis_url)
        r.set(f"kg:fail:ip:{throttle_client(throttled)}", 20, ex=60)  # at the limit (20)
        r.close()
        auth.cache.clear()  # a cold replica (a deploy)

        async def first(ip: str) -> tuple[int, str]:
            headers = {**bearer(token), "X-Forwarded-For": ip}
            async with g.proxy.get("/people/1", headers=headers) as resp:
                body = await resp.json()
                return resp.status, body.get("error", {}).get("code", "")

        digest = token_digest(token)
        # the throttled one's verification holds while it reads its failure count; the other
        # arrives meanwhile and joins it
        relay.hold_when(f"kg:fail:ip:{throttle_client(throttled)}".encode())
        a = asyncio.ensure_future(first(throttled))
        assert await eventually(lambda: relay.held_back > 0, 5)
        b = asyncio.ensure_future(first(clean))
        assert await eventually(lambda: digest in auth._inflight
                                and auth._inflight[digest].waiting == 2, 5)
        relay.release()
        got = await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert g.counter("keygate_argon2_verifications_total", result="ok") <= 1
        return got


async def test_a_clean_address_sharing_a_first_verification_with_a_throttled_one_is_not_refused(
        redis_url, upstream, monkeypatch):
    """One valid key used from two client addresses (a customer's fleet): address A is over
    the failure limit, B has never failed. On a cold replica both send their first request
    with the key at once and share one verification, which ran A's throttle: B was answered
    A's 429 too_many_failures. The limit counts failures from one client IP, and legitimate
    first requests are never refused as failures: B gets its 200 (one argon2 run, its own)."""
    got_a, got_b = await _first_requests_from_a_throttled_and_a_clean_address(
        redis_url, upstream, monkeypatch, "10.0.0.1", "10.0.0.2")
    assert got_a == (429, "too_many_failures"), got_a
    assert got_b[0] == 200, f"a clean address answered {got_b} for a throttled one's failures"


async def test_an_ipv6_address_in_a_throttled_ones_64_shares_its_refusal(
        redis_url, upstream, monkeypatch):
    """The throttle counts an IPv6 /64 as one client: another address in it joining the
    throttled one's verification is that client, refused with it, not verified again."""
    got_a, got_b = await _first_requests_from_a_throttled_and_a_clean_address(
        redis_url, upstream, monkeypatch, "2001:db8:1:2::1", "2001:db8:1:2::2")
    assert got_a == got_b == (429, "too_many_failures"), (got_a, got_b)


async def test_a_clean_address_sharing_a_first_verification_refused_overloaded_is_verified(gut):
    """The verification queue is bounded per client address: a first verification refused
    503 overloaded because its first requester's address had its queue full was answered to
    every request sharing it, from any address. Another address gets its own verification."""
    token, key = await gut.key()
    auth = gut.gw.pipeline.auth
    auth.queue._by_ip["10.0.0.1"] = auth.queue.per_ip  # 10.0.0.1's queue is full
    try:
        first = asyncio.create_task(auth.authenticate(token, "10.0.0.1"))
        joined = asyncio.create_task(auth.authenticate(token, "10.0.0.2"))
        same = asyncio.create_task(auth.authenticate(token, "10.0.0.1"))
        results = await asyncio.gather(first, joined, same, return_exceptions=True)
    finally:
        del auth.queue._by_ip["10.0.0.1"]
    assert [getattr(r, "code", None) for r in (results[0], results[2])] == ["overloaded"] * 2
    assert not isinstance(results[1], Exception), results[1]
    assert results[1].id == key["id"]


def _failures(r: redis.Redis, ip: str) -> int:
    return int(r.get(f"kg:fail:ip:{throttle_client(ip)}") or 0)


async def test_an_address_over_its_failure_limit_is_refused_429_even_when_it_joins_a_clean_run(
        redis_url, upstream, monkeypatch):
    """SPEC (proxy listener, first failure wins): "repeated failed verifications from one
    client IP ... checked before argon2 runs | 429 too_many_failures" comes before "unknown
    key id or wrong secret | 401 invalid_key". 10.9.0.9 is at its per-IP failure limit. Sent
    alone, its wrong guess is answered 429 (no argon2). Sent while a clean address has the same
    token's first verification under way, it joined that run (run under the clean address's
    limit only) and was answered that run's 401 invalid_key: the verdict for its guess, no
    Retry-After. It is now refused 429 with its own Retry-After, as alone; the clean address
    still gets its 401 from the one argon2 run. (Adversarial review revauth.)"""
    config = make_config(str(upstream.make_url("")))
    limit = config.keys.failures.per_ip
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        auth = g.gw.pipeline.auth
        r = redis.Redis.from_url(redis_url)
        try:
            r.set(f"kg:fail:ip:{throttle_client('10.9.0.9')}", limit, ex=60)
            guess = wrong_secret(token)
            alone = await asyncio.gather(auth.authenticate(guess, "10.9.0.9"),
                                         return_exceptions=True)
            assert getattr(alone[0], "code", None) == "too_many_failures", alone  # as SPEC says
            clean = asyncio.create_task(auth.authenticate(guess, "10.1.0.1"))
            throttled = asyncio.create_task(auth.authenticate(guess, "10.9.0.9"))  # joins it
            got = await asyncio.wait_for(asyncio.gather(clean, throttled,
                                                        return_exceptions=True), 20)
            assert getattr(got[0], "code", None) == "invalid_key", got
            assert isinstance(got[1], TooManyRequests) and got[1].code == "too_many_failures", (
                f"an address at its failure limit was answered {getattr(got[1], 'code', got[1])!r} "
                "for a wrong secret because another address sent it at the same moment")
            assert 1 <= int(got[1].headers["Retry-After"]) <= 60
            assert _failures(r, "10.9.0.9") == limit  # refused before: not counted again
            assert _failures(r, "10.1.0.1") == 1
            assert g.counter("keygate_argon2_verifications_total", result="fail") == 1
        finally:
            r.close()


async def test_a_wrong_secret_joining_another_addresss_run_counts_against_its_own_address(
        redis_url, upstream, monkeypatch):
    """A failed shared verification was counted against its first requester's address only:
    an address whose wrong guesses each joined another address's run of the same token was
    never counted, so it never reached its limit. Each request's failure counts against its
    own client (as alone: an IPv6 /64 is one client), still with one argon2 run per token."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        auth = g.gw.pipeline.auth
        r = redis.Redis.from_url(redis_url)
        try:
            guess = wrong_secret(token)
            tasks = [asyncio.create_task(auth.authenticate(guess, ip)) for ip in
                     ("10.1.0.1", "10.2.0.2", "2001:db8:1:2::1", "2001:db8:1:2::2")]
            got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
            assert [getattr(e, "code", e) for e in got] == ["invalid_key"] * 4, got
            # per request, as alone: the /64's two requests are two failures of that client
            assert [_failures(r, ip) for ip in ("10.1.0.1", "10.2.0.2", "2001:db8:1:2::1")] \
                == [1, 1, 2]
            assert g.counter("keygate_argon2_verifications_total", result="fail") == 1
        finally:
            r.close()


async def test_a_joiner_whose_client_left_as_the_shared_run_was_refused_starts_no_run(
        redis_url, upstream, monkeypatch):
    """A clean address joined a throttled address's first verification; the run was refused
    (429, for the throttled address alone) in the very pass its client's connection went: it
    was answered from the refusal rather than as gone, and then started a verification of its
    own (queue turn, store reads, argon2) for a client no longer there. It now ends as
    client_closed, and no run starts."""
    from gateway.proxying.connection import ClientGone
    c = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        c, keys=dataclasses.replace(c.keys, failures=FailureLimits(20, None, 60)))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        auth = g.gw.pipeline.auth
        r = redis.Redis.from_url(redis_url)
        r.set(f"kg:fail:ip:{throttle_client('10.0.0.1')}", 20, ex=60)  # at the limit (20)
        r.close()
        auth.cache.clear()
        digest = token_digest(token)
        # keygate's own connection handler as authenticate watches it: it ends the wait
        # it holds as upstream_wait with ClientGone when its client goes
        watch = types.SimpleNamespace(upstream_wait=None)
        went = []

        def client_goes(_task) -> None:  # in the pass the refusal is handed out
            if isinstance(watch.upstream_wait, asyncio.Future):
                watch.upstream_wait.set_exception(ClientGone())
                went.append(True)

        relay.hold_when(f"kg:fail:ip:{throttle_client('10.0.0.1')}".encode())
        first = asyncio.create_task(auth.authenticate(token, "10.0.0.1"))
        assert await eventually(lambda: relay.held_back > 0, 5)
        joined = asyncio.create_task(auth.authenticate(
            token, "10.0.0.2", types.SimpleNamespace(protocol=watch)))
        assert await eventually(lambda: digest in auth._inflight
                                and auth._inflight[digest].waiting == 2, 5)
        auth._inflight[digest].task.add_done_callback(client_goes)
        relay.release()
        got = await asyncio.wait_for(asyncio.gather(first, joined, return_exceptions=True), 10)
        assert went, "the joiner was not waiting on the run when it was refused"
        assert getattr(got[0], "code", None) == "too_many_failures", got
        assert getattr(got[1], "code", None) == "bad_request", got  # client_closed
        await asyncio.sleep(0.05)
        assert not auth._inflight, auth._inflight
        assert g.counter("keygate_argon2_verifications_total", result="ok") == 0


async def test_a_cancelled_first_verification_does_not_fail_the_requests_waiting_on_it(gut):
    token, key = await gut.key()
    auth = gut.gw.pipeline.auth
    first = asyncio.create_task(auth.authenticate(token, "10.0.0.1"))
    await asyncio.sleep(0)          # first is now verifying; the followers join it
    followers = [asyncio.create_task(auth.authenticate(token, "10.0.0.2")) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()                  # e.g. its client went away, or shutdown
    results = await asyncio.gather(*followers, return_exceptions=True)
    assert [getattr(r, "key", r).id for r in results] == [key["id"]] * 3
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_fail_open_counts_reach_the_store_without_waiting_for_more_traffic(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch, ledger_retry=0.05) as g:
        await g.workspace()
        token, _ = await g.key()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1000")
        for _ in range(2):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200

        async def usage_read():  # no request after the store came back: the retry writes them
            status, usage = await g.admin_json("GET", "/workspaces/acme/usage")
            return status == 200 and usage["used"] >= 3
        await eventually(usage_read)
        _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
        assert usage["used"] == 3


def _client_goes(watch) -> None:
    """What keygate's connection handler does when its client goes
    (proxying/server.py connection_lost): it ends the wait it holds as upstream_wait, if any."""
    from gateway.proxying.connection import ClientGone
    waiting, watch.upstream_wait = watch.upstream_wait, None
    if waiting is not None and not waiting.done():
        waiting.set_exception(ClientGone())


async def test_a_joiner_whose_client_goes_during_its_own_failure_check_ends_and_frees_the_run(
        redis_url, upstream, monkeypatch):
    """10.0.0.1 starts a token's first verification, which waits for a queue turn (every
    turn taken). 10.0.0.2 sends the same token and joins it: 429a07d first reads its own
    failure count (Redis slow here), and while it did, it counted as waiting on the run but
    held no upstream_wait, so its connection handler cannot tell it its client went. Both
    clients go. The first ends client_closed and leaves the run to the joiner; the joiner,
    its read answered, waits on the run with a fresh upstream_wait nobody will ever end: it
    does not end as client_closed, and the run it keeps alive is not cancelled, so it keeps
    its queue place and runs argon2 for nobody (and a verified key then goes on through the
    pipeline for a client long gone). A request alone, or joining one of its own client,
    ends at once and frees the queue place (_wait_while_there / _abandon); so does this
    joiner now, the wait for its own check held as its upstream_wait."""
    config = make_config(str(upstream.make_url("")))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        auth = g.gw.pipeline.auth
        auth.cache.clear()
        digest = token_digest(token)
        watch_a = types.SimpleNamespace(upstream_wait=None)
        watch_b = types.SimpleNamespace(upstream_wait=None)
        auth.queue.busy = auth.queue.slots  # every turn taken: the run waits for one
        first = joined = None
        try:
            first = asyncio.create_task(auth.authenticate(
                token, "10.0.0.1", types.SimpleNamespace(protocol=watch_a)))
            assert await eventually(lambda: digest in auth._inflight
                                    and auth._inflight[digest].waiting == 1, 5)
            run = auth._inflight[digest]
            relay.delay_when(f"kg:fail:ip:{throttle_client('10.0.0.2')}".encode())
            joined = asyncio.create_task(auth.authenticate(
                token, "10.0.0.2", types.SimpleNamespace(protocol=watch_b)))
            assert await eventually(lambda: relay.held_back > 0, 5)  # in its own check
            assert run.waiting == 2
            _client_goes(watch_a)  # both clients go
            _client_goes(watch_b)
            relay.release()
            await asyncio.wait({first, joined}, timeout=3)
            assert first.done() and getattr(first.exception(), "code", None) == "bad_request"
            assert joined.done(), (
                "the joiner whose client went during its own failure check still waits on "
                "the shared run (which is still queued) instead of ending client_closed")
            assert getattr(joined.exception(), "code", None) == "bad_request"
            assert run.task.cancelled() and digest not in auth._inflight, \
                "a verification nobody waits on still holds its queue place"
        finally:
            auth.queue.busy = 0
            auth.queue.resize(auth.queue.slots)  # let the run have its turn, and end
            for t in (first, joined):
                if t is not None:
                    await asyncio.wait({t}, timeout=10)


async def test_unknown_key_id_and_wrong_secret_take_the_same_store_round_trips(
        redis_url, upstream, monkeypatch):
    """A token whose key id has no key is verified against a decoy "so that its timing tells
    no key id exists" (gateway/auth.py). Against a store a round trip away (a managed Redis in
    another zone: 0.5-2 ms; here 40 ms, to see it plainly) a wrong secret cost a store round
    trip an unknown id did not: the key id was looked up, and only an existing one's record
    read. Both now make the same calls (the metrics' per-call counts), so take the same
    number of round trips."""
    from harness import HeldReplies
    config = make_config(str(upstream.make_url("")))
    async with HeldReplies(redis_url) as far, \
            gateway_under_test(config, far.url, monkeypatch) as g:
        await g.workspace()
        token, key = await g.key()
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200

        def forged(key_id: str, i: int) -> str:
            head = f"kg_live_{key_id}{i:032d}"
            return head + checksum(head)

        calls = ("failure_counts", "key_workspace", "read_key", "record_failure", "authorize")

        def counts() -> dict[str, float]:
            return {c: g.counter("keygate_store_call_duration_seconds_count", call=c)
                    for c in calls}

        async def refused(bad: str) -> tuple[float, dict[str, float]]:
            before = counts()
            started = asyncio.get_running_loop().time()
            async with g.proxy.get("/people/1", headers=bearer(bad)) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (401, "invalid_key")
            took = asyncio.get_running_loop().time() - started
            return took, {c: n - before[c] for c, n in counts().items()}

        far.reply_delay = 0.04
        wrong, unknown = [], []
        for i in range(4):  # per_key 10, per_ip 20 in the harness config: all stay 401
            wrong.append(await refused(forged(key["id"], i)))
            unknown.append(await refused(forged(f"{i:012d}", i)))
        assert all(made == wrong[0][1] for _, made in wrong + unknown), (wrong, unknown)
        assert wrong[0][1]["read_key"] == 1 and wrong[0][1]["key_workspace"] == 1
        # and in time: four store round trips of 40 ms each at least (the throttle's read,
        # the index, the record, the failure's count; three before), besides an argon2 run
        # that a loaded machine can hold back by tens of ms (its threads take only the CPU
        # the loop leaves), so no bound on the difference of the two holds there
        assert min(t for t, _ in unknown) >= 4 * 0.04, unknown


async def test_ipv4_clients_translated_into_the_nat64_prefix_are_not_one_client(
        redis_url, upstream, monkeypatch):
    """An IPv6-only deployment (SIIT-DC / NAT46 in front, RFC 6052's well-known prefix
    64:ff9b::/96; RFC 7755) sees every IPv4 client as 64:ff9b::<its IPv4 address>. The
    throttle counts an IPv6 client by its /64, so the whole IPv4 Internet is one client there:
    one attacker's 20 wrong guesses answer every other IPv4 client's first request 429
    too_many_failures (and share one verify_queue.per_ip). An address in 64:ff9b::/96
    carries an IPv4 address, as ::ffff:0:0/96 does, and should be counted as that address."""
    from gateway.tokens import make_token
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        config, keys=dataclasses.replace(config.keys, failures=FailureLimits(20, None, 60)),
        server=ServerConfig(host="127.0.0.1", access_log="off",
                            trusted_proxies=("127.0.0.1/32",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        g.gw.pipeline.auth.cache.clear()
        attacker = {"X-Forwarded-For": "64:ff9b::c633:6407"}  # 198.51.100.7
        for _ in range(20):
            async with g.proxy.get("/people/1", headers={
                    **bearer(make_token("kg", "live")[0]), **attacker}) as r:
                assert r.status == 401
        other = {"X-Forwarded-For": "64:ff9b::cb00:7109"}  # 203.0.113.9, never failed
        async with g.proxy.get("/people/1", headers={**bearer(token), **other}) as r:
            assert r.status == 200, (r.status, await r.text())


def test_the_throttle_counts_a_nat64_address_as_the_ipv4_address_it_carries():
    assert throttle_client("64:ff9b::c633:6407") == "198.51.100.7"
    assert throttle_client("64:ff9b::198.51.100.7") == "198.51.100.7"
    assert throttle_client("::ffff:198.51.100.7") == "198.51.100.7"
    # outside the /96 (64:ff9b:1::/48, RFC 8215's local-use prefix, places the IPv4 address
    # where its operator chose): by its /64, as any IPv6 address
    assert throttle_client("64:ff9b:0:0:1::c633:6407") == "64:ff9b::/64"
    assert throttle_client("2001:db8::1") == "2001:db8::/64"


async def test_a_nat64_client_is_matched_against_allowed_ips_as_the_address_it_is(
        redis_url, upstream, monkeypatch) -> None:
    """The throttle counts a client in 64:ff9b::/96 as the IPv4 address it carries; a key's
    allow-list matches the address as it is (docs/api.md): an IPv4 entry does not take it, the
    NAT64 form of the same range does."""
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=ServerConfig(
        host="127.0.0.1", access_log="off", trusted_proxies=("127.0.0.1/32",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        v4, _ = await g.key(allowed_ips=["198.51.100.0/24"])
        nat64, _ = await g.key(allowed_ips=["64:ff9b::198.51.100.0/120"])
        for token, via, status in ((v4, "198.51.100.7", 200), (v4, "64:ff9b::c633:6407", 403),
                                   (nat64, "64:ff9b::c633:6407", 200),
                                   (nat64, "198.51.100.7", 403)):
            async with g.proxy.get("/people/1", headers={
                    **bearer(token), "X-Forwarded-For": via}) as r:
                assert r.status == status, (via, r.status, await r.text())

