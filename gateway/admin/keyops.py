"""The key operations of one workspace, shared by the admin API and self-service.

They differ only in who acts (:class:`Actor`): the operator, or a ``keys:admin`` key, which
the audit records and which may never mint a key wider than itself (its effective scopes),
longer-lived than itself, or above the plan's rate limit, nor a ``keys:admin`` key less
restricted than itself (its allow-list, monthly cap and rate limit). Each operation returns the
JSON body of its answer; the caller picks the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..config import Config
from ..errors import BadRequest, Forbidden, NotFound, StoreError, shown
from ..usage import effective_plan
from ..models import KeyRecord, rfc3339, whole_second
from ..store import OPERATOR, UNSET, Store, effective_scopes_of
from ..store.admin_base import role_gone, unknown_role
from ..tokens import KEY_ID_RE
from .listing import matching, select_keys
from .validate import (MAX_DESCRIPTION, MAX_NAME, check_catalogue, parse_allowed_ips,
                       parse_body, parse_days, parse_enabled, parse_expires_at, parse_meta,
                       parse_monthly, parse_rate, parse_role_name, parse_scopes, parse_seconds,
                       parse_text, rate_exceeds)

CONTROL_FIELDS = ("rate_limit", "monthly_requests", "enabled", "meta", "allowed_ips")
LIMIT_FIELDS = ("allowed_ips", "monthly_requests", "rate_limit")
"""The controls that bound where and how much a key may be used (None: no bound of its own)."""
ADMIN_SCOPE = "keys:admin"
CREATE_FIELDS = ("name", "description", "role", "scopes", "expires_at", "expires_in",
                 "environment") + CONTROL_FIELDS
PATCH_FIELDS = ("name", "description", "role", "scopes", "expires_at") + CONTROL_FIELDS
ROTATE_FIELDS = ("grace_seconds",)
TURN_EVERY = 100
"""Key objects a listing builds (and encodes, ``api.listing_response``) between two turns of
the event loop: the admin listener shares it with the proxy, and a listing of every key of
a workspace of 50,000 held it ~0.6 s to build them and ~0.35 s to encode them."""
SORT_INLINE = 2000
"""Keys a listing filters and sorts on the event loop; more are done in a thread (the loop,
and the proxy's requests on it, get turns meanwhile)."""
LIST_ATTEMPTS = 3
"""Choices of a listing's page whose keys were revoked or re-dated while it was read (each:
the page chosen on the summaries, its keys' records read, and the summaries of those found
changed read again); the last page is answered filtered on its records."""


@dataclass(frozen=True)
class Actor:
    """Who an admin call acts as: the operator (``workspace`` None), or a ``keys:admin``
    key confined to its workspace, its effective scopes and its own expiry."""
    key_id: str
    workspace: str | None = None
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None
    rev: int | None = None
    """The acting key's rev when it was judged: a create or rotation it makes is written only
    if the key is still that (not revoked, disabled or re-scoped meanwhile, nor expired)."""

    @property
    def is_operator(self) -> bool:
        return self.workspace is None


OPERATOR_ACTOR = Actor(OPERATOR)


class KeyOps:
    """The key endpoints of one workspace, acting as ``actor``.

    A workspace key's effective scopes bound every key it creates, re-binds or rotates. Its
    own expiry (None: it never expires) bounds every key it creates, rotates or re-dates, else
    a key given a day by the operator could make itself (or a copy) permanent; and it may not
    extend the life of a key that holds scopes it lacks itself.

    A key that holds (or, by the call, comes to hold) ``keys:admin`` and that the workspace key
    creates, rotates, re-binds to more scopes or loosens must be at least as restricted as the
    acting key (:meth:`_admin_no_looser`): else a key the operator bound to the office network,
    or capped, would mint an admin key without those limits and manage the workspace's keys
    from anywhere with it. Keys without ``keys:admin`` are not held to the acting key's limits.
    """

    def __init__(self, store: Store, config: Config, ws: str,
                 actor: Actor = OPERATOR_ACTOR,
                 connected: Callable[[], bool] | None = None,
                 operator_token: str = "") -> None:
        self.store, self.config, self.ws = store, config, ws
        self.connected = connected  # the caller is still there (None: take it that it is)
        # the operator's calls: what their bodies may not hold (validate.refuse_operator_token)
        self._operator_token = operator_token
        self.actor = actor.key_id
        self.limit_scopes = None if actor.is_operator else actor.scopes
        self.limit_expires_at = None if actor.is_operator else actor.expires_at
        self.acting_rev = None if actor.is_operator else actor.rev
        # the scopes this call's checks needed the acting key to hold (``_within_limit``): a
        # PATCH's script refuses if its role no longer grants them when it writes
        self._judged_scopes: dict[str, None] = {}
        # the workspace's plan and limits a new rate_limit was judged against (the write is
        # refused if they changed since)
        self._plan_basis: str | None = None

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
            used, = await self.store.keys_used_this_month(self.ws, [key.budget_id])
        return key.to_json(effective_scopes_of(key, roles, self.config.roles),
                           self.store.clock(), used)

    def _key_id(self, key_id: str) -> str:
        if not KEY_ID_RE.fullmatch(key_id):
            raise NotFound(f"Workspace '{self.ws}' has no key '{shown(key_id, 12)}'.")
        return key_id

    async def _binding(self, data: Mapping[str, Any]
                       ) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
        """(role, explicit scopes, the scopes the binding grants now) from ``role`` /
        ``scopes``, checked against the limits."""
        if "role" in data and "scopes" in data:
            raise BadRequest("Give either 'role' or 'scopes', not both: a key is bound to a "
                             "role or to explicit scopes.")
        if "role" in data:
            role = parse_role_name(data["role"])
            granted = await self.store.resolve_role(self.ws, role)
            if granted is None:
                raise unknown_role(self.ws, role)
            self._role_in_catalogue(role, granted)
            self._within_limit(granted)
            return role, (), granted
        scopes = parse_scopes(data.get("scopes", []))
        check_catalogue(scopes, self.config)
        self._within_limit(scopes)
        return None, scopes, scopes

    def _role_in_catalogue(self, role: str, granted: tuple[str, ...]) -> None:
        """A role defined before a reloaded scope catalogue dropped one of its scopes binds no
        new key, as naming that scope explicitly would not (keys already bound to it keep
        working: the dropped scope matches no route, as for keys holding it explicitly)."""
        if self.config.scopes is None:
            return
        unknown = [s for s in granted if s != "ALL" and s not in self.config.scopes]
        if unknown:
            raise BadRequest(f"The field 'role' names role '{role}', which holds a scope that is "
                             f"not in the scope catalogue: {shown(unknown[0])!r}; define the "
                             f"role again within the catalogue (PUT /admin/v1/workspaces/"
                             f"{self.ws}/roles/{role}) first.")

    def _within_limit(self, scopes: tuple[str, ...], verb: str = "grant") -> None:
        if self.limit_scopes is None:
            return
        self._judged_scopes.update(dict.fromkeys(scopes))
        if "ALL" in self.limit_scopes:
            return
        wider = [s for s in scopes if s not in self.limit_scopes]
        if wider:
            raise Forbidden(f"This key cannot {verb} scopes it does not hold itself: "
                            f"{', '.join(wider)}.")

    async def _admin_no_looser(self, scopes: tuple[str, ...], limits: Mapping[str, Any],
                               what: str) -> None:
        """Self-service: a key that will hold ``keys:admin`` with ``scopes`` and the limits
        ``limits`` (``LIMIT_FIELDS``, None: no bound) may be no less restricted than the acting
        key: its addresses within the acting key's, its monthly cap and its rate no higher.
        Where the acting key has no limit of its own, none is asked of the other key (the
        plan's rate and the workspace's quota bind both)."""
        if self.limit_scopes is None or not (ADMIN_SCOPE in scopes or "ALL" in scopes):
            return
        acting = await self.store.require_key(self.ws, self.actor)  # its limits as they are now
        wider = _widened(acting, limits)
        if wider:
            bounds = "; ".join(f"{f} {_shown_limit(getattr(acting, f))}" for f in wider)
            raise Forbidden(f"A workspace key cannot {what} a key holding '{ADMIN_SCOPE}' less "
                            f"restricted than itself: that key's {', '.join(wider)} must be "
                            f"within the acting key's ({bounds}). Keys without '{ADMIN_SCOPE}' "
                            "are not held to the acting key's limits; the operator is not held "
                            "to them.")

    async def list(self, query: Mapping[str, str]) -> dict[str, Any]:
        select_keys([], query, 0)  # a bad query is a 400 before any store call
        # the page chosen by what ordering and filtering need of each key, then the page's
        # records only (a workspace may hold many thousands of keys). The two reads are no one
        # snapshot: a page key revoked or re-dated between them (a rotation: the old key
        # revoked, the new one not in the summaries) has its summary read again, with a
        # rotation's new key, and the page is chosen again; never the whole workspace scanned
        # again (under a tenant's stream of revokes every listing scanned it 3 times). The page
        # answered is filtered on its records, so it never shows a key of another status.
        started = self.store.clock()
        summaries = {s.id: s for s in await self.store.list_key_summaries(self.ws)}
        records: dict[str, KeyRecord] = {}
        for attempt in range(LIST_ATTEMPTS):
            if len(summaries) > SORT_INLINE:  # ~45 ms of sorting at 50,000: off the loop
                page, next_cursor = await asyncio.to_thread(
                    select_keys, list(summaries.values()), query, self.store.clock())
            else:
                page, next_cursor = select_keys(list(summaries.values()), query,
                                                self.store.clock())
            records.update((k.id, k) for k in await self.store.get_keys(
                self.ws, [k.id for k in page if k.id not in records]))
            changed = _changed_since(page, records)
            if not changed or attempt + 1 == LIST_ATTEMPTS:
                break
            for key_id in changed:
                records.pop(key_id, None)  # read again if the page keeps it
            await self.store.refresh_summaries(self.ws, summaries, changed, started)
        keys = matching([records[k.id] for k in page if k.id in records], query,
                        self.store.clock())
        roles = await self.store.workspace_roles(self.ws)
        used = await self.store.keys_used_this_month(self.ws, [k.budget_id for k in keys])
        items = []
        for i, (k, n) in enumerate(zip(keys, used)):
            if i and not i % TURN_EVERY:
                await asyncio.sleep(0)  # the proxy's requests, on this loop, get a turn
            items.append(await self.key_json(k, roles, n))
        body: dict[str, Any] = {"items": items}
        if next_cursor is not None:
            body["next_cursor"] = next_cursor
        return body

    async def delete(self, key_id: str) -> dict:
        key = await self.store.delete_key(self.ws, self._key_id(key_id), actor=self.actor,
                                          acting_rev=self.acting_rev)
        return await self.key_json(key, used=0)

    async def daily(self, key_id: str, query: Mapping[str, str]) -> dict:
        days = parse_days(query)
        await self.store.require_key(self.ws, self._key_id(key_id))
        return {"items": await self.store.daily_usage(self.ws, days, key_id)}

    async def _controls(self, data: Mapping[str, Any],
                        target: KeyRecord | None = None) -> dict[str, Any]:
        """The key controls in ``data``, checked; self-service may tighten any key of its
        workspace but loosen (enable, lift a cap, widen the addresses, raise the rate) only
        keys within its own scopes other than itself, and never past the plan's rate limit."""
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
        if target is not None and _loosens(target, controls, self.store.clock()):
            if target.id == self.actor:  # else the operator's limits on it bind nothing
                raise Forbidden("A key cannot loosen its own limits (lift its cap, raise its "
                                "rate, widen its addresses); the operator can.")
            self._within_limit(await self.store.effective_scopes(self.ws, target),
                               "loosen the limits of a key with")
        return controls

    async def create(self, raw: bytes) -> dict:
        data = parse_body(raw, CREATE_FIELDS, self.config.keys, self._operator_token,
                          self.store.key_prefixes_known)
        now = self.store.clock()
        name = parse_text(data, "name", MAX_NAME, required=True)
        description = parse_text(data, "description", MAX_DESCRIPTION, nonempty=False) or ""
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
        elif (expires_in := parse_seconds(data, "expires_in", 1)) is not None:
            expires_at = whole_second(now + expires_in)
        if self.limit_scopes is not None and self.limit_expires_at is not None \
                and "expires_at" not in data and "expires_in" not in data:
            # a new key that names no expiry inherits the acting key's; an explicit null asks
            # for none, which a key that expires cannot give (403 below)
            expires_at = self.limit_expires_at
        self._within_lifetime(expires_at)
        controls = await self._controls(data)
        role, scopes, granted = await self._binding(data)
        await self._admin_no_looser(granted, {f: controls.get(f) for f in LIMIT_FIELDS}, "create")
        new = await self.store.create_key(
            self.ws, name=name, description=description, environment=environment, role=role,
            scopes=scopes, expires_at=expires_at, actor=self.actor, acting_rev=self.acting_rev,
            acting_grants=granted, wanted=self.connected, plan_basis=self._plan_basis,
            **controls)
        # answered from what is known, no store read after the write: a read failing there
        # answered 503 for a key that stood, its token never shown
        return {"key": await self.key_json(new.key, roles={role: granted} if role else {},
                                           used=0), "token": new.token}

    async def _rate_within_plan(self, rate_limit: str) -> None:
        workspace, self._plan_basis = await self.store.capped_workspace(self.ws)
        plan = effective_plan(self.config, workspace)  # the workspace's own limits included
        if plan.rate_limit is None:
            return
        # a rate the plan's binds in every window, and looser in one (180/m under a 3/s plan:
        # 3 a second on average, 180 in one second; 4/s). A rate tighter in one window (10/m
        # under 3/s: 10 a minute) is the tenant slowing its key: in force it is held within
        # the plan's in both (usage.key_rate_limit: 10/m, at most 3 in any second)
        if rate_exceeds(rate_limit, str(plan.rate_limit)) \
                and not rate_exceeds(str(plan.rate_limit), rate_limit):
            raise Forbidden(f"The field 'rate_limit' may not exceed the plan's rate limit "
                            f"({plan.rate_limit}) for a key created by a workspace key.")

    async def read(self, key_id: str) -> dict:
        key = await self.store.require_key(self.ws, self._key_id(key_id))
        return await self.key_json(key)

    async def patch(self, key_id: str, raw: bytes) -> dict:
        self._key_id(key_id)
        data = parse_body(raw, PATCH_FIELDS, self.config.keys, self._operator_token,
                          self.store.key_prefixes_known)
        if not data:
            raise BadRequest(f"Nothing to change; send one or more of: {', '.join(PATCH_FIELDS)}.")
        changes: dict[str, Any] = {}
        if "name" in data:
            changes["name"] = parse_text(data, "name", MAX_NAME)
        if "description" in data:
            changes["description"] = parse_text(data, "description", MAX_DESCRIPTION,
                                                nonempty=False)
        if "expires_at" in data:
            changes["expires_at"] = parse_expires_at(data["expires_at"], self.store.clock(),
                                                     nullable=True)
        granted = None
        if "role" in data or "scopes" in data:
            role, scopes, granted = await self._binding(data)
            if role is not None:
                changes["role"] = role
            else:
                changes["scopes"] = scopes
        current = await self.store.require_key(self.ws, key_id)  # 404 before anything else
        changes.update(await self._controls(data, current))
        if "expires_at" in changes and self.limit_scopes is not None:
            await self._may_redate(current, changes["expires_at"])
        if self.limit_scopes is not None:
            await self._admin_patch_no_looser(current, granted, changes)
        key = await self.store.update_key(self.ws, key_id, actor=self.actor,
                                          **{f: changes.get(f, UNSET) for f in PATCH_FIELDS},
                                          expect_rev=None if self.limit_scopes is None
                                          else current.rev,  # the rev the checks judged
                                          # the acting key as they judged it (its scopes,
                                          # expiry), still so when the change is written
                                          acting_rev=self.acting_rev,
                                          acting_grants=tuple(self._judged_scopes),
                                          plan_basis=self._plan_basis)
        return await self.key_json(key)

    async def _admin_patch_no_looser(self, key: KeyRecord, granted: tuple[str, ...] | None,
                                     changes: Mapping[str, Any]) -> None:
        """Self-service: a PATCH that leaves ``key`` holding ``keys:admin`` and gives it a
        scope it lacked or loosens its limits must leave it no less restricted than the acting
        key. Renaming, re-dating and tightening a wider admin key (the operator's) stay open.
        Enabling a disabled key loosens it too, and so does a new expiry for an expired key,
        which brings it back to life (as ``_loosens`` has it)."""
        widens = _loosens(key, changes, self.store.clock())
        if granted is None and not widens:
            return
        held = await self.store.effective_scopes(self.ws, key)
        gains = granted is not None and "ALL" not in held and any(s not in held for s in granted)
        if not gains and not widens:
            return
        limits = {f: changes.get(f, getattr(key, f)) for f in LIMIT_FIELDS}
        await self._admin_no_looser(held if granted is None else granted, limits, "leave")

    async def _may_redate(self, key: KeyRecord, expires_at: float | None) -> None:
        """Self-service: never past the acting key's own expiry; and a key holding scopes the
        actor lacks may be brought forward, not extended."""
        self._within_lifetime(expires_at)
        extends = key.expires_at is not None and (expires_at is None or expires_at > key.expires_at)
        if extends:
            self._within_limit(await self.store.effective_scopes(self.ws, key),
                               "extend the life of a key with")

    async def revoke(self, key_id: str, raw: bytes) -> dict:
        parse_body(raw, (), operator_token=self._operator_token)
        key = await self.store.revoke_key(self.ws, self._key_id(key_id), actor=self.actor,
                                          acting_rev=self.acting_rev)
        return await self.key_json(key)

    async def rotate(self, key_id: str, raw: bytes) -> dict:
        """SPEC: exactly ``{"key", "token"}`` of the new key; the old key is read with GET."""
        data = parse_body(raw, ROTATE_FIELDS, operator_token=self._operator_token)
        grace = parse_seconds(data, "grace_seconds", 0) or 0
        key = await self.store.require_key(self.ws, self._key_id(key_id))
        if key.role and await self.store.resolve_role(self.ws, key.role) is None:
            # an expired key outlives its role (it does not hold a delete up): its successor
            # would be an active token with no scopes at all
            raise role_gone(self.ws, key.id, key.role)
        scopes: tuple[str, ...] = ()
        if self.limit_scopes is not None:  # a rotation hands out a token with the key's scopes
            scopes = await self.store.effective_scopes(self.ws, key)
            self._within_limit(scopes, "rotate a key with")
            # ... and with its limits: an admin key looser than the acting key stays the
            # operator's to rotate
            await self._admin_no_looser(scopes, {f: getattr(key, f) for f in LIMIT_FIELDS},
                                        "rotate")
        latest = self.limit_expires_at if self.limit_scopes is not None else None
        # what the answer shows, read before the write (the new key has the old one's binding
        # and budget): a read failing after it answered 503 for a rotation that stood, the
        # old key revoked and the new token never shown
        granted = await self.store.effective_scopes(self.ws, key)
        used, = await self.store.keys_used_this_month(self.ws, [key.budget_id])
        _old, new = await self.store.rotate_key(self.ws, key_id, grace_seconds=grace,
                                                actor=self.actor, max_expires_at=latest,
                                                acting_rev=self.acting_rev,
                                                acting_grants=scopes, wanted=self.connected,
                                                expect_rev=None if self.limit_scopes is None
                                                else key.rev)  # the rev whose scopes we checked
        if (new.key.role, new.key.scopes) != (key.role, key.scopes):  # re-bound meanwhile
            granted = new.key.scopes if new.key.role is None else \
                self.config.roles.get(new.key.role, ())
            with contextlib.suppress(StoreError):
                granted = await self.store.effective_scopes(self.ws, new.key)
        return {"key": await self.key_json(new.key, roles={new.key.role: granted}
                                           if new.key.role else {}, used=used),
                "token": new.token}


def _loosens(key: KeyRecord, controls: Mapping[str, Any], now: float) -> bool:
    """Whether ``controls`` (a PATCH's changes) would let ``key`` do more than it may now:
    enabling a disabled key, giving an expired key a new expiry (or none: it is active again),
    or a limit made looser (``_widened``)."""
    if controls.get("enabled") is True and not key.enabled:
        return True
    if "expires_at" in controls and key.revoked_at is None and key.status(now) == "expired":
        return True
    return bool(_widened(key, controls))


def _changed_since(page: list, records: Mapping[str, KeyRecord]) -> list[str]:
    """The ids of the keys of ``page`` (the summaries it was chosen by) revoked, re-dated or
    deleted before their records (``records``) were read: their status, and a rotation's new
    key, may be missing from the summaries."""
    return [k.id for k in page
            if (r := records.get(k.id)) is None
            or (r.revoked_at, r.expires_at) != (k.revoked_at, k.expires_at)]


def _widened(key: KeyRecord, controls: Mapping[str, Any]) -> list[str]:
    """The ``LIMIT_FIELDS`` in ``controls`` that are looser than ``key``'s: a cap lifted or
    raised, a rate lifted or raised, an address outside the key's allow-list."""
    wider = []
    if "allowed_ips" in controls and key.allowed_ips is not None:
        new = controls["allowed_ips"]
        old = [ipaddress.ip_network(n) for n in key.allowed_ips]
        if new is None or not all(
                any(net.version == o.version and net.subnet_of(o) for o in old)
                for net in map(ipaddress.ip_network, new)):
            wider.append("allowed_ips")
    if "monthly_requests" in controls and key.monthly_requests is not None:
        cap = controls["monthly_requests"]
        if cap is None or cap > key.monthly_requests:
            wider.append("monthly_requests")
    if "rate_limit" in controls and key.rate_limit is not None:
        rate = controls["rate_limit"]
        if rate is None or rate_exceeds(rate, key.rate_limit):
            wider.append("rate_limit")
    return wider


def _shown_limit(value: Any) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value)
