"""SPEC.md conformance, black box: each test pins one statement of the contract, through the
real listeners (``gateway_under_test``: proxy + admin on loopback, real Redis, real upstream)
or the real CLI (``gateway.cli.main`` in a thread against a real admin listener).

Tests are named after the SPEC line they pin; where SPEC gives an exact shape (field set, error
body, status code), the assertion is exact.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import zlib
from datetime import datetime, timezone

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError
from harness import ADMIN_TOKEN, tampered

KEY_FIELDS = {"id", "workspace", "name", "description", "environment", "role", "scopes",
              "prefix", "created_at", "expires_at", "last_used_at", "revoked_at", "rate_limit",
              "status", "monthly_requests", "used_this_month", "enabled", "meta", "allowed_ips"}
USAGE_FIELDS = {"workspace", "plan", "period", "used", "limit", "remaining", "resets_at",
                "limits"}
AUDIT_FIELDS = {"at", "actor", "action", "target", "details"}
RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def spec_checksum(head: str) -> str:
    """SPEC's checksum, written from the SPEC text (not from gateway.tokens)."""
    n, out = zlib.crc32(head.encode("ascii")), ""
    while n:
        n, r = divmod(n, 62)
        out = ALPHABET[r] + out
    return out.rjust(6, "0")


def assert_error(status: int, body: dict, headers, want_status: int, code: str) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["error"]["request_id"] == headers["X-Request-Id"]


async def call(session, method: str, path: str, **kw) -> tuple[int, dict, dict]:
    async with session.request(method, path, **kw) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None), r.headers


# --- token format --------------------------------------------------------------------------------

async def test_token_format_id_checksum_and_prefix(gut):
    await gut.workspace()
    for env in ("live", "test"):
        token, key = await gut.key(environment=env)
        assert re.fullmatch(rf"kg_{env}_[0-9A-Za-z]{{50}}", token)
        body = token[len(f"kg_{env}_"):]
        assert key["id"] == body[:12]
        assert token[-6:] == spec_checksum(token[:-6])
        assert key["prefix"] == token[:20]
        assert key["environment"] == env


# --- admin listener: plumbing --------------------------------------------------------------------

async def test_health_ready_metrics_need_no_auth_and_carry_request_id(gut):
    for path in ("/healthz", "/readyz", "/metrics"):
        async with gut.admin.get(path, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 200, path
            assert r.headers["X-Request-Id"]


async def test_admin_api_without_or_with_a_wrong_token_is_401_unauthorized(gut):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"},
                    {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        status, body, h = await call(gut.admin, "GET", "/admin/v1/workspaces", headers=headers)
        assert_error(status, body, h, 401, "unauthorized")


async def test_admin_unknown_path_wrong_method_and_bad_json_use_the_error_body(gut):
    status, body, h = await call(gut.admin, "GET", "/admin/v1/nothing-here")
    assert_error(status, body, h, 404, "not_found")
    status, body, h = await call(gut.admin, "GET", "/nothing-here")
    assert_error(status, body, h, 404, "not_found")
    status, body, h = await call(gut.admin, "DELETE", "/admin/v1/workspaces")
    assert status == 405 and set(body) == {"error"}
    assert body["error"]["request_id"] == h["X-Request-Id"]
    status, body, h = await call(gut.admin, "POST", "/admin/v1/workspaces", data=b"{nope",
                                 headers={"Content-Type": "application/json"})
    assert_error(status, body, h, 400, "bad_request")


async def test_admin_echoes_a_sane_request_id(gut):
    async with gut.admin.get("/admin/v1/workspaces", headers={"X-Request-Id": "abc-123"}) as r:
        assert r.headers["X-Request-Id"] == "abc-123"


# --- workspaces ----------------------------------------------------------------------------------

async def test_workspace_create_201_conflict_409_list_read_patch(gut):
    status, ws, _ = await call(gut.admin, "POST", "/admin/v1/workspaces",
                               json={"id": "acme", "name": "Acme", "plan": "tiny"})
    assert status == 201 and ws["id"] == "acme" and ws["name"] == "Acme" and ws["plan"] == "tiny"
    status, body, h = await call(gut.admin, "POST", "/admin/v1/workspaces",
                                 json={"id": "acme", "name": "Other"})
    assert_error(status, body, h, 409, "conflict")
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces")
    assert status == 200 and set(body) == {"items"} and [w["id"] for w in body["items"]] == ["acme"]
    status, body, _ = await call(gut.admin, "PATCH", "/admin/v1/workspaces/acme",
                                 json={"plan": "starter"})
    assert status == 200 and body["plan"] == "starter" and body["id"] == "acme"
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme")
    assert status == 200 and body["plan"] == "starter"
    status, body, h = await call(gut.admin, "GET", "/admin/v1/workspaces/nope")
    assert_error(status, body, h, 404, "not_found")
    status, body, h = await call(gut.admin, "POST", "/admin/v1/workspaces",
                                 json={"name": "X", "colour": "red"})
    assert_error(status, body, h, 400, "bad_request")


# --- keys ----------------------------------------------------------------------------------------

async def test_key_object_has_exactly_the_spec_fields_and_utc_timestamps(gut):
    await gut.workspace()
    status, body, _ = await call(gut.admin, "POST", "/admin/v1/workspaces/acme/keys",
                                 json={"name": "ci", "scopes": ["people:read"],
                                       "expires_in": 3600, "description": "d",
                                       "rate_limit": "5/s"})
    assert status == 201 and set(body) == {"key", "token"}
    key = body["key"]
    assert set(key) == KEY_FIELDS
    assert key["role"] is None and key["scopes"] == ["people:read"]
    assert key["workspace"] == "acme" and key["status"] == "active"
    assert key["rate_limit"] == "5/s" and key["description"] == "d"
    assert RFC3339_Z.fullmatch(key["created_at"]) and RFC3339_Z.fullmatch(key["expires_at"])
    assert key["last_used_at"] is None and key["revoked_at"] is None
    assert "token" not in json.dumps(key) and body["token"] not in json.dumps(key)


async def test_key_bound_to_a_role_shows_the_role_and_its_effective_scopes(gut):
    await gut.workspace()
    _, key = await gut.key(role="reader")
    assert key["role"] == "reader" and key["scopes"] == ["people:read", "companies:read"]


@pytest.mark.parametrize("fields", [
    {"role": "reader", "scopes": ["people:read"]},
    {"scopes": ["people:read"], "expires_at": "2099-01-01T00:00:00Z", "expires_in": 60},
    {"scopes": ["people:read"], "colour": "red"},
])
async def test_key_create_refuses_both_bindings_both_expiries_and_unknown_fields(gut, fields):
    await gut.workspace()
    status, body, h = await call(gut.admin, "POST", "/admin/v1/workspaces/acme/keys",
                                 json={"name": "ci", **fields})
    assert_error(status, body, h, 400, "bad_request")


async def test_key_patch_refuses_both_bindings_and_unknown_fields(gut):
    await gut.workspace()
    _, key = await gut.key()
    for fields in ({"role": "reader", "scopes": ["people:read"]}, {"expires_in": 60},
                   {"environment": "test"}):
        status, body, h = await call(gut.admin, "PATCH",
                                     f"/admin/v1/workspaces/acme/keys/{key['id']}", json=fields)
        assert_error(status, body, h, 400, "bad_request")


async def test_key_list_read_patch_and_status_filter(gut):
    await gut.workspace()
    _, a = await gut.key(name="a")
    _, b = await gut.key(name="b")
    status, body, _ = await call(gut.admin, "PATCH", f"/admin/v1/workspaces/acme/keys/{a['id']}",
                                 json={"name": "a2", "role": "editor"})
    assert status == 200 and set(body) == KEY_FIELDS
    assert body["name"] == "a2" and body["role"] == "editor" and "people:write" in body["scopes"]
    status, body, _ = await call(gut.admin, "PATCH", f"/admin/v1/workspaces/acme/keys/{a['id']}",
                                 json={"scopes": ["companies:read"]})
    assert status == 200 and body["role"] is None and body["scopes"] == ["companies:read"]
    await call(gut.admin, "POST", f"/admin/v1/workspaces/acme/keys/{b['id']}/revoke")
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/keys")
    assert status == 200 and set(body) == {"items"}
    assert {k["id"] for k in body["items"]} == {a["id"], b["id"]}
    assert all(set(k) == KEY_FIELDS for k in body["items"])
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/keys?status=active")
    assert [k["id"] for k in body["items"]] == [a["id"]]
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/keys?status=revoked")
    assert [k["id"] for k in body["items"]] == [b["id"]]
    status, body, _ = await call(gut.admin, "GET", f"/admin/v1/workspaces/acme/keys/{a['id']}")
    assert status == 200 and body["name"] == "a2"
    status, body, h = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/keys/AAAAAAAAAAAA")
    assert_error(status, body, h, 404, "not_found")


async def test_revoke_is_200_idempotent_and_acts_on_the_next_request(gut):
    await gut.workspace()
    token, key = await gut.key()
    auth = {"Authorization": f"Bearer {token}"}
    async with gut.proxy.get("/people", headers=auth) as r:
        assert r.status == 200
    path = f"/admin/v1/workspaces/acme/keys/{key['id']}/revoke"
    status, first, _ = await call(gut.admin, "POST", path)
    assert status == 200 and first["status"] == "revoked" and RFC3339_Z.fullmatch(first["revoked_at"])
    status, second, _ = await call(gut.admin, "POST", path)
    assert status == 200 and second["revoked_at"] == first["revoked_at"]
    status, body, h = await call(gut.proxy, "GET", "/people", headers=auth)
    assert_error(status, body, h, 401, "revoked_key")


async def test_rotate_is_201_key_and_token_with_the_same_settings(gut):
    await gut.workspace()
    old_token, old = await gut.key(role="reader", rate_limit="7/m", name="sync")
    status, body, _ = await call(gut.admin, "POST",
                                 f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate")
    assert status == 201
    assert set(body) == {"key", "token"}
    new = body["key"]
    assert set(new) == KEY_FIELDS and new["id"] != old["id"]
    assert body["token"].startswith("kg_live_") and body["token"][8:20] == new["id"]
    for field in ("name", "role", "scopes", "rate_limit"):
        assert new[field] == old[field], field
    _, after, _ = await call(gut.admin, "GET", f"/admin/v1/workspaces/acme/keys/{old['id']}")
    assert after["status"] == "revoked"
    async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {body['token']}"}) as r:
        assert r.status == 200
    status, err, h = await call(gut.proxy, "GET", "/people",
                                headers={"Authorization": f"Bearer {old_token}"})
    assert_error(status, err, h, 401, "revoked_key")


async def test_rotate_with_grace_keeps_the_old_key_working(gut):
    await gut.workspace()
    old_token, old = await gut.key()
    status, body, _ = await call(gut.admin, "POST",
                                 f"/admin/v1/workspaces/acme/keys/{old['id']}/rotate",
                                 json={"grace_seconds": 3600})
    assert status == 201
    _, after, _ = await call(gut.admin, "GET", f"/admin/v1/workspaces/acme/keys/{old['id']}")
    assert after["status"] == "active" and after["expires_at"] is not None
    async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {old_token}"}) as r:
        assert r.status == 200


async def test_key_limit_reached_is_409(gut):
    await gut.workspace()
    for i in range(5):   # the starter plan's max_keys
        await gut.key(name=f"k{i}")
    status, body, h = await call(gut.admin, "POST", "/admin/v1/workspaces/acme/keys",
                                 json={"name": "one-too-many", "scopes": []})
    assert_error(status, body, h, 409, "key_limit_reached")


async def test_last_used_at_updates_after_a_proxied_request(gut):
    await gut.workspace()
    token, key = await gut.key()
    async with gut.proxy.get("/people/1", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    status, body, _ = await call(gut.admin, "GET", f"/admin/v1/workspaces/acme/keys/{key['id']}")
    assert status == 200 and RFC3339_Z.fullmatch(body["last_used_at"] or ""), body
    used = datetime.strptime(body["last_used_at"], "%Y-%m-%dT%H:%M:%SZ")
    created = datetime.strptime(body["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert used >= created
    _, listing, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/keys")
    assert listing["items"][0]["last_used_at"] == body["last_used_at"]


# --- usage, roles, audit -------------------------------------------------------------------------

async def test_usage_object_counts_forwarded_requests(gut):
    await gut.workspace()
    token, _ = await gut.key()
    for _ in range(2):
        async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    status, usage, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/usage")
    assert status == 200 and set(usage) == USAGE_FIELDS
    now = datetime.now(timezone.utc)
    assert usage["workspace"] == "acme" and usage["plan"] == "starter"
    assert usage["period"] == now.strftime("%Y-%m")
    assert (usage["used"], usage["limit"], usage["remaining"]) == (2, 1000, 998)
    nxt = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1)
    assert usage["resets_at"] == nxt.strftime("%Y-%m-%dT00:00:00Z")


async def test_usage_of_an_unlimited_plan_has_null_limit_and_remaining(gut):
    await gut.workspace("big", plan="unlimited")
    status, usage, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/big/usage")
    assert status == 200 and usage["limit"] is None and usage["remaining"] is None


async def test_proxy_usage_endpoint_answers_usage_plus_key_and_counts_nothing(gut, upstream):
    await gut.workspace()
    token, key = await gut.key()
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(2):
        status, body, _ = await call(gut.proxy, "GET", "/_keygate/v1/usage", headers=auth)
        assert status == 200
        assert set(body) == USAGE_FIELDS | {"key"}
        assert body["used"] == 0 and body["workspace"] == "acme"
        assert set(body["key"]) == KEY_FIELDS and body["key"]["id"] == key["id"]
    assert upstream.requests == []
    status, body, h = await call(gut.proxy, "GET", "/_keygate/v1/usage")
    assert_error(status, body, h, 401, "missing_key")


async def test_proxy_usage_endpoint_refuses_unknown_query_parameters_as_the_admin_api_does(gut):
    """SPEC: unknown query parameters are a 400 ``bad_request`` (the admin usage endpoint and
    the ``/_keygate/v1/keys`` endpoints refuse them); ``/_keygate/v1/usage?period=2026-01``
    answered this month's usage as if the parameter had been read."""
    await gut.workspace()
    token, _ = await gut.key()
    auth = {"Authorization": f"Bearer {token}"}
    for query in ("?period=2026-01", "?x=1", "?workspace=other"):
        status, body, h = await call(gut.proxy, "GET", "/_keygate/v1/usage" + query, headers=auth)
        assert_error(status, body, h, 400, "bad_request")
        assert query[1:].split("=")[0] in body["error"]["message"]
    status, body, h = await call(gut.proxy, "GET", "/_keygate/v1/usage?x=1")
    assert_error(status, body, h, 401, "missing_key")  # the key is still asked for first
    assert gut.upstream.requests == []


async def test_proxy_reserved_endpoints_carry_x_request_id(gut):
    await gut.workspace()
    token, _ = await gut.key(role="admin")
    auth = {"Authorization": f"Bearer {token}"}
    for path in ("/_keygate/v1/usage", "/_keygate/v1/keys"):
        async with gut.proxy.get(path, headers=auth) as r:
            assert r.status == 200
            assert r.headers.get("X-Request-Id"), path


async def test_proxy_usage_endpoint_key_shows_last_used_at(gut):
    await gut.workspace()
    token, key = await gut.key()
    auth = {"Authorization": f"Bearer {token}"}
    async with gut.proxy.get("/people", headers=auth) as r:
        assert r.status == 200
    status, body, _ = await call(gut.proxy, "GET", "/_keygate/v1/usage", headers=auth)
    assert status == 200 and body["key"]["last_used_at"] is not None


async def test_roles_put_list_delete(gut):
    await gut.workspace()
    status, body, _ = await call(gut.admin, "PUT", "/admin/v1/workspaces/acme/roles/ops",
                                 json={"scopes": ["people:read"]})
    assert status == 200
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/roles")
    assert status == 200 and set(body) == {"items"}
    assert any(r["name"] == "ops" and r["scopes"] == ["people:read"] for r in body["items"])
    status, body, h = await call(gut.admin, "PUT", "/admin/v1/workspaces/acme/roles/ops",
                                 json={"scopes": ["people:read"], "extra": 1})
    assert_error(status, body, h, 400, "bad_request")
    status, _, _ = await call(gut.admin, "DELETE", "/admin/v1/workspaces/acme/roles/ops")
    assert status in (200, 204)


async def test_audit_is_newest_first_with_limit_and_actor(gut):
    await gut.workspace()
    _, key = await gut.key()
    await call(gut.admin, "POST", f"/admin/v1/workspaces/acme/keys/{key['id']}/revoke")
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/audit")
    assert status == 200 and set(body) == {"items"}
    items = body["items"]
    assert all(set(e) == AUDIT_FIELDS for e in items)
    assert all(e["actor"] == "operator" and RFC3339_Z.fullmatch(e["at"]) for e in items)
    assert [e["target"] for e in items[:2]] == [key["id"], key["id"]]
    assert items[-1]["target"] == "acme"
    status, body, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/audit?limit=1")
    assert len(body["items"]) == 1 and body["items"][0] == items[0]


async def test_self_service_audit_actor_is_the_acting_key_id(gut):
    await gut.workspace()
    token, admin_key = await gut.key(role="admin")
    status, body, _ = await call(gut.proxy, "POST", "/_keygate/v1/keys",
                                 headers={"Authorization": f"Bearer {token}"},
                                 json={"name": "made-by-key", "scopes": ["people:read"]})
    assert status == 201 and set(body) == {"key", "token"}
    assert set(body["key"]) == KEY_FIELDS
    _, audit, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/acme/audit?limit=1")
    assert audit["items"][0]["actor"] == admin_key["id"]


# --- proxy listener: request ids and error bodies ------------------------------------------------

async def test_proxy_carries_x_request_id_on_every_answer(gut):
    await gut.workspace()
    token, _ = await gut.key()
    for path, headers, want in (("/nowhere", {}, 404), ("/people", {}, 401),
                                ("/people", {"Authorization": f"Bearer {token}"}, 200),
                                ("/health", {}, 200)):
        async with gut.proxy.get(path, headers=headers) as r:
            assert r.status == want and r.headers["X-Request-Id"], path
    async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {token}",
                                                 "X-Request-Id": "req-42"}) as r:
        assert r.headers["X-Request-Id"] == "req-42"


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["embedded", "redis://localhost:6379", "redis://localhost:6379/0",
                                 "redis://:pw@localhost/3", "rediss://host:6380/1",
                                 "redis+cluster://host:7000",
                                 "redis+sentinel://host:26379/mymaster"])
def test_config_accepts_spec_redis_url_forms(tmp_path, url):
    path = tmp_path / "c.yaml"
    path.write_text(f"store:\n  redis_url: {url}\n")
    assert load_config(path).store.redis_url == url


@pytest.mark.parametrize("url", ["redis://host:6379/abc", "redis://host:6379/-1",
                                 "redis://host:6379/0/1", "http://host:6379"])
def test_config_refuses_a_bad_redis_url_naming_file_line_and_field(tmp_path, url):
    path = tmp_path / "c.yaml"
    path.write_text(f"server:\n  port: 8080\nstore:\n  redis_url: {url}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:4: store.redis_url:"), problems


# --- CLI ------------------------------------------------------------------------------------------

@pytest.fixture
async def cli(gut, monkeypatch, capsys):
    """``await cli(*argv, stdin=...)`` → (exit code, stdout, stderr) against the gateway's
    admin listener."""
    monkeypatch.setenv("KEYGATE_ADMIN_URL", str(gut.admin_server.make_url("")).rstrip("/"))
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)

    async def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run


async def test_cli_workspace_key_lifecycle_exit_codes_and_json(cli, gut):
    code, out, err = await cli("workspaces", "create", "acme", "--name", "Acme", "--plan", "tiny")
    assert code == 0, err
    code, out, err = await cli("workspaces", "create", "acme", "--name", "Acme")
    assert code == 1 and err.strip() and out == ""
    code, out, _ = await cli("workspaces", "list", "--json")
    assert code == 0 and "acme" in out
    code, out, _ = await cli("workspaces", "set-plan", "acme", "starter")
    assert code == 0
    code, out, err = await cli("keys", "create", "--workspace", "acme", "--name", "ci",
                               "--scope", "people:read", "--scope", "companies:read",
                               "--expires", "30d", "--env", "test", "--description", "d")
    assert code == 0, err
    token = out.strip()
    assert re.fullmatch(r"kg_test_[0-9A-Za-z]{50}", token)
    assert "cannot be shown again" in err and token not in err
    key_id = token[8:20]
    code, out, _ = await cli("keys", "list", "--workspace", "acme", "--json")
    assert code == 0 and token not in out
    listed = json.loads(out)
    items = listed["items"] if isinstance(listed, dict) else listed
    assert [k["id"] for k in items] == [key_id] and items[0]["environment"] == "test"
    code, out, _ = await cli("keys", "list", "--workspace", "acme")
    header = out.splitlines()[0].lower()
    for column in ("id", "name", "role", "created", "last used", "expires", "status"):
        assert column in header
    code, out, err = await cli("keys", "rotate", "--workspace", "acme", key_id, "--grace", "24h")
    assert code == 0, err
    new_token = out.strip()
    assert re.fullmatch(r"kg_test_[0-9A-Za-z]{50}", new_token)
    new_id = new_token[8:20]
    code, out, err = await cli("keys", "revoke", "--workspace", "acme", new_id, stdin="n\n")
    assert code != 0
    _, key, _ = await call(gut.admin, "GET", f"/admin/v1/workspaces/acme/keys/{new_id}")
    assert key["status"] == "active"
    code, out, err = await cli("keys", "revoke", "--workspace", "acme", new_id, stdin="y\n")
    assert code == 0, err
    code, out, err = await cli("keys", "revoke", "--workspace", "acme", key_id, "--yes")
    assert code == 0, err
    code, out, _ = await cli("usage", "--workspace", "acme", "--json")
    assert code == 0 and set(json.loads(out)) == USAGE_FIELDS
    code, _, err = await cli("usage", "--workspace", "nope")
    assert code == 1 and err.strip()
    code, _, _ = await cli("keys", "revoke", "--workspace")
    assert code == 2


async def test_cli_config_check_path(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("store:\n  redis_url: redis://localhost:6379/0\n"
                    "upstreams:\n  api: http://127.0.0.1:9000\n"
                    "routes:\n  - {path: /x, upstream: api}\n")
    assert await asyncio.to_thread(main, ["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  redis_url: redis://localhost:6379/abc\n")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: store.redis_url" in err


# --- proxy listener: the error table's exact codes and headers ------------------------------------

async def test_proxy_error_table_codes_and_rfc6750_challenges(gut, upstream):
    await gut.workspace()
    token, _ = await gut.key()
    bearer = {"Authorization": f"Bearer {token}"}
    realm = 'Bearer realm="keygate"'
    status, body, h = await call(gut.proxy, "GET", "/people")
    assert_error(status, body, h, 401, "missing_key")
    assert h["WWW-Authenticate"] == realm
    for auth in ("Basic abc", "Bearer kg_live_nonsense", "Bearer " + tampered(token)):
        status, body, h = await call(gut.proxy, "GET", "/people", headers={"Authorization": auth})
        assert_error(status, body, h, 401, "malformed_key")
        assert h["WWW-Authenticate"] == realm + ', error="invalid_token"'
    status, body, h = await call(gut.proxy, "GET", "/people",
                                 headers={"Authorization": f"Bearer {token}",
                                          "X-Api-Key": (await gut.key(name="third"))[0]})
    assert_error(status, body, h, 400, "ambiguous_key")
    assert h["WWW-Authenticate"] == realm + ', error="invalid_request"'
    status, body, h = await call(gut.proxy, "POST", "/people", headers=bearer)
    assert_error(status, body, h, 403, "insufficient_scope")
    assert h["WWW-Authenticate"] == realm + ', error="insufficient_scope", scope="people:write"'
    status, body, h = await call(gut.proxy, "GET", "/nope", headers=bearer)
    assert_error(status, body, h, 404, "no_route")
    status, body, h = await call(gut.proxy, "GET", "/people;x=1", headers=bearer)
    assert_error(status, body, h, 400, "bad_path")
    status, body, h = await call(gut.proxy, "GET", f"/people?api_key={token}")
    assert_error(status, body, h, 400, "key_in_url")
    wrong = token[:20] + ("A" if token[20] != "A" else "B") + token[21:-6]
    from gateway.tokens import checksum
    wrong += checksum(wrong)
    status, body, h = await call(gut.proxy, "GET", "/people",
                                 headers={"Authorization": f"Bearer {wrong}"})
    assert_error(status, body, h, 401, "invalid_key")
    assert h["WWW-Authenticate"] == realm + ', error="invalid_token"'
    assert token not in json.dumps(body)
    assert all("/nope" not in r["raw_path"] and ";" not in r["raw_path"]
               for r in upstream.requests)


@pytest.mark.parametrize("length", [3000, 9000, 20000])
async def test_an_over_long_path_is_bad_path_however_long(gut, length):
    """SPEC: an over-long path is 400 ``bad_path``. One past the HTTP parser's 8 KiB request
    line was ``bad_request`` ("not valid HTTP/1.1") instead, and its connection closed."""
    await gut.workspace()
    token, _ = await gut.key()
    reader, writer = await gut.raw_connection()
    path = "/people/" + "a" * length
    writer.write(f"GET {path} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {token}\r\n"
                 "Connection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"]["code"] == "bad_path"
    assert gut.upstream.requests == [] and await gut.used() == 0


async def test_forwarded_response_carries_monthly_ratelimit_fields(gut):
    await gut.workspace()
    token, _ = await gut.key()
    async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        policy, value = r.headers["RateLimit-Policy"], r.headers["RateLimit"]
    assert re.fullmatch(r'"monthly";q=1000;w=\d+', policy), policy
    assert re.fullmatch(r'"monthly";r=999;t=\d+', value), value


async def test_rate_limited_429_has_retry_after_and_rate_policy(redis_url, upstream,
                                                                monkeypatch):
    # on a clock that moves only when told: with the wall clock, four requests that a loaded
    # machine spread over more than a second would find the first one out of the 1 s window
    from harness import Clock, gateway_under_test, make_config
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch, clock=Clock()) as gut:
        await gut.workspace("lim", plan="limited")   # 3/s
        token, _ = await gut.key("lim")
        auth = {"Authorization": f"Bearer {token}"}
        statuses = []
        for _ in range(4):
            async with gut.proxy.get("/people", headers=auth) as r:
                statuses.append(r.status)
                last = r
                body = await r.json()
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    assert body["error"]["code"] == "rate_limited"
    assert int(last.headers["Retry-After"]) >= 1
    assert '"rate";q=3;w=1' in last.headers["RateLimit-Policy"]


async def test_quota_exceeded_429_counts_nothing(gut):
    await gut.workspace("t", plan="tiny")        # 3 a month
    token, _ = await gut.key("t")
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        async with gut.proxy.get("/people", headers=auth) as r:
            assert r.status == 200
    for _ in range(2):
        status, body, h = await call(gut.proxy, "GET", "/people", headers=auth)
        assert_error(status, body, h, 429, "quota_exceeded")
        assert int(h["Retry-After"]) >= 1
    _, usage, _ = await call(gut.admin, "GET", "/admin/v1/workspaces/t/usage")
    assert (usage["used"], usage["remaining"]) == (3, 0)


async def test_admin_listener_answers_unparseable_requests_with_the_json_error_body(gut):
    from aiohttp import web

    from gateway.proxying.server import AdminRunner
    runner = AdminRunner(gut.gw.admin_app, handle_signals=False, access_log=None)  # as app.py
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400"
    assert b"x-request-id" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"


# --- failed-verification throttle ----------------------------------------------------------------

async def test_only_failed_verifications_count_toward_the_per_ip_throttle(redis_url, upstream,
                                                                          monkeypatch):
    """SPEC: only verifications that *failed* count. A key whose secret verified and is then
    refused (revoked, disabled, from an address it may not use, lacking a scope) and a token
    refused for its format (no verification ran) leave the client's address alone."""
    import dataclasses
    from gateway.config import FailureLimits
    from harness import gateway_under_test, make_config
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, failures=FailureLimits(per_ip=3, per_key=None, window_seconds=60),
        cache_ttl=0.0))  # every request verifies its secret again
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        revoked, key = await g.key(name="revoked")
        await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        disabled, key = await g.key(name="disabled")
        await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}", {"enabled": False})
        elsewhere, _ = await g.key(name="elsewhere", allowed_ips=["10.0.0.0/8"])
        narrow, _ = await g.key(name="narrow", scopes=["companies:read"])
        refusals = {revoked: "revoked_key", disabled: "disabled_key",
                    elsewhere: "ip_not_allowed", narrow: "insufficient_scope",
                    tampered(narrow): "malformed_key"}
        for token, code in refusals.items():
            for _ in range(4):  # past per_ip each
                status, body, h = await call(g.proxy, "GET", "/people/1",
                                             headers={"Authorization": f"Bearer {token}"})
                assert body["error"]["code"] == code
        good, _ = await g.key(name="good")
        status, _, _ = await call(g.proxy, "GET", "/people/1",
                                  headers={"Authorization": f"Bearer {good}"})
        assert status == 200


# --- verify-only routes --------------------------------------------------------------------------

async def test_a_verify_only_route_is_no_route_on_the_forwarding_path_before_any_key_check(
        redis_url, upstream, monkeypatch):
    """SPEC: a route without ``upstream`` answers 404 ``no_route`` on the forwarding path;
    route match comes before the credential, so with or without a key, public or not, and
    even when a later forwarding route matches the same path (first match in file order)."""
    import dataclasses
    from gateway.config import Route
    from harness import gateway_under_test, verify_config
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, routes=config.routes + (
        Route("/orders/**", "api", ("GET",), ()),))  # shadowed by the verify-only one
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["orders:read"])
        for path, headers in (("/orders/9", {}), ("/orders/9", {"Authorization": "Bearer x"}),
                              ("/orders/9", {"Authorization": f"Bearer {token}"}),
                              ("/open/x", {})):
            status, body, h = await call(g.proxy, "GET", path, headers=headers)
            assert_error(status, body, h, 404, "no_route")
        status, _, _ = await call(g.proxy, "GET", "/_keygate/v1/verify/orders/9",
                                  headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        assert upstream.requests == []


# --- finding keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("sort", ["name", "created"])
async def test_a_cursor_listing_neither_repeats_nor_drops_keys_created_or_deleted_meanwhile(
        gut, sort):
    """SPEC: ``limit=`` and ``cursor=`` page a listing. Keys created and deleted between pages
    (names sorting before and after the cursor) make no key that was there all along appear
    twice or not at all."""
    await gut.workspace("acme", plan="unlimited")
    made = [(await gut.key(name=name))[1] for name in ("m1", "m2", "m3", "m4", "m5", "m6")]
    await gut.admin_json("POST", f"/workspaces/acme/keys/{made[3]['id']}/revoke")
    seen, cursor, page = [], None, 0
    while True:
        path = f"/admin/v1/workspaces/acme/keys?sort={sort}&limit=2" + (
            f"&cursor={cursor}" if cursor else "")
        status, body, _ = await call(gut.admin, "GET", path)
        assert status == 200 and len(body["items"]) <= 2
        seen += [k["name"] for k in body["items"]]
        page += 1
        if page == 1:
            await gut.key(name="a0")
            await gut.key(name="z9")
            status, _, _ = await call(gut.admin, "DELETE",
                                      f"/admin/v1/workspaces/acme/keys/{made[3]['id']}")
            assert status == 200
        cursor = body.get("next_cursor")
        if cursor is None:
            break
    always = ["m1", "m2", "m3", "m5", "m6"]
    assert [n for n in seen if n in always] == always
    assert "m4" not in seen[2:] and len(seen) == len(set(seen))


# --- key state disclosed only after the secret verified ------------------------------------------

async def test_disabled_expired_revoked_and_ip_refusals_are_only_told_to_the_right_secret(
        redis_url, upstream, monkeypatch):
    """SPEC: expired/revoked are only disclosed once the secret has verified; ``disabled_key``
    and ``ip_not_allowed`` come after the secret verified. A well-formed token with the key's
    public id and another secret (a valid checksum: not ``malformed_key``) is ``invalid_key``
    for each, also once the right token was verified and cached in this process."""
    from harness import Clock, gateway_under_test, make_config, wrong_secret
    import time
    clock = Clock(time.time())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme")
        made = {name: await g.key(name=name, expires_in=60) for name in
                ("disabled", "revoked", "expired", "elsewhere")}
        for token, _ in made.values():  # each verified and cached
            status, _, _ = await call(g.proxy, "GET", "/people/1",
                                      headers={"Authorization": f"Bearer {token}"})
            assert status == 200
        ids = {name: key["id"] for name, (_, key) in made.items()}
        await g.admin_json("PATCH", f"/workspaces/acme/keys/{ids['disabled']}",
                           {"enabled": False})
        await g.admin_json("POST", f"/workspaces/acme/keys/{ids['revoked']}/revoke")
        await g.admin_json("PATCH", f"/workspaces/acme/keys/{ids['elsewhere']}",
                           {"allowed_ips": ["10.0.0.0/8"]})
        clock.now += 120  # 'expired' (and every other) is past its expires_at now...
        for name in ("disabled", "revoked", "elsewhere"):  # ...so give those back time
            await g.admin_json("PATCH", f"/workspaces/acme/keys/{ids[name]}",
                               {"expires_at": "2099-01-01T00:00:00Z"})
        told = {"disabled": (401, "disabled_key"), "revoked": (401, "revoked_key"),
                "expired": (401, "expired_key"), "elsewhere": (403, "ip_not_allowed")}
        for name, (token, _) in made.items():
            status, body, h = await call(g.proxy, "GET", "/people/1",
                                         headers={"Authorization": f"Bearer {token}"})
            assert (status, body["error"]["code"]) == told[name]
            guess = wrong_secret(token)
            status, body, h = await call(g.proxy, "GET", "/people/1",
                                         headers={"Authorization": f"Bearer {guess}"})
            assert_error(status, body, h, 401, "invalid_key")
            assert h["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_token"'
