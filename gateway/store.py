"""Every Redis call keygate makes lives in this module.

Data layout (``{ws}`` is a Redis Cluster hash tag: everything of one workspace shares a slot,
so the per-request script touches a single slot):

    kg:workspaces                 SET     workspace ids (added before the workspace hash is
                                          created, so it may name an id whose creation failed;
                                          listings skip those)
    kg:ws:{ws}                    HASH    id, name, plan, created_at, rev
                                          (rev is bumped on any change that affects
                                          authorisation: plan change, workspace role edit;
                                          the admin scripts bump it on every workspace change)
    kg:ws:{ws}:keys               SET     key ids of the workspace
    kg:ws:{ws}:active             ZSET    key ids not revoked, score = expires_at (+inf = never);
                                          entries whose score has passed are trimmed by the
                                          create script; ZCARD after trimming = active keys,
                                          what the plan's max_keys caps
    kg:ws:{ws}:roles              HASH    role name -> JSON list of scopes
    kg:ws:{ws}:audit              STREAM  field "e" = JSON {at, actor, action, target, details},
                                          capped (MAXLEN ~ 10000)
    kg:key:{ws}:<id>              HASH    id, workspace, name, description, environment,
                                          role ("" = none), scopes (JSON list, explicit scopes),
                                          hash (argon2id of the secret), prefix,
                                          created_at, expires_at, revoked_at, last_used_at
                                          (epoch seconds as decimal strings, "" = null),
                                          rate_limit ("" = plan's), rev (bumped on every change)
    kg:keyid:<id>                 STRING  workspace id of key <id> (global index, own slot;
                                          read only on a key's first request in a process).
                                          Written (SET NX, which also catches id collisions)
                                          *before* the key's script runs and deleted if the
                                          script refuses, so a key never exists without its
                                          index; a crash in between leaves at worst an index
                                          entry pointing at no key, which reads as unknown.
    kg:usage:{ws}:<YYYY-MM>       STRING  requests forwarded this month (always has a TTL)
    kg:rate:{ws}:<id>             STRING  GCRA theoretical arrival time, ms (always has a TTL)
    kg:fail:ip:<ip>               STRING  failed verifications in the window (TTL)
    kg:fail:key:<id>              STRING  failed verifications in the window (TTL)

Every multi-step change is one Lua script (``gateway/lua/admin_*.lua``) on the workspace's
slot: the change, the ``rev`` bump and the audit entry happen together or not at all. The
global entries (``kg:workspaces``, ``kg:keyid:<id>``) live in other slots, so they are written
first and are allowed to name something that does not exist (readers treat that as absent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, Callable, Iterator, Mapping, Sequence

from redis.exceptions import RedisClusterException, RedisError

from .config import Config
from .errors import Conflict, NotFound, StoreError, describe, shown
from .limits import effective_plan, limits_json
from .models import LIMIT_FIELDS, KeyRecord, Workspace, rfc3339
from .redis_urls import is_topology_url, standalone_client, topology_client
from .tokens import ID_LEN, PREFIX_CHARS, SecretHasher, make_token


def ws_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}"


def ws_keys_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:keys"


def ws_active_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:active"


def ws_roles_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:roles"


def ws_audit_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:audit"


def key_key(ws: str, key_id: str) -> str:
    return f"kg:key:{{{ws}}}:{key_id}"


def key_index_key(key_id: str) -> str:
    return f"kg:keyid:{key_id}"


def usage_key(ws: str, period: str) -> str:
    return f"kg:usage:{{{ws}}}:{period}"


def key_usage_key(ws: str, key_id: str, period: str) -> str:
    return f"kg:kusage:{{{ws}}}:{key_id}:{period}"


def daily_key(ws: str, day: str) -> str:
    return f"kg:daily:{{{ws}}}:{day}"


def key_daily_key(ws: str, key_id: str, day: str) -> str:
    return f"kg:kdaily:{{{ws}}}:{key_id}:{day}"


def rate_key(ws: str, key_id: str) -> str:
    return f"kg:rate:{{{ws}}}:{key_id}"


def fail_ip_key(ip: str) -> str:
    return f"kg:fail:ip:{ip}"


def fail_key_key(key_id: str) -> str:
    return f"kg:fail:key:{key_id}"


WORKSPACES = "kg:workspaces"


# --- the store ---------------------------------------------------------------------------------

OPERATOR = "operator"        # the audit actor of admin-API changes (self-service: the key id)
AUDIT_MAXLEN = 10_000
WORKSPACE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _ws(ws: str) -> str:
    """A workspace id as a message may quote it (a token is never a valid id)."""
    return ws if WORKSPACE_ID_RE.fullmatch(ws) else shown(ws)
STATUSES = ("active", "expired", "revoked")
_ID_ATTEMPTS = 8             # fresh key ids / slug suffixes tried before giving up


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Marks an ``update_*`` argument that was not given (``None`` means "set to null")."""


def _script_text(name: str) -> str:
    return resources.files("gateway").joinpath("lua", name).read_text()


def _ts(epoch: float | None) -> str:
    return "" if epoch is None else f"{epoch:.3f}"


def _opt_float(text: str | None) -> float | None:
    return float(text) if text else None


def month_period(now: float) -> tuple[str, float]:
    """("YYYY-MM", first instant of the next month) of ``now``, UTC."""
    dt = datetime.fromtimestamp(now, timezone.utc)
    nxt = datetime(dt.year + (dt.month == 12), dt.month % 12 + 1, 1, tzinfo=timezone.utc)
    return f"{dt.year:04d}-{dt.month:02d}", nxt.timestamp()


def slug_from_name(name: str) -> str:
    """A workspace id derived from a display name: ``"ACME Corp."`` → ``"acme-corp"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50].rstrip("-")
    return slug or "ws"


def effective_scopes_of(key: KeyRecord, workspace_roles: Mapping[str, tuple[str, ...]],
                        config_roles: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A key bound to scopes has those; a key bound to a role has the role's scopes *now* (a
    workspace role shadows the configured role of the same name; a role that no longer exists
    grants nothing)."""
    if key.role is None:
        return key.scopes
    if key.role in workspace_roles:
        return workspace_roles[key.role]
    return tuple(config_roles.get(key.role, ()))


def key_from_hash(h: Mapping[str, str]) -> KeyRecord | None:
    if not h or not h.get("id"):
        return None
    try:
        return KeyRecord(
            id=h["id"], workspace=h["workspace"], name=h.get("name", ""),
            description=h.get("description", ""), environment=h.get("environment", ""),
            role=h.get("role") or None, scopes=tuple(json.loads(h.get("scopes") or "[]")),
            hash=h.get("hash", ""), prefix=h.get("prefix", ""),
            created_at=float(h["created_at"]), expires_at=_opt_float(h.get("expires_at")),
            revoked_at=_opt_float(h.get("revoked_at")),
            last_used_at=_opt_float(h.get("last_used_at")),
            rate_limit=h.get("rate_limit") or None, rev=int(h.get("rev") or 0),
            monthly_requests=int(h["monthly_requests"]) if h.get("monthly_requests") else None,
            enabled=h.get("enabled", "1") != "0", meta=h.get("meta") or "{}",
            allowed_ips=tuple(json.loads(h["allowed_ips"])) if h.get("allowed_ips") else None)
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"the store holds a malformed key record ({h.get('id')!r})") from exc


def workspace_from_hash(h: Mapping[str, str]) -> Workspace | None:
    if not h or not h.get("id"):
        return None
    try:
        overrides = json.loads(h.get("limits") or "{}")
        if not isinstance(overrides, dict):
            raise ValueError("limits")
        return Workspace(id=h["id"], name=h.get("name", ""), plan=h.get("plan", ""),
                         created_at=float(h["created_at"]), rev=int(h.get("rev") or 0),
                         overrides=tuple((f, overrides[f]) for f in LIMIT_FIELDS
                                         if f in overrides))
    except (KeyError, ValueError) as exc:
        raise StoreError(f"the store holds a malformed workspace ({h.get('id')!r})") from exc


def _control_fields(**controls: Any) -> list[str]:
    """Hash field, value pairs for the key controls given (as in ``KeyRecord``)."""
    out: list[str] = []
    for name, value in controls.items():
        if name in ("rate_limit", "monthly_requests"):
            out += [name, "" if value is None else str(value)]
        elif name == "enabled":
            out += [name, "1" if value else "0"]
        elif name == "meta":
            out += [name, value]
        elif name == "allowed_ips":
            out += [name, "" if value is None else json.dumps(list(value))]
    return out


def _pairs(h: Any) -> dict[str, str]:
    """A script's HGETALL reply (flat list) as a dict."""
    if not h:
        return {}
    return dict(zip(h[0::2], h[1::2]))


def _client(url: str, timeout: float) -> Any:
    if "://" not in url:
        raise StoreError("the store URL needs a scheme: redis://, rediss://, unix://, "
                         "redis+sentinel:// or redis+cluster://")
    if is_topology_url(url):  # redis+sentinel://, redis+cluster:// (see gateway.redis_urls)
        return topology_client(url, timeout=timeout, decode_responses=True)
    return standalone_client(url, timeout=timeout, decode_responses=True)


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """Re-raise whatever the Redis client raises as :class:`StoreError` (never shown to clients)."""
    try:
        yield
    except StoreError:
        raise
    except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
        # RedisClusterException: e.g. no seed node of a Cluster answers (not a RedisError)
        raise StoreError(f"store {what} failed: {describe(exc)}") from exc


@dataclass(frozen=True)
class NewKey:
    """A key just created (or created by rotation): its record and its token, shown once."""
    key: KeyRecord
    token: str

    def __repr__(self) -> str:  # never print the token by accident
        return f"NewKey({self.key.id})"


class Store:
    """Workspaces, keys, roles, usage and audit in Redis (see the module docstring).

    Admin writes raise :class:`NotFound` / :class:`Conflict` for unknown or clashing objects,
    :class:`StoreError` when Redis fails. Validation of user input is the caller's job
    (``gateway.admin``); the store trusts its arguments.
    """

    def __init__(self, client: Any, config: Config, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.config = config
        self.clock = clock
        a = config.keys.argon2
        self.hasher = SecretHasher(a.time_cost, a.memory_cost, a.parallelism)
        self._scripts = {name: client.register_script(_script_text(f"admin_{name}.lua"))
                         for name in ("create_workspace", "update_workspace", "create_key",
                                      "rotate_key", "update_key", "revoke_key", "set_role",
                                      "delete_key")}

    @classmethod
    async def connect(cls, url: str, config: Config, *,
                      clock: Callable[[], float] = time.time) -> "Store":
        """A store on ``url``. Does not wait for Redis to answer (``ping`` tells readiness)."""
        with _store_errors("connect"):
            try:
                client = _client(url, config.store.timeout)
            except ValueError as exc:
                raise StoreError(f"bad store URL: {exc}") from exc
        return cls(client, config, clock=clock)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.redis.aclose()

    async def ping(self) -> bool:
        return await self.ping_problem() is None

    async def ping_problem(self) -> str | None:
        """None when Redis answers PING, else the cause (exception class and message)."""
        try:
            if await self.redis.ping():
                return None
            return "PING was not answered with PONG"
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            return describe(exc)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with _store_errors(name.replace("_", " ")):
            return await self._scripts[name](keys=list(keys), args=list(args))

    def _audit_entry(self, now: float, actor: str, action: str, target: str,
                     details: Mapping[str, Any]) -> str:
        return json.dumps({"at": rfc3339(now), "actor": actor, "action": action,
                           "target": target, "details": dict(details)})

    # --- workspaces ---------------------------------------------------------------------------

    async def get_workspace(self, ws: str) -> Workspace | None:
        if not WORKSPACE_ID_RE.fullmatch(ws):
            return None
        with _store_errors("read"):
            return workspace_from_hash(await self.redis.hgetall(ws_key(ws)))

    async def require_workspace(self, ws: str) -> Workspace:
        workspace = await self.get_workspace(ws)
        if workspace is None:
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        return workspace

    async def list_workspaces(self) -> list[Workspace]:
        with _store_errors("read"):
            ids = sorted(await self.redis.smembers(WORKSPACES))
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for ws in ids:
                    pipe.hgetall(ws_key(ws))
                hashes = await pipe.execute()
        return [w for h in hashes if (w := workspace_from_hash(h)) is not None]

    async def create_workspace(self, ws: str | None, name: str, plan: str, *,
                               actor: str = OPERATOR) -> Workspace:
        """Create a workspace. ``ws`` None: a slug of ``name``, with a random suffix if taken.
        An explicit ``ws`` that is taken raises :class:`Conflict`."""
        base = ws or slug_from_name(name)
        for attempt in range(_ID_ATTEMPTS):
            candidate = base
            if ws is None and attempt:
                suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                 for _ in range(5))
                candidate = f"{base[:57]}-{suffix}"
            now = self.clock()
            with _store_errors("write"):
                await self.redis.sadd(WORKSPACES, candidate)
            created = await self._run(
                "create_workspace", (ws_key(candidate), ws_audit_key(candidate)),
                (self._audit_entry(now, actor, "workspace.create", candidate,
                                   {"name": name, "plan": plan}), AUDIT_MAXLEN,
                 "id", candidate, "name", name, "plan", plan, "created_at", _ts(now)))
            if created:
                return Workspace(candidate, name, plan, now, 1)
            if ws is not None:
                break
        raise Conflict(f"The workspace id '{_ws(base)}' is already taken.")

    async def update_workspace(self, ws: str, *, name: str | None = None,
                               plan: str | None = None, limits: Any = UNSET,
                               actor: str = OPERATOR) -> Workspace:
        """Rename, re-plan and/or change the workspace's own limits; bumps the workspace's rev
        (cached authorisations re-read it on their next request).

        ``limits``: a dict of LIMIT_FIELDS merged into the overrides (a value of None:
        unlimited), or None to drop every override (back to the plan's). The merge happens in
        the script, so concurrent changes of different fields both stay."""
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = name
        if plan is not None:
            changes["plan"] = plan
        patch = ""
        if limits is not UNSET:
            patch = "null" if limits is None else json.dumps(limits)
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        details: dict[str, Any] = dict(changes)
        if limits is not UNSET:
            details["limits"] = limits
        reply = await self._run(
            "update_workspace", (ws_key(ws), ws_audit_key(ws)),
            (self._audit_entry(self.clock(), actor, "workspace.update", ws, details),
             AUDIT_MAXLEN, patch, *[x for kv in changes.items() for x in kv]))
        workspace = workspace_from_hash(_pairs(reply))
        if workspace is None:
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        return workspace

    # --- roles --------------------------------------------------------------------------------

    async def workspace_roles(self, ws: str) -> dict[str, tuple[str, ...]]:
        with _store_errors("read"):
            raw = await self.redis.hgetall(ws_roles_key(ws))
        try:
            return {name: tuple(json.loads(scopes)) for name, scopes in raw.items()}
        except ValueError as exc:
            raise StoreError("the store holds a malformed workspace role") from exc

    async def resolve_role(self, ws: str, role: str) -> tuple[str, ...] | None:
        """The scopes of ``role`` in ``ws`` now (workspace role first, then config); None if
        neither defines it."""
        with _store_errors("read"):
            raw = await self.redis.hget(ws_roles_key(ws), role)
        if raw is not None:
            try:
                return tuple(json.loads(raw))
            except ValueError as exc:
                raise StoreError("the store holds a malformed workspace role") from exc
        if role in self.config.roles:
            return tuple(self.config.roles[role])
        return None

    async def effective_scopes(self, ws: str, key: KeyRecord) -> tuple[str, ...]:
        if key.role is None:
            return key.scopes
        return await self.resolve_role(ws, key.role) or ()

    async def put_role(self, ws: str, name: str, scopes: Sequence[str], *,
                       actor: str = OPERATOR) -> None:
        """Define or replace a workspace role; keys bound to it act with ``scopes`` at once."""
        await self._set_role(ws, "put", name, list(scopes), actor)

    async def delete_role(self, ws: str, name: str, *, actor: str = OPERATOR) -> None:
        """Remove a workspace role (NotFound if the workspace does not define it). Keys bound to
        it fall back to the configured role of that name, or have no scopes."""
        await self._set_role(ws, "delete", name, None, actor)

    async def _set_role(self, ws: str, op: str, name: str, scopes: list[str] | None,
                        actor: str) -> None:
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        details = {"scopes": scopes} if scopes is not None else {}
        reply = await self._run(
            "set_role", (ws_key(ws), ws_roles_key(ws), ws_audit_key(ws)),
            (op, name, json.dumps(scopes or []),
             self._audit_entry(self.clock(), actor, f"role.{op}", name, details), AUDIT_MAXLEN))
        if reply == "no_workspace":
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        if reply == "not_found":
            raise NotFound(f"Workspace '{_ws(ws)}' defines no role '{shown(name)}'.")

    # --- keys: reads --------------------------------------------------------------------------

    async def key_workspace(self, key_id: str) -> str | None:
        with _store_errors("read"):
            return await self.redis.get(key_index_key(key_id))

    async def get_key(self, ws: str, key_id: str) -> KeyRecord | None:
        if not WORKSPACE_ID_RE.fullmatch(ws):
            return None
        with _store_errors("read"):
            return key_from_hash(await self.redis.hgetall(key_key(ws, key_id)))

    async def require_key(self, ws: str, key_id: str) -> KeyRecord:
        key = await self.get_key(ws, key_id)
        if key is None:
            raise NotFound(f"Workspace '{_ws(ws)}' has no key '{shown(key_id, 12)}'.")
        return key

    async def list_keys(self, ws: str, status: str | None = None) -> list[KeyRecord]:
        """The workspace's keys, oldest first; ``status`` filters (active|expired|revoked)."""
        with _store_errors("read"):
            ids = await self.redis.smembers(ws_keys_key(ws))
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(key_key(ws, key_id))
                hashes = await pipe.execute()
        now = self.clock()
        keys = [k for h in hashes if (k := key_from_hash(h)) is not None]
        if status is not None:
            keys = [k for k in keys if k.status(now) == status]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    # --- keys: changes ------------------------------------------------------------------------

    def _max_keys(self, workspace: Workspace) -> int:
        plan = effective_plan(self.config, workspace)
        return -1 if plan.max_keys is None else plan.max_keys

    async def _new_token(self, ws: str, environment: str) -> tuple[str, str, str]:
        """(key id, token, argon2 hash) with the key id reserved in the global index."""
        for _ in range(_ID_ATTEMPTS):
            token, parts = make_token(self.config.keys.prefix, environment)
            with _store_errors("write"):
                reserved = await self.redis.set(key_index_key(parts.key_id), ws, nx=True)
            if reserved:
                hashed = await asyncio.to_thread(self.hasher.hash, parts.secret)
                return parts.key_id, token, hashed
        raise StoreError("could not find a free key id")

    async def _release_id(self, key_id: str) -> None:
        with _store_errors("write"):
            await self.redis.delete(key_index_key(key_id))

    def _key_fields(self, *, key_id: str, ws: str, token: str, hashed: str, name: str,
                    description: str, environment: str, role: str | None,
                    scopes: Sequence[str], expires_at: float | None, rate_limit: str | None,
                    now: float, monthly_requests: int | None = None, enabled: bool = True,
                    meta: str = "{}", allowed_ips: Sequence[str] | None = None
                    ) -> tuple[KeyRecord, list[str]]:
        # The public prefix never reaches into the secret, whatever the configured prefix/env.
        head = len(self.config.keys.prefix) + len(environment) + 2
        record = KeyRecord(
            id=key_id, workspace=ws, name=name, description=description,
            environment=environment, role=role, scopes=tuple(scopes) if role is None else (),
            hash=hashed, prefix=token[:min(PREFIX_CHARS, head + ID_LEN)], created_at=now,
            expires_at=expires_at, revoked_at=None, last_used_at=None, rate_limit=rate_limit,
            rev=1, monthly_requests=monthly_requests, enabled=enabled, meta=meta,
            allowed_ips=None if allowed_ips is None else tuple(allowed_ips))
        fields = ["id", key_id, "workspace", ws, "name", name, "description", description,
                  "environment", environment, "role", role or "",
                  "scopes", json.dumps(list(record.scopes)), "hash", hashed,
                  "prefix", record.prefix, "created_at", _ts(now),
                  "expires_at", _ts(expires_at), "revoked_at", "", "last_used_at", "",
                  "rate_limit", rate_limit or "", *_control_fields(
                      monthly_requests=monthly_requests, enabled=enabled, meta=meta,
                      allowed_ips=allowed_ips)]
        return record, fields

    @staticmethod
    def _key_details(record: KeyRecord) -> dict[str, Any]:
        details = {"name": record.name, "environment": record.environment,
                   "role": record.role, "scopes": None if record.role else list(record.scopes),
                   "expires_at": rfc3339(record.expires_at), "rate_limit": record.rate_limit}
        if record.monthly_requests is not None:
            details["monthly_requests"] = record.monthly_requests
        if not record.enabled:
            details["enabled"] = False
        if record.allowed_ips is not None:
            details["allowed_ips"] = list(record.allowed_ips)
        return details

    async def create_key(self, ws: str, *, name: str, environment: str,
                         description: str = "", role: str | None = None,
                         scopes: Sequence[str] = (), expires_at: float | None = None,
                         rate_limit: str | None = None, monthly_requests: int | None = None,
                         enabled: bool = True, meta: str = "{}",
                         allowed_ips: Sequence[str] | None = None,
                         actor: str = OPERATOR) -> NewKey:
        """Create a key bound to ``role`` (if given) or to ``scopes``. Raises NotFound (no such
        workspace) or Conflict ``key_limit_reached`` (the plan's active-key cap is reached;
        checked and applied in one script, so concurrent creates cannot overshoot)."""
        workspace = await self.require_workspace(ws)
        for _ in range(_ID_ATTEMPTS):
            key_id, token, hashed = await self._new_token(ws, environment)
            now = self.clock()
            record, fields = self._key_fields(
                key_id=key_id, ws=ws, token=token, hashed=hashed, name=name,
                description=description, environment=environment, role=role, scopes=scopes,
                expires_at=expires_at, rate_limit=rate_limit, now=now,
                monthly_requests=monthly_requests, enabled=enabled, meta=meta,
                allowed_ips=allowed_ips)
            # No release of the id on a store error: the script may have run, and a key
            # must never lose its index entry (a stray entry is harmless, see the layout).
            reply = await self._run(
                "create_key", (ws_key(ws), ws_keys_key(ws), ws_active_key(ws),
                               key_key(ws, key_id), ws_audit_key(ws)),
                (_ts(now), self._max_keys(workspace),
                 "+inf" if expires_at is None else _ts(expires_at), key_id,
                 self._audit_entry(now, actor, "key.create", key_id,
                                   self._key_details(record)), AUDIT_MAXLEN, *fields))
            if reply == "ok":
                return NewKey(record, token)
            await self._release_id(key_id)
            if reply == "no_workspace":
                raise NotFound(f"There is no workspace '{_ws(ws)}'.")
            if reply == "limit":
                raise Conflict(f"Workspace '{_ws(ws)}' already has the {self._max_keys(workspace)} "
                               f"active keys its plan '{workspace.plan}' allows; revoke one "
                               "first.", code="key_limit_reached")
        raise StoreError("could not find a free key id")

    async def rotate_key(self, ws: str, key_id: str, *, grace_seconds: int = 0,
                         actor: str = OPERATOR, max_expires_at: float | None = None,
                         expect_rev: int | None = None) -> tuple[KeyRecord, NewKey]:
        """Replace a key by a new one with the same name, description, environment, role or
        scopes and rate limit (and, if the old key had an expiry, the same lifetime). The old
        key is revoked now (grace 0) or expires after the grace (never later than it already
        would). ``max_expires_at`` caps the new key's expiry (self-service: the acting key's).
        Returns (old key as now, new key). Conflict if the key is revoked.

        The new key copies the old one as the script finds it: if the old key changed between
        the read here and the script (its rev moved), the rotation is retried from a fresh read
        -- or, with ``expect_rev`` (the rev the caller checked, e.g. self-service's scope check),
        refused with Conflict."""
        workspace = await self.require_workspace(ws)
        old = await self.require_key(ws, key_id)
        for _ in range(_ID_ATTEMPTS):
            if old.revoked_at is not None:
                raise Conflict(f"Key '{shown(key_id, 12)}' is revoked; a revoked key cannot be rotated.")
            if expect_rev is not None and old.rev != expect_rev:
                raise Conflict(f"Key '{shown(key_id, 12)}' changed while it was being rotated; read it "
                               "again and retry.")
            new_id, token, hashed = await self._new_token(ws, old.environment)
            now = self.clock()
            expires_at = None
            if old.expires_at is not None:
                expires_at = now + max(1.0, old.expires_at - old.created_at)
            if max_expires_at is not None:
                expires_at = min(max_expires_at, expires_at or max_expires_at)
            record, fields = self._key_fields(
                key_id=new_id, ws=ws, token=token, hashed=hashed, name=old.name,
                description=old.description, environment=old.environment, role=old.role,
                scopes=old.scopes, expires_at=expires_at, rate_limit=old.rate_limit, now=now,
                monthly_requests=old.monthly_requests, enabled=old.enabled, meta=old.meta,
                allowed_ips=old.allowed_ips)
            details = {"new_key": new_id, "grace_seconds": grace_seconds}
            reply = await self._run(
                "rotate_key", (ws_key(ws), ws_keys_key(ws), ws_active_key(ws),
                               key_key(ws, key_id), key_key(ws, new_id), ws_audit_key(ws)),
                (_ts(now), self._max_keys(workspace),
                 "+inf" if expires_at is None else _ts(expires_at), new_id, key_id,
                 "" if grace_seconds <= 0 else _ts(now + grace_seconds),
                 self._audit_entry(now, actor, "key.rotate", key_id, details),
                 AUDIT_MAXLEN, old.rev, *fields))
            if reply == "ok":
                return await self.require_key(ws, key_id), NewKey(record, token)
            await self._release_id(new_id)
            if reply == "no_workspace":
                raise NotFound(f"There is no workspace '{_ws(ws)}'.")
            if reply == "not_found":
                raise NotFound(f"Workspace '{_ws(ws)}' has no key '{shown(key_id, 12)}'.")
            if reply == "revoked":
                raise Conflict(f"Key '{shown(key_id, 12)}' is revoked; a revoked key cannot be rotated.")
            if reply in ("stale", "collision"):
                old = await self.require_key(ws, key_id)
                continue
            if reply == "limit":
                raise Conflict(f"Key '{shown(key_id, 12)}' has expired and workspace '{_ws(ws)}' already has "
                               f"the {self._max_keys(workspace)} active keys its plan allows.",
                               code="key_limit_reached")
            if reply == "grace_limit":
                raise Conflict(f"Workspace '{_ws(ws)}' is already over the "
                               f"{self._max_keys(workspace)} active keys its plan allows (a "
                               "rotation's grace period is running); rotate without a grace, "
                               "or revoke a key first.", code="key_limit_reached")
        raise StoreError("could not find a free key id")

    async def update_key(self, ws: str, key_id: str, *, name: Any = UNSET,
                         description: Any = UNSET, role: Any = UNSET, scopes: Any = UNSET,
                         expires_at: Any = UNSET, rate_limit: Any = UNSET,
                         monthly_requests: Any = UNSET, enabled: Any = UNSET, meta: Any = UNSET,
                         allowed_ips: Any = UNSET, actor: str = OPERATOR) -> KeyRecord:
        """Change the given fields (UNSET = leave as is). ``role`` binds the key to a role,
        ``scopes`` to explicit scopes (the other binding is cleared); ``expires_at`` None
        removes the expiry. Bumps the key's rev: every replica applies it on the next request.
        A new expiry for an expired key re-activates it: Conflict ``key_limit_reached`` if the
        plan's cap is reached."""
        fields: list[str] = []
        details: dict[str, Any] = {}
        if name is not UNSET:
            fields += ["name", name]
            details["name"] = name
        if description is not UNSET:
            fields += ["description", description]
            details["description"] = description
        if role is not UNSET:
            fields += ["role", role, "scopes", "[]"]
            details["role"] = role
        elif scopes is not UNSET:
            fields += ["role", "", "scopes", json.dumps(list(scopes))]
            details["scopes"] = list(scopes)
        controls = {name: value for name, value in (
            ("rate_limit", rate_limit), ("monthly_requests", monthly_requests),
            ("enabled", enabled), ("meta", meta), ("allowed_ips", allowed_ips))
            if value is not UNSET}
        fields += _control_fields(**controls)
        details.update({k: v for k, v in controls.items() if k != "meta"})
        if "meta" in controls:
            details["meta"] = "changed"  # metadata can be large; the audit says it changed
        score = ""
        if expires_at is not UNSET:
            fields += ["expires_at", _ts(expires_at)]
            details["expires_at"] = rfc3339(expires_at)
            score = "+inf" if expires_at is None else _ts(expires_at)
        max_keys = -1
        if score:
            max_keys = self._max_keys(await self.require_workspace(ws))
        elif not WORKSPACE_ID_RE.fullmatch(ws):
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        now = self.clock()
        reply = await self._run(
            "update_key", (key_key(ws, key_id), ws_active_key(ws), ws_audit_key(ws)),
            (key_id, score, _ts(now), max_keys,
             self._audit_entry(now, actor, "key.update", key_id, details), AUDIT_MAXLEN,
             *fields))
        if reply == "limit":
            raise Conflict(f"Key '{shown(key_id, 12)}' has expired and workspace '{_ws(ws)}' already has the "
                           f"{max_keys} active keys its plan allows; a new expiry would make "
                           "it active again.", code="key_limit_reached")
        key = key_from_hash(_pairs(reply))
        if key is None:
            raise NotFound(f"Workspace '{_ws(ws)}' has no key '{shown(key_id, 12)}'.")
        return key

    async def revoke_key(self, ws: str, key_id: str, *, actor: str = OPERATOR) -> KeyRecord:
        """Revoke for good (idempotent: revoking again changes nothing and audits nothing)."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        now = self.clock()
        reply = await self._run(
            "revoke_key", (key_key(ws, key_id), ws_active_key(ws), ws_audit_key(ws)),
            (key_id, _ts(now), self._audit_entry(now, actor, "key.revoke", key_id, {}),
             AUDIT_MAXLEN))
        key = key_from_hash(_pairs(reply))
        if key is None:
            raise NotFound(f"Workspace '{_ws(ws)}' has no key '{shown(key_id, 12)}'.")
        return key

    async def delete_key(self, ws: str, key_id: str, *, actor: str = OPERATOR) -> KeyRecord:
        """Remove a revoked or expired key for good (Conflict for an active key: revoke it
        first). Its audit entries stay; its token then reads as unknown (invalid_key)."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise NotFound(f"There is no workspace '{_ws(ws)}'.")
        now = self.clock()
        reply = await self._run(
            "delete_key", (key_key(ws, key_id), ws_keys_key(ws), ws_active_key(ws),
                           ws_audit_key(ws)),
            (key_id, _ts(now), self._audit_entry(now, actor, "key.delete", key_id, {}),
             AUDIT_MAXLEN))
        if reply == "active":
            raise Conflict(f"Key '{shown(key_id, 12)}' is active; revoke it (or let it expire) "
                           "before deleting it.")
        key = key_from_hash(_pairs(reply))
        if key is None:
            raise NotFound(f"Workspace '{_ws(ws)}' has no key '{shown(key_id, 12)}'.")
        with _store_errors("write"):  # the global index, in its own slot: after the key
            await self.redis.delete(key_index_key(key_id))
        return key

    # --- usage and audit ----------------------------------------------------------------------

    async def usage(self, ws: str) -> dict:
        """SPEC's usage object for the clock's current UTC month, with the limits in force."""
        workspace = await self.require_workspace(ws)
        period, resets_at = month_period(self.clock())
        with _store_errors("read"):
            used = int(await self.redis.get(usage_key(ws, period)) or 0)
        return self._usage_object(workspace, period, resets_at, used)

    def _usage_object(self, workspace: Workspace, period: str, resets_at: float,
                      used: int) -> dict:
        plan = effective_plan(self.config, workspace)  # the workspace's own limits included
        limit = plan.monthly_requests
        return {"workspace": workspace.id, "plan": workspace.plan, "period": period,
                "used": used, "limit": limit,
                "remaining": None if limit is None else max(0, limit - used),
                "resets_at": rfc3339(resets_at), "limits": limits_json(plan)}

    def workspace_json(self, workspace: Workspace) -> dict:
        """The workspace object, with the limits in force."""
        return workspace.to_json(limits_json(effective_plan(self.config, workspace)))

    async def keys_used_this_month(self, ws: str, key_ids: Sequence[str]) -> list[int]:
        """Each key's own count for the clock's current month (one MGET; one slot)."""
        if not key_ids:
            return []
        period, _ = month_period(self.clock())
        with _store_errors("read"):
            counts = await self.redis.mget([key_usage_key(ws, k, period) for k in key_ids])
        return [int(c or 0) for c in counts]

    async def daily_usage(self, ws: str, days: int, key_id: str | None = None) -> list[dict]:
        """``days`` UTC days up to today, oldest first, days without requests as 0: the
        workspace's counts, or one key's."""
        today = datetime.fromtimestamp(self.clock(), timezone.utc).date()
        dates = [(today - timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]
        names = [daily_key(ws, d) if key_id is None else key_daily_key(ws, key_id, d)
                 for d in dates]
        with _store_errors("read"):
            counts = await self.redis.mget(names)
        return [{"date": d, "requests": int(c or 0)} for d, c in zip(dates, counts)]

    async def usage_all(self, known: Sequence[str] = ()) -> list[dict]:
        """Every workspace's usage object this month, for a scrape: one round trip (the
        workspace set, and the hash and counter of each workspace in ``known``, pipelined)
        while ``known`` -- the ids the previous call returned -- is still the whole set; a
        second for workspaces created since. Never one call per workspace."""
        period, resets_at = month_period(self.clock())

        async def read(ids: Sequence[str], with_set: bool) -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                if with_set:
                    pipe.smembers(WORKSPACES)
                for ws in ids:
                    pipe.hgetall(ws_key(ws))
                    pipe.get(usage_key(ws, period))
                return await pipe.execute()

        with _store_errors("read"):
            replies = await read(known, True)
            ids, replies = sorted(replies[0]), replies[1:]
            read_back = {ws: (replies[2 * i], replies[2 * i + 1]) for i, ws in enumerate(known)}
            new = [ws for ws in ids if ws not in read_back]
            if new:
                replies = await read(new, False)
                read_back.update({ws: (replies[2 * i], replies[2 * i + 1])
                                  for i, ws in enumerate(new)})
        usages = []
        for ws in ids:
            workspace = workspace_from_hash(read_back[ws][0])
            if workspace is not None:  # deleted meanwhile
                usages.append(self._usage_object(workspace, period, resets_at,
                                                 int(read_back[ws][1] or 0)))
        return usages

    async def audit(self, ws: str, limit: int = 100) -> list[dict]:
        """The workspace's lifecycle events, newest first."""
        with _store_errors("read"):
            entries = await self.redis.xrevrange(ws_audit_key(ws), count=limit)
        events = []
        for _id, fields in entries:
            try:
                events.append(json.loads(fields["e"]))
            except (KeyError, ValueError) as exc:
                raise StoreError("the store holds a malformed audit entry") from exc
        return events
