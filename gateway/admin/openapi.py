"""The OpenAPI 3.1 document of keygate's own HTTP API, built from small pieces.

Served at ``GET /admin/v1/openapi.json`` (no auth). It describes every endpoint of the admin
listener and the ``/_keygate/`` endpoints of the proxy listener, with every body, status code
and error code they answer. ``tests/test_openapi.py`` keeps it honest: every route the admin app
registers must be described here, and schemathesis runs against a live gateway on real Redis and
fails on any answer the document does not allow.

Adding an endpoint (see also docs/operations.md "Extending the API"):

1. If it returns or takes a new object, add its schema to ``schemas()``.
2. Add one ``op(...)`` call to ``admin_paths()`` (or ``proxy_paths()``): the success status and
   schema, the request body schema if any, the query parameters, and the error statuses with
   the error codes each can carry (``err(404, "not_found")``).
3. Run ``pytest tests/test_openapi.py``.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

from .. import __version__
from .api import WORKSPACE_ADMIN_ROUTES

JSON = "application/json"
Schema = dict[str, Any]

TIMESTAMP: Schema = {"type": "string", "format": "date-time",
                     "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$",
                     "description": "RFC 3339, UTC (`...Z`)."}
NULLABLE_TIMESTAMP: Schema = {"type": ["string", "null"], "format": "date-time",
                              "pattern": TIMESTAMP["pattern"]}
WORKSPACE_ID: Schema = {"type": "string", "pattern": r"^[a-z0-9][a-z0-9-]{0,62}$"}
KEY_ID: Schema = {"type": "string", "pattern": r"^[0-9A-Za-z]{12}$"}
SCOPE: Schema = {"type": "string", "maxLength": 128,
                 "pattern": r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*$"}
ROLE_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 64,
                     "pattern": r"^[A-Za-z0-9_.-]+$"}
RATE_LIMIT: Schema = {"type": "string", "pattern": r"^\s*[0-9]+\s*/\s*[sm]\s*$",
                      "description": "`N/s` or `N/m`."}
SINGLE_LINE = r"^[^\u0000-\u001f\u007f-\u009f]*$"
COUNT_OR_NULL: Schema = {"type": ["integer", "null"], "minimum": 0, "maximum": 10**15}
NULLABLE_RATE: Schema = {"type": ["string", "null"], "pattern": RATE_LIMIT["pattern"]}
DAYS = {"type": "integer", "minimum": 1, "maximum": 90}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None,
        **extra: Any) -> Schema:
    """A closed JSON object: exactly these properties, the first group required."""
    return {"type": "object", "properties": {**required, **(optional or {})},
            "required": list(required), "additionalProperties": False, **extra}


def items_of(schema: Schema) -> Schema:
    return obj({"items": {"type": "array", "items": schema}})


def schemas() -> dict[str, Schema]:
    key = obj({
        "id": KEY_ID, "workspace": WORKSPACE_ID, "name": {"type": "string"},
        "description": {"type": "string"}, "environment": {"type": "string"},
        "role": {"type": ["string", "null"], "description": "null when bound to scopes"},
        "scopes": {"type": "array", "items": {"type": "string"},
                   "description": "effective scopes (the role's as they are now)"},
        "prefix": {"type": "string", "description": "the token up to the key id"},
        "created_at": TIMESTAMP, "expires_at": NULLABLE_TIMESTAMP,
        "last_used_at": NULLABLE_TIMESTAMP, "revoked_at": NULLABLE_TIMESTAMP,
        "rate_limit": {"type": ["string", "null"]},
        "status": {"enum": ["active", "expired", "revoked"]},
        "monthly_requests": {"type": ["integer", "null"], "minimum": 0,
                             "description": "the key's own monthly cap; null: none"},
        "used_this_month": {"type": "integer", "minimum": 0},
        "enabled": {"type": "boolean", "description": "false: refused with `disabled_key`"},
        "meta": {"type": "object", "description": "the key's metadata (never forwarded)"},
        "allowed_ips": {"type": ["array", "null"], "items": {"type": "string"},
                        "description": "CIDRs the key may be used from; null: any"},
    })
    limit_values = {"monthly_requests": COUNT_OR_NULL, "max_keys": COUNT_OR_NULL,
                    "rate_limit": NULLABLE_RATE}
    limits = obj(dict(limit_values), description="the limits in force (null: unlimited)")
    limits_patch = obj({}, dict(limit_values),
                       description="limits overriding the plan's for this workspace (null: "
                                   "unlimited); fields left out keep their override or the "
                                   "plan's; `limits: null` drops every override")
    limits_patch["type"] = ["object", "null"]
    controls = {
        "rate_limit": NULLABLE_RATE,
        "monthly_requests": {**COUNT_OR_NULL,
                             "description": "the key's own monthly cap; null: none"},
        "enabled": {"type": "boolean"},
        "meta": {"type": "object", "description": "a JSON object of at most 4 KiB"},
        "allowed_ips": {"type": ["array", "null"], "items": {"type": "string"},
                        "minItems": 1, "maxItems": 100,
                        "description": "CIDRs (a bare address is a /32 or /128); null: any"},
    }
    usage = obj({
        "workspace": WORKSPACE_ID, "plan": {"type": "string"},
        "period": {"type": "string", "pattern": r"^\d{4}-\d{2}$"},
        "used": {"type": "integer", "minimum": 0},
        "limit": {"type": ["integer", "null"], "minimum": 0},
        "remaining": {"type": ["integer", "null"], "minimum": 0},
        "resets_at": TIMESTAMP,
        "limits": ref("Limits"),
    })
    self_usage = copy.deepcopy(usage)
    self_usage["properties"]["key"] = ref("Key")
    self_usage["required"].append("key")
    name = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": SINGLE_LINE}
    description = {"type": "string", "maxLength": 2000}
    seconds = {"type": "integer", "maximum": 100 * 365 * 86400}
    return {
        "Error": obj({"error": obj({
            "code": {"type": "string"}, "message": {"type": "string"},
            "request_id": {"type": "string"}})}),
        "Status": obj({"status": {"const": "ok"}}),
        "Workspace": obj({"id": WORKSPACE_ID, "name": {"type": "string"},
                          "plan": {"type": "string"}, "created_at": TIMESTAMP,
                          "limits": ref("Limits"),
                          "custom_limits": obj({}, dict(limit_values))}),
        "Limits": limits,
        "WorkspaceList": items_of(ref("Workspace")),
        "WorkspaceCreate": obj({"name": name}, {"id": WORKSPACE_ID, "plan": {"type": "string"}}),
        "WorkspacePatch": obj({}, {"name": name, "plan": {"type": "string"},
                                   "limits": limits_patch}, minProperties=1),
        "Key": key,
        "KeyList": obj({"items": {"type": "array", "items": ref("Key")}},
                       {"next_cursor": {"type": "string",
                                        "description": "present when there are more keys: "
                                                       "pass it as `cursor`"}}),
        "KeyCreate": obj({"name": name}, {
            "description": description, "role": ROLE_NAME,
            "scopes": {"type": "array", "items": SCOPE, "maxItems": 100},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "expires_in": {**seconds, "minimum": 1}, "environment": {"type": "string"},
            **controls,
        }, description="Give `role` or `scopes`, not both; `expires_at` or `expires_in`, "
                       "not both."),
        "KeyPatch": obj({}, {
            "name": name, "description": description, "role": ROLE_NAME,
            "scopes": {"type": "array", "items": SCOPE, "maxItems": 100},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            **controls,
        }, minProperties=1),
        "KeyRotate": obj({}, {"grace_seconds": {**seconds, "minimum": 0}}),
        "NewKey": obj({"key": ref("Key"),
                       "token": {"type": "string",
                                 "description": "shown once; never retrievable again"}}),
        "Usage": usage,
        "SelfUsage": self_usage,
        "Role": obj({"name": ROLE_NAME, "scopes": {"type": "array", "items": SCOPE},
                     "source": {"enum": ["workspace", "config"]}}),
        "RoleList": items_of(ref("Role")),
        "RolePut": obj({"scopes": {"type": "array", "items": SCOPE, "maxItems": 100}}),
        "AuditEvent": obj({"at": TIMESTAMP,
                           "actor": {"type": "string",
                                     "description": "`operator` or the acting key's id"},
                           "action": {"type": "string"}, "target": {"type": "string"},
                           "details": {"type": "object"}}),
        "AuditList": items_of(ref("AuditEvent")),
        "DailyUsage": items_of(obj({
            "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
            "requests": {"type": "integer", "minimum": 0}})),
        "ScopeList": items_of(obj({"name": SCOPE,
                                   "description": {"type": ["string", "null"]}})),
        "ReloadResult": obj({"result": {"const": "ok"},
                             "config": {"type": "string", "description": "the file re-read"},
                             "reloaded_at": TIMESTAMP,
                             "restart_required": {"type": "array", "items": {"type": "string"},
                                                  "description": "settings changed in the file "
                                                                 "but kept until a restart"}}),
        "ConfigProblems": obj({"error": obj({
            "code": {"const": "bad_request"}, "message": {"type": "string"},
            "request_id": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "every problem, as file:line: field: what"}})}),
    }


def list_params() -> list[Schema]:
    """The key listing's query parameters."""
    return [param("status", "query", {"enum": ["active", "expired", "revoked"]}),
            param("unused_days", "query", {"type": "integer", "minimum": 0, "maximum": 36500},
                  "never used, or last used more than N days ago"),
            param("sort", "query", {"enum": ["created", "last_used", "name"]}),
            param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
            param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page")]


# --- responses -----------------------------------------------------------------------------------

REQUEST_ID_HEADER = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}


def ok(status: int, schema: Schema, description: str) -> tuple[str, Schema]:
    return str(status), {"description": description, "headers": REQUEST_ID_HEADER,
                         "content": {JSON: {"schema": schema}}}


def err(status: int, *codes: str, headers: dict[str, Schema] | None = None) -> tuple[str, Schema]:
    """An error answer: the SPEC error body, its ``code`` one of ``codes``."""
    schema = copy.deepcopy(ref("Error"))
    body = {"allOf": [schema, {"properties": {"error": {"properties": {
        "code": {"enum": list(codes)}}}}}]}
    all_headers = {**REQUEST_ID_HEADER, **(headers or {})}
    return str(status), {"description": ", ".join(f"`{c}`" for c in codes),
                         "headers": all_headers, "content": {JSON: {"schema": body}}}


def header(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "required": True,
            "schema": schema or {"type": "string"}}


ADMIN_401 = err(401, "unauthorized", headers={
    "WWW-Authenticate": header('`Bearer realm="keygate-admin"`')})
STORE_503 = err(503, "store_unavailable")
BAD_400 = err(400, "bad_request")
NOT_FOUND_404 = err(404, "not_found")
TOO_LARGE_413 = err(413, "body_too_large")


def param(name: str, where: str, schema: Schema, description: str = "",
          required: bool | None = None) -> Schema:
    return {"name": name, "in": where, "required": where == "path" if required is None
            else required, "schema": schema, **({"description": description} if description
                                               else {})}


WS = param("ws", "path", WORKSPACE_ID, "workspace id")
KEY = param("key", "path", KEY_ID, "key id (the public 12 characters of the token)")


def op(summary: str, success: tuple[str, Schema], *errors: tuple[str, Schema],
       body: Schema | None = None, params: list[Schema] | None = None,
       security: list | None = None, tags: list[str] | None = None) -> Schema:
    operation: Schema = {"summary": summary, "responses": dict([success, *errors])}
    if tags:
        operation["tags"] = tags
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    if security is not None:
        operation["security"] = security
    return operation


# --- the admin listener ----------------------------------------------------------------------

def admin_paths() -> dict[str, Schema]:
    v1 = "/admin/v1/workspaces"
    common = (BAD_400, ADMIN_401, STORE_503)          # unknown query parameter, auth, store
    with_body = (BAD_400, ADMIN_401, TOO_LARGE_413, STORE_503)
    open_ = []                                        # no authentication
    return {
        "/healthz": {"get": op("The process is up", ok(200, ref("Status"), "up"),
                               security=open_, tags=["probes"])},
        "/readyz": {"get": op("The store is reachable", ok(200, ref("Status"), "ready"),
                              err(503, "store_unavailable"), security=open_, tags=["probes"])},
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
                       ok(200, ref("ReloadResult"), "applied"), ADMIN_401, TOO_LARGE_413,
                       ("400", {"description": "`bad_request`: a body was sent, or the file has "
                                              "problems (listed; nothing was changed)",
                                "headers": REQUEST_ID_HEADER,
                                "content": {JSON: {"schema": {"anyOf": [
                                    ref("ConfigProblems"), err(400, "bad_request")[1]["content"]
                                    [JSON]["schema"]]}}}}),
                       err(409, "conflict"), tags=["config"]),
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
                       NOT_FOUND_404, err(409, "key_limit_reached"), body=ref("KeyCreate"),
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
                         err(409, "conflict"), tags=["keys"]),
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
            "parameters": [WS, param("name", "path", ROLE_NAME, "role name")],
            "put": op("Create or replace a workspace role",
                      ok(200, ref("Role"), "the role"), *with_body, NOT_FOUND_404,
                      body=ref("RolePut"), tags=["roles"]),
            "delete": op("Delete a workspace role (idempotent)",
                         ok(200, ref("Role"), "the role as it was"), *common, NOT_FOUND_404,
                         tags=["roles"]),
        },
        v1 + "/{ws}/audit": {
            "parameters": [WS],
            "get": op("Key and role lifecycle events, newest first",
                      ok(200, ref("AuditList"), "the events"), *common, NOT_FOUND_404,
                      params=[param("limit", "query",
                                    {"type": "integer", "minimum": 1, "maximum": 1000})],
                      tags=["audit"]),
        },
    }


# --- the proxy listener's /_keygate/ endpoints ---------------------------------------------------

PROXY_SERVER = [{"url": "{proxy}", "description": "the proxy listener",
                 "variables": {"proxy": {"default": "http://127.0.0.1:8080"}}}]
API_KEY_SECURITY = [{"apiKey": []}]
INVALID_TOKEN = {"WWW-Authenticate": header('`Bearer realm="keygate"`, with '
                                            '`error="invalid_token"` except for `missing_key`')}
RETRY_AFTER = {"Retry-After": header("seconds", {"type": "string", "pattern": r"^[0-9]+$"})}


def proxy_errors(*, scope: bool, body: bool) -> list[tuple[str, Schema]]:
    """What any ``/_keygate/`` call can answer before its own work starts."""
    errors = [
        err(400, "bad_request", "bad_path", "key_in_url", "ambiguous_key"),
        err(401, "missing_key", "malformed_key", "invalid_key", "expired_key", "revoked_key",
            "disabled_key", headers=INVALID_TOKEN),
        err(429, "too_many_failures", "rate_limited", "quota_exceeded", "key_quota_exceeded",
            headers=RETRY_AFTER),
        err(503, "store_unavailable", "overloaded", headers=RETRY_AFTER),
    ]
    if scope:
        errors.append(err(403, "insufficient_scope", "ip_not_allowed"))
    else:
        errors.append(err(403, "ip_not_allowed"))
    if body:
        errors.append(err(413, "body_too_large"))
    return errors


def proxy_paths() -> dict[str, Schema]:
    base = "/_keygate/v1/keys"

    def own(summary: str, success: tuple[str, Schema], *extra: tuple[str, Schema],
            body: Schema | None = None, params: list[Schema] | None = None) -> Schema:
        # a key with keys:admin, confined to its own workspace and scopes; another
        # workspace's key reads as 404
        errors = proxy_errors(scope=True, body=body is not None)
        errors.append(err(404, "not_found", "no_route"))
        merged = dict(errors)
        for status, response in extra:
            if status in merged:  # widen the code list of an error already there
                codes = (merged[status]["content"][JSON]["schema"]["allOf"][1]["properties"]
                         ["error"]["properties"]["code"]["enum"])
                more = (response["content"][JSON]["schema"]["allOf"][1]["properties"]["error"]
                        ["properties"]["code"]["enum"])
                codes.extend(c for c in more if c not in codes)
            else:
                merged[status] = response
        return op(summary, success, *merged.items(), body=body, params=params,
                  security=API_KEY_SECURITY, tags=["self-service"])

    key_path = [param("key", "path", KEY_ID, "key id")]
    verify_headers = {
        "X-Forwarded-Method": "the original method (Traefik forwardAuth, nginx)",
        "X-Forwarded-Uri": "the original path and query",
        "X-Original-Method": "the original method (nginx auth_request convention)",
        "X-Original-URI": "the original path and query",
    }
    verify_params = [param(name, "header", {"type": "string"}, text, required=False)
                     for name, text in verify_headers.items()]

    def verify(summary: str) -> Schema:
        errors = dict(proxy_errors(scope=True, body=False))
        errors["404"] = err(404, "no_route")[1]
        return {"summary": summary, "security": API_KEY_SECURITY, "tags": ["verify"],
                "parameters": verify_params,
                "description": "Any method is taken; the original request comes from the "
                               "X-Forwarded-* headers, else X-Original-*, else this request's "
                               "own method and the path after /_keygate/v1/verify.",
                "responses": {"200": {"description": "allowed: the identity and RateLimit "
                                                     "fields as headers, no body",
                                      "headers": REQUEST_ID_HEADER},
                              **errors}}
    return {
        "/_keygate/v1/usage": {
            "servers": PROXY_SERVER,
            "get": op("The calling key's workspace usage and the key itself (not counted)",
                      ok(200, ref("SelfUsage"), "usage plus `key`"),
                      *proxy_errors(scope=False, body=False), security=API_KEY_SECURITY,
                      tags=["self-service"]),
        },
        "/_keygate/v1/verify": {
            "servers": PROXY_SERVER,
            "get": verify("Verify-only: the whole pipeline on the original request, nothing "
                          "forwarded (auth_request, forwardAuth, ext_authz)"),
        },
        "/_keygate/v1/verify/{original}": {
            "servers": PROXY_SERVER,
            "parameters": [param("original", "path", {"type": "string"},
                                 "the original path (Envoy ext_authz path_prefix)")],
            "get": verify("Verify-only, the original path after the prefix"),
        },
        base: {
            "servers": PROXY_SERVER,
            "get": own("List the workspace's keys", ok(200, ref("KeyList"), "the keys"),
                       params=list_params()),
            "post": own("Create a key within the calling key's own scopes",
                        ok(201, ref("NewKey"), "the key and its token"),
                        err(409, "key_limit_reached"), body=ref("KeyCreate")),
        },
        base + "/{key}": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "get": own("Read a key", ok(200, ref("Key"), "the key")),
            "patch": own("Update a key within the calling key's own scopes",
                         ok(200, ref("Key"), "the updated key"),
                         err(409, "conflict", "key_limit_reached"), body=ref("KeyPatch")),
            "delete": own("Delete a revoked or expired key of the workspace",
                          ok(200, ref("Key"), "the key as it was"), err(409, "conflict")),
        },
        base + "/{key}/usage/daily": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "get": own("A key's requests per UTC day, oldest first",
                       ok(200, ref("DailyUsage"), "one item per day"),
                       params=[param("days", "query", DAYS, "default 30")]),
        },
        base + "/{key}/revoke": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "post": own("Revoke a key", ok(200, ref("Key"), "the revoked key"), body=obj({})),
        },
        base + "/{key}/rotate": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "post": own("Rotate a key within the calling key's own scopes",
                        ok(201, ref("NewKey"), "the new key and its token"),
                        err(409, "conflict", "key_limit_reached"), body=ref("KeyRotate")),
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
            if method in ("get", "put", "post", "patch", "delete"):
                operation["operationId"] = operation_id(method, path)
    by_id = {op["operationId"]: op for item in paths.values() for m, op in item.items()
             if isinstance(op, dict) and "operationId" in op}
    for (source, status), links in LINKS.items():
        by_id[source]["responses"][status]["links"] = {
            name: {"operationId": target, "parameters": parameters}
            for name, (target, parameters) in links.items()}
    return paths


def document() -> Schema:
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
        "paths": with_operation_ids(workspace_admin_access({**admin_paths(), **proxy_paths()})),
        "components": {
            "schemas": schemas(),
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


def workspace_admin_access(paths: dict[str, Schema]) -> dict[str, Schema]:
    """The admin API also answers a workspace's ``keys:admin`` key (the console signs people in
    with one) on the routes ``api.WORKSPACE_ADMIN_ROUTES`` lists, confined to that
    workspace (another reads as 404 ``not_found``) and to the key's own scopes (wider: 403);
    every other authenticated admin route answers such a key 403 ``insufficient_scope``."""
    key_errors = dict([err(403, "insufficient_scope"),
                       err(429, "too_many_failures", headers=RETRY_AFTER)])
    for path, item in paths.items():
        if not path.startswith("/admin/v1/"):
            continue
        for method, operation in item.items():
            if method == "parameters" or operation.get("security") == []:
                continue
            operation["responses"].update(key_errors)
            if (method.upper(), path) in WORKSPACE_ADMIN_ROUTES:
                operation["security"] = [{"operatorToken": []}, {"workspaceAdminKey": []}]
    return paths
