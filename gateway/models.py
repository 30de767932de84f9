"""Plain records shared by the store, the admin API and the pipeline."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 / ISO 8601 with a zone (``Z`` or offset) → epoch seconds. ValueError otherwise."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("timestamp needs a time zone, e.g. 2027-01-31T00:00:00Z")
    return dt.timestamp()


LIMIT_FIELDS = ("monthly_requests", "max_keys", "rate_limit")


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    plan: str
    created_at: float
    rev: int = 0  # bumped on every change that affects authorisation (plan, workspace roles)
    # the workspace's own limits over its plan's (a custom deal): (field, value) pairs of
    # LIMIT_FIELDS, a value of None meaning unlimited; a field not given is the plan's. A tuple,
    # so a workspace stays hashable (the key cache shares equal workspaces).
    overrides: tuple[tuple[str, Any], ...] = ()

    def to_json(self, limits: Mapping[str, Any] | None = None) -> dict:
        """``limits``: the limits in force (plan and overrides merged)."""
        data = {"id": self.id, "name": self.name, "plan": self.plan,
                "created_at": rfc3339(self.created_at)}
        if limits is not None:
            data["limits"] = dict(limits)
            data["custom_limits"] = dict(self.overrides)
        return data


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored; ``hash`` is the argon2id hash of the secret and never leaves the store
    module except to be verified."""
    id: str
    workspace: str
    name: str
    description: str
    environment: str
    role: str | None
    scopes: tuple[str, ...]          # explicit scopes (role None) — effective scopes are computed
    hash: str
    prefix: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    rate_limit: str | None           # "N/s" | "N/m" | None (plan's)
    rev: int = 0                     # bumped on every change
    monthly_requests: int | None = None      # the key's own monthly cap (None: none)
    enabled: bool = True                     # False: refused (disabled_key) until enabled
    meta: str = "{}"                         # JSON object, as stored (never forwarded)
    allowed_ips: tuple[str, ...] | None = None   # CIDRs the key may be used from (None: any)

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, effective_scopes: tuple[str, ...], now: float | None = None,
                used_this_month: int = 0) -> dict:
        return {"id": self.id, "workspace": self.workspace, "name": self.name,
                "description": self.description, "environment": self.environment,
                "role": self.role, "scopes": list(effective_scopes), "prefix": self.prefix,
                "created_at": rfc3339(self.created_at), "expires_at": rfc3339(self.expires_at),
                "last_used_at": rfc3339(self.last_used_at),
                "revoked_at": rfc3339(self.revoked_at), "rate_limit": self.rate_limit,
                "monthly_requests": self.monthly_requests, "used_this_month": used_this_month,
                "enabled": self.enabled, "meta": json.loads(self.meta or "{}"),
                "allowed_ips": None if self.allowed_ips is None else list(self.allowed_ips),
                "status": self.status(now)}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated proxy request acts as."""
    workspace: str
    key_id: str
    scopes: frozenset[str]
    plan: str

    def has_scope(self, scope: str) -> bool:
        return "ALL" in self.scopes or scope in self.scopes
