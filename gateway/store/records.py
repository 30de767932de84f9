"""The records as Redis holds them: key and workspace hashes to ``models`` records and back,
and the small vocabulary the admin store's callers share (ids, statuses, ``UNSET``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from ..errors import StoreError, shown
from ..models import LIMIT_FIELDS, KeyRecord, Workspace

WORKSPACE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def shown_ws(ws: str) -> str:
    """A workspace id as a message may quote it (a token is never a valid id)."""
    return ws if WORKSPACE_ID_RE.fullmatch(ws) else shown(ws)


STATUSES = ("active", "expired", "revoked")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Marks an ``update_*`` argument that was not given (``None`` means "set to null")."""


def epoch_field(epoch: float | None) -> str:
    """An instant as the key and workspace hashes hold it ("" = null)."""
    return "" if epoch is None else f"{epoch:.3f}"


def _opt_float(text: str | None) -> float | None:
    return float(text) if text else None


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


def _whole_prefix(h: Mapping[str, str]) -> str:
    """The key's ``prefix``, the token up to and including the key id. Versions up to 0.2.0
    stored the token's first 20 characters, which a longer ``keys.prefix`` or environment cut
    short of the id's end: such a prefix is completed from its own first part (the token's
    prefix then), the key's environment and its id."""
    stored = h.get("prefix", "")
    whole = f"{stored.partition('_')[0]}_{h.get('environment', '')}_{h.get('id', '')}"
    return whole if stored and len(stored) < len(whole) and whole.startswith(stored) else stored


def key_from_hash(h: Mapping[str, str]) -> KeyRecord | None:
    if not h or not h.get("id"):
        return None
    try:
        return KeyRecord(
            id=h["id"], workspace=h["workspace"], name=h.get("name", ""),
            description=h.get("description", ""), environment=h.get("environment", ""),
            role=h.get("role") or None, scopes=tuple(json.loads(h.get("scopes") or "[]")),
            hash=h.get("hash", ""), prefix=_whole_prefix(h),
            created_at=float(h["created_at"]), expires_at=_opt_float(h.get("expires_at")),
            revoked_at=_opt_float(h.get("revoked_at")),
            last_used_at=_opt_float(h.get("last_used_at")),
            rate_limit=h.get("rate_limit") or None, rev=int(h.get("rev") or 0),
            monthly_requests=int(h["monthly_requests"]) if h.get("monthly_requests") else None,
            enabled=h.get("enabled", "1") != "0", meta=h.get("meta") or "{}",
            allowed_ips=tuple(json.loads(h["allowed_ips"])) if h.get("allowed_ips") else None,
            budget=h.get("budget") or None,
            expiry_before_grace=_opt_float(h.get("own_expires_at")),
            in_grace="own_expires_at" in h)
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"the store holds a malformed key record ({h.get('id')!r})") from exc


class KeySummary(NamedTuple):
    """What a key listing orders and filters by (``gateway.admin.listing``), as
    ``lua/admin_list_keys.lua`` reads it (a step at a time): a listing judges every key of
    the workspace by this, and reads whole records only for its page."""
    id: str
    name: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    rotated_to: str | None = None  # the key its last rotation made, until its next change

    status = KeyRecord.status  # the same rule: revoked_at, then expires_at


SUMMARY_FIELDS = ("id", "name", "created_at", "expires_at", "revoked_at", "last_used_at",
                  "rotated_to")
"""The key hash fields of a ``KeySummary``, in its order."""


def key_summary(row: Sequence[Any]) -> KeySummary:
    """A ``KeySummary`` of the ``SUMMARY_FIELDS`` of a key hash as stored."""
    key_id, name, created, expires, revoked, used, rotated_to = row
    return KeySummary(key_id, name or "", float(created), _opt_float(expires),
                      _opt_float(revoked), _opt_float(used), rotated_to or None)


def key_summaries(raw: str | bytes) -> list[KeySummary]:
    """The JSON array of a step of ``lua/admin_list_keys.lua``."""
    try:
        return [key_summary(row) for row in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise StoreError("the store holds a malformed key record") from exc


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


def control_fields(**controls: Any) -> list[str]:
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


def hash_pairs(h: Any) -> dict[str, str]:
    """A script's HGETALL reply (flat list) as a dict."""
    if not h:
        return {}
    return dict(zip(h[0::2], h[1::2]))


@dataclass(frozen=True)
class NewKey:
    """A key just created (or created by rotation): its record and its token, shown once."""
    key: KeyRecord
    token: str

    def __repr__(self) -> str:  # never print the token by accident
        return f"NewKey({self.key.id})"
