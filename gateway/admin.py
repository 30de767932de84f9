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

import base64
import hmac
import ipaddress
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
from .models import LIMIT_FIELDS, KeyRecord, Principal, parse_rfc3339, rfc3339
from .usage import effective_plan
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


MAX_META_BYTES = 4096
MAX_ALLOWED_IPS = 100
MAX_MONTHLY = 10**15
DAILY_DEFAULT, DAILY_MAX = 30, 90
LIST_MAX = 1000
SORTS = ("created", "last_used", "name")


def parse_monthly(value: Any, field: str = "monthly_requests") -> int | None:
    """A monthly request cap: a whole number ≥ 0, or null (none of its own)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MONTHLY:
        raise BadRequest(f"The field '{field}' must be a whole number from 0 to "
                         f"{MAX_MONTHLY}, or null (no limit of its own).")
    return value


def parse_enabled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("The field 'enabled' must be true or false.")
    return value


def parse_meta(value: Any) -> str:
    """A JSON object of at most 4 KiB (compact UTF-8 JSON), returned as that JSON text."""
    if not isinstance(value, dict):
        raise BadRequest("The field 'meta' must be a JSON object.")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise BadRequest("The field 'meta' holds text that is not valid Unicode (a lone "
                         "surrogate).") from None
    if size > MAX_META_BYTES:
        raise BadRequest(f"The field 'meta' is {size} bytes as JSON; at most {MAX_META_BYTES}.")
    return text


def parse_allowed_ips(value: Any) -> tuple[str, ...] | None:
    """A list of CIDRs (a bare address is a /32 or /128), or null for any address."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRequest("The field 'allowed_ips' must be a non-empty list of CIDRs such as "
                         "'203.0.113.0/24', or null for any address (to refuse every address, "
                         "disable the key: 'enabled': false).")
    if len(value) > MAX_ALLOWED_IPS:
        raise BadRequest(f"The field 'allowed_ips' holds more than {MAX_ALLOWED_IPS} entries.")
    networks: list[str] = []
    for item in value:
        try:
            if not isinstance(item, str) or len(item) > 64 or item != item.strip():
                raise ValueError
            net = ipaddress.ip_network(item, strict=False)
            mapped = net.network_address.ipv4_mapped if net.version == 6 else None
            if mapped is not None and net.prefixlen >= 96:
                # ::ffff:a.b.c.d/n: clients are compared as IPv4 (as the failure throttle sees
                # them), so the entry is kept as the IPv4 network it names
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
        except ValueError:
            raise BadRequest(f"The field 'allowed_ips' holds {shown(str(item))!r}, which is not "
                             "an IP address or CIDR like '203.0.113.0/24'.") from None
        if str(net) not in networks:
            networks.append(str(net))
    return tuple(networks)


def parse_days(query: Mapping[str, str]) -> int:
    text = query.get("days", str(DAILY_DEFAULT))
    if not re.fullmatch(r"[0-9]{1,3}", text) or not 1 <= int(text) <= DAILY_MAX:
        raise BadRequest(f"The query parameter 'days' must be an integer from 1 to {DAILY_MAX}.")
    return int(text)


def parse_limits(value: Any) -> dict[str, Any] | None:
    """PATCH workspace ``limits``: an object of the limits to override (a null value:
    unlimited; a field left out keeps its current override or the plan's), or null to drop
    every override."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("The field 'limits' must be an object with any of monthly_requests, "
                         "max_keys, rate_limit (null values mean unlimited), or null to go "
                         "back to the plan's limits.")
    unknown = [f for f in value if f not in LIMIT_FIELDS]
    if unknown:
        raise BadRequest(f"Unknown field 'limits.{shown(str(unknown[0]))}'; limits takes: "
                         f"{', '.join(LIMIT_FIELDS)}.")
    limits: dict[str, Any] = {}
    if "monthly_requests" in value:
        limits["monthly_requests"] = parse_monthly(value["monthly_requests"],
                                                   "limits.monthly_requests")
    if "max_keys" in value:
        limits["max_keys"] = parse_monthly(value["max_keys"], "limits.max_keys")
    if "rate_limit" in value:
        try:
            limits["rate_limit"] = parse_rate(value["rate_limit"])
        except BadRequest:
            raise BadRequest("The field 'limits.rate_limit' must be a rate like '5/s' or "
                             "'300/m', or null.") from None
    return limits


def check_catalogue(scopes: tuple[str, ...], config: Config, field: str = "scopes") -> None:
    """With a scope catalogue configured, every scope must be in it (``ALL`` always is)."""
    if config.scopes is None:
        return
    unknown = [s for s in scopes if s != "ALL" and s not in config.scopes]
    if unknown:
        raise BadRequest(f"The field '{field}' names a scope that is not in the scope "
                         f"catalogue: {shown(unknown[0])!r} (GET /admin/v1/scopes lists them).")


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


def _sort_key(key: KeyRecord, sort: str) -> tuple:
    if sort == "name":
        return (key.name, key.id)
    if sort == "last_used":  # least recently used first; never used before all
        return (-1.0 if key.last_used_at is None else key.last_used_at, key.id)
    return (key.created_at, key.id)


def _cursor(sort: str, sort_key: tuple) -> str:
    raw = json.dumps([sort, *sort_key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(text: str, sort: str) -> tuple:
    """The sort key a ``cursor`` continues after (400 if it is not one of ours for ``sort``)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
        if not (isinstance(data, list) and len(data) == 3 and data[0] == sort
                and isinstance(data[2], str)
                and isinstance(data[1], str if sort == "name" else (int, float))
                and not isinstance(data[1], bool)):
            raise ValueError
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("The query parameter 'cursor' is not a cursor this listing gave "
                         "(with the same 'sort').") from None
    return (data[1], data[2])


def _query_int(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    text = query.get(name)
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,7}", text) or not low <= int(text) <= high:
        raise BadRequest(f"The query parameter '{name}' must be an integer from {low} to "
                         f"{high}.")
    return int(text)


def select_keys(keys: list[KeyRecord], query: Mapping[str, str],
                now: float) -> tuple[list[KeyRecord], str | None]:
    """A listing's page: ``status``, ``unused_days`` (never used, or last used more than N days
    ago), ``sort`` (created|last_used|name, ascending), ``limit`` and ``cursor`` (keyset: the
    page continues after the last key of the previous one, so keys created or deleted between
    pages neither repeat nor vanish). Returns (page, next cursor or None)."""
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"The query parameter 'status' must be one of {', '.join(STATUSES)}.")
    sort = query.get("sort", "created")
    if sort not in SORTS:
        raise BadRequest(f"The query parameter 'sort' must be one of {', '.join(SORTS)}.")
    unused = _query_int(query, "unused_days", 0, 36500)
    limit = _query_int(query, "limit", 1, LIST_MAX)
    if status is not None:
        keys = [k for k in keys if k.status(now) == status]
    if unused is not None:
        cutoff = now - unused * 86400
        keys = [k for k in keys if k.last_used_at is None or k.last_used_at < cutoff]
    keys = sorted(keys, key=lambda k: _sort_key(k, sort))
    if "cursor" in query:
        after = _after(query["cursor"], sort)
        keys = [k for k in keys if _sort_key(k, sort) > after]
    if limit is None or len(keys) <= limit:
        return keys, None
    page = keys[:limit]
    return page, _cursor(sort, _sort_key(page[-1], sort))


def _loosens(key: KeyRecord, controls: Mapping[str, Any]) -> bool:
    """Whether ``controls`` would let ``key`` do more than it may now."""
    if controls.get("enabled") is True and not key.enabled:
        return True
    if "monthly_requests" in controls and key.monthly_requests is not None:
        cap = controls["monthly_requests"]
        if cap is None or cap > key.monthly_requests:
            return True
    if "rate_limit" in controls and key.rate_limit is not None:
        rate = controls["rate_limit"]
        if rate is None or _per_second(rate) > _per_second(key.rate_limit):
            return True
    if "allowed_ips" in controls and key.allowed_ips is not None:
        new = controls["allowed_ips"]
        if new is None:
            return True
        old = [ipaddress.ip_network(n) for n in key.allowed_ips]
        for text in new:
            net = ipaddress.ip_network(text)
            if not any(net.version == o.version and net.subnet_of(o) for o in old):
                return True
    return False


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json")


# --- key operations shared by the admin API and self-service ----------------------------------

CONTROL_FIELDS = ("rate_limit", "monthly_requests", "enabled", "meta", "allowed_ips")
CREATE_FIELDS = ("name", "description", "role", "scopes", "expires_at", "expires_in",
                 "environment") + CONTROL_FIELDS
PATCH_FIELDS = ("name", "description", "role", "scopes", "expires_at") + CONTROL_FIELDS
LIST_PARAMS = ("status", "unused_days", "sort", "limit", "cursor")
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
                       roles: Mapping[str, tuple[str, ...]] | None = None,
                       used: int | None = None) -> dict:
        if roles is None:
            roles = await self.store.workspace_roles(self.ws)
        if used is None:
            used, = await self.store.keys_used_this_month(self.ws, [key.id])
        return key.to_json(effective_scopes_of(key, roles, self.config.roles),
                           self.store.clock(), used)

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
        check_catalogue(scopes, self.config)
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
        select_keys([], query, 0)  # a bad query is a 400 before any store call
        keys, next_cursor = select_keys(await self.store.list_keys(self.ws), query,
                                        self.store.clock())
        roles = await self.store.workspace_roles(self.ws)
        used = await self.store.keys_used_this_month(self.ws, [k.id for k in keys])
        body: dict[str, Any] = {"items": [await self.key_json(k, roles, n)
                                          for k, n in zip(keys, used)]}
        if next_cursor is not None:
            body["next_cursor"] = next_cursor
        return _json(body)

    async def delete(self, key_id: str) -> web.Response:
        key = await self.store.delete_key(self.ws, self._key_id(key_id), actor=self.actor)
        return _json(await self.key_json(key, used=0))

    async def daily(self, key_id: str, query: Mapping[str, str]) -> web.Response:
        days = parse_days(query)
        await self.store.require_key(self.ws, self._key_id(key_id))
        return _json({"items": await self.store.daily_usage(self.ws, days, key_id)})

    async def _controls(self, data: Mapping[str, Any],
                        target: KeyRecord | None = None) -> dict[str, Any]:
        """The key controls in ``data``, checked; self-service may tighten any key of its
        workspace but loosen (enable, lift a cap, widen the addresses, raise the rate) only
        keys within its own scopes, and never past the plan's rate limit."""
        controls: dict[str, Any] = {}
        if "rate_limit" in data:
            controls["rate_limit"] = parse_rate(data["rate_limit"])
        if "monthly_requests" in data:
            controls["monthly_requests"] = parse_monthly(data["monthly_requests"])
        if "enabled" in data:
            controls["enabled"] = parse_enabled(data["enabled"])
        if "meta" in data:
            controls["meta"] = parse_meta(data["meta"])
        if "allowed_ips" in data:
            controls["allowed_ips"] = parse_allowed_ips(data["allowed_ips"])
        if self.limit_scopes is None:
            return controls
        if controls.get("rate_limit") is not None:
            await self._rate_within_plan(controls["rate_limit"])
        if target is not None and _loosens(target, controls):
            self._within_limit(await self.store.effective_scopes(self.ws, target),
                               "loosen the limits of a key with")
        return controls

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
        controls = await self._controls(data)
        role, scopes = await self._binding(data)
        new = await self.store.create_key(
            self.ws, name=name, description=description, environment=environment, role=role,
            scopes=scopes, expires_at=expires_at, actor=self.actor, **controls)
        return _json({"key": await self.key_json(new.key, used=0), "token": new.token}, 201)

    async def _rate_within_plan(self, rate_limit: str) -> None:
        workspace = await self.store.require_workspace(self.ws)
        plan = effective_plan(self.config, workspace)  # the workspace's own limits included
        if plan.rate_limit is None:
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
        changes.update(await self._controls(data, current))
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

QUERY_PARAMS = {("GET", "/admin/v1/workspaces/{ws}/keys"): LIST_PARAMS,
                ("GET", "/admin/v1/workspaces/{ws}/audit"): ("limit",),
                ("GET", "/admin/v1/workspaces/{ws}/usage/daily"): ("days",),
                ("GET", "/admin/v1/workspaces/{ws}/keys/{key}/usage/daily"): ("days",)}
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
        return _json(store.workspace_json(workspace), 201)

    async def list_workspaces(request: web.Request) -> web.Response:
        actor = request.get(ACTOR, OPERATOR_ACTOR)
        if not actor.is_operator:  # a workspace admin sees its own workspace only
            return _json({"items": [store.workspace_json(
                await store.require_workspace(actor.workspace))]})
        return _json({"items": [store.workspace_json(w)
                                for w in await store.list_workspaces()]})

    async def read_workspace(request: web.Request) -> web.Response:
        return _json(store.workspace_json(
            await store.require_workspace(request.match_info["ws"])))

    async def patch_workspace(request: web.Request) -> web.Response:
        ws = await workspace_exists(request)
        data = parse_body(await request.read(), ("name", "plan", "limits"))
        if not data:
            raise BadRequest("Nothing to change; send 'name', 'plan' and/or 'limits'.")
        name = _string(data, "name", MAX_NAME)
        limits = parse_limits(data["limits"]) if "limits" in data else UNSET
        workspace = await store.update_workspace(ws, name=name, plan=plan_of(data),
                                                 limits=limits)
        return _json(store.workspace_json(workspace))

    async def scopes(request: web.Request) -> web.Response:
        current = store.config  # a reload swaps it
        if current.scopes is not None:
            return _json({"items": [{"name": n, "description": d}
                                    for n, d in current.scopes.items()]})
        # no catalogue: the scopes the config's routes and roles name, undescribed
        used = dict.fromkeys(s for route in current.routes for s in route.scopes)
        used.update(dict.fromkeys(s for role in current.roles.values() for s in role))
        return _json({"items": [{"name": n, "description": None} for n in sorted(used)]})

    async def delete_key(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).delete(request.match_info["key"])

    async def key_daily(request: web.Request) -> web.Response:
        await workspace_exists(request)
        return await ops(request).daily(request.match_info["key"], request.query)

    async def workspace_daily(request: web.Request) -> web.Response:
        days = parse_days(request.query)
        ws = await workspace_exists(request)
        return _json({"items": await store.daily_usage(ws, days)})

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
        check_catalogue(scopes, store.config)
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
    r.add_delete(v1 + "/{ws}/keys/{key}", delete_key)
    r.add_get(v1 + "/{ws}/keys/{key}/usage/daily", key_daily)
    r.add_get(v1 + "/{ws}/usage", usage)
    r.add_get(v1 + "/{ws}/usage/daily", workspace_daily)
    r.add_get("/admin/v1/scopes", scopes)
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
    if rest is None or (rest and not rest.startswith("/")) or len(parts) > 3 or "" in parts:
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

    daily = len(parts) == 3 and parts[1:] == ["usage", "daily"]
    if len(parts) == 3 and not daily:
        raise NotFound("No such endpoint.")
    check_query(request.query, LIST_PARAMS if not parts and method == "GET"
                else ("days",) if daily and method == "GET" else ())
    if not parts:
        allow("GET", "POST")
        if method == "GET":
            return await ops.list(request.query)
        return await ops.create(await body())
    key_id = parts[0]
    if daily:
        allow("GET")
        return await ops.daily(key_id, request.query)
    if len(parts) == 1:
        allow("GET", "PATCH", "DELETE")
        if method == "GET":
            return await ops.read(key_id)
        if method == "DELETE":
            return await ops.delete(key_id)
        return await ops.patch(key_id, await body())
    if parts[1] == "revoke":
        allow("POST")
        return await ops.revoke(key_id, await body())
    if parts[1] == "rotate":
        allow("POST")
        return await ops.rotate(key_id, await body())
    raise NotFound("No such endpoint.")
