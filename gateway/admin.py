"""The admin API (admin listener) and workspace self-service (``keys:admin`` keys, proxy
listener ``/_keygate/v1/keys...``), and the web console's static files (``/console/``).

The admin API answers the operator token everywhere, and a ``keys:admin`` key of a workspace on
that workspace's key routes (:data:`WORKSPACE_ADMIN_ROUTES`), with exactly the self-service
rules below: it is the one API the console uses for both kinds of people. Every other admin
route stays operator-only, including routes added later that are not listed.

Both share one set of key operations (:class:`KeyOps`); they differ in who acts (``operator``
or the acting key's id, which the audit records), which workspace they may touch (self-service:
only the acting key's own — anything else reads as 404, never 403, so existence is not
disclosed) and how wide a key they may mint (self-service: never beyond the acting key's own
effective scopes, nor above the plan's rate limit).

Input is validated here, field by field; every refusal names the field. The store trusts what
it is given.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from .config import NAME_RE, SCOPE_RE, Config, parse_rate_limit
from .errors import (shown, BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound,
                     PayloadTooLarge, ServiceUnavailable, StoreError, Unauthorized)
from .models import KeyRecord, Principal, parse_rfc3339, rfc3339
from .store import (OPERATOR, STATUSES, UNSET, WORKSPACE_ID_RE, Store, effective_scopes_of)
from .tokens import KEY_ID_RE, adoptable_request_id

log = logging.getLogger("keygate.admin")

MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_SCOPES = 100
MAX_SCOPE_LEN = 128
MAX_ROLE_LEN = 64
MAX_SECONDS = 100 * 365 * 86400   # expires_in / grace_seconds ceiling (a century)
AUDIT_DEFAULT, AUDIT_MAX = 100, 1000
_ADMIN_REALM = 'Bearer realm="keygate-admin"'


# --- input validation (pure) -------------------------------------------------------------------

def parse_body(raw: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object whose fields are all in ``allowed`` (an empty body is ``{}``)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    unknown = [f for f in data if f not in allowed]
    if unknown:
        raise BadRequest(f"Unknown field '{shown(unknown[0])}'; this endpoint accepts: "
                         f"{', '.join(allowed)}.")
    return data


# C0 and C1 controls, DEL, line/paragraph separators, bidi marks, embeddings, overrides, isolates
_UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _string(data: Mapping[str, Any], field: str, max_len: int, *, required: bool = False,
            nonempty: bool = True) -> str | None:
    if field not in data:
        if required:
            raise BadRequest(f"The field '{field}' is required.")
        return None
    value = data[field]
    if not isinstance(value, str):
        raise BadRequest(f"The field '{field}' must be a string.")
    if nonempty and not value.strip():
        raise BadRequest(f"The field '{field}' must not be empty.")
    if len(value) > max_len:
        raise BadRequest(f"The field '{field}' is too long ({len(value)} characters; "
                         f"at most {max_len}).")
    if _UNSAFE_TEXT.search(value):
        # C1 controls too (U+009B is a terminal CSI), and the bidi overrides that make a
        # listing read other than it is: text fields reach `keygate keys list` and the console
        raise BadRequest(f"The field '{field}' must not contain control characters "
                         "(newlines, tabs, escapes, bidirectional overrides, ...).")
    try:  # JSON can carry lone surrogates ("\ud800"), which no store can hold as UTF-8
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"The field '{field}' is not valid Unicode text (it holds a lone "
                         "surrogate).") from None
    return value


def _integer(data: Mapping[str, Any], field: str, minimum: int) -> int | None:
    if field not in data:
        return None
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The field '{field}' must be an integer number of seconds.")
    if not minimum <= value <= MAX_SECONDS:
        raise BadRequest(f"The field '{field}' must be between {minimum} and {MAX_SECONDS}.")
    return value


def parse_scopes(value: Any, field: str = "scopes") -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"The field '{field}' must be a list of scope strings.")
    if len(value) > MAX_SCOPES:
        raise BadRequest(f"The field '{field}' holds more than {MAX_SCOPES} scopes.")
    scopes: list[str] = []
    for scope in value:
        if not isinstance(scope, str) or len(scope) > MAX_SCOPE_LEN \
                or not SCOPE_RE.fullmatch(scope):
            raise BadRequest(f"The field '{field}' holds a malformed scope {shown(scope) if isinstance(scope, str) else scope!r}; a scope "
                             "looks like 'people:read' (letters, digits, '_', '.', '-', "
                             "parts joined by ':').")
        if scope not in scopes:
            scopes.append(scope)
    return tuple(scopes)


def parse_role_name(value: Any, field: str = "role") -> str:
    if not isinstance(value, str) or len(value) > MAX_ROLE_LEN or not NAME_RE.fullmatch(value):
        raise BadRequest(f"The field '{field}' must be a role name (a letter or digit, then "
                         f"letters, digits, '_', '.', '-'; at most {MAX_ROLE_LEN} characters).")
    return value


def parse_expires_at(value: Any, now: float, *, nullable: bool) -> float | None:
    if value is None:
        if nullable:
            return None
        raise BadRequest("The field 'expires_at' must be an RFC 3339 timestamp.")
    if not isinstance(value, str):
        raise BadRequest("The field 'expires_at' must be an RFC 3339 timestamp such as "
                         "'2027-01-31T00:00:00Z'.")
    try:
        when = parse_rfc3339(value)
    except ValueError:
        raise BadRequest(f"The field 'expires_at' is not an RFC 3339 timestamp with a time "
                         f"zone (e.g. '2027-01-31T00:00:00Z'): {shown(value)!r}.") from None
    if when <= now:
        raise BadRequest(f"The field 'expires_at' is in the past ({rfc3339(when)}).")
    if when > now + MAX_SECONDS:
        raise BadRequest("The field 'expires_at' is more than a century away.")
    return when


def parse_rate(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(parse_rate_limit(value))
    except ValueError as exc:
        raise BadRequest(f"The field 'rate_limit' is invalid: {exc}.") from None


def _per_second(rate: str) -> float:
    limit = parse_rate_limit(rate)
    return limit.requests / limit.period_seconds


def check_query(query: Mapping[str, str], allowed: tuple[str, ...] = ()) -> None:
    """Refuse query parameters an endpoint does not take: a typo such as ``?state=active``
    must not silently answer as if no filter had been asked for."""
    unknown = [p for p in query if p not in allowed]
    if unknown:
        takes = f"it takes: {', '.join(allowed)}" if allowed else "it takes none"
        raise BadRequest(f"Unknown query parameter '{shown(unknown[0])}'; {takes}.")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json")


# --- key operations shared by the admin API and self-service ----------------------------------

CREATE_FIELDS = ("name", "description", "role", "scopes", "expires_at", "expires_in",
                 "environment", "rate_limit")
PATCH_FIELDS = ("name", "description", "role", "scopes", "expires_at")
ROTATE_FIELDS = ("grace_seconds",)


class KeyOps:
    """The key endpoints of one workspace, acting as ``actor``.

    ``limit_scopes`` is None for the operator; for a workspace key it holds that key's
    effective scopes, which bound every key it creates, re-binds or rotates.
    ``limit_expires_at`` is the acting workspace key's own expiry (None: it never expires): no
    key it creates, rotates or re-dates may outlive it, else a key given a day by the operator
    could make itself (or a copy) permanent. It also may not extend the life of a key that holds
    scopes it lacks itself.
    """

    def __init__(self, store: Store, config: Config, ws: str, actor: str = OPERATOR,
                 limit_scopes: frozenset[str] | None = None,
                 limit_expires_at: float | None = None) -> None:
        self.store, self.config, self.ws = store, config, ws
        self.actor, self.limit_scopes = actor, limit_scopes
        self.limit_expires_at = limit_expires_at

    def _within_lifetime(self, expires_at: float | None) -> None:
        if self.limit_scopes is None or self.limit_expires_at is None:
            return
        if expires_at is None or expires_at > self.limit_expires_at:
            raise Forbidden(f"The field 'expires_at' may not be later than the acting key's own "
                            f"expiry ({rfc3339(self.limit_expires_at)}): a key cannot create "
                            "or extend a key that outlives it.")

    async def key_json(self, key: KeyRecord,
                       roles: Mapping[str, tuple[str, ...]] | None = None) -> dict:
        if roles is None:
            roles = await self.store.workspace_roles(self.ws)
        return key.to_json(effective_scopes_of(key, roles, self.config.roles),
                           self.store.clock())

    def _key_id(self, key_id: str) -> str:
        if not KEY_ID_RE.fullmatch(key_id):
            raise NotFound(f"Workspace '{self.ws}' has no key '{shown(key_id, 12)}'.")
        return key_id

    async def _binding(self, data: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...]]:
        """(role, explicit scopes) from ``role`` / ``scopes``, checked against the limits."""
        if "role" in data and "scopes" in data:
            raise BadRequest("Give either 'role' or 'scopes', not both: a key is bound to a "
                             "role or to explicit scopes.")
        if "role" in data:
            role = parse_role_name(data["role"])
            granted = await self.store.resolve_role(self.ws, role)
            if granted is None:
                raise BadRequest(f"The field 'role' names an unknown role '{role}'; it is "
                                 f"neither a role of workspace '{self.ws}' nor a configured "
                                 "role.")
            self._within_limit(granted)
            return role, ()
        scopes = parse_scopes(data.get("scopes", []))
        self._within_limit(scopes)
        return None, scopes

    def _within_limit(self, scopes: tuple[str, ...], verb: str = "grant") -> None:
        if self.limit_scopes is None or "ALL" in self.limit_scopes:
            return
        wider = [s for s in scopes if s not in self.limit_scopes]
        if wider:
            raise Forbidden(f"This key cannot {verb} scopes it does not hold itself: "
                            f"{', '.join(wider)}.")

    async def list(self, query: Mapping[str, str]) -> web.Response:
        status = query.get("status")
        if status is not None and status not in STATUSES:
            raise BadRequest(f"The query parameter 'status' must be one of "
                             f"{', '.join(STATUSES)}.")
        keys = await self.store.list_keys(self.ws, status)
        roles = await self.store.workspace_roles(self.ws)
        return _json({"items": [await self.key_json(k, roles) for k in keys]})

    async def create(self, raw: bytes) -> web.Response:
        data = parse_body(raw, CREATE_FIELDS)
        now = self.store.clock()
        name = _string(data, "name", MAX_NAME, required=True)
        description = _string(data, "description", MAX_DESCRIPTION, nonempty=False) or ""
        environments = self.config.keys.environments
        environment = data.get("environment", environments[0])
        if environment not in environments:
            raise BadRequest(f"The field 'environment' must be one of "
                             f"{', '.join(environments)}.")
        if "expires_at" in data and "expires_in" in data:
            raise BadRequest("Give either 'expires_at' or 'expires_in', not both.")
        expires_at = None
        if "expires_at" in data:
            expires_at = parse_expires_at(data["expires_at"], now, nullable=True)
        elif (expires_in := _integer(data, "expires_in", 1)) is not None:
            expires_at = now + expires_in
        if self.limit_scopes is not None and self.limit_expires_at is not None \
                and expires_at is None:
            expires_at = self.limit_expires_at  # a new key inherits the acting key's expiry
        self._within_lifetime(expires_at)
        rate_limit = parse_rate(data.get("rate_limit"))
        if rate_limit is not None and self.limit_scopes is not None:
            await self._rate_within_plan(rate_limit)
        role, scopes = await self._binding(data)
        new = await self.store.create_key(
            self.ws, name=name, description=description, environment=environment, role=role,
            scopes=scopes, expires_at=expires_at, rate_limit=rate_limit, actor=self.actor)
        return _json({"key": await self.key_json(new.key), "token": new.token}, 201)

    async def _rate_within_plan(self, rate_limit: str) -> None:
        workspace = await self.store.require_workspace(self.ws)
        plan = self.config.plan_of(workspace.plan)
        if plan is None or plan.rate_limit is None:
            return
        if _per_second(rate_limit) > _per_second(str(plan.rate_limit)):
            raise Forbidden(f"The field 'rate_limit' may not exceed the plan's rate limit "
                            f"({plan.rate_limit}) for a key created by a workspace key.")

    async def read(self, key_id: str) -> web.Response:
        key = await self.store.require_key(self.ws, self._key_id(key_id))
        return _json(await self.key_json(key))

    async def patch(self, key_id: str, raw: bytes) -> web.Response:
        self._key_id(key_id)
        data = parse_body(raw, PATCH_FIELDS)
        if not data:
            raise BadRequest(f"Nothing to change; send one or more of: {', '.join(PATCH_FIELDS)}.")
        changes: dict[str, Any] = {}
        if "name" in data:
            changes["name"] = _string(data, "name", MAX_NAME)
        if "description" in data:
            changes["description"] = _string(data, "description", MAX_DESCRIPTION,
                                             nonempty=False)
        if "expires_at" in data:
            changes["expires_at"] = parse_expires_at(data["expires_at"], self.store.clock(),
                                                     nullable=True)
        if "role" in data or "scopes" in data:
            role, scopes = await self._binding(data)
            if role is not None:
                changes["role"] = role
            else:
                changes["scopes"] = scopes
        current = await self.store.require_key(self.ws, key_id)  # 404 before anything else
        if "expires_at" in changes and self.limit_scopes is not None:
            await self._may_redate(current, changes["expires_at"])
        key = await self.store.update_key(self.ws, key_id, actor=self.actor,
                                          **{f: changes.get(f, UNSET) for f in PATCH_FIELDS})
        return _json(await self.key_json(key))

    async def _may_redate(self, key: KeyRecord, expires_at: float | None) -> None:
        """Self-service: never past the acting key's own expiry; and a key holding scopes the
        actor lacks may be brought forward, not extended."""
        self._within_lifetime(expires_at)
        extends = key.expires_at is not None and (expires_at is None or expires_at > key.expires_at)
        if extends:
            self._within_limit(await self.store.effective_scopes(self.ws, key),
                               "extend the life of a key with")

    async def revoke(self, key_id: str, raw: bytes) -> web.Response:
        parse_body(raw, ())
        key = await self.store.revoke_key(self.ws, self._key_id(key_id), actor=self.actor)
        return _json(await self.key_json(key))

    async def rotate(self, key_id: str, raw: bytes) -> web.Response:
        data = parse_body(raw, ROTATE_FIELDS)
        grace = _integer(data, "grace_seconds", 0) or 0
        key = await self.store.require_key(self.ws, self._key_id(key_id))
        if self.limit_scopes is not None:  # a rotation hands out a token with the key's scopes
            self._within_limit(await self.store.effective_scopes(self.ws, key), "rotate a key with")
        latest = self.limit_expires_at if self.limit_scopes is not None else None
        _old, new = await self.store.rotate_key(self.ws, key_id, grace_seconds=grace,
                                                actor=self.actor, max_expires_at=latest,
                                                expect_rev=None if self.limit_scopes is None
                                                else key.rev)  # the rev whose scopes we checked
        # SPEC: 201 {"key", "token"} -- exactly those two; the old key is read with GET.
        return _json({"key": await self.key_json(new.key), "token": new.token}, 201)


# --- the admin app -----------------------------------------------------------------------------

def request_id_of(request: web.BaseRequest) -> str:
    rid = request.headers.get("X-Request-Id")
    if adoptable_request_id(rid):
        return rid
    return uuid.uuid4().hex


def check_operator(request: web.BaseRequest, config: Config, expected: str) -> None:
    """The operator token (read from ``config.admin.token_env`` when the app is made), compared
    in constant time. With the variable unset or empty every call is refused: the admin API
    never runs open."""
    if not expected.strip():
        raise Unauthorized(f"The admin API is disabled: the environment variable "
                           f"{config.admin.token_env} holding the operator token is not set "
                           "on the gateway.", headers={"WWW-Authenticate": _ADMIN_REALM})
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("Send the operator token as 'Authorization: Bearer <token>'.",
                           headers={"WWW-Authenticate": _ADMIN_REALM})
    # aiohttp decodes header bytes with surrogateescape: encode the same way (a strict encode
    # of a non-UTF-8 header raised, which answered 500); both sides without surrounding blanks
    # (a token file written on Windows leaves a '\r' in the variable).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given_bytes, expected.strip().encode("utf-8", "surrogateescape")):
        raise Unauthorized("The operator token is not valid.",
                           headers={"WWW-Authenticate": _ADMIN_REALM + ', error="invalid_token"'})


@dataclass(frozen=True)
class Actor:
    """Who an admin API call acts as: the operator (``workspace`` None), or a ``keys:admin``
    key confined to its workspace, its effective scopes and its own expiry."""
    key_id: str
    workspace: str | None = None
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None

    @property
    def is_operator(self) -> bool:
        return self.workspace is None


OPERATOR_ACTOR = Actor(OPERATOR)
ACTOR = web.RequestKey("actor", Actor)

KeyAuthenticator = Callable[[str, web.BaseRequest], Awaitable[Actor]]
"""Token → the acting workspace key: verified, not expired or revoked, holding ``keys:admin``
(the proxy pipeline's own authenticate + authorise, so the failure throttle, the verification
cache and the revision checks are the same ones). Raises the proxy's ``GatewayError``s."""

WORKSPACE_ADMIN_ROUTES = frozenset({
    ("GET", "/admin/v1/workspaces"),              # lists only the key's own workspace
    ("GET", "/admin/v1/workspaces/{ws}"),
    ("GET", "/admin/v1/workspaces/{ws}/keys"),
    ("POST", "/admin/v1/workspaces/{ws}/keys"),
    ("GET", "/admin/v1/workspaces/{ws}/keys/{key}"),
    ("PATCH", "/admin/v1/workspaces/{ws}/keys/{key}"),
    ("POST", "/admin/v1/workspaces/{ws}/keys/{key}/revoke"),
    ("POST", "/admin/v1/workspaces/{ws}/keys/{key}/rotate"),
    ("GET", "/admin/v1/workspaces/{ws}/usage"),
    ("GET", "/admin/v1/workspaces/{ws}/roles"),
    # key controls (issue 17), which self-service offers too: delete a dead key, daily usage
    ("DELETE", "/admin/v1/workspaces/{ws}/keys/{key}"),
    ("GET", "/admin/v1/workspaces/{ws}/keys/{key}/usage/daily"),
    ("GET", "/admin/v1/workspaces/{ws}/usage/daily"),
})
"""What a ``keys:admin`` key may call on the admin API: its workspace's key endpoints (those
self-service offers on the proxy listener) and reads the console needs. Anything else is for
the operator: workspace creation and plans, role definitions, the audit, reloads."""


_TOKEN_SHAPE = re.compile(r"[a-z0-9]{1,10}_[A-Za-z0-9]{1,32}_[A-Za-z0-9]{50}")
"""Shaped like an API key (``<prefix>_<env>_<50 base62>``): checked as one, not as the operator
token. The pipeline then checks the prefix, environment and checksum in force."""


async def identify(request: web.BaseRequest, config: Config, expected: str,
                   authenticate_key: KeyAuthenticator | None) -> Actor:
    """The operator, or a workspace admin key; 401 ``unauthorized`` for anything else."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    is_operator = bool(expected.strip()) and hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"),
        expected.strip().encode("utf-8", "surrogateescape"))
    if authenticate_key is not None and not is_operator and scheme.lower() == "bearer" \
            and _TOKEN_SHAPE.fullmatch(given):  # any prefix: a reload may change it
        try:
            return await authenticate_key(given, request)
        except Unauthorized as exc:  # malformed/invalid/expired/revoked: the admin API's code
            raise Unauthorized(exc.message, headers={
                "WWW-Authenticate": _ADMIN_REALM + ', error="invalid_token"'}) from None
    check_operator(request, config, expected)
    return OPERATOR_ACTOR


def confine(request: web.Request, actor: Actor) -> None:
    """A workspace admin reaches its own workspace's listed routes only. Another workspace
    reads as 404 exactly like one that does not exist (existence is not disclosed); an
    operator-only route of its own workspace (or no workspace) is 403."""
    if actor.is_operator:
        return
    resource = getattr(request.match_info.route, "resource", None)
    if resource is None:  # no such route (404) or method (405): the router answers
        return
    ws = request.match_info.get("ws")
    if ws is not None and ws != actor.workspace:
        shown_ws = ws if WORKSPACE_ID_RE.fullmatch(ws) else shown(ws)  # as the store says it
        raise NotFound(f"There is no workspace '{shown_ws}'.")
    method = "GET" if request.method == "HEAD" else request.method
    if (method, resource.canonical) not in WORKSPACE_ADMIN_ROUTES:
        raise Forbidden("Only the operator token may use this endpoint; a workspace key "
                        "manages the keys of its own workspace.")


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("No such admin endpoint.")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(f"Method not allowed here; use {allow or 'another method'}.",
                                headers={"Allow": allow} if allow else None)
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    err = GatewayError(exc.reason or "Request refused.", code="bad_request")
    err.status = exc.status
    return err


def error_middleware(config: Config, *, authenticate: bool = True,
                     authenticate_key: KeyAuthenticator | None = None) -> Callable:
    """Errors → SPEC's JSON body; anything unexpected → a generic 500 (logged, never shown);
    ``X-Request-Id`` on every response; auth for everything under ``/admin/``: the operator
    token, or (with ``authenticate_key``) a workspace admin key, confined by :func:`confine`.

    The operator token is read from the environment here, once: changing the variable takes a
    restart (as with every other setting)."""
    expected = os.environ.get(config.admin.token_env, "")

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        rid = request_id_of(request)
        started, actor = time.perf_counter(), "-"
        try:
            if authenticate and request.path.startswith("/admin/") \
                    and request.path not in UNAUTHENTICATED:
                caller = await identify(request, config, expected, authenticate_key)
                confine(request, caller)
                request[ACTOR] = caller
                actor = caller.key_id  # "operator" or the acting key's id, for the log
                resource = getattr(request.match_info.route, "resource", None)
                if resource is not None:
                    check_query(request.query, QUERY_PARAMS.get(
                        (request.method, getattr(resource, "canonical", "")), ()))
            response = await handler(request)
        except GatewayError as err:
            response = err.response(rid)
        except StoreError as exc:
            log.warning("store unavailable during %s %s (request %s): %s", request.method,
                        request.path, rid, exc)
            response = ServiceUnavailable("The key store is unavailable; nothing was changed "
                                          "or the change could not be confirmed.").response(rid)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _from_http_exception(exc).response(rid)
        except Exception:
            log.exception("unexpected error in %s %s (request %s)", request.method,
                          request.path, rid)
            response = GatewayError("An internal error occurred.").response(rid)
        response.headers["X-Request-Id"] = rid
        if request.path.startswith("/admin/") and request.path not in UNAUTHENTICATED:
            log_admin_call(request, response.status, rid, actor, time.perf_counter() - started,
                           config.keys.prefix)
        return response

    return middleware


def log_admin_call(request: web.Request, status: int, rid: str, actor: str,
                   elapsed: float, prefix: str) -> None:
    """One line per admin API call: who (``operator``, or ``-`` when the token was refused),
    what, the answer. Never a header value, so never a token; keys in the path are masked."""
    from .accesslog import mask_target
    target = mask_target(request.raw_path, prefix)
    log.info("admin %s %s %d %s", request.method, target, status, actor,
             extra={"request_id": rid, "method": request.method, "path": target,
                    "status": status, "actor": actor, "client": request.remote,
                    "duration_ms": round(elapsed * 1000, 3)})


OPENAPI_PATH = "/admin/v1/openapi.json"
UNAUTHENTICATED = frozenset({OPENAPI_PATH})
"""Paths under /admin/ that need no operator token (SPEC: the OpenAPI document)."""

QUERY_PARAMS = {("GET", "/admin/v1/workspaces/{ws}/keys"): ("status",),
                ("GET", "/admin/v1/workspaces/{ws}/audit"): ("limit",)}
"""The query parameters each admin endpoint takes; any other is a 400."""


def create_admin_app(config: Config, store: Store,
                     per_request_ready: Callable[[], Awaitable[None]] | None = None,
                     authenticate_key: KeyAuthenticator | None = None) -> web.Application:
    """The admin listener's app: ``/admin/v1/...`` (operator token; with ``authenticate_key``
    also workspace admin keys), ``/healthz``, ``/readyz``, and the console at ``/console/``."""
    app = web.Application(middlewares=[error_middleware(config,
                                                        authenticate_key=authenticate_key)])
    # Handlers read ``store.config`` on each request: a reload swaps it (gateway/reload.py).

    def ops(request: web.Request) -> KeyOps:
        actor = request.get(ACTOR, OPERATOR_ACTOR)
        if actor.is_operator:
            return KeyOps(store, store.config, request.match_info["ws"])
        return KeyOps(store, store.config, request.match_info["ws"], actor=actor.key_id,
                      limit_scopes=actor.scopes, limit_expires_at=actor.expires_at)

    async def workspace_exists(request: web.Request) -> str:
        ws = request.match_info["ws"]
        await store.require_workspace(ws)
        return ws

    def plan_of(data: Mapping[str, Any]) -> str | None:
        if "plan" not in data:
            return None
        plan = data["plan"]
        if not isinstance(plan, str) or plan not in store.config.plans:
            raise BadRequest(f"The field 'plan' must be one of the configured plans: "
                             f"{', '.join(sorted(store.config.plans))}.")
        return plan

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    last_problem: list[str | None] = [None]

    async def readyz(request: web.Request) -> web.Response:
        """200 only when both store clients work: the admin path answers PING and the
        per-request path's own connection can run its script (``per_request_ready``)."""
        problem = None
        if not await store.ping():
            problem = "the admin store connection does not answer PING"
        elif per_request_ready is not None:
            try:
                await per_request_ready()
            except StoreError as exc:
                problem = str(exc)
        if problem != last_problem[0]:  # log changes, not every probe
            if problem:
                log.warning("not ready: %s", problem)
            elif last_problem[0]:
                log.info("ready again: the store answers on both paths")
            last_problem[0] = problem
        if problem is None:
            return _json({"status": "ok"})
        raise ServiceUnavailable("The key store is unreachable.")

    async def create_workspace(request: web.Request) -> web.Response:
        data = parse_body(await request.read(), ("id", "name", "plan"))
        name = _string(data, "name", MAX_NAME, required=True)
        ws = None
        if "id" in data:
            ws = data["id"]
            if not isinstance(ws, str) or not WORKSPACE_ID_RE.fullmatch(ws):
                raise BadRequest("The field 'id' must be a slug: lowercase letters, digits and "
                                 "'-', starting with a letter or digit, at most 63 "
                                 "characters.")
        plan = plan_of(data) or store.config.default_plan
        workspace = await store.create_workspace(ws, name, plan)
        return _json(workspace.to_json(), 201)

    async def list_workspaces(request: web.Request) -> web.Response:
        actor = request.get(ACTOR, OPERATOR_ACTOR)
        if not actor.is_operator:  # a workspace admin sees its own workspace only
            return _json({"items": [(await store.require_workspace(actor.workspace)).to_json()]})
        return _json({"items": [w.to_json() for w in await store.list_workspaces()]})

    async def read_workspace(request: web.Request) -> web.Response:
        return _json((await store.require_workspace(request.match_info["ws"])).to_json())

    async def patch_workspace(request: web.Request) -> web.Response:
        ws = await workspace_exists(request)
        data = parse_body(await request.read(), ("name", "plan"))
        if not data:
            raise BadRequest("Nothing to change; send 'name' and/or 'plan'.")
        name = _string(data, "name", MAX_NAME)
        workspace = await store.update_workspace(ws, name=name, plan=plan_of(data))
        return _json(workspace.to_json())

    async def list_keys(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).list(request.query)

    async def create_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).create(await request.read())

    async def read_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).read(request.match_info["key"])

    async def patch_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).patch(request.match_info["key"], await request.read())

    async def revoke_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).revoke(request.match_info["key"], await request.read())

    async def rotate_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).rotate(request.match_info["key"], await request.read())

    async def usage(request: web.Request) -> web.Response:
        return _json(await store.usage(request.match_info["ws"]))

    async def list_roles(request: web.Request) -> web.Response:
        ws = await workspace_exists(request)
        own = await store.workspace_roles(ws)
        items = [{"name": n, "scopes": list(s), "source": "workspace"}
                 for n, s in sorted(own.items())]
        items += [{"name": n, "scopes": list(s), "source": "config"}
                  for n, s in sorted(store.config.roles.items()) if n not in own]
        return _json({"items": items})

    async def put_role(request: web.Request) -> web.Response:
        name = parse_role_name(request.match_info["name"], "name")
        data = parse_body(await request.read(), ("scopes",))
        if "scopes" not in data:
            raise BadRequest("The field 'scopes' is required.")
        scopes = parse_scopes(data["scopes"])
        await store.put_role(request.match_info["ws"], name, scopes)
        return _json({"name": name, "scopes": list(scopes), "source": "workspace"})

    async def delete_role(request: web.Request) -> web.Response:
        ws, name = request.match_info["ws"], request.match_info["name"]
        scopes = (await store.workspace_roles(ws)).get(name, ())
        await store.delete_role(ws, name)
        return _json({"name": name, "scopes": list(scopes), "source": "workspace"})

    async def audit(request: web.Request) -> web.Response:
        ws = await workspace_exists(request)
        text = request.query.get("limit", str(AUDIT_DEFAULT))
        # ASCII digits only: str.isdigit() admits '²' (int() refuses it) and '٣'
        if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= AUDIT_MAX:
            raise BadRequest(f"The query parameter 'limit' must be an integer from 1 to "
                             f"{AUDIT_MAX}.")
        return _json({"items": await store.audit(ws, int(text))})

    async def openapi(request: web.Request) -> web.Response:
        from .openapi import document_bytes
        return web.Response(body=document_bytes(), content_type="application/json")

    r = app.router
    r.add_get(OPENAPI_PATH, openapi)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    v1 = "/admin/v1/workspaces"
    r.add_post(v1, create_workspace)
    r.add_get(v1, list_workspaces)
    r.add_get(v1 + "/{ws}", read_workspace)
    r.add_patch(v1 + "/{ws}", patch_workspace)
    r.add_post(v1 + "/{ws}/keys", create_key)
    r.add_get(v1 + "/{ws}/keys", list_keys)
    r.add_get(v1 + "/{ws}/keys/{key}", read_key)
    r.add_patch(v1 + "/{ws}/keys/{key}", patch_key)
    r.add_post(v1 + "/{ws}/keys/{key}/revoke", revoke_key)
    r.add_post(v1 + "/{ws}/keys/{key}/rotate", rotate_key)
    r.add_get(v1 + "/{ws}/usage", usage)
    r.add_get(v1 + "/{ws}/roles", list_roles)
    r.add_put(v1 + "/{ws}/roles/{name}", put_role)
    r.add_delete(v1 + "/{ws}/roles/{name}", delete_role)
    r.add_get(v1 + "/{ws}/audit", audit)
    add_console_routes(app)
    return app


# --- the web console: static files from the package ---------------------------------------------

CONSOLE_FILES = {"index.html": "text/html", "app.js": "text/javascript",
                 "app.css": "text/css", "favicon.svg": "image/svg+xml"}
CONSOLE_HEADERS = {
    # Everything from this origin only; no inline script or style, no plugins, no framing,
    # no <base> rewriting, forms post nowhere (the page sends JSON with fetch).
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def add_console_routes(app: web.Application) -> None:
    """``GET /console/`` and its few files, read once from the package (no directory
    listing, no path from the request ever reaches the file system)."""
    folder = resources.files("gateway") / "console"
    bodies = {name: (folder / name).read_bytes() for name in CONSOLE_FILES}

    def serve(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=bodies[name], headers=CONSOLE_HEADERS,
                                content_type=CONSOLE_FILES[name],
                                charset=None if name == "favicon.svg" else "utf-8")
        return handler

    async def to_console(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/console/", headers=CONSOLE_HEADERS)

    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", serve("index.html"))
    for name in CONSOLE_FILES:
        if name != "index.html":
            app.router.add_get("/console/" + name, serve(name))


# --- workspace self-service on the proxy listener ----------------------------------------------

SELF_SERVICE_PREFIX = "/_keygate/v1/keys"


async def self_service(request: web.Request, principal: Principal, store: Store,
                       config: Config) -> web.Response:
    """``/_keygate/v1/keys...`` for a key holding ``keys:admin`` (the pipeline checked that):
    the admin key endpoints, confined to the key's own workspace and scopes. Raises
    ``GatewayError``s; the pipeline renders them."""
    path = request.rel_url.raw_path
    rest = path[len(SELF_SERVICE_PREFIX):] if path.startswith(SELF_SERVICE_PREFIX) else None
    parts = rest.strip("/").split("/") if rest not in (None, "", "/") else []
    if rest is None or (rest and not rest.startswith("/")) or len(parts) > 2 or "" in parts:
        raise NotFound("No such endpoint.")
    async def body() -> bytes:
        try:  # aiohttp caps it (1 MiB) with an HTTPException the pipeline does not render
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge("The request body is too large for a key endpoint.") from None

    acting = await store.require_key(principal.workspace, principal.key_id)
    ops = KeyOps(store, config, principal.workspace, actor=principal.key_id,
                 limit_scopes=principal.scopes, limit_expires_at=acting.expires_at)
    method = request.method

    def allow(*methods: str) -> None:
        if method not in methods:
            raise MethodNotAllowed(f"Use {' or '.join(methods)} here.",
                                   headers={"Allow": ", ".join(methods)})

    check_query(request.query, ("status",) if not parts and method == "GET" else ())
    if not parts:
        allow("GET", "POST")
        if method == "GET":
            return await ops.list(request.query)
        return await ops.create(await body())
    key_id = parts[0]
    if len(parts) == 1:
        allow("GET", "PATCH")
        if method == "GET":
            return await ops.read(key_id)
        return await ops.patch(key_id, await body())
    if parts[1] == "revoke":
        allow("POST")
        return await ops.revoke(key_id, await body())
    if parts[1] == "rotate":
        allow("POST")
        return await ops.rotate(key_id, await body())
    raise NotFound("No such endpoint.")
