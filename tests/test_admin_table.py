"""The admin API's one route table: the admin listener and self-service serve from it, and the
workspace-admin list and the query parameters are read from its rows. The refusals it makes
are seen on the real proxy listener, with a real ``keys:admin`` key on real Redis."""

import asyncio

import pytest
import redis

from gateway.admin import WORKSPACE_ADMIN_ROUTES
from gateway.admin.api import KEYS, QUERY_PARAMS, ROUTES
from gateway.admin.self_service import SELF_SERVICE_PREFIX, SELF_SERVICE_ROUTES
from gateway.config import StoreConfig
from harness import bearer, eventually, gateway_under_test, make_config, redis_answers


def test_self_service_serves_the_workspace_admin_key_rows_of_the_table():
    served = {(e.method, SELF_SERVICE_PREFIX + e.path[len(KEYS):])
              for e, _ in SELF_SERVICE_ROUTES}
    assert served == {("GET", SELF_SERVICE_PREFIX), ("POST", SELF_SERVICE_PREFIX),
                      ("GET", SELF_SERVICE_PREFIX + "/{key}"),
                      ("PATCH", SELF_SERVICE_PREFIX + "/{key}"),
                      ("DELETE", SELF_SERVICE_PREFIX + "/{key}"),
                      ("POST", SELF_SERVICE_PREFIX + "/{key}/revoke"),
                      ("POST", SELF_SERVICE_PREFIX + "/{key}/rotate"),
                      ("GET", SELF_SERVICE_PREFIX + "/{key}/usage/daily")}
    assert all(any(e is row for row in ROUTES) for e, _ in SELF_SERVICE_ROUTES)
    assert all((e.method, e.path) in WORKSPACE_ADMIN_ROUTES for e, _ in SELF_SERVICE_ROUTES)


def test_workspace_admin_routes_and_query_parameters_come_from_the_rows():
    assert WORKSPACE_ADMIN_ROUTES == {(e.method, e.path) for e in ROUTES if e.workspace_admin}
    assert QUERY_PARAMS[("GET", KEYS)] == ("status", "unused_days", "sort", "limit", "cursor")
    assert ("POST", "/admin/v1/workspaces") not in WORKSPACE_ADMIN_ROUTES
    assert len({(e.method, e.path) for e in ROUTES}) == len(ROUTES)


NOT_IN_THE_TABLE = ["/_keygate/v1/keysX", "/_keygate/v1/keys/k/usage",
                    "/_keygate/v1/keys/k/a/b/c", "/_keygate/v1/keys/k/usage/weekly"]


@pytest.fixture
async def admin_key(redis_url, upstream, monkeypatch):
    """A gateway failing open (so a paused store still lets a cached key through to the
    table) and a real ``keys:admin`` key of workspace acme, already verified once."""
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, key = await g.key(role="admin")  # ALL + keys:admin
        async with g.proxy.get("/_keygate/v1/keys", headers=bearer(token)) as r:
            assert r.status == 200
        yield g, token, key


async def _call(g, method: str, path: str, token: str) -> tuple[int, dict, dict | None]:
    async with g.proxy.request(method, path, headers=bearer(token)) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, dict(r.headers), body


@pytest.mark.parametrize("path", NOT_IN_THE_TABLE)
async def test_a_path_not_in_the_table_is_404(admin_key, path):
    g, token, _ = admin_key
    status, _, body = await _call(g, "GET", path, token)
    assert status == 404, body


async def test_an_empty_segment_is_refused_before_the_table(admin_key):
    g, token, _ = admin_key
    status, _, body = await _call(g, "GET", "/_keygate/v1/keys/a//revoke", token)
    assert (status, body["error"]["code"]) == (400, "bad_path")


async def test_a_path_not_in_the_table_is_404_before_any_store_call(admin_key, redis_url):
    """With Redis paused, a path the table has is 503 (it needs the store); one it has not is
    still 404: it was answered before the store was asked."""
    g, token, _ = admin_key
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1500")
    try:
        got = await asyncio.gather(_call(g, "GET", "/_keygate/v1/keys", token),
                                   *(_call(g, "GET", p, token) for p in NOT_IN_THE_TABLE))
    finally:
        assert await eventually(redis_answers(redis_url))  # the pause is over
    (status, _, body), *unknown = got
    assert (status, body["error"]["code"]) == (503, "store_unavailable")
    assert [s for s, _, _ in unknown] == [404] * len(NOT_IN_THE_TABLE), unknown


@pytest.mark.parametrize("method, path, allow", [  # HEAD is GET without the body
    ("PUT", "", "GET, HEAD, POST"),
    ("PUT", "/{id}", "GET, HEAD, PATCH, DELETE"),
    ("GET", "/{id}/revoke", "POST"),
    ("POST", "/{id}/usage/daily", "GET, HEAD"),
])
async def test_a_method_the_table_has_not_there_is_405_with_the_rows_methods(
        admin_key, method, path, allow):
    g, token, key = admin_key
    status, headers, _ = await _call(g, method, "/_keygate/v1/keys" + path.format(id=key["id"]),
                                     token)
    assert (status, headers["Allow"]) == (405, allow)


async def test_query_parameters_are_the_rows_own(admin_key):
    g, token, key = admin_key
    status, _, body = await _call(g, "GET", f"/_keygate/v1/keys/{key['id']}?status=active",
                                  token)
    assert status == 400 and "'status'" in body["error"]["message"], body
    status, _, body = await _call(g, "GET", "/_keygate/v1/keys?status=active", token)
    assert status == 200, body  # the list's row takes it
