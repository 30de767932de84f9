"""The admin API over real HTTP against a real redis-server: every endpoint, success and errors."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time

import pytest
import redis
from aiohttp import web

from gateway.accesslog import mask_query
from gateway.admin import create_admin_app, error_middleware
from gateway.config import Argon2Config, Config, Plan, RateLimit
from gateway.models import rfc3339
from gateway.store import Store, keyspace
from gateway.tokens import make_token, parse_token
from harness import T0, Clock

OPERATOR_TOKEN = "operator-secret-for-tests"
AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
KEY_FIELDS = {"id", "workspace", "name", "description", "environment", "role", "scopes",
              "prefix", "created_at", "expires_at", "last_used_at", "revoked_at", "rate_limit",
              "status", "monthly_requests", "used_this_month", "enabled", "meta", "allowed_ips"}


def cheap_config() -> Config:
    base = Config()
    keys = dataclasses.replace(base.keys, argon2=Argon2Config(time_cost=1, memory_cost=8,
                                                                parallelism=1))
    plans = {"default": Plan("default"),
             "small": Plan("small", monthly_requests=1000, max_keys=3,
                           rate_limit=RateLimit(10, 1))}
    return dataclasses.replace(base, keys=keys, plans=plans,
                               roles={"reader": ("people:read",), "admin": ("ALL",)})


@pytest.fixture
async def admin(aiohttp_client, redis_url, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", OPERATOR_TOKEN)
    clock = Clock()
    store = await Store.connect(redis_url, cheap_config(), clock=clock)
    client = await aiohttp_client(create_admin_app(cheap_config(), store), headers=AUTH)
    client.store, client.clock = store, clock
    yield client
    await store.close()


async def ok(resp, status: int = 200) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    assert resp.headers["X-Request-Id"]
    return body


async def error(resp, status: int, code: str, mentions: str | None = None) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    return body


async def workspace(admin, ws: str = "acme", plan: str = "default") -> dict:
    return await ok(await admin.post("/admin/v1/workspaces",
                                     json={"id": ws, "name": ws.upper(), "plan": plan}), 201)


async def new_key(admin, ws: str = "acme", **fields) -> dict:
    fields.setdefault("name", "ci")
    return await ok(await admin.post(f"/admin/v1/workspaces/{ws}/keys", json=fields), 201)


async def active_keys(admin, ws: str = "acme") -> list[dict]:
    return (await ok(await admin.get(f"/admin/v1/workspaces/{ws}/keys?status=active")))["items"]


# --- auth, health, plumbing --------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, ""])
async def test_admin_is_closed_when_the_token_env_var_is_unset(aiohttp_client, redis_url,
                                                               monkeypatch, value):
    if value is None:
        monkeypatch.delenv("KEYGATE_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", value)
    store = await Store.connect(redis_url, cheap_config())
    client = await aiohttp_client(create_admin_app(cheap_config(), store))
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
        await error(await client.get("/admin/v1/workspaces", headers=headers), 401,
                    "unauthorized", "KEYGATE_ADMIN_TOKEN")
    await error(await client.post("/admin/v1/workspaces", json={"name": "x"}), 401,
                "unauthorized", "KEYGATE_ADMIN_TOKEN")
    assert await store.list_workspaces() == []
    assert (await client.get("/healthz")).status == 200
    await store.close()


async def test_missing_or_wrong_operator_token_is_401(admin):
    await error(await admin.get("/admin/v1/workspaces", headers={"Authorization": ""}),
                401, "unauthorized")
    await error(await admin.get("/admin/v1/workspaces",
                                headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    await error(await admin.get("/admin/v1/workspaces",
                                headers={"Authorization": f"Basic {OPERATOR_TOKEN}"}),
                401, "unauthorized")
    await error(await admin.get("/admin/v1/nothing-here", headers={"Authorization": ""}),
                401, "unauthorized")


async def test_health_endpoints_need_no_auth(admin):
    assert await ok(await admin.get("/healthz", headers={"Authorization": ""})) == \
        {"status": "ok"}
    assert await ok(await admin.get("/readyz", headers={"Authorization": ""})) == \
        {"status": "ok"}


async def test_readyz_is_503_and_admin_calls_503_when_the_store_is_down(
        aiohttp_client, own_redis, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", OPERATOR_TOKEN)
    store = await Store.connect(own_redis.url, cheap_config())
    client = await aiohttp_client(create_admin_app(cheap_config(), store), headers=AUTH)
    own_redis.stop()
    await error(await client.get("/readyz"), 503, "store_unavailable")
    body = await error(await client.get("/admin/v1/workspaces"), 503, "store_unavailable")
    assert "Error" not in body["error"]["message"]
    await store.close()


async def test_request_id_is_echoed_when_sane_and_generated_otherwise(admin):
    resp = await admin.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await admin.get("/healthz", headers={"X-Request-Id": "bad id\twith junk"})
    assert resp.headers["X-Request-Id"] != "bad id\twith junk"
    await error(await admin.get("/admin/v1/nope", headers={"X-Request-Id": "r1"}),
                404, "not_found")


async def test_unknown_endpoint_is_json_404_and_wrong_method_json_405(admin):
    await error(await admin.get("/admin/v1/nope"), 404, "not_found")
    resp = await admin.delete("/admin/v1/workspaces")
    await error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


async def test_unexpected_errors_are_a_generic_500_without_details(aiohttp_client):
    async def boom(request):
        raise RuntimeError("secret internals kg_live_xyz")

    app = web.Application(middlewares=[error_middleware(Config(), authenticate=False)])
    app.router.add_get("/boom", boom)
    client = await aiohttp_client(app)
    resp = await client.get("/boom")
    body = await error(resp, 500, "internal_error")
    assert "internals" not in json.dumps(body) and "Traceback" not in await resp.text()


# --- workspaces --------------------------------------------------------------------------------

async def test_create_workspace_returns_201_with_default_plan(admin):
    body = await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "ACME"}),
                    201)
    assert body == {"id": "acme", "name": "ACME", "plan": "default",
                    "created_at": "2026-01-01T00:00:00Z",
                    "limits": {"monthly_requests": None, "max_keys": None, "rate_limit": None},
                    "custom_limits": {}}


async def test_create_workspace_without_id_derives_a_slug(admin):
    first = await ok(await admin.post("/admin/v1/workspaces", json={"name": "Acme Corp"}), 201)
    second = await ok(await admin.post("/admin/v1/workspaces", json={"name": "Acme Corp"}), 201)
    assert first["id"] == "acme-corp"
    assert second["id"].startswith("acme-corp-")


async def test_create_workspace_with_a_taken_id_is_409(admin):
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "x"}),
                409, "conflict", "acme")


@pytest.mark.parametrize("body, field", [
    ({"id": "Acme", "name": "x"}, "id"),
    ({"id": "-acme", "name": "x"}, "id"),
    ({"id": "a" * 64, "name": "x"}, "id"),
    ({"id": 5, "name": "x"}, "id"),
    ({"id": "acme"}, "name"),
    ({"id": "acme", "name": ""}, "name"),
    ({"id": "acme", "name": "n" * 201}, "name"),
    ({"id": "acme", "name": 7}, "name"),
    ({"id": "acme", "name": "two\nlines"}, "name"),
    ({"id": "acme", "name": "x", "plan": "gold"}, "plan"),
    ({"id": "acme", "name": "x", "colour": "red"}, "colour"),
])
async def test_create_workspace_rejects_bad_fields(admin, body, field):
    await error(await admin.post("/admin/v1/workspaces", json=body), 400, "bad_request", field)


@pytest.mark.parametrize("raw, field", [
    (b'{"name": "k", "scopes": ["people:read"], "scopes": ["ALL"]}', "scopes"),
    (b'{"name": "k", "name": "other"}', "name"),
    (b'{"name": "k", "meta": {"team": "a", "team": "b"}}', "team"),
])
async def test_a_field_given_twice_is_400_and_nothing_is_made(admin, raw, field):
    """Python's reader keeps the last of two equal names: a body that a log, a proxy in front
    or a reviewer read by its first ``scopes`` made a key with the second one."""
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces/acme/keys", data=raw,
                                 headers={"Content-Type": "application/json"}),
                400, "bad_request", f"'{field}'")
    assert await admin.store.list_keys("acme") == []


async def test_bad_json_and_non_objects_are_400(admin):
    await error(await admin.post("/admin/v1/workspaces", data=b"{not json"), 400,
                "bad_request", "JSON")
    await error(await admin.post("/admin/v1/workspaces", json=["a"]), 400, "bad_request",
                "object")
    await error(await admin.post("/admin/v1/workspaces", data=b"[" * 100_000), 400,
                "bad_request", "JSON")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
async def test_a_body_in_another_encoding_than_utf8_is_400_and_nothing_is_made(admin, encoding):
    """RFC 8259 8.1: JSON between systems is UTF-8. Python's reader also takes UTF-16 and
    UTF-32 (it guesses from the NUL bytes), so a key was made from a body that a WAF, a proxy
    in front or a log reading it as UTF-8 (as the OpenAPI document says it is) saw only as
    NUL-riddled bytes: what was checked was not what keygate acted on."""
    await workspace(admin)
    raw = json.dumps({"name": "sixteen", "scopes": ["people:read"]}).encode(encoding)
    await error(await admin.post("/admin/v1/workspaces/acme/keys", data=raw,
                                 headers={"Content-Type": "application/json"}),
                400, "bad_request", "UTF-8")
    assert await admin.store.list_keys("acme") == []


async def test_a_utf8_byte_order_mark_before_the_json_is_ignored(admin):
    """RFC 8259 8.1 lets a reader ignore one (Windows PowerShell 5 writes it)."""
    await workspace(admin)
    raw = b"\xef\xbb\xbf" + json.dumps({"name": "bom"}).encode()
    await ok(await admin.post("/admin/v1/workspaces/acme/keys", data=raw,
                              headers={"Content-Type": "application/json"}), 201)


async def test_list_and_read_workspaces(admin):
    await workspace(admin, "acme")
    await workspace(admin, "beta")
    body = await ok(await admin.get("/admin/v1/workspaces"))
    assert [w["id"] for w in body["items"]] == ["acme", "beta"]
    assert (await ok(await admin.get("/admin/v1/workspaces/beta")))["name"] == "BETA"
    await error(await admin.get("/admin/v1/workspaces/ghost"), 404, "not_found")
    await error(await admin.get("/admin/v1/workspaces/BAD%7Bslug"), 404, "not_found")


async def test_patch_workspace_changes_name_and_plan_and_bumps_rev(admin):
    await workspace(admin)
    before = await admin.store.get_workspace("acme")
    body = await ok(await admin.patch("/admin/v1/workspaces/acme",
                                      json={"name": "New", "plan": "small"}))
    assert (body["name"], body["plan"]) == ("New", "small")
    assert (await admin.store.get_workspace("acme")).rev > before.rev


async def test_patch_workspace_errors(admin):
    await error(await admin.patch("/admin/v1/workspaces/ghost", json={"name": "x"}), 404,
                "not_found")
    await workspace(admin)
    await error(await admin.patch("/admin/v1/workspaces/acme", json={"plan": "gold"}), 400,
                "bad_request", "plan")
    await error(await admin.patch("/admin/v1/workspaces/acme", json={"id": "x"}), 400,
                "bad_request", "id")
    await error(await admin.patch("/admin/v1/workspaces/acme", json={}), 400, "bad_request")
    await error(await admin.patch("/admin/v1/workspaces/acme", json={"name": "x" * 201}), 400,
                "bad_request", "name")


# --- keys --------------------------------------------------------------------------------------

async def test_create_key_returns_the_key_object_and_the_token_once(admin):
    await workspace(admin)
    body = await new_key(admin, scopes=["people:read"], description="CI runner")
    key, token = body["key"], body["token"]
    assert set(key) == KEY_FIELDS
    parsed = parse_token(token, "kg", ("live", "test"))
    assert key["id"] == parsed.key_id and key["prefix"] == "kg_live_" + key["id"] == token[:20]
    assert key["role"] is None and key["scopes"] == ["people:read"]
    assert (key["environment"], key["status"], key["workspace"]) == ("live", "active", "acme")
    assert key["created_at"] == "2026-01-01T00:00:00Z" and key["expires_at"] is None
    listing = await admin.get("/admin/v1/workspaces/acme/keys")
    text = await listing.text()
    assert token not in text and parsed.secret not in text and "argon2" not in text
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read == key


@pytest.mark.parametrize("prefix, environment", [
    ("acme", "live"), ("kg", "staging"), ("acmecorp12", "abcdefghijklmnop")])
async def test_the_key_objects_prefix_holds_the_whole_key_id_for_any_prefix_and_environment(
        redis_url, aiohttp_client, monkeypatch, prefix, environment):
    """SPEC: ``prefix`` is the token up to and including the key id, whatever the configured
    ``keys.prefix`` (up to 10 characters) and environment (up to 16); a key stored by an older
    version with the prefix cut at 20 characters reads with its whole prefix too, in a key's
    read, its listing and the answers of a change."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", OPERATOR_TOKEN)
    base = cheap_config()
    config = dataclasses.replace(base, keys=dataclasses.replace(
        base.keys, prefix=prefix, environments=(environment,)))
    store = await Store.connect(redis_url, config, clock=Clock())
    try:
        client = await aiohttp_client(create_admin_app(config, store), headers=AUTH)
        await workspace(client)
        body = await new_key(client)
        key, token = body["key"], body["token"]
        whole = f"{prefix}_{environment}_{key['id']}"
        assert token.startswith(whole) and key["prefix"] == whole
        path = f"/admin/v1/workspaces/acme/keys/{key['id']}"
        redis.Redis.from_url(redis_url).hset(keyspace.key_key("acme", key["id"]), "prefix",
                                             token[:20])  # as an older version stored it
        assert (await ok(await client.get(path)))["prefix"] == whole
        listing = await ok(await client.get("/admin/v1/workspaces/acme/keys"))
        assert [k["prefix"] for k in listing["items"]] == [whole]
        assert (await ok(await client.patch(path, json={"name": "renamed"})))["prefix"] == whole
        rotated = await ok(await client.post(path + "/rotate"), 201)
        assert rotated["key"]["prefix"] == rotated["token"][:len(whole)] \
            == f"{prefix}_{environment}_{rotated['key']['id']}"
    finally:
        await store.close()


async def test_create_key_with_role_env_expiry_and_rate_limit(admin):
    await workspace(admin)
    body = await new_key(admin, role="reader", environment="test", expires_in=3600,
                         rate_limit="5/s")
    key = body["key"]
    assert key["role"] == "reader" and key["scopes"] == ["people:read"]
    assert key["environment"] == "test" and body["token"].startswith("kg_test_")
    assert key["expires_at"] == "2026-01-01T01:00:00Z" and key["rate_limit"] == "5/s"
    body = await new_key(admin, expires_at="2026-06-01T00:00:00Z")
    assert body["key"]["expires_at"] == "2026-06-01T00:00:00Z"


@pytest.mark.parametrize("fields, mention", [
    ({"name": "k", "role": "reader", "scopes": ["a"]}, "role"),
    ({"name": "k", "expires_at": "2027-01-01T00:00:00Z", "expires_in": 60}, "expires_in"),
    ({"name": "k", "expires_at": "2025-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "k", "expires_at": "next tuesday"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00:00:00"}, "expires_at"),
    # ISO 8601 forms that are not RFC 3339 (the OpenAPI document's date-time)
    ({"name": "k", "expires_at": "2027-W01-1T00:00:00Z"}, "expires_at"),
    ({"name": "k", "expires_at": "20270101T000000Z"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00Z"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00:00Z"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00:00:00,5Z"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00:00:00+0100"}, "expires_at"),
    ({"name": "k", "expires_at": "2027-01-01T00:00:00+00:00:30"}, "expires_at"),
    ({"name": "k", "expires_in": 0}, "expires_in"),
    ({"name": "k", "expires_in": True}, "expires_in"),
    ({"name": "k", "expires_in": "60"}, "expires_in"),
    ({"name": "k", "role": "nobody"}, "role"),
    ({"name": "k", "role": 5}, "role"),
    ({"name": "k", "scopes": "people:read"}, "scopes"),
    ({"name": "k", "scopes": ["people read"]}, "scopes"),
    ({"name": "k", "scopes": ["a::b"]}, "scopes"),
    ({"name": "k", "scopes": [1]}, "scopes"),
    ({"name": "k", "environment": "prod"}, "environment"),
    ({"name": "k", "rate_limit": "5/h"}, "rate_limit"),
    ({"name": "k", "rate_limit": 5}, "rate_limit"),
    ({"name": "n" * 201}, "name"),
    ({"description": "no name"}, "name"),
    ({"name": "k", "token": "mine"}, "token"),
])
async def test_create_key_rejects_bad_fields(admin, fields, mention):
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces/acme/keys", json=fields), 400,
                "bad_request", mention)
    assert await admin.store.list_keys("acme") == []


@pytest.mark.parametrize("text", ["2027-01-01T01:00:00+01:00", "2027-01-01t00:00:00z",
                                  "2027-01-01T00:00:00.25Z", "2026-12-31T23:00:00-01:00"])
async def test_create_key_takes_rfc3339_with_any_offset_case_or_fraction(admin, text):
    await workspace(admin)
    body = await new_key(admin, expires_at=text)
    assert body["key"]["expires_at"] == "2027-01-01T00:00:00Z"


@pytest.mark.parametrize("when, mention", [
    ("0001-01-01T00:00:00+00:01", "in the past"), ("0001-01-01T00:00:00+23:59", "in the past"),
    ("9999-12-31T23:59:59-00:01", "century")])
async def test_an_expiry_outside_years_1_to_9999_utc_is_a_400_on_create_and_patch(admin, when,
                                                                                 mention):
    """A well-formed timestamp whose UTC instant falls before year 1 (or after 9999) is a 400
    saying why, never a 500 from showing that instant back in the message."""
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces/acme/keys",
                                 json={"name": "old", "expires_at": when}), 400, "bad_request",
                mention)
    key = (await new_key(admin))["key"]
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                  json={"expires_at": when}), 400, "bad_request", mention)
    assert (await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
            )["expires_at"] is None


async def test_create_key_in_unknown_workspace_is_404(admin):
    await error(await admin.post("/admin/v1/workspaces/ghost/keys", json={"name": "k"}), 404,
                "not_found")


async def test_key_cap_is_409_key_limit_reached(admin):
    await workspace(admin, plan="small")
    for i in range(3):
        await new_key(admin, name=f"k{i}")
    body = await error(await admin.post("/admin/v1/workspaces/acme/keys", json={"name": "k4"}),
                       409, "key_limit_reached")
    assert "cap of 3 active keys (set by its plan 'small')" in body["error"]["message"]


async def test_concurrent_creates_at_the_cap_over_http(admin):
    await workspace(admin, plan="small")
    responses = await asyncio.gather(*[
        admin.post("/admin/v1/workspaces/acme/keys", json={"name": f"k{i}"}) for i in range(10)])
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] * 3 + [409] * 7


async def test_creates_refused_at_the_cap_do_not_hash_a_secret_each(aiohttp_client, redis_url,
                                                                    monkeypatch):
    """A create hashed its new secret (argon2, one at a time for the whole process) before the
    script found the workspace at its cap: a workspace admin sending creates at its cap burned
    a core on hashes thrown away, and every other workspace's creates and rotations (an
    operator's emergency rotation included) queued behind them (60 such creates held another
    workspace's create 3.6 s). The cap is now read in the create's hashing turn, before its
    hash: a refused create costs a round trip, not an argon2 hash."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", OPERATOR_TOKEN)
    config = dataclasses.replace(cheap_config(), keys=Config().keys)  # the shipped argon2 cost
    store = await Store.connect(redis_url, config)
    try:
        client = await aiohttp_client(create_admin_app(config, store), headers=AUTH)
        await workspace(client, plan="small")
        for i in range(3):
            await new_key(client, name=f"k{i}")
        one_hash = min(_cpu_of(lambda: store.hasher.hash("s" * 32)) for _ in range(3))
        started = time.process_time()
        resps = await asyncio.gather(*[client.post("/admin/v1/workspaces/acme/keys",
                                                   json={"name": "more"}) for _ in range(30)])
        spent = time.process_time() - started
        assert [r.status for r in resps] == [409] * 30
        assert {(await r.json())["error"]["code"] for r in resps} == {"key_limit_reached"}
        # 30 hashes before; now none (a create let through to the script may hash: at most 1)
        assert spent < 8 * one_hash, (spent, one_hash)
        # a rotation that would take the workspace past its cap is refused as cheaply
        key = (await ok(await client.get("/admin/v1/workspaces/acme/keys")))["items"][0]
        await ok(await client.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                                   json={"grace_seconds": 60}), 201)  # one over: allowed
        started = time.process_time()
        resps = await asyncio.gather(*[
            client.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                        json={"grace_seconds": 60}) for _ in range(30)])
        spent = time.process_time() - started
        assert [r.status for r in resps] == [409] * 30
        assert spent < 8 * one_hash, (spent, one_hash)
        active = await ok(await client.get("/admin/v1/workspaces/acme/keys?status=active"))
        assert len(active["items"]) == 4
    finally:
        await store.close()


def _cpu_of(work) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


async def test_list_keys_filters_by_status(admin):
    await workspace(admin)
    a = (await new_key(admin, name="a"))["key"]["id"]
    admin.clock.now = T0 + 1
    b = (await new_key(admin, name="b", expires_in=10))["key"]["id"]
    admin.clock.now = T0 + 2
    c = (await new_key(admin, name="c"))["key"]["id"]
    await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{c}/revoke"))
    admin.clock.now = T0 + 12

    async def ids(query: str) -> list[str]:
        body = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys{query}"))
        return [k["id"] for k in body["items"]]

    assert await ids("") == [a, b, c]
    assert await ids("?status=active") == [a]
    assert await ids("?status=expired") == [b]
    assert await ids("?status=revoked") == [c]
    await error(await admin.get("/admin/v1/workspaces/acme/keys?status=gone"), 400,
                "bad_request", "status")
    await error(await admin.get("/admin/v1/workspaces/ghost/keys"), 404, "not_found")


async def test_read_key_errors(admin):
    await workspace(admin)
    await workspace(admin, "beta")
    other = (await new_key(admin, "beta"))["key"]["id"]
    await error(await admin.get(f"/admin/v1/workspaces/acme/keys/{other}"), 404, "not_found")
    await error(await admin.get("/admin/v1/workspaces/acme/keys/not-an-id"), 404, "not_found")
    await error(await admin.get(f"/admin/v1/workspaces/ghost/keys/{other}"), 404, "not_found")


async def test_patch_key_updates_fields_and_rev(admin):
    await workspace(admin)
    key = (await new_key(admin, scopes=["a:read"]))["key"]
    url = f"/admin/v1/workspaces/acme/keys/{key['id']}"
    rev0 = (await admin.store.get_key("acme", key["id"])).rev
    body = await ok(await admin.patch(url, json={"name": "renamed", "description": "d",
                                                 "role": "reader",
                                                 "expires_at": "2026-02-01T00:00:00Z"}))
    assert (body["name"], body["description"], body["role"], body["scopes"]) == \
        ("renamed", "d", "reader", ["people:read"])
    assert body["expires_at"] == "2026-02-01T00:00:00Z"
    assert (await admin.store.get_key("acme", key["id"])).rev > rev0
    body = await ok(await admin.patch(url, json={"scopes": ["b:write"], "expires_at": None}))
    assert body["role"] is None and body["scopes"] == ["b:write"] and body["expires_at"] is None


@pytest.mark.parametrize("fields, mention", [
    ({"role": "reader", "scopes": ["a"]}, "role"),
    ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_in": 60}, "expires_in"),
    ({"environment": "test"}, "environment"),
    ({"rate_limit": "5/x"}, "rate_limit"),
    ({"name": "x" * 201}, "name"),
    ({"name": None}, "name"),
    ({"role": "nobody"}, "role"),
    ({"scopes": ["bad scope"]}, "scopes"),
    ({}, "Nothing"),
])
async def test_patch_key_rejects_bad_fields(admin, fields, mention):
    await workspace(admin)
    key = (await new_key(admin))["key"]
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}", json=fields),
                400, "bad_request", mention)


async def test_patch_unknown_key_is_404(admin):
    await workspace(admin)
    await error(await admin.patch("/admin/v1/workspaces/acme/keys/AAAAAAAAAAAA",
                                  json={"name": "x"}), 404, "not_found")


async def test_revoke_is_permanent_and_idempotent(admin):
    await workspace(admin)
    key = (await new_key(admin))["key"]
    url = f"/admin/v1/workspaces/acme/keys/{key['id']}/revoke"
    first = await ok(await admin.post(url))
    assert first["status"] == "revoked" and first["revoked_at"] == "2026-01-01T00:00:00Z"
    admin.clock.now = T0 + 5
    again = await ok(await admin.post(url))
    assert again["revoked_at"] == first["revoked_at"]
    await error(await admin.post("/admin/v1/workspaces/acme/keys/AAAAAAAAAAAA/revoke"), 404,
                "not_found")
    refused = await error(await admin.post(url, json={"force": True}), 400, "bad_request",
                          "force")
    # the message says the endpoint takes no fields (it read "this endpoint accepts: .")
    assert refused["error"]["message"] == "Unknown field 'force'; this endpoint takes no fields."


async def test_a_delete_with_unknown_fields_is_refused_and_changes_nothing(admin):
    """Unknown JSON fields are a 400 on every endpoint (docs/api.md); a DELETE took any body
    unread and deleted: a script's {"dry_run": true} removed the key or the role."""
    await workspace(admin)
    key = (await new_key(admin, role="reader"))["key"]
    await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/revoke"))
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops", json={"scopes": ["a:b"]}))
    for url in (f"/admin/v1/workspaces/acme/keys/{key['id']}",
                "/admin/v1/workspaces/acme/roles/ops"):
        await error(await admin.delete(url, json={"dry_run": True}), 400, "bad_request",
                    "dry_run")
    await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))  # still there
    roles = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert "ops" in [r["name"] for r in roles["items"]]
    await ok(await admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}"))  # no body: fine
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/ops", json={}))


async def test_rotate_copies_settings_and_revokes_the_old_key_by_default(admin):
    await workspace(admin)
    old = (await new_key(admin, name="svc", role="reader", rate_limit="7/m"))["key"]
    body = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate"), 201)
    new = body["key"]
    assert new["id"] != old["id"] and body["token"].startswith("kg_live_" + new["id"])
    assert (new["name"], new["role"], new["scopes"], new["rate_limit"]) == \
        ("svc", "reader", ["people:read"], "7/m")
    old_now = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{old['id']}"))
    assert old_now["status"] == "revoked"
    await error(await admin.post(f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate"), 409,
                "conflict", "revoked")


async def test_rotate_with_grace_expires_the_old_key_later(admin):
    await workspace(admin)
    old = (await new_key(admin))["key"]
    body = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate",
                                     json={"grace_seconds": 3600}), 201)
    assert set(body) == {"key", "token"}  # SPEC: 201 {"key", "token"}
    previous = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{old['id']}"))
    assert previous["expires_at"] == "2026-01-01T01:00:00Z"
    assert previous["status"] == "active"


async def test_rotating_again_in_a_grace_gives_the_new_key_the_old_keys_own_lifetime(admin):
    """A grace sets the old key's ``expires_at`` to the grace's end; rotated again while it runs
    (a retry, or grace 0 to end it now), the new key has the key's own lifetime (none, or the
    one it was made with), never created_at -> grace end."""
    await workspace(admin)
    forever = (await new_key(admin, name="billing"))["key"]
    month = (await new_key(admin, name="ci", expires_in=30 * 86400))["key"]
    admin.clock.now += 10 * 86400
    for key, lifetime in ((forever, None), (month, 30 * 86400)):
        path = f"/admin/v1/workspaces/acme/keys/{key['id']}"
        first = await ok(await admin.post(path + "/rotate", json={"grace_seconds": 3600}), 201)
        assert (await ok(await admin.get(path)))["expires_at"] == rfc3339(admin.clock.now + 3600)
        again = await ok(await admin.post(path + "/rotate", json={"grace_seconds": 60}), 201)
        ended = await ok(await admin.post(path + "/rotate", json={}), 201)
        wanted = None if lifetime is None else rfc3339(admin.clock.now + lifetime)
        assert [b["key"]["expires_at"] for b in (first, again, ended)] == [wanted] * 3
        # the new key's own rotation, with and without a grace, goes on with that lifetime
        newest = f"/admin/v1/workspaces/acme/keys/{ended['key']['id']}"
        assert (await ok(await admin.post(newest + "/rotate", json={"grace_seconds": 60}),
                         201))["key"]["expires_at"] == wanted


async def test_two_rotations_with_a_grace_at_once_both_keep_the_old_keys_lifetime(admin):
    """The second of two concurrent rotations finds the key changed by the first (its expiry
    now the grace's end) and copies it again: its new key still has the key's own lifetime."""
    await workspace(admin)
    forever = (await new_key(admin, name="billing"))["key"]
    month = (await new_key(admin, name="ci", expires_in=30 * 86400))["key"]
    admin.clock.now += 10 * 86400
    for key, lifetime in ((forever, None), (month, 30 * 86400)):
        answers = await asyncio.gather(*[
            admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                       json={"grace_seconds": 3600}) for _ in range(2)])
        wanted = None if lifetime is None else rfc3339(admin.clock.now + lifetime)
        assert [(await ok(r, 201))["key"]["expires_at"] for r in answers] == [wanted] * 2


async def test_a_key_re_dated_in_its_grace_is_rotated_with_its_new_expiry(admin):
    """A PATCH of ``expires_at`` on a key in its grace makes that its own expiry: a rotation
    then copies the lifetime created_at -> that expiry."""
    await workspace(admin)
    key = (await new_key(admin, name="billing"))["key"]
    path = f"/admin/v1/workspaces/acme/keys/{key['id']}"
    admin.clock.now += 86400
    await ok(await admin.post(path + "/rotate", json={"grace_seconds": 3600}), 201)
    await ok(await admin.patch(path, json={"expires_at": rfc3339(admin.clock.now + 7200)}))
    body = await ok(await admin.post(path + "/rotate", json={}), 201)
    assert body["key"]["expires_at"] == rfc3339(admin.clock.now + 86400 + 7200)


@pytest.mark.parametrize("grace", [-1, "60", 1.5, None])
async def test_rotate_rejects_bad_grace(admin, grace):
    await workspace(admin)
    old = (await new_key(admin))["key"]
    await error(await admin.post(f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate",
                                 json={"grace_seconds": grace}), 400, "bad_request",
                "grace_seconds")


async def test_a_whole_number_written_with_a_fraction_is_taken_as_the_document_says(admin):
    """The OpenAPI document (JSON Schema 2020-12) types these fields ``integer``, which 60.0
    is; the API refused it ("must be an integer number of seconds"), so a client that wrote
    ``hours * 3600.0`` was refused a request the document says is valid. 1.5 stays a 400."""
    await workspace(admin)
    key = (await new_key(admin, expires_in=3600.0, monthly_requests=10.0))["key"]
    assert key["expires_at"] == "2026-01-01T01:00:00Z" and key["monthly_requests"] == 10
    body = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                                     json={"grace_seconds": 60.0}), 201)
    previous = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert previous["expires_at"] == "2026-01-01T00:01:00Z"
    assert body["key"]["monthly_requests"] == 10
    patched = await ok(await admin.patch("/admin/v1/workspaces/acme",
                                         json={"limits": {"max_keys": 4.0}}))
    assert patched["limits"]["max_keys"] == 4 and type(patched["limits"]["max_keys"]) is int
    for path, fields in ((f"/keys/{key['id']}/rotate", {"grace_seconds": 60.5}),
                         ("/keys", {"name": "k", "expires_in": 1e300}),
                         ("/keys", {"name": "k", "monthly_requests": -0.5})):
        await error(await admin.post("/admin/v1/workspaces/acme" + path, json=fields), 400,
                    "bad_request", next(iter(fields.keys() - {"name"})))


async def test_rotate_unknown_key_is_404(admin):
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces/acme/keys/AAAAAAAAAAAA/rotate"), 404,
                "not_found")


async def test_no_token_or_secret_is_stored_anywhere(admin, redis_url):
    await workspace(admin)
    tokens = [(await new_key(admin, name=f"k{i}"))["token"] for i in range(3)]
    kid = parse_token(tokens[0], "kg", ("live",)).key_id
    body = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{kid}/rotate",
                                     json={"grace_seconds": 60}), 201)
    tokens.append(body["token"])
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    values: list[str] = []
    hashes = []
    for name in raw.scan_iter("*"):  # every key and every value, read by type (no RDB dump:
        values.append(name)          # it may compress strings and hide a match)
        kind = raw.type(name)
        if kind == "hash":
            values += [x for kv in raw.hgetall(name).items() for x in kv]
            if name.startswith("kg:key:"):
                hashes.append(raw.hget(name, "hash"))
        elif kind == "string":
            values.append(raw.get(name))
        elif kind == "set":
            values += raw.smembers(name)
        elif kind == "zset":
            values += raw.zrange(name, 0, -1)
        elif kind == "stream":
            values += [v for _id, fields in raw.xrange(name) for v in fields.values()]
        else:
            raise AssertionError(f"unexpected Redis type {kind} at {name}")
    raw.close()
    blob = "\n".join(values)
    for token in tokens:
        secret = parse_token(token, "kg", ("live",)).secret
        assert token not in blob and secret not in blob
    assert len(hashes) == 4 and all(h.startswith("$argon2id$") for h in hashes)


# --- usage, roles, audit -----------------------------------------------------------------------

async def test_usage_object(admin, redis_url):
    await workspace(admin, plan="small")
    raw = redis.Redis.from_url(redis_url)
    raw.set("kg:usage:{acme}:2026-01", 40)
    raw.close()
    assert await ok(await admin.get("/admin/v1/workspaces/acme/usage")) == {
        "workspace": "acme", "plan": "small", "period": "2026-01", "used": 40, "limit": 1000,
        "remaining": 960, "resets_at": "2026-02-01T00:00:00Z",
        "limits": {"monthly_requests": 1000, "max_keys": 3, "rate_limit": "10/s"}}
    await error(await admin.get("/admin/v1/workspaces/ghost/usage"), 404, "not_found")


async def test_roles_list_put_delete(admin):
    await workspace(admin)
    key = (await new_key(admin, role="reader"))["key"]
    body = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert {"name": "reader", "scopes": ["people:read"], "source": "config"} in body["items"]
    rev0 = (await admin.store.get_workspace("acme")).rev
    put = await ok(await admin.put("/admin/v1/workspaces/acme/roles/reader",
                                   json={"scopes": ["people:read", "notes:read"]}))
    assert put == {"name": "reader", "scopes": ["people:read", "notes:read"],
                   "source": "workspace"}
    assert (await admin.store.get_workspace("acme")).rev > rev0
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read["scopes"] == ["people:read", "notes:read"]  # bound keys follow at once
    body = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert [r for r in body["items"] if r["name"] == "reader"] == [put]
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/reader"))
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read["scopes"] == ["people:read"]
    await error(await admin.delete("/admin/v1/workspaces/acme/roles/reader"), 404, "not_found")


async def test_role_errors(admin):
    await error(await admin.put("/admin/v1/workspaces/ghost/roles/r", json={"scopes": []}),
                404, "not_found")
    await error(await admin.get("/admin/v1/workspaces/ghost/roles"), 404, "not_found")
    await workspace(admin)
    await error(await admin.put("/admin/v1/workspaces/acme/roles/r", json={}), 400,
                "bad_request", "scopes")
    await error(await admin.put("/admin/v1/workspaces/acme/roles/r",
                                json={"scopes": ["no spaces"]}), 400, "bad_request", "scopes")
    await error(await admin.put("/admin/v1/workspaces/acme/roles/r",
                                json={"scopes": [], "x": 1}), 400, "bad_request", "'x'")
    await error(await admin.put("/admin/v1/workspaces/acme/roles/bad%20name",
                                json={"scopes": []}), 400, "bad_request", "name")
    await error(await admin.delete("/admin/v1/workspaces/acme/roles/none"), 404, "not_found")


@pytest.mark.parametrize("name", ["Reader", "read_only", "read.only", "-r", "a" * 64])
async def test_role_names_are_slugs(admin, name):
    """SPEC: role names are slugs (lowercase letters, digits and '-', as a workspace id). The
    API took upper case, '_' and '.', names a client following SPEC never expects back."""
    await workspace(admin)
    await error(await admin.put(f"/admin/v1/workspaces/acme/roles/{name}",
                                json={"scopes": ["people:read"]}), 400, "bad_request", "name")
    await error(await admin.post("/admin/v1/workspaces/acme/keys",
                                 json={"name": "k", "role": name}), 400, "bad_request", "role")
    put = await ok(await admin.put("/admin/v1/workspaces/acme/roles/read-only-2",
                                   json={"scopes": ["people:read"]}))
    assert put["name"] == "read-only-2"
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/" + "a" * 63, json={"scopes": []}))


async def test_a_role_stored_before_names_were_slugs_can_still_be_deleted(admin):
    """A workspace role an earlier version stored under a name that is not a slug is listed,
    and can be deleted (only new names are held to the rule)."""
    await workspace(admin)
    await admin.store.put_role("acme", "Old_Role", ["people:read"])
    body = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert {"name": "Old_Role", "scopes": ["people:read"], "source": "workspace"} in body["items"]
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/Old_Role"))
    body = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert "Old_Role" not in [r["name"] for r in body["items"]]


async def test_deleting_a_role_keys_still_use_is_a_conflict(admin):
    """A workspace role with no configured role of its name behind it, deleted while keys are
    bound to it, left those keys with no scopes (403 everywhere, and nothing said). The delete
    is now a 409 that counts the keys still using it (a disabled key counts: enabling it brings
    it back) and says to re-role them; revoked and expired keys do not hold it up."""
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    active = (await new_key(admin, name="a", role="ops"))["key"]
    disabled = (await new_key(admin, name="d", role="ops"))["key"]
    await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{disabled['id']}",
                               json={"enabled": False}))
    revoked = (await new_key(admin, name="r", role="ops"))["key"]
    await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{revoked['id']}/revoke"))
    await new_key(admin, name="e", role="ops", expires_in=60)
    admin.clock.now += 120  # the last one has expired
    refused = await error(await admin.delete("/admin/v1/workspaces/acme/roles/ops"), 409,
                          "conflict", "2 keys")
    assert "re-role" in refused["error"]["message"]
    roles = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert {"name": "ops", "scopes": ["ops:run"], "source": "workspace"} in roles["items"]
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{active['id']}"))
    assert read["scopes"] == ["ops:run"]
    audit = await ok(await admin.get("/admin/v1/workspaces/acme/audit"))
    assert "role.delete" not in [e["action"] for e in audit["items"]]
    # re-role one, revoke the other: then the role goes
    await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{active['id']}",
                               json={"role": "reader"}))
    await error(await admin.delete("/admin/v1/workspaces/acme/roles/ops"), 409, "conflict",
                "1 key ")
    await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{disabled['id']}/revoke"))
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/ops"))
    roles = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert "ops" not in [r["name"] for r in roles["items"]]


async def test_a_role_that_shadows_a_configured_one_can_be_deleted_while_in_use(admin):
    """Keys of a deleted workspace role that shadows a configured role fall back to the
    configured one (SPEC: same name shadows global), so they keep scopes: no conflict."""
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/reader",
                             json={"scopes": ["people:read", "notes:read"]}))
    key = (await new_key(admin, role="reader"))["key"]
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/reader"))
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read["scopes"] == ["people:read"]


@pytest.mark.parametrize("binding", ["create", "patch", "re-date", "rotate", "take-back"])
async def test_a_key_bound_to_a_role_while_its_delete_counts_holds_the_delete_up(
        admin, monkeypatch, binding):
    """A role delete counts the keys bound to the role in steps before its own script (a count
    in the script held Redis for as long as the workspace is big): a key made live bound to
    the role between the count and the delete (created, re-bound, re-dated, rotated, or given
    back by the take-back of a rotation answered 503) makes the script refuse and the count
    run again, which finds it: 409, and the role stays."""
    from gateway.models import rfc3339
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    other = (await new_key(admin, name="other", scopes=["a:b"]))["key"]
    expired = (await new_key(admin, name="expired", role="ops", expires_in=60))["key"]
    admin.clock.now += 120
    store, count = admin.store, admin.store._role_users
    keys = "/admin/v1/workspaces/acme/keys"

    async def counted_then_bound(ws, name):
        found = await count(ws, name)
        monkeypatch.setattr(store, "_role_users", count)
        if binding == "create":  # another admin, meanwhile
            await ok(await admin.post(keys, json={"name": "new", "role": "ops"}), 201)
        elif binding == "patch":
            await ok(await admin.patch(f"{keys}/{other['id']}", json={"role": "ops"}))
        elif binding == "re-date":
            later = rfc3339(admin.clock.now + 3600)
            await ok(await admin.patch(f"{keys}/{expired['id']}", json={"expires_at": later}))
        else:
            await ok(await admin.patch(f"{keys}/{expired['id']}", json={"role": "reader"}))
            await ok(await admin.patch(f"{keys}/{other['id']}", json={"role": "ops"}))
            found = await count(ws, name)  # 1: the count has already been made again
            await ok(await admin.post(f"{keys}/{other['id']}/rotate"), 201)
            return found - 1  # as if the count had run before the re-bind
        return found

    if binding == "take-back":  # a rotation answered 503, whose take-back gives the old key back
        await ok(await admin.patch(f"{keys}/{expired['id']}", json={"role": "reader"}))
        await ok(await admin.patch(f"{keys}/{other['id']}", json={"role": "ops"}))
        old = await store.get_key("acme", other["id"])
        rotated = (await ok(await admin.post(f"{keys}/{other['id']}/rotate"), 201))["key"]

    async def taken_back(ws, name):
        found = await count(ws, name)  # 1: the rotation's new key
        monkeypatch.setattr(store, "_role_users", count)
        await store._taking_back_until_done(ws, rotated["id"], old, "operator", "test")
        return found - 1  # as if the count read the old key before, the new one after

    monkeypatch.setattr(store, "_role_users",
                        taken_back if binding == "take-back" else counted_then_bound)
    await error(await admin.delete("/admin/v1/workspaces/acme/roles/ops"), 409, "conflict",
                "still used by 1 key ")
    roles = await ok(await admin.get("/admin/v1/workspaces/acme/roles"))
    assert "ops" in [r["name"] for r in roles["items"]]


async def test_a_role_deleted_while_a_key_is_being_bound_to_it_is_not_bound(admin,
                                                                           monkeypatch):
    """The create and the PATCH check the role exists before their script runs; a delete
    landing in between left a key bound to nothing (and the delete's own check had not seen
    it). The scripts now check again in the same step as the write."""
    await workspace(admin)
    store = admin.store
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    key = (await new_key(admin, name="k", scopes=["a:b"]))["key"]

    new_token, update_key = store._new_token, store.update_key

    async def delete_first_then_mint(*args, **kwargs):
        await store.delete_role("acme", "ops")
        return await new_token(*args, **kwargs)

    monkeypatch.setattr(store, "_new_token", delete_first_then_mint)
    await error(await admin.post("/admin/v1/workspaces/acme/keys",
                                 json={"name": "k2", "role": "ops"}), 400, "bad_request", "ops")
    monkeypatch.setattr(store, "_new_token", new_token)
    listed = await ok(await admin.get("/admin/v1/workspaces/acme/keys"))
    assert [k["name"] for k in listed["items"]] == ["k"]

    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))

    async def delete_first_then_update(*args, **kwargs):
        await store.delete_role("acme", "ops")
        return await update_key(*args, **kwargs)

    monkeypatch.setattr(store, "update_key", delete_first_then_update)
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                  json={"role": "ops"}), 400, "bad_request", "ops")
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read["role"] is None and read["scopes"] == ["a:b"]


async def test_an_expired_key_of_a_deleted_role_is_not_made_active_again_with_no_scopes(admin):
    """An expired key does not hold up a role delete, but a new expiry makes it active again
    (as enabling a disabled key does, and disabled keys do hold it up): the PATCH answered 200
    and the key came back bound to a role nothing defines, with no scopes (403 on every
    route). Re-dating it alone is now a 409 naming the role; re-dating it with a new role or
    scopes in the same change goes through."""
    from gateway.models import rfc3339
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    key = (await new_key(admin, name="e", role="ops", expires_in=60))["key"]
    bound = (await new_key(admin, name="c", role="reader", expires_in=60))["key"]
    admin.clock.now += 120  # both have expired: the role delete is not held up
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/ops"))
    later = rfc3339(admin.clock.now + 3600)
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                  json={"expires_at": later}), 409, "conflict", "'ops'")
    read = await ok(await admin.get(f"/admin/v1/workspaces/acme/keys/{key['id']}"))
    assert read["status"] == "expired" and read["role"] == "ops"
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                  json={"expires_at": None}), 409, "conflict", "'ops'")
    # a configured role still stands behind the other one: it comes back with its scopes
    read = await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{bound['id']}",
                                      json={"expires_at": later}))
    assert read["status"] == "active" and read["scopes"] == ["people:read"]
    # re-roled in the same change, it comes back with scopes
    read = await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                      json={"expires_at": later, "role": "reader"}))
    assert read["status"] == "active" and read["scopes"] == ["people:read"]


async def test_rotating_a_key_whose_role_is_gone_is_a_conflict_not_a_key_with_no_scopes(admin):
    """Rotating an expired key whose workspace role was deleted since (an expired key does not
    hold a role delete up) answered 201 with a new, active token bound to a role nothing
    defines: a key with no scopes, 403 on every route, with nothing said. It is a 409 naming
    the role, and nothing is made or revoked; re-roled first, it rotates."""
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    key = (await new_key(admin, name="e", role="ops", expires_in=60))["key"]
    admin.clock.now += 120
    await ok(await admin.delete("/admin/v1/workspaces/acme/roles/ops"))
    before = await ok(await admin.get("/admin/v1/workspaces/acme/keys"))
    await error(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate"),
                409, "conflict", "'ops'")
    assert await ok(await admin.get("/admin/v1/workspaces/acme/keys")) == before
    await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                               json={"role": "reader"}))
    rotated = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate"),
                       201)
    assert rotated["key"]["scopes"] == ["people:read"] and rotated["key"]["status"] == "active"



async def test_a_role_deleted_while_its_expired_key_is_rotated_is_a_conflict(admin):
    """The role is checked in the rotation's own step, as a create checks it: the 409 above
    was decided on a read before the rotation, and a DELETE in between (an expired key does
    not hold it up) still made an active token bound to a role nothing defines."""
    await workspace(admin)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/ops",
                             json={"scopes": ["ops:run"]}))
    key = (await new_key(admin, name="e", role="ops", expires_in=60))["key"]
    admin.clock.now += 120
    store, resolve = admin.store, admin.store.resolve_role

    async def resolve_then_deleted(ws, role):
        scopes = await resolve(ws, role)
        store.resolve_role = resolve
        await store.delete_role(ws, role)  # another admin, meanwhile
        return scopes
    store.resolve_role = resolve_then_deleted
    before = await ok(await admin.get("/admin/v1/workspaces/acme/keys"))
    await error(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate"),
                409, "conflict", "'ops'")
    after = await ok(await admin.get("/admin/v1/workspaces/acme/keys"))
    assert [k["id"] for k in after["items"]] == [k["id"] for k in before["items"]]


async def test_audit_lists_changes_newest_first_without_secrets(admin):
    await workspace(admin)
    created = await new_key(admin, name="k")
    kid = created["key"]["id"]
    await ok(await admin.patch(f"/admin/v1/workspaces/acme/keys/{kid}", json={"name": "k2"}))
    await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{kid}/rotate"), 201)
    await ok(await admin.put("/admin/v1/workspaces/acme/roles/r", json={"scopes": ["a"]}))
    await ok(await admin.patch("/admin/v1/workspaces/acme", json={"plan": "small"}))
    resp = await admin.get("/admin/v1/workspaces/acme/audit")
    body = await ok(resp)
    assert [e["action"] for e in body["items"]] == [
        "workspace.update", "role.put", "key.rotate", "key.update", "key.create",
        "workspace.create"]
    for event in body["items"]:
        assert set(event) == {"at", "actor", "action", "target", "details"}
        assert event["actor"] == "operator"
    assert body["items"][2]["target"] == kid
    text = await resp.text()
    assert created["token"] not in text and "argon2" not in text
    limited = await ok(await admin.get("/admin/v1/workspaces/acme/audit?limit=2"))
    assert len(limited["items"]) == 2


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1"])
async def test_audit_rejects_bad_limit(admin, limit):
    await workspace(admin)
    await error(await admin.get(f"/admin/v1/workspaces/acme/audit?limit={limit}"), 400,
                "bad_request", "limit")


async def test_audit_of_unknown_workspace_is_404(admin):
    await error(await admin.get("/admin/v1/workspaces/ghost/audit"), 404, "not_found")


# --- hostile input: never a 500, never a way around a rule ---------------------------------------

@pytest.mark.parametrize("path,field", [
    ("/admin/v1/workspaces", "name"),
    ("/admin/v1/workspaces/acme/keys", "name"),
    ("/admin/v1/workspaces/acme/keys", "description"),
])
async def test_lone_surrogates_and_c1_controls_in_strings_are_400_not_500(admin, path, field):
    """JSON may carry "\\ud800" (a lone surrogate): it cannot be stored as UTF-8, which used to
    escape as a 500 from the Redis client. C1 controls (U+009B is a terminal CSI) in one-line
    names would reach the operator's terminal through `keygate keys list`."""
    await workspace(admin)
    raw = '{"name": "ok", "%s": "bad\\ud800"}' % field if field != "name" else \
        '{"name": "bad\\ud800"}'
    await error(await admin.post(path, data=raw), 400, "bad_request", field)
    if field == "name":
        await error(await admin.post(path, json={"name": "x\u009b31m"}), 400, "bad_request",
                    field)
    assert (await admin.get("/admin/v1/workspaces")).status == 200


@pytest.mark.parametrize("name", ["\u200b", "\ufeff", "\u2060", "\u00ad", "\u3164",
                                  "\u2800", "\u034f", "\u180e", "\ufe0f", " \u200b\u200c\u200d "])
async def test_a_name_of_invisible_characters_alone_is_empty(admin, name):
    """A name of a zero-width space, a word joiner, a soft hyphen, a Hangul filler or a
    Braille blank passed "must not be empty" (``str.strip()`` keeps them) and was listed as
    nothing: a blank row in the console and `keygate keys list`, a key nobody can name."""
    await workspace(admin)
    await error(await admin.post("/admin/v1/workspaces/acme/keys", json={"name": name}), 400,
                "bad_request", "'name' must not be empty")
    await error(await admin.post("/admin/v1/workspaces", json={"id": "beta", "name": name}),
                400, "bad_request", "'name' must not be empty")
    assert await admin.store.list_keys("acme") == []


@pytest.mark.parametrize("name", ["\U000e0041\U000e0042\U000e0043", "\U000e0001\U000e007f",
                                  "\U000e0000", "\U000e0080", "\U000e0100\U000e01ef", "\U000e0fff",
                                  "\U0001bca0\U0001bca3", "\U0001d173\U0001d17a",
                                  " \u200b\U000e0020\u2060 "])
async def test_a_name_of_invisible_characters_beyond_the_bmp_alone_is_empty(admin, name):
    """A name made only of Unicode tag characters (U+E0000 block: "ASCII smuggling"),
    supplementary variation selectors, shorthand or musical format controls (every default-
    ignorable code point beyond the BMP) was stored: the check for "shows as nothing" stopped
    at U+FFFF. The console showed a row with an empty name ("Revoke key ?"), `keygate keys
    list` a blank. Each name field that must not be empty refuses it, on create and on edit."""
    await workspace(admin)
    key = (await new_key(admin, name="visible"))["key"]
    empty = "'name' must not be empty"
    await error(await admin.post("/admin/v1/workspaces/acme/keys", json={"name": name}), 400,
                "bad_request", empty)
    await error(await admin.patch(f"/admin/v1/workspaces/acme/keys/{key['id']}",
                                  json={"name": name}), 400, "bad_request", empty)
    await error(await admin.post("/admin/v1/workspaces", json={"id": "beta", "name": name}),
                400, "bad_request", empty)
    await error(await admin.patch("/admin/v1/workspaces/acme", json={"name": name}), 400,
                "bad_request", empty)
    assert [k.name for k in await admin.store.list_keys("acme")] == ["visible"]
    assert (await ok(await admin.get("/admin/v1/workspaces/acme")))["name"] == "ACME"


@pytest.mark.parametrize("name", ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
                                  "\U0001f468\u200d\U0001f469\u200d\U0001f467", "deploy\u00adbot",
                                  # England's flag: tag characters after a black flag
                                  "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e"
                                  "\U000e0067\U000e007f"])
async def test_invisible_characters_within_a_visible_name_are_kept(admin, name):
    """The joiners a Persian word or an emoji family needs, a soft hyphen inside a word."""
    await workspace(admin)
    assert (await new_key(admin, name=name))["key"]["name"] == name


PASTED, _ = make_token("kg", "live")


@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/admin/v1/workspaces", {"id": "beta", "name": PASTED}, "name"),
    ("PATCH", "/admin/v1/workspaces/acme", {"name": f"Acme ({PASTED})"}, "name"),
    ("POST", "/admin/v1/workspaces/acme/keys", {"name": PASTED}, "name"),
    ("POST", "/admin/v1/workspaces/acme/keys",
     {"name": "ci", "description": f"token for CI: {PASTED}"}, "description"),
    ("POST", "/admin/v1/workspaces/acme/keys", {"name": "ci", "scopes": [PASTED]}, "scopes"),
    ("POST", "/admin/v1/workspaces/acme/keys",
     {"name": "ci", "meta": {"notes": [f"Bearer {PASTED}"]}}, "meta"),
    ("POST", "/admin/v1/workspaces/acme/keys", {"name": "ci", "meta": {PASTED: 1}}, "meta"),
    ("POST", "/admin/v1/workspaces/acme/keys", {"name": PASTED[:-1] + "x"}, "name"),
    ("PATCH", "/admin/v1/workspaces/acme/keys/{key}", {"description": PASTED}, "description"),
    ("PATCH", "/admin/v1/workspaces/acme/keys/{key}", {"scopes": [PASTED]}, "scopes"),
    ("PUT", "/admin/v1/workspaces/acme/roles/ops", {"scopes": ["a:b", PASTED]}, "scopes"),
    ("POST", "/admin/v1/workspaces/acme/keys",  # glued to a label: still the whole secret
     {"name": "ci", "meta": {"env": f"CI_KEY_{PASTED}", "url": f"https://x/?k={PASTED}"}},
     "meta"),
    ("POST", "/admin/v1/workspaces/acme/keys",
     {"name": "ci", "description": make_token("kg", "test")[0][:-6]}, "description"),
])
async def test_a_token_pasted_into_a_stored_field_is_400_and_never_stored(admin, method, path,
                                                                          body, field):
    """A key's token pasted into a name, a description, a scope or meta (the console's Copy
    button, then the next form) was stored in the clear: shown in every listing to every
    ``keys:admin`` key of the workspace and by `keygate keys list`, kept in the audit after the
    key is deleted, and, as a scope, forwarded upstream in ``X-Api-Scopes`` on every request.
    Its checksum mistyped, it still holds the secret. Refused, naming the field, echoing it
    nowhere; nothing written."""
    await workspace(admin)
    key = (await new_key(admin, description="kept"))["key"]
    before = await admin.store.audit("acme", 1000)
    resp = await admin.request(method, path.format(key=key["id"]), json=body)
    answer = await error(resp, 400, "bad_request", f"'{field}'")
    assert PASTED[8:-6] not in json.dumps(answer)
    assert [k["id"] for k in (await ok(await admin.get(
        "/admin/v1/workspaces/acme/keys")))["items"]] == [key["id"]]
    assert (await admin.store.require_key("acme", key["id"])).description == "kept"
    assert [w.id for w in await admin.store.list_workspaces()] == ["acme"]
    assert (await admin.store.get_workspace("acme")).name == "ACME"
    assert "ops" not in await admin.store.workspace_roles("acme")
    assert await admin.store.audit("acme", 1000) == before


@pytest.mark.parametrize("invisible", ["\u200b", "\u00ad", "\u2060", "\ufeff", "\u200b\u200d",
                                       "\U000e0041", "\U000e0100", "\U0001bca0", "\U0001d173"])
async def test_a_token_split_by_an_invisible_character_is_refused(admin, invisible):
    """Zero-width space, soft hyphen, word joiner, BOM: parse_text accepts them within a
    visible text, and the token check needed the token's characters contiguous, so a token
    pasted from rich text with one inside was stored and listed to every keys:admin key of
    the workspace, rendered exactly as the token (the secret whole). Looked for without
    them; nothing stored. The same for those beyond the BMP (a tag character, a
    supplementary variation selector, a shorthand or musical format control)."""
    await workspace(admin)
    pasted = PASTED[:28] + invisible + PASTED[28:]
    for body, field in (({"name": "ci", "description": pasted}, "description"),
                        ({"name": pasted}, "name"),
                        ({"name": "ci", "meta": {"note": "Bearer " + pasted}}, "meta")):
        resp = await admin.post("/admin/v1/workspaces/acme/keys", json=body)
        await error(resp, 400, "bad_request", f"'{field}'")
    assert (await ok(await admin.get("/admin/v1/workspaces/acme/keys")))["items"] == []


async def test_words_after_the_prefix_are_no_token_though_spaces_part_them(admin):
    """Only invisible characters are dropped before looking: prose after the prefix, its
    words parted by spaces (a visible gap no one reads as one token), is kept."""
    await workspace(admin)
    text = "see kg_live_ keys in the docs for more information about this integration"
    created = await new_key(admin, description=text, meta={"note": text.replace(" ", "\u00a0")})
    assert created["key"]["description"] == text


async def test_text_near_a_token_is_not_mistaken_for_one(admin):
    """A key's public prefix (``kg_live_<id>``), or a name in the token's style, is no token."""
    await workspace(admin)
    key = (await new_key(admin))["key"]
    await new_key(admin, name=f"replaces {key['prefix']}", description="kg_live_" + "a" * 40,
                  meta={"kg_test_x": "y"})


_DIGEST = hashlib.sha256(b"release-1.4.2.tar.gz").hexdigest()


@pytest.mark.parametrize("text", [
    f"pkg_sha256_{_DIGEST}",           # 'kg' inside 'pkg', 'sha256' taken as an environment
    f"weight_kg_total_{_DIGEST}",      # 'kg' after a '_', 'total' no environment either
    f"kg_sha256_{_DIGEST}",            # the prefix, but no environment keygate issues
    f"xkg_live_{_DIGEST}",             # an environment, but 'kg' inside a word
])
async def test_a_label_that_merely_contains_the_prefix_is_not_a_token(admin, text):
    """The token check had no boundary before the prefix and took any environment label:
    ``pkg_sha256_<hex digest>`` (``kg`` inside ``pkg``, ``sha256`` as the "environment", 64
    hex digits as id + secret) in a description or ``meta`` was refused as "holds an API key's
    token", though no configured environment is ``sha256`` and no key has that shape. Only
    the configured prefix at a word's start, one of the configured environments and a token
    body's worth of base62 are refused; the logs still mask the broader shape."""
    await workspace(admin)
    created = await new_key(admin, description=text, meta={"artifact": text, text: "name"})
    assert created["key"]["meta"] == {"artifact": text, text: "name"}
    assert created["key"]["description"] == text
    assert mask_query(f"v={text}", "kg") == "v=***"  # what a log masks stays broader


@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "9" * 5000, "+5", " 5"])
async def test_audit_limit_is_ascii_digits_only_never_500(admin, limit):
    """'²'.isdigit() is True but int('²') raises; 5000 digits exceed int()'s digit limit."""
    await workspace(admin)
    await error(await admin.get("/admin/v1/workspaces/acme/audit", params={"limit": limit}),
                400, "bad_request", "limit")


async def test_non_utf8_operator_header_is_401_not_500(admin):
    """aiohttp decodes header bytes with surrogateescape; encoding them strictly raised a 500."""
    host, port = admin.server.host, admin.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer \xff\xfe-not-the-token\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


@pytest.mark.parametrize("path", ["/admin/v1/workspaces/acme/keys?state=active",
                                  "/admin/v1/workspaces/acme/audit?limt=5",
                                  "/admin/v1/workspaces?x=1"])
async def test_unknown_query_parameters_are_400(admin, path):
    """`?state=active` (a typo of status) used to list every key, revoked ones included: a
    script acting on "the active keys" would act on all of them."""
    await workspace(admin)
    await error(await admin.get(path), 400, "bad_request")


async def test_head_takes_the_query_parameters_of_its_get(admin):
    """RFC 9110: HEAD is GET without the body. aiohttp serves HEAD for every GET route, but the
    table of query parameters was looked up by the request's own method, so a HEAD of
    ``/keys?status=active`` (a link checker, a cache probe) was 400 "Unknown query parameter
    'status'; it takes none" where GET answers 200."""
    await workspace(admin)
    for path in ("/admin/v1/workspaces/acme/keys?status=active&sort=name&limit=5",
                 "/admin/v1/workspaces/acme/usage/daily?days=7",
                 "/admin/v1/workspaces/acme/audit?limit=5"):
        assert (await admin.get(path)).status == 200
        head = await admin.head(path)
        assert head.status == 200, (path, head.status)
    assert (await admin.head("/admin/v1/workspaces/acme/keys?state=active")).status == 400


@pytest.mark.parametrize("query", ["status=active&status=revoked", "limit=1&limit=1000",
                                   "sort=name&sort=created"])
async def test_a_repeated_query_parameter_is_400_not_its_first_value(admin, query):
    """``?status=active&status=revoked`` answered the active keys alone, silently: a script
    meaning "active or revoked" acted on part of them, the very misreading that makes unknown
    parameters a 400. Each parameter takes one value."""
    await workspace(admin)
    body = await error(await admin.get(f"/admin/v1/workspaces/acme/keys?{query}"), 400,
                       "bad_request")
    assert query.split("=")[0] in body["error"]["message"]


async def test_the_same_rotation_sent_20_times_at_once_is_never_a_503(admin):
    """Each rotation copies the key as it read it; one that finds the key changed since (by
    another rotation) tries again. Every try hashed a new secret behind the others and gave up
    after 8: 9 of 20 concurrent rotations with a grace answered 503 store_unavailable from a
    healthy store. Without a grace exactly one rotates; with one each is a rotation of a key
    still active (as sent one after another), and the old key ends at the grace's end."""
    await workspace(admin)
    old = (await new_key(admin))["key"]
    path = f"/admin/v1/workspaces/acme/keys/{old['id']}"
    for grace in (60, 0):
        if grace == 0:
            old = (await new_key(admin, name="again"))["key"]
            path = f"/admin/v1/workspaces/acme/keys/{old['id']}"
        resps = await asyncio.gather(*[admin.post(path + "/rotate", json={"grace_seconds": grace})
                                       for _ in range(20)])
        statuses = sorted(r.status for r in resps)
        assert statuses == ([201] * 20 if grace else [201] + [409] * 19), statuses
        now = await ok(await admin.get(path))
        if grace:
            assert (now["status"], now["expires_at"]) == ("active", "2026-01-01T00:01:00Z")
        else:
            assert now["status"] == "revoked"
    audit = await ok(await admin.get("/admin/v1/workspaces/acme/audit?limit=1000"))
    assert [e["action"] for e in audit["items"]].count("key.rotate") == 21


async def test_role_changes_meanwhile_never_make_a_rotation_a_503(admin):
    """A role PUT bumps the workspace's rev (cached authorisations re-read it), and rotations
    and creates took any rev change for a change of the key cap: they read the workspace
    again, hashed again, and after 8 such tries answered 503 store_unavailable, though only
    the plan or the workspace's own limits set the cap."""
    await workspace(admin, plan="small")
    key = (await new_key(admin))["key"]
    done = asyncio.Event()

    async def churn() -> None:
        i = 0
        while not done.is_set():
            i += 1
            await ok(await admin.put(f"/admin/v1/workspaces/acme/roles/r{i % 3}",
                                     json={"scopes": ["people:read"]}))

    churners = [asyncio.create_task(churn()) for _ in range(2)]
    try:
        for _ in range(3):
            body = await ok(await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                                             json={"grace_seconds": 0}), 201)
            key = body["key"]
        body = await ok(await admin.post("/admin/v1/workspaces/acme/keys",
                                         json={"name": "more"}), 201)
    finally:
        done.set()
        await asyncio.gather(*churners)


async def test_rotating_with_grace_cannot_grow_a_workspace_past_its_cap(admin):
    """Rotating with a grace keeps the old key active: without a check, rotating the newest key
    again and again minted any number of active keys on a plan with max_keys=3."""
    await workspace(admin, plan="small")
    key = (await new_key(admin))["key"]
    await new_key(admin)
    await new_key(admin)
    resp = await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                            json={"grace_seconds": 86400})
    key = (await ok(resp, 201))["key"]   # one over the cap during a grace period is fine
    resp = await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate",
                            json={"grace_seconds": 86400})
    await error(resp, 409, "key_limit_reached")
    active = await ok(await admin.get("/admin/v1/workspaces/acme/keys?status=active"))
    assert len(active["items"]) == 4
    # without a grace the old key is revoked at once: always possible
    resp = await admin.post(f"/admin/v1/workspaces/acme/keys/{key['id']}/rotate")
    await ok(resp, 201)
    active = await ok(await admin.get("/admin/v1/workspaces/acme/keys?status=active"))
    assert len(active["items"]) == 4


async def test_a_later_expiry_for_a_key_in_its_grace_needs_room_under_the_cap(admin):
    """The old key of a rotation with a grace is active until the grace's end, one over the
    cap: a PATCH giving it no expiry, or a later one, would keep the workspace over its cap
    for good, so it is 409 ``key_limit_reached`` and nothing changes. An earlier expiry, or
    any change once the workspace has room, is fine."""
    await workspace(admin, plan="small")
    ids = [(await new_key(admin, name=f"k{i}"))["key"]["id"] for i in range(3)]
    path = f"/admin/v1/workspaces/acme/keys/{ids[0]}"
    await ok(await admin.post(path + "/rotate", json={"grace_seconds": 3600}), 201)
    grace_end = rfc3339(admin.clock.now + 3600)
    for later in (None, rfc3339(admin.clock.now + 7200)):
        await error(await admin.patch(path, json={"expires_at": later}), 409,
                    "key_limit_reached", "over")
        assert (await ok(await admin.get(path)))["expires_at"] == grace_end
    sooner = rfc3339(admin.clock.now + 60)
    assert (await ok(await admin.patch(path, json={"expires_at": sooner})))["expires_at"] == sooner
    admin.clock.now += 7200
    assert len(await active_keys(admin)) == 3
    # with room under the cap, a key in its grace may live on
    await workspace(admin, "beta", plan="small")
    one = (await new_key(admin, "beta", name="one"))["key"]["id"]
    beta = f"/admin/v1/workspaces/beta/keys/{one}"
    await ok(await admin.post(beta + "/rotate", json={"grace_seconds": 3600}), 201)
    assert (await ok(await admin.patch(beta, json={"expires_at": None})))["expires_at"] is None
    assert len(await active_keys(admin, "beta")) == 2


async def test_a_10_mb_body_is_413_and_the_api_keeps_working(admin):
    await workspace(admin)
    resp = await admin.post("/admin/v1/workspaces/acme/keys",
                            data=b'{"name": "' + b"a" * (10 * 1024 * 1024) + b'"}')
    await error(resp, 413, "body_too_large")
    await ok(await admin.get("/admin/v1/workspaces/acme"))


@pytest.mark.parametrize("name", ["..", "a%2Fb", "%2e%2e"])
async def test_path_traversal_ish_role_names_are_refused(admin, name):
    await workspace(admin)
    resp = await admin.delete(f"/admin/v1/workspaces/acme/roles/{name}")
    assert resp.status in (400, 404)
    resp = await admin.put(f"/admin/v1/workspaces/acme/roles/{name}", json={"scopes": []})
    assert resp.status in (400, 404)
    assert (await ok(await admin.get("/admin/v1/workspaces/acme/roles")))["items"][0]["source"] \
        == "config"
