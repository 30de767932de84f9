"""The pieces of keygate's OpenAPI document: the component schemas (``schemas()``) and the
small builders every operation is made of (``op``, ``ok``, ``err``, ``param``, ``header``)."""

from __future__ import annotations

import copy
from typing import Any

from .validate import (BLANK_CLASS, DAILY_DEFAULT, MAX_DESCRIPTION, MAX_NAME,
                       UNSAFE_TEXT_CLASS)

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
ROLE_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 63,  # validate.parse_role_name
                     "pattern": r"^[a-z0-9][a-z0-9-]*$"}
# A role name as stored and answered: a slug, or a name an earlier version took (a letter or
# digit, then letters, digits, '_', '.', '-'; at most 64) - still listed, used and deletable
STORED_ROLE_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 64,
                            "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"}
# 1 to 10^9 (models.MAX_RATE) requests, leading zeros allowed, as models.parse_rate_limit reads
RATE_LIMIT: Schema = {"type": "string",
                      "pattern": r"^\s*0*(?:[1-9][0-9]{0,8}|1000000000)\s*/\s*[sm]\s*$",
                      "description": "`N/s` or `N/m`."}
# a text field as validate.parse_text takes it: no control, separator or bidi character,
# and (a name) not blank
SAFE_TEXT = f"^[^{UNSAFE_TEXT_CLASS}]*$"
NONBLANK_TEXT = f"^[^{UNSAFE_TEXT_CLASS}]*[^{UNSAFE_TEXT_CLASS}{BLANK_CLASS}][^{UNSAFE_TEXT_CLASS}]*$"
COUNT_OR_NULL: Schema = {"type": ["integer", "null"], "minimum": 0, "maximum": 10**15}
NULLABLE_RATE: Schema = {"type": ["string", "null"], "pattern": RATE_LIMIT["pattern"]}
KEY_RATE = ("the key's own rate limit, `N/s` or `N/m`, as set; null: none of its own. In "
            "force it is held within its workspace's rate (`limits.rate_limit`: the plan's or "
            "the workspace's override), compared in both windows; when the two cross, both "
            "hold. The RateLimit headers show the rate in force.")
DAYS = {"type": "integer", "minimum": 1, "maximum": 90, "default": DAILY_DEFAULT}


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
        "prefix": {"type": "string",
                   "description": "the token up to and including the key id, e.g. "
                                  "kg_live_<id> (never a character of the secret)"},
        "created_at": TIMESTAMP, "expires_at": NULLABLE_TIMESTAMP,
        "last_used_at": NULLABLE_TIMESTAMP, "revoked_at": NULLABLE_TIMESTAMP,
        "rate_limit": {"type": ["string", "null"], "description": KEY_RATE},
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
                    "rate_limit": {**NULLABLE_RATE,
                                   "description": "each key's rate; a key's own "
                                                  "`rate_limit` is held within it"}}
    limits = obj(dict(limit_values), description="the limits in force (null: unlimited)")
    limits_patch = obj({}, dict(limit_values),
                       description="limits overriding the plan's for this workspace (null: "
                                   "unlimited); fields left out keep their override or the "
                                   "plan's; `limits: null` drops every override")
    limits_patch["type"] = ["object", "null"]
    controls = {
        "rate_limit": {**NULLABLE_RATE, "description": KEY_RATE},
        "monthly_requests": {**COUNT_OR_NULL,
                             "description": "the key's own monthly cap; null: none"},
        "enabled": {"type": "boolean"},
        "meta": {"type": "object", "description": "a JSON object of at most 4 KiB (compact "
                                                  "UTF-8 JSON), nested at most 32 deep"},
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
    name = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": NONBLANK_TEXT,
            "description": "one line of text, not blank: not only spaces and characters "
                           "that show as nothing. The pattern lists those of the Basic "
                           "Multilingual Plane; the API also counts the default-ignorable "
                           "ones beyond it (tag characters U+E0000-E0FFF, U+1BCA0-1BCA3, "
                           "U+1D173-1D17A) as nothing."}
    description = {"type": "string", "maxLength": MAX_DESCRIPTION, "pattern": SAFE_TEXT,
                   "description": "one line of text"}
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
        "Role": obj({"name": STORED_ROLE_NAME, "scopes": {"type": "array", "items": SCOPE},
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
                                                                 "but kept until a restart"}},
                            {"not_confirmed": {
                                "type": "array", "items": {"type": "string"}, "minItems": 1,
                                "description": "under `serve --workers N`, only when some "
                                               "worker had not re-read the file 10 s after "
                                               "the call (busy, wedged, stopped): those "
                                               "workers, as `worker I (pid P)`; they may "
                                               "still serve the old config"}}),
        "ConfigProblems": obj({"error": obj({
            "code": {"const": "bad_request"}, "message": {"type": "string"},
            "request_id": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "every problem, as file:line: field: what"}})}),
        "WorkerProblems": obj({"error": obj({
            "code": {"const": "conflict"}, "message": {"type": "string"},
            "request_id": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "what the workers that refused the file found, as "
                                        "worker 2 (pid 4242): file:line: field: what"}})}),
    }


def list_params() -> list[Schema]:
    """The key listing's query parameters."""
    return [param("status", "query", {"enum": ["active", "expired", "revoked"]}),
            param("unused_days", "query", {"type": "integer", "minimum": 0, "maximum": 36500},
                  "never used, or last used more than N days ago"),
            param("sort", "query", {"enum": ["created", "last_used", "name"],
                                    "default": "created"},
                  "oldest first; `last_used`: least recently used first, never used before all"),
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
TIMEOUT_408 = err(408, "request_timeout")   # a declared body that stalls (then closed)
# an ``Expect`` other than 100-continue: the admin listener answers it on every call, before
# the caller is authenticated (gateway/admin/middleware.py); the proxy listener ignores one
EXPECTATION_417 = err(417, "bad_request")
EXPECTATION_417[1]["description"] = "`bad_request`: an `Expect` other than `100-continue`"


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
        # required or not: openapi.with_bodies_required, from the schema
        operation["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    if security is not None:
        operation["security"] = security
    return operation

RETRY_AFTER = {"Retry-After": header("seconds", {"type": "string", "pattern": r"^[0-9]+$"})}
