"""The OpenAPI description of the proxy listener's ``/_keygate/`` endpoints: the calling key's
usage, verify-only, and self-service (the admin API's key rows, acting as a ``keys:admin``
key)."""

from __future__ import annotations

from .openapi_schemas import (DAYS, JSON, KEY_ID, REQUEST_ID_HEADER, RETRY_AFTER, Schema, err,
                              header, list_params, obj, ok, op, param, ref)

# --- the proxy listener's /_keygate/ endpoints ---------------------------------------------------

PROXY_SERVER = [{"url": "{proxy}", "description": "the proxy listener",
                 "variables": {"proxy": {"default": "http://127.0.0.1:8080"}}}]
API_KEY_SECURITY = [{"apiKey": []}]
INVALID_TOKEN = {"WWW-Authenticate": header('`Bearer realm="keygate"`, with '
                                            '`error="invalid_token"` except for `missing_key`')}


PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Origin": header("the request's `Origin` (one of "
                                          "`cors.allow_origins`; never `*`)"),
    "Access-Control-Allow-Methods": header("the methods this path takes, the requested one "
                                           "first"),
    "Access-Control-Allow-Headers": header("`Authorization`, the `keys.headers`, "
                                           "`Content-Type`, `X-Request-Id` and "
                                           "`cors.allow_headers`"),
    "Access-Control-Max-Age": header("`cors.max_age`, in seconds",
                                     {"type": "string", "pattern": "^[0-9]+$"}),
    "Access-Control-Allow-Credentials": {"description": "with `cors.allow_credentials` only",
                                         "required": False,
                                         "schema": {"type": "string", "const": "true"}},
    "Vary": header("`Origin`"),
}


def preflight(*errors: tuple[str, Schema], after_key: bool) -> Schema:
    """``OPTIONS`` on a ``/_keygate/`` endpoint: a browser's CORS preflight keygate answers
    (gateway/cors.py) when the config has a ``cors`` section; otherwise a method the path does
    not take. The document is the same whatever the config, so it gives both."""
    rest = ("once the calling key is checked (its errors come first)" if after_key
            else "before any key is read")
    return {
        "summary": "A browser's CORS preflight: answered by keygate only when the config has "
                   "a `cors` section",
        "description": "With a `cors` section, an `OPTIONS` carrying one `Origin` that "
                       "`cors.allow_origins` allows, an `Access-Control-Request-Method` this "
                       "path takes and no body is answered by keygate itself: 204, no body, "
                       "no key asked for, nothing counted. This document is static (the same "
                       "whatever the config), so it lists that 204 even where no `cors` "
                       "section is configured, and there it is never answered. Any other "
                       "`OPTIONS` here, and every one without `cors`, is a method the path "
                       f"does not take: 405 `method_not_allowed` with `Allow`, {rest}. With "
                       "`cors`, every answer to an allowed `Origin` also carries "
                       "`Access-Control-Allow-Origin` and `Vary: Origin`.",
        "security": [], "tags": ["cors"],
        "parameters": [
            param("Origin", "header", {"type": "string", "examples": ["https://app.example"]},
                  "the page's origin, as the browser sends it", required=True),
            param("Access-Control-Request-Method", "header",
                  {"type": "string", "examples": ["GET", "POST"]},
                  "the method the page's request will use", required=True),
            param("Access-Control-Request-Headers", "header", {"type": "string"},
                  "the headers it will send (not checked: the answer lists the allowed ones)",
                  required=False)],
        "responses": {
            "204": {"description": "the preflight's answer (only with `cors` configured)",
                    "headers": {**REQUEST_ID_HEADER, **PREFLIGHT_HEADERS}},
            **dict(errors),
            "405": err(405, "method_not_allowed", headers={"Allow": header(
                "the methods this path takes")})[1]}}


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
        errors.append(err(408, "request_timeout"))  # a body that stalls (then closed)
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

    def options(key: bool = True) -> Schema:
        # as any call of the key endpoints until its method is looked at
        errors = proxy_errors(scope=True, body=False)
        errors.append(err(404, "not_found", "no_route"))
        operation = preflight(*errors, after_key=True)
        if key:  # a preflight reads no key: it is answered for any segment there
            operation["parameters"].insert(0, param(
                "key", "path", {"type": "string", "minLength": 1},
                "a key id; a preflight is answered whatever the segment (the request it "
                "clears is then answered 404 if there is no such key)"))
        return operation

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
        errors["501"] = err(501, "not_implemented")[1]  # an original CONNECT
        return {"summary": summary, "security": API_KEY_SECURITY, "tags": ["verify"],
                "parameters": verify_params,
                "description": "Any method is taken; the original request comes from the "
                               "X-Forwarded-* headers, else X-Original-*, else this request's "
                               "own method and the path after /_keygate/v1/verify. A URI "
                               "header without its method header, or a bare call naming no "
                               "original request, is a 400 bad_request.",
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
            "options": preflight(err(400, "bad_request", "bad_path", "key_in_url"),
                                 after_key=False),
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
                        err(409, "conflict", "key_limit_reached"), body=ref("KeyCreate")),
            "options": options(key=False),
        },
        base + "/{key}": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "get": own("Read a key", ok(200, ref("Key"), "the key")),
            "patch": own("Update a key within the calling key's own scopes",
                         ok(200, ref("Key"), "the updated key"),
                         err(409, "conflict", "key_limit_reached"), body=ref("KeyPatch")),
            "delete": own("Delete a revoked or expired key of the workspace",
                          ok(200, ref("Key"), "the key as it was"), err(409, "conflict"),
                          body=obj({})),
            "options": options(),
        },
        base + "/{key}/usage/daily": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "get": own("A key's requests per UTC day, oldest first",
                       ok(200, ref("DailyUsage"), "one item per day"),
                       params=[param("days", "query", DAYS, "default 30")]),
            "options": options(),
        },
        base + "/{key}/revoke": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "post": own("Revoke a key", ok(200, ref("Key"), "the revoked key"), body=obj({})),
            "options": options(),
        },
        base + "/{key}/rotate": {
            "servers": PROXY_SERVER, "parameters": key_path,
            "post": own("Rotate a key within the calling key's own scopes",
                        ok(201, ref("NewKey"), "the new key and its token"),
                        err(409, "conflict", "key_limit_reached"), body=ref("KeyRotate")),
            "options": options(),
        },
    }

