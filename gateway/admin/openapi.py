"""The OpenAPI 3.1 document of keygate's own HTTP API, built from small pieces.

Served at ``GET /admin/v1/openapi.json`` (no auth). It describes every endpoint of the admin
listener and the ``/_keygate/`` endpoints of the proxy listener, with every body, status code
and error code they answer. ``tests/test_openapi.py`` keeps it honest: every route the admin app
registers must be described here, and schemathesis runs against a live gateway on real Redis and
fails on any answer the document does not allow.

Adding an endpoint (see also docs/operations.md "Extending the API"):

1. If it returns or takes a new object, add its schema to ``schemas()`` (openapi_schemas.py).
2. Add one ``op(...)`` call to ``admin_paths()`` (or ``proxy_paths()`` in openapi_proxy.py):
   the success status and schema, the request body schema if any, the query parameters, and
   the error statuses with the error codes each can carry (``err(404, "not_found")``).
3. Run ``pytest tests/test_openapi.py``.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache

from .. import __version__
from .api import WORKSPACE_ADMIN_ROUTES
from .openapi_proxy import proxy_paths
from .validate import AUDIT_DEFAULT
from .openapi_schemas import (ADMIN_401, BAD_400, DAYS, EXPECTATION_417, JSON, KEY,
                              NOT_FOUND_404, REQUEST_ID_HEADER, RETRY_AFTER, ROLE_NAME, STORE_503,
                              STORED_ROLE_NAME,
                              TIMEOUT_408, TOO_LARGE_413, WS, Schema, err, list_params, obj, ok,
                              op, param, ref, schemas)


# --- the admin listener ----------------------------------------------------------------------

def admin_paths() -> dict[str, Schema]:
    v1 = "/admin/v1/workspaces"
    # unknown query parameter, auth, a declared body that stalls or is over aiohttp's 1 MiB
    # (any authenticated call's body is read before its handler runs, a GET's too), store
    common = (BAD_400, ADMIN_401, TIMEOUT_408, TOO_LARGE_413, STORE_503)
    with_body = (BAD_400, ADMIN_401, TIMEOUT_408, TOO_LARGE_413, STORE_503)
    open_ = []                                        # no authentication
    return {
        "/healthz": {"get": op("The process is up", ok(200, ref("Status"), "up"),
                               security=open_, tags=["probes"])},
        "/readyz": {"get": op("The store is reachable and the gateway is not shutting down",
                              ok(200, ref("Status"), "ready"),
                              err(503, "store_unavailable", "shutting_down"), security=open_,
                              tags=["probes"])},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text exposition format)", "security": open_,
            "tags": ["probes"],
            "responses": {"200": {"description": "the exposition",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/admin/v1/openapi.json": {"get": {
            "summary": "This document", "security": open_, "tags": ["probes"],
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "headers": REQUEST_ID_HEADER,
                                  "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/admin/v1/reload": {
            "post": op("Re-read the config file and apply it without a restart (every worker)",
                       ok(200, ref("ReloadResult"), "applied"), ADMIN_401, TIMEOUT_408,
                       TOO_LARGE_413, STORE_503,
                       ("400", {"description": "`bad_request`: a body was sent, or the file has "
                                              "problems (listed; nothing was changed)",
                                "headers": REQUEST_ID_HEADER,
                                "content": {JSON: {"schema": {"anyOf": [
                                    ref("ConfigProblems"), err(400, "bad_request")[1]["content"]
                                    [JSON]["schema"]]}}}}),
                       ("409", {"description": "`conflict`: started without a config file; or "
                                              "(serve --workers N) other workers refused the "
                                              "file this one took (their problems listed as "
                                              "`worker I (pid P): ...`)",
                                "headers": REQUEST_ID_HEADER,
                                "content": {JSON: {"schema": {"anyOf": [
                                    ref("WorkerProblems"), err(409, "conflict")[1]["content"]
                                    [JSON]["schema"]]}}}}),
                       tags=["config"]),
        },
        v1: {
            "post": op("Create a workspace", ok(201, ref("Workspace"), "created"), *with_body,
                       err(409, "conflict"), body=ref("WorkspaceCreate"), tags=["workspaces"]),
            "get": op("List workspaces", ok(200, ref("WorkspaceList"), "every workspace"),
                      *common, tags=["workspaces"]),
        },
        v1 + "/{ws}": {
            "parameters": [WS],
            "get": op("Read a workspace", ok(200, ref("Workspace"), "the workspace"), *common,
                      NOT_FOUND_404, tags=["workspaces"]),
            "patch": op("Rename a workspace, change its plan or its own limits",
                        ok(200, ref("Workspace"), "the updated workspace"), *with_body,
                        NOT_FOUND_404, body=ref("WorkspacePatch"), tags=["workspaces"]),
        },
        v1 + "/{ws}/keys": {
            "parameters": [WS],
            "post": op("Create a key; the token is in this answer only",
                       ok(201, ref("NewKey"), "the key and its token"), *with_body,
                       NOT_FOUND_404, err(409, "conflict", "key_limit_reached"),
                       body=ref("KeyCreate"),
                       tags=["keys"]),
            "get": op("List a workspace's keys (never tokens or hashes)",
                      ok(200, ref("KeyList"), "the keys"), *common, NOT_FOUND_404,
                      params=list_params(), tags=["keys"]),
        },
        v1 + "/{ws}/keys/{key}": {
            "parameters": [WS, KEY],
            "get": op("Read a key", ok(200, ref("Key"), "the key"), *common, NOT_FOUND_404,
                      tags=["keys"]),
            "patch": op("Update a key (a re-role takes effect on the next request)",
                        ok(200, ref("Key"), "the updated key"), *with_body, NOT_FOUND_404,
                        err(409, "conflict", "key_limit_reached"), body=ref("KeyPatch"),
                        tags=["keys"]),
            "delete": op("Delete a revoked or expired key (its audit entries stay)",
                         ok(200, ref("Key"), "the key as it was"), *common, NOT_FOUND_404,
                         err(409, "conflict"), body=obj({}), tags=["keys"]),
        },
        v1 + "/{ws}/keys/{key}/usage/daily": {
            "parameters": [WS, KEY],
            "get": op("A key's requests per UTC day, oldest first",
                      ok(200, ref("DailyUsage"), "one item per day"), *common, NOT_FOUND_404,
                      params=[param("days", "query", DAYS, "default 30")], tags=["usage"]),
        },
        v1 + "/{ws}/keys/{key}/revoke": {
            "parameters": [WS, KEY],
            "post": op("Revoke a key: permanent and idempotent",
                       ok(200, ref("Key"), "the revoked key"), *with_body, NOT_FOUND_404,
                       body=obj({}), tags=["keys"]),
        },
        v1 + "/{ws}/keys/{key}/rotate": {
            "parameters": [WS, KEY],
            "post": op("Replace a key; the old one expires after the grace (0: now)",
                       ok(201, ref("NewKey"), "the new key and its token"), *with_body,
                       NOT_FOUND_404, err(409, "conflict", "key_limit_reached"),
                       body=ref("KeyRotate"), tags=["keys"]),
        },
        v1 + "/{ws}/usage": {
            "parameters": [WS],
            "get": op("This month's usage", ok(200, ref("Usage"), "the usage object"),
                      *common, NOT_FOUND_404, tags=["usage"]),
        },
        v1 + "/{ws}/usage/daily": {
            "parameters": [WS],
            "get": op("The workspace's requests per UTC day, oldest first",
                      ok(200, ref("DailyUsage"), "one item per day"), *common, NOT_FOUND_404,
                      params=[param("days", "query", DAYS, "default 30")], tags=["usage"]),
        },
        "/admin/v1/scopes": {
            "get": op("The scope catalogue (without one: the scopes the config uses)",
                      ok(200, ref("ScopeList"), "the scopes"), *common, tags=["scopes"]),
        },
        v1 + "/{ws}/roles": {
            "parameters": [WS],
            "get": op("The roles a workspace's keys can use (its own shadow the config's)",
                      ok(200, ref("RoleList"), "the roles"), *common, NOT_FOUND_404,
                      tags=["roles"]),
        },
        v1 + "/{ws}/roles/{name}": {
            "parameters": [WS],
            "put": op("Create or replace a workspace role",
                      ok(200, ref("Role"), "the role"), *with_body, NOT_FOUND_404,
                      body=ref("RolePut"), tags=["roles"],
                      params=[param("name", "path", ROLE_NAME, "role name (a slug)")]),
            # an earlier version's role name (not a slug) is still deletable
            "delete": op("Delete a workspace role (404 when the workspace does not define it; "
                         "409 while keys not revoked or expired still use it and no configured "
                         "role of its name takes over: re-role them first)",
                         ok(200, ref("Role"), "the role as it was"), *common, NOT_FOUND_404,
                         err(409, "conflict"), body=obj({}), tags=["roles"],
                         params=[param("name", "path", STORED_ROLE_NAME, "role name")]),
        },
        v1 + "/{ws}/audit": {
            "parameters": [WS],
            "get": op("Lifecycle events of the workspace (created; its name, plan or "
                      "limits changed), its roles and its keys, newest first",
                      ok(200, ref("AuditList"), "the events"), *common, NOT_FOUND_404,
                      params=[param("limit", "query",
                                    {"type": "integer", "minimum": 1, "maximum": 1000,
                                     "default": AUDIT_DEFAULT})],
                      tags=["audit"]),
        },
    }


@lru_cache(maxsize=1)
def document_bytes() -> bytes:
    return json.dumps(document(), indent=1).encode()


def operation_id(method: str, path: str) -> str:
    """``POST /admin/v1/workspaces/{ws}/keys`` → ``post_workspaces_ws_keys`` (stable, for
    links and client generators)."""
    words = [w.strip("{}_") for w in path.split("/") if w and w not in ("admin", "v1")]
    return "_".join([method] + [w.replace(".", "_").replace("-", "_") for w in words])


LINKS = {
    # (operation, status) → {link name: (target operation, parameters)}: how a client (and
    # schemathesis's stateful phase) goes from a created object to the calls that use it
    ("post_workspaces", "201"): {
        "GetWorkspace": ("get_workspaces_ws", {"ws": "$response.body#/id"}),
        "CreateKey": ("post_workspaces_ws_keys", {"ws": "$response.body#/id"}),
        "ListKeys": ("get_workspaces_ws_keys", {"ws": "$response.body#/id"}),
        "GetUsage": ("get_workspaces_ws_usage", {"ws": "$response.body#/id"}),
        "GetAudit": ("get_workspaces_ws_audit", {"ws": "$response.body#/id"}),
    },
    ("post_workspaces_ws_keys", "201"): {
        "GetKey": ("get_workspaces_ws_keys_key", {"ws": "$response.body#/key/workspace",
                                                  "key": "$response.body#/key/id"}),
        "UpdateKey": ("patch_workspaces_ws_keys_key", {"ws": "$response.body#/key/workspace",
                                                       "key": "$response.body#/key/id"}),
        "RevokeKey": ("post_workspaces_ws_keys_key_revoke",
                      {"ws": "$response.body#/key/workspace", "key": "$response.body#/key/id"}),
        "RotateKey": ("post_workspaces_ws_keys_key_rotate",
                      {"ws": "$response.body#/key/workspace", "key": "$response.body#/key/id"}),
    },
}


def with_operation_ids(paths: dict[str, Schema]) -> dict[str, Schema]:
    for path, item in paths.items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "patch", "delete", "options"):
                operation["operationId"] = operation_id(method, path)
    by_id = {op["operationId"]: op for item in paths.values() for m, op in item.items()
             if isinstance(op, dict) and "operationId" in op}
    for (source, status), links in LINKS.items():
        by_id[source]["responses"][status]["links"] = {
            name: {"operationId": target, "parameters": parameters}
            for name, (target, parameters) in links.items()}
    return paths


def with_bodies_required(paths: dict[str, Schema], components: dict[str, Schema]
                         ) -> dict[str, Schema]:
    """A request body is required when its schema requires a field or at least one (the API
    answers a call sent without one 400); otherwise it may be left out (``{}``)."""
    for item in paths.values():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            schema = operation["requestBody"]["content"][JSON]["schema"]
            if "$ref" in schema:
                schema = components[schema["$ref"].rsplit("/", 1)[-1]]
            operation["requestBody"]["required"] = bool(schema.get("required")) \
                or schema.get("minProperties", 0) > 0
    return paths


def document() -> Schema:
    components = schemas()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keygate", "version": __version__,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
            "description": (
                "keygate's own API: the admin listener (operator token) and the `/_keygate/` "
                "endpoints of the proxy listener (an API key). Every error body is "
                '`{"error": {"code", "message", "request_id"}}`; every answer carries '
                "`X-Request-Id`. Unknown JSON fields and unknown query parameters are 400 "
                "`bad_request`; a method a path does not take is 405 `method_not_allowed` "
                "with `Allow`."),
        },
        "servers": [{"url": "/", "description": "the admin listener (default "
                                                "127.0.0.1:8081)"}],
        "security": [{"operatorToken": []}],
        "paths": with_bodies_required(with_operation_ids(workspace_admin_access(
            {**with_unmet_expectation(admin_paths()), **proxy_paths()})), components),
        "components": {
            "schemas": components,
            "headers": {"X-Request-Id": {
                "description": "the client's if it is a sane token, else generated",
                "required": True, "schema": {"type": "string", "minLength": 1}}},
            "securitySchemes": {
                "workspaceAdminKey": {"type": "http", "scheme": "bearer",
                                      "description": "an API key holding `keys:admin`: its own "
                                                     "workspace's key routes only, never wider "
                                                     "than the key itself (the console uses "
                                                     "it)"},
                "operatorToken": {"type": "http", "scheme": "bearer",
                                  "description": "the operator token, from the variable "
                                                 "`admin.token_env` names"},
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "a keygate API key. It may instead come in a header "
                                          "that `keys.headers` names (default `X-Api-Key`); "
                                          "two different credentials are 400 "
                                          "`ambiguous_key`."},
            },
        },
    }


def with_unmet_expectation(paths: dict[str, Schema]) -> dict[str, Schema]:
    """Every operation of the admin listener answers an ``Expect`` other than
    ``100-continue`` 417 ``bad_request``, before it looks at the caller (a probe's too)."""
    for item in paths.values():
        for method, operation in item.items():
            if method != "parameters":
                operation["responses"]["417"] = copy.deepcopy(EXPECTATION_417[1])
    return paths


def workspace_admin_access(paths: dict[str, Schema]) -> dict[str, Schema]:
    """The admin API also answers a workspace's ``keys:admin`` key (the console signs people in
    with one) on the routes ``api.WORKSPACE_ADMIN_ROUTES`` lists, confined to that
    workspace (another reads as 404 ``not_found``) and to the key's own scopes (wider: 403);
    every other authenticated admin route answers such a key 403 ``insufficient_scope``. The
    key is checked by the proxy pipeline's own steps: from outside its ``allowed_ips`` it is
    403 ``ip_not_allowed``, and a full verification queue is 503 ``overloaded``.

    429 ``too_many_failures`` (with ``Retry-After``) is answered on every authenticated route,
    to the operator token as to a key: a client past ``keys.failures.per_ip`` wrong operator
    tokens in the window is refused before its token is compared, the right one too
    (gateway/admin/throttle.py); a key meets the proxy pipeline's own throttle. On the routes it
    may call, a key's calls are also bounded as its ``/_keygate/`` calls are, in the same log
    (20 a second): 429 ``rate_limited`` over it."""
    key_errors = dict([err(403, "insufficient_scope", "ip_not_allowed"),
                       err(429, "too_many_failures", headers=RETRY_AFTER)])
    key_429 = err(429, "too_many_failures", "rate_limited", headers=RETRY_AFTER)
    busy = err(503, "store_unavailable", "overloaded", headers={"Retry-After": {
        **RETRY_AFTER["Retry-After"], "required": False,
        "description": "seconds (with `overloaded`)"}})
    for path, item in paths.items():
        if not path.startswith("/admin/v1/"):
            continue
        for method, operation in item.items():
            if method == "parameters" or operation.get("security") == []:
                continue
            operation["responses"].update(key_errors)
            if "503" in operation["responses"]:
                operation["responses"]["503"] = copy.deepcopy(busy[1])
            if (method.upper(), path) in WORKSPACE_ADMIN_ROUTES:
                operation["security"] = [{"operatorToken": []}, {"workspaceAdminKey": []}]
                operation["responses"]["429"] = copy.deepcopy(key_429[1])
    return paths
