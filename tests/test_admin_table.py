"""The admin API's one route table: the admin listener and self-service serve from it, and the
workspace-admin list and the query parameters are read from its rows."""

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.admin import WORKSPACE_ADMIN_ROUTES
from gateway.admin.api import KEYS, QUERY_PARAMS, ROUTES
from gateway.admin.self_service import (SELF_SERVICE_PREFIX, SELF_SERVICE_ROUTES,
                                        handle_self_service)
from gateway.config import Config
from gateway.errors import BadRequest, MethodNotAllowed, NotFound
from gateway.models import Principal

PRINCIPAL = Principal("acme", "AbCdEf123456", frozenset({"keys:admin"}), "free")


class NoStore:
    """A store that must not be reached."""

    async def require_key(self, ws, key_id):
        raise AssertionError("the store was called")


class ActingKeyStore:
    async def require_key(self, ws, key_id):
        return type("Key", (), {"expires_at": None})()


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


@pytest.mark.parametrize("path", ["/_keygate/v1/keysX", "/_keygate/v1/keys/a//revoke",
                                  "/_keygate/v1/keys/k/usage", "/_keygate/v1/keys/k/a/b/c",
                                  "/_keygate/v1/keys/k/usage/weekly"])
async def test_a_path_not_in_the_table_is_404_before_any_store_call(path):
    with pytest.raises(NotFound):
        await handle_self_service(make_mocked_request("GET", path), PRINCIPAL, NoStore(), Config())


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/_keygate/v1/keys", "GET, POST"),
    ("HEAD", "/_keygate/v1/keys/AbCdEf123456", "GET, PATCH, DELETE"),
    ("GET", "/_keygate/v1/keys/AbCdEf123456/revoke", "POST"),
    ("POST", "/_keygate/v1/keys/AbCdEf123456/usage/daily", "GET"),
])
async def test_a_method_the_table_has_not_there_is_405_with_the_rows_methods(method, path, allow):
    with pytest.raises(MethodNotAllowed) as caught:
        await handle_self_service(make_mocked_request(method, path), PRINCIPAL, ActingKeyStore(),
                           Config())
    assert caught.value.headers["Allow"] == allow


async def test_query_parameters_are_the_rows_own():
    request = make_mocked_request("GET", "/_keygate/v1/keys/AbCdEf123456?status=active")
    with pytest.raises(BadRequest, match="'status'"):
        await handle_self_service(request, PRINCIPAL, ActingKeyStore(), Config())
