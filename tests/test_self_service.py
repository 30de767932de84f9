"""Workspace self-service on the proxy listener (``/_keygate/v1/keys...``), through the real
pipeline (token parsing, argon2 verification, revision checks) against a real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.app import running_gateway
from gateway.config import Argon2Config, Config, Plan, RateLimit

FUTURE = "2099-01-01T00:00:00Z"


def cheap_config() -> Config:
    base = Config()
    keys = dataclasses.replace(base.keys, argon2=Argon2Config(time_cost=1, memory_cost=8,
                                                                parallelism=1))
    plans = {"default": Plan("default"),
             "small": Plan("small", max_keys=10, rate_limit=RateLimit(10, 1))}
    server = dataclasses.replace(base.server, access_log="off")
    return dataclasses.replace(
        base, keys=keys, plans=plans, server=server,
        roles={"keyadmin": ("keys:admin", "people:read"), "reader": ("people:read",),
               "writer": ("people:read", "people:write")})


@pytest.fixture
async def env(redis_url, aiohttp_raw_server, aiohttp_client):
    """A gateway on a flushed Redis with workspaces ``acme`` and ``beta``; ``env.token(key)``."""
    async with running_gateway(cheap_config(), redis_url) as gw:
        server = await aiohttp_raw_server(gw.pipeline.handle)
        client = await aiohttp_client(server)
        store = gw.store
        await store.create_workspace("acme", "ACME", "small")
        await store.create_workspace("beta", "Beta", "default")

        class Env:
            pass

        e = Env()
        e.client, e.store = client, store
        e.admin = await store.create_key("acme", name="acme-admin", environment="live",
                                         role="keyadmin")
        e.beta_key = await store.create_key("beta", name="beta-key", environment="live",
                                            scopes=["people:read"])
        e.reader = await store.create_key("acme", name="reader", environment="live",
                                          role="reader")
        e.writer = await store.create_key("acme", name="writer", environment="live",
                                          role="writer")

        def call(method: str, path: str, token: str | None = None, **kwargs):
            headers = {"Authorization": f"Bearer {token or e.admin.token}"}
            return client.request(method, "/_keygate/v1/keys" + path, headers=headers, **kwargs)

        e.call = call
        yield e


async def status_and_body(resp) -> tuple[int, dict]:
    return resp.status, await resp.json()


async def test_lists_only_its_own_workspace(env):
    status, body = await status_and_body(await env.call("GET", ""))
    assert status == 200
    ids = {k["id"] for k in body["items"]}
    assert ids == {env.admin.key.id, env.reader.key.id, env.writer.key.id}
    assert env.beta_key.key.id not in ids
    status, body = await status_and_body(await env.call("GET", "?status=revoked"))
    assert status == 200 and body["items"] == []


async def test_creates_a_key_within_its_scopes_and_audit_names_the_acting_key(env):
    status, body = await status_and_body(await env.call(
        "POST", "", json={"name": "ci", "scopes": ["people:read"], "expires_at": FUTURE}))
    assert status == 201, body
    assert body["key"]["workspace"] == "acme" and body["token"].startswith("kg_live_")
    event = (await env.store.audit("acme", 1))[0]
    assert event == {
        "at": event["at"], "actor": env.admin.key.id,
        "action": "key.create", "target": body["key"]["id"],
        "details": {"name": "ci", "environment": "live", "role": None,
                    "scopes": ["people:read"], "expires_at": FUTURE, "rate_limit": None}}
    # the new key works at once
    status, body = await status_and_body(await env.call("GET", "", token=body["token"]))
    assert status == 403 and body["error"]["code"] == "insufficient_scope"  # no keys:admin


async def test_other_workspaces_keys_are_not_found_for_every_operation(env):
    other = env.beta_key.key.id
    for method, path, body in (("GET", f"/{other}", None),
                               ("PATCH", f"/{other}", {"name": "pwned"}),
                               ("POST", f"/{other}/revoke", None),
                               ("POST", f"/{other}/rotate", None)):
        status, answer = await status_and_body(await env.call(method, path, json=body))
        assert (status, answer["error"]["code"]) == (404, "not_found"), (method, path)
    untouched = await env.store.get_key("beta", other)
    assert untouched.name == "beta-key" and untouched.revoked_at is None
    assert len(await env.store.list_keys("beta")) == 1
    assert [e["action"] for e in await env.store.audit("beta")] == ["key.create",
                                                                     "workspace.create"]


@pytest.mark.parametrize("fields", [
    {"name": "wide", "scopes": ["people:write"]},
    {"name": "wide", "scopes": ["ALL"]},
    {"name": "wide", "role": "writer"},
    {"name": "wide", "scopes": ["people:read", "billing:read"]},
])
async def test_cannot_mint_a_wider_key(env, fields):
    status, body = await status_and_body(await env.call("POST", "", json=fields))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    assert len(await env.store.list_keys("acme")) == 3


async def test_cannot_widen_a_key_by_patch(env):
    target = env.reader.key.id
    for fields in ({"scopes": ["people:write"]}, {"role": "writer"}, {"scopes": ["ALL"]}):
        status, body = await status_and_body(await env.call("PATCH", f"/{target}", json=fields))
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), fields
    assert (await env.store.get_key("acme", target)).role == "reader"
    status, body = await status_and_body(await env.call(
        "PATCH", f"/{target}", json={"scopes": ["keys:admin"], "name": "n"}))
    assert status == 200 and body["scopes"] == ["keys:admin"] and body["name"] == "n"


async def test_cannot_rotate_a_key_wider_than_itself(env):
    status, body = await status_and_body(await env.call("POST", f"/{env.writer.key.id}/rotate"))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    assert (await env.store.get_key("acme", env.writer.key.id)).revoked_at is None
    status, body = await status_and_body(await env.call(
        "POST", f"/{env.reader.key.id}/rotate", json={"grace_seconds": 60}))
    assert status == 201 and body["key"]["scopes"] == ["people:read"]


async def test_cannot_raise_the_rate_limit_above_the_plan(env):
    status, body = await status_and_body(await env.call(
        "POST", "", json={"name": "fast", "rate_limit": "11/s"}))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    # 600/m is the plan's 10 a second on average and admits 600 in one second: no tighter
    # than the plan anywhere, looser in one window
    status, body = await status_and_body(await env.call(
        "POST", "", json={"name": "bursty", "rate_limit": "600/m"}))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    # 60/m is 1 a second on average: slower than the plan (in force, at most 10 in a second)
    for rate in ("60/m", "10/m"):
        status, _ = await status_and_body(await env.call(
            "POST", "", json={"name": "slow", "rate_limit": rate}))
        assert status == 201


async def test_a_key_holding_all_may_mint_all(env):
    root = await env.store.create_key("acme", name="root", environment="live", scopes=["ALL"])
    status, body = await status_and_body(await env.call(
        "POST", "", token=root.token, json={"name": "another-root", "scopes": ["ALL"]}))
    assert status == 201 and body["key"]["scopes"] == ["ALL"]


async def test_revoke_takes_effect_on_the_next_request(env):
    status, body = await status_and_body(await env.call("POST", f"/{env.admin.key.id}/revoke"))
    assert status == 200 and body["status"] == "revoked"
    status, body = await status_and_body(await env.call("GET", ""))
    assert (status, body["error"]["code"]) == (401, "revoked_key")


async def test_read_and_patch_within_the_workspace(env):
    status, body = await status_and_body(await env.call("GET", f"/{env.reader.key.id}"))
    assert status == 200 and body["name"] == "reader" and "token" not in body
    status, body = await status_and_body(await env.call(
        "PATCH", f"/{env.reader.key.id}", json={"description": "read-only", "expires_at": FUTURE}))
    assert status == 200 and body["description"] == "read-only"
    assert (await env.store.audit("acme", 1))[0]["actor"] == env.admin.key.id


async def test_key_without_keys_admin_is_refused(env):
    status, body = await status_and_body(await env.call("GET", "", token=env.reader.token))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")


async def test_validation_errors_and_unknown_paths(env):
    status, body = await status_and_body(await env.call("POST", "", json={"name": "x",
                                                                          "plan": "gold"}))
    assert (status, body["error"]["code"]) == (400, "bad_request") and "plan" in \
        body["error"]["message"]
    status, body = await status_and_body(await env.call("POST", "", data=b"{nope"))
    assert status == 400
    status, body = await status_and_body(await env.call("GET", "/AAAAAAAAAAAA"))
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await status_and_body(await env.call("GET", f"/{env.reader.key.id}/nope"))
    assert status == 404
    resp = await env.call("PUT", f"/{env.reader.key.id}")
    status, body = await status_and_body(resp)
    assert status == 405 and "PATCH" in resp.headers["Allow"] and "DELETE" in resp.headers["Allow"]



async def test_a_trailing_slash_is_no_key_endpoint_as_on_the_admin_listener(env):
    """`/_keygate/v1/keys/` listed the workspace's keys (and a POST there made one), and
    `/_keygate/v1/keys/ID/` or `/ID/revoke/` acted on the key, while the admin listener, the
    usage endpoint and the OpenAPI document know those paths only without the slash (404
    there): one call answered two ways depending on the listener."""
    key = env.reader.key.id
    for method, path in (("GET", "/"), ("POST", "/"), ("GET", f"/{key}/"),
                         ("PATCH", f"/{key}/"), ("POST", f"/{key}/revoke/"),
                         ("GET", f"/{key}/usage/daily/")):
        status, body = await status_and_body(await env.call(method, path, json={"name": "x"}
                                                            if method != "GET" else None))
        assert (status, body["error"]["code"]) == (404, "not_found"), (method, path, body)
    got = await env.store.get_key("acme", key)
    assert got.revoked_at is None and got.name == "reader"
    assert len(await env.store.list_keys("acme")) == 3


async def test_head_takes_what_get_takes_and_allow_says_so(env):
    """HEAD on a key endpoint that takes GET answered 405, though the admin listener serves
    the same table rows HEAD and /_keygate/v1/usage takes it too: a monitor or a client
    checking an endpoint with HEAD was refused here only."""
    for path in ("", f"/{env.reader.key.id}", f"/{env.reader.key.id}/usage/daily"):
        resp = await env.call("HEAD", path)
        assert resp.status == 200, (path, resp.status)
        assert await resp.read() == b""
    resp = await env.call("PUT", "")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD, POST"
    resp = await env.call("GET", f"/{env.reader.key.id}/revoke")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"


async def test_a_method_the_path_does_not_take_is_405_whatever_the_query(env):
    """A method a key path does not take, sent with a query, was 400 "unknown query parameter"
    (``DELETE .../usage/daily?days=7``: told that ``days``, a parameter of that very path, is
    unknown) where the admin listener answers the same call 405 with ``Allow``."""
    key = env.reader.key.id
    for method, path, allow in (("DELETE", f"/{key}/usage/daily?days=7", "GET, HEAD"),
                                ("PUT", f"/{key}?status=active", "GET, HEAD, PATCH, DELETE"),
                                ("GET", f"/{key}/rotate?grace_seconds=1", "POST")):
        resp = await env.call(method, path)
        status, body = await status_and_body(resp)
        assert (status, body["error"]["code"]) == (405, "method_not_allowed"), (method, path, body)
        assert resp.headers["Allow"] == allow
    # a method the path takes still refuses a query parameter it does not
    status, body = await status_and_body(await env.call("GET", f"/{key}?days=7"))
    assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_re_roling_or_editing_a_role_takes_effect_on_the_next_request(env):
    assert (await env.call("GET", "")).status == 200
    await env.store.put_role("acme", "keyadmin", ["people:read"])  # the role loses keys:admin
    status, body = await status_and_body(await env.call("GET", ""))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    await env.store.delete_role("acme", "keyadmin")                # back to the config role
    assert (await env.call("GET", "")).status == 200
    await env.store.update_key("acme", env.admin.key.id, role="reader")
    status, body = await status_and_body(await env.call("GET", ""))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")


async def test_unknown_query_parameter_is_400(env):
    """`?state=revoked` (typo of status) used to list every key of the workspace."""
    resp = await env.call("GET", "?state=revoked")
    assert resp.status == 400 and "state" in (await resp.json())["error"]["message"]


async def _short_lived_admin(env, seconds: float = 86400):
    import time
    return await env.store.create_key("acme", name="temp-admin", environment="live",
                                      role="keyadmin", expires_at=time.time() + seconds)


async def test_a_key_cannot_extend_its_own_expiry(env):
    """An operator gave a keys:admin key one day; PATCHing its own expires_at to null or to a
    later date made it a permanent credential."""
    temp = await _short_lived_admin(env)
    for value in (None, FUTURE):
        status, body = await status_and_body(await env.call(
            "PATCH", f"/{temp.key.id}", temp.token, json={"expires_at": value}))
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
        assert "expires_at" in body["error"]["message"]
    assert abs((await env.store.get_key("acme", temp.key.id)).expires_at - temp.key.expires_at) < 0.01
    sooner = "2000-01-01T00:00:00Z"  # the past is a 400 as ever; a sooner future date is fine
    status, _ = await status_and_body(await env.call(
        "PATCH", f"/{temp.key.id}", temp.token, json={"expires_at": sooner}))
    assert status == 400


async def test_a_key_cannot_mint_or_rotate_a_key_that_outlives_it(env):
    temp = await _short_lived_admin(env)
    status, body = await status_and_body(await env.call(
        "POST", "", temp.token, json={"name": "x", "scopes": ["people:read"],
                                      "expires_at": FUTURE}))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
    # without an expiry the new key inherits the acting key's
    status, body = await status_and_body(await env.call(
        "POST", "", temp.token, json={"name": "x", "scopes": ["people:read"]}))
    assert status == 201, body
    assert body["key"]["expires_at"] is not None
    assert body["key"]["expires_at"] <= temp.key.to_json(())["expires_at"]
    # rotating a never-expiring key hands out a key that ends no later than the actor
    status, body = await status_and_body(await env.call(
        "POST", f"/{env.reader.key.id}/rotate", temp.token))
    assert status == 201, body
    assert body["key"]["expires_at"] is not None
    assert body["key"]["expires_at"] <= temp.key.to_json(())["expires_at"]


async def test_a_key_asking_for_a_key_that_never_expires_is_refused_not_given_its_expiry(env):
    """An explicit ``"expires_at": null`` asks for no expiry, which a key that expires cannot
    give: 403 and nothing made, not a 201 with the acting key's expiry (only a create that
    names no expiry inherits it)."""
    temp = await _short_lived_admin(env)
    before = len(await env.store.list_keys("acme"))
    status, body = await status_and_body(await env.call(
        "POST", "", temp.token, json={"name": "forever", "scopes": ["people:read"],
                                      "expires_at": None}))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
    assert "expires_at" in body["error"]["message"]
    assert len(await env.store.list_keys("acme")) == before


async def test_a_key_cannot_extend_the_life_of_a_wider_key(env):
    """The acting key lacks people:write; keeping a writer key alive longer is widening."""
    import time
    writer = await env.store.create_key("acme", name="w", environment="live", role="writer",
                                        expires_at=time.time() + 3600)
    status, body = await status_and_body(await env.call(
        "PATCH", f"/{writer.key.id}", json={"expires_at": None}))
    assert (status, body["error"]["code"]) == (403, "insufficient_scope"), body
    status, body = await status_and_body(await env.call(
        "PATCH", f"/{writer.key.id}", json={"name": "renamed"}))
    assert status == 200, body


async def test_an_oversized_body_is_413_not_500(env):
    """The proxy listener's request.read() refuses bodies over 1 MiB with an aiohttp
    HTTPException that the pipeline rendered as a 500."""
    resp = await env.call("POST", "", data=b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}')
    assert resp.status == 413, await resp.text()
    assert (await resp.json())["error"]["code"] == "body_too_large"
    status, _ = await status_and_body(await env.call("GET", ""))
    assert status == 200


async def test_a_key_used_only_for_self_service_is_stamped_last_used(env):
    """A keys:admin key used only on /_keygate/v1/keys (the console, a script) listed as
    never used, so `keys list --unused 90d` offered it for revocation while it was in daily
    use. Its successful calls now stamp last_used_at; a refused call stamps nothing, and
    no call is counted as usage."""
    assert (await env.store.get_key("acme", env.admin.key.id)).last_used_at is None
    status, _ = await status_and_body(await env.call("GET", ""))
    assert status == 200
    stamped = (await env.store.get_key("acme", env.admin.key.id)).last_used_at
    assert stamped is not None
    status, _ = await status_and_body(await env.call("GET", "", token=env.reader.token))
    assert status == 403
    assert (await env.store.get_key("acme", env.reader.key.id)).last_used_at is None
    assert (await env.store.usage("acme"))["used"] == 0


async def test_self_service_calls_are_bounded_per_key_and_count_no_usage(env):
    """/_keygate/ calls admitted a key without any bound: a key could call the costly key
    listing (it reads the workspace's keys) or the usage endpoint as fast as it liked. A
    key's calls there are now bounded (20 a second, in a log of their own: the key's rate
    limit is left to its requests, and a key over it still reads its usage) and are still
    counted in no usage."""
    admin = await env.store.create_key("acme", name="slow-admin", environment="live",
                                       role="keyadmin", rate_limit="3/m")
    headers = {"Authorization": f"Bearer {admin.token}"}
    assert (await env.client.get("/_keygate/v1/usage", headers=headers)).status == 200

    async def one(path: str):
        resp = await env.client.get(path, headers=headers)
        return resp.status, (await resp.json()), resp.headers

    got = await asyncio.gather(*(one("/_keygate/v1/keys" if i % 2 else "/_keygate/v1/usage")
                                 for i in range(30)))
    statuses = [s for s, _, _ in got]
    assert statuses.count(200) >= 19, statuses  # 20 a second, the key's 3/m not spent
    refused = [(b, h) for s, b, h in got if s == 429]
    assert refused, statuses
    for body, h in refused:
        assert body["error"]["code"] == "rate_limited", body
        assert h["Retry-After"] == "1" and "RateLimit" not in h
    assert (await env.store.usage("acme"))["used"] == 0
    resp = await env.call("GET", "")  # another key's calls are bounded on their own
    assert resp.status == 200


async def test_the_usage_endpoint_is_never_stored_by_a_cache(env):
    """``/_keygate/v1/usage`` answers a key's own record (its name, scopes, ``meta``, last use)
    with no ``Cache-Control`` at all, while the admin listener's usage and the key endpoints
    beside it say ``no-store``: a browser's cache or a CDN in front of keygate could keep a
    copy (a key sent as ``X-Api-Key`` is no ``Authorization``, which keeps shared caches off
    on its own) and hand it on. Every answer of it, HEAD too, now says ``no-store``."""
    headers = {"Authorization": f"Bearer {env.admin.token}"}
    for method in ("GET", "HEAD"):
        resp = await env.client.request(method, "/_keygate/v1/usage", headers=headers)
        assert resp.status == 200, method
        assert resp.headers.get("Cache-Control") == "no-store", method
    resp = await env.client.get("/_keygate/v1/usage", headers={"X-Api-Key": env.reader.token})
    assert resp.status == 200 and resp.headers.get("Cache-Control") == "no-store"
