"""The admin store's key operations: reads, and the changes that each run as one script on
the workspace's slot (see ``gateway/store/lua/admin_*_key.lua``)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

from ..errors import BadRequest, Conflict, NotFound, StoreError, shown
from ..models import KeyRecord, Workspace, rfc3339, whole_second
from ..tokens import ID_LEN, make_token
from .admin_base import (AUDIT_MAXLEN, ID_ATTEMPTS, OPERATOR, StoreBase, confirmed_write, no_key,
                         no_workspace, revoked_key, role_gone, store_errors, unknown_role)
from .keyspace import (gone_key_key, key_index_key, key_key, undone_key, ws_active_key,
                       ws_audit_key, ws_bindings_key, ws_key, ws_keys_key, ws_roles_key)
from .records import (SUMMARY_FIELDS, UNSET, WORKSPACE_ID_RE, KeySummary, NewKey,
                      control_fields, epoch_field, hash_pairs, key_from_hash, key_summaries,
                      key_summary, shown_ws, workspace_from_hash)


log = logging.getLogger("keygate.store")
T = TypeVar("T")

TAKE_BACK_FOR = 600.0
"""Seconds a create or rotation answered 503 is tried to be taken back (the store answering
again within them); past that it is logged as an error with the key id."""
UNDONE_TTL = 86_400
"""Seconds the 'undone' mark of a taken-back key id is kept (a late run of its script adds
nothing meanwhile)."""

_KEPT = ("not given back: its role was deleted meanwhile (a role defined again under its name "
         "is another role), and given back it would have been active with scopes nobody bound "
         "it to, or none; it stays as the rotation left it")
"""A take-back's audit detail ``old_key`` when the rotated key is not given back."""

TAKEN_BACK = ("The key store did not answer in time, so the change could not be confirmed; "
              "nothing was changed (if the store made it, it is taken back as soon as it "
              "answers again). Send the call again once the store is back.")

_MADE: contextvars.ContextVar[list[tuple[str, str, KeyRecord | None, str]] | None] = \
    contextvars.ContextVar("keygate_keys_made", default=None)
"""The creates and rotations an operation run by ``_confirmed_or_taken_back`` made (ws, new key
id, old key or None, actor): taken back if the operation is not confirmed after all."""


def _confirmed_or_taken_back(method: Callable[..., Awaitable[Any]]
                             ) -> Callable[..., Awaitable[Any]]:
    """``confirmed_write`` for a create or rotation: on Sentinel the write is confirmed after it
    ran (``_ConfirmingSentinelMaster``), and when it is not, the caller is answered 503 and
    never sees the token, though the write may stand (no Sentinel answered; a promotion came
    just after it and the write had reached the replica). What it made is then taken back, as
    any create or rotation answered 503 (on the master the Sentinels name: 'absent' when the
    write went with the old master)."""
    confirmed = confirmed_write(method)

    @functools.wraps(method)
    async def write(self: "KeyStore", *args: Any, **kwargs: Any) -> Any:
        if getattr(self.redis, "writes_confirmed", None) is None:
            return await method(self, *args, **kwargs)
        made: list[tuple[str, str, KeyRecord | None, str]] = []
        noted = _MADE.set(made)
        try:
            return await confirmed(self, *args, **kwargs)
        except StoreError as exc:
            for ws, new_id, old, actor in made:
                self._take_back(ws, new_id, old, actor, "could not be confirmed")
                exc.answer = TAKEN_BACK
            raise
        finally:
            _MADE.reset(noted)
    return write


def _note_made(ws: str, new_id: str, old: KeyRecord | None, actor: str) -> None:
    made = _MADE.get()
    if made is not None:
        made.append((ws, new_id, old, actor))


READ_CHUNK = 500
"""Keys an admin read names in one Redis command (an MGET) or one pipeline: no admin read of a
big workspace runs a command that holds up the per-request calls for long."""
LIST_STEP = 200
"""SSCAN's COUNT in a step of a listing's read (``lua/admin_list_keys.lua``): a step runs
~200 HMGETs in one script, well under a millisecond of Redis's time."""


ROTATED_CHAIN = 4
"""Rounds of a listing's read of the keys rotations made while it ran that its steps missed
(a key rotated again meanwhile: its successor in the next round)."""
ROTATION_SKEW = 60.0
"""Seconds before a listing began that a key revoked then may have been revoked by a rotation
during the listing (replicas' clocks differ): only such a key's successor is looked for when
its steps missed it. A key rotated before that, whose successor its steps did not find, had its
successor deleted since (SSCAN returns every member there for the whole scan): looking for it
cost every listing a read per such key, forever."""

RECORD_CHUNK = 100
"""Whole key records read per pipeline (``get_keys``): each is parsed into a record as its
pipeline comes back, on the event loop the proxy shares; 100 keep each stretch ~2 ms."""


def _chunks(items: Sequence[T], size: int = READ_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


ROTATE_ATTEMPTS = 64
"""Tries of a rotation that finds the key changed since it read it (each try: a read and the
script; the new key's id and hash are kept): concurrent rotations of one key each find it
changed once per rotation that came first."""


def changed_meanwhile(key_id: str) -> Conflict:
    return Conflict(f"Key '{shown(key_id, 12)}' changed while it was being rotated; read it "
                    "again and retry.")


def plan_changed(ws: str, outcome: str) -> Conflict:
    return Conflict(f"Workspace '{shown_ws(ws)}' changed its plan or limits while this call "
                    f"was being checked against them; {outcome}. Retry.")


def caller_gone(outcome: str) -> BadRequest:
    """Nobody reads it (the caller has gone): it is what the admin log says."""
    return BadRequest(f"The caller closed the connection before it could be answered; "
                      f"{outcome}.")


def acting_key_changed(actor: str, outcome: str) -> Conflict:
    return Conflict(f"The acting key '{shown(actor, 12)}' was revoked, disabled, changed or "
                    f"expired while this call waited its turn; {outcome}. Call again with a "
                    "key that may.")


class KeyStore(StoreBase):
    """Keys: the reads, create, rotate, update, revoke, delete."""

    # --- keys: reads --------------------------------------------------------------------------

    async def key_workspace(self, key_id: str) -> str | None:
        with store_errors("read"):
            return await self.redis.get(key_index_key(key_id))

    async def get_key(self, ws: str, key_id: str) -> KeyRecord | None:
        if not WORKSPACE_ID_RE.fullmatch(ws):
            return None
        with store_errors("read"):
            return key_from_hash(await self.redis.hgetall(key_key(ws, key_id)))

    async def require_key(self, ws: str, key_id: str) -> KeyRecord:
        key = await self.get_key(ws, key_id)
        if key is None:
            raise no_key(ws, key_id)
        return key

    async def _capped_workspace(self, ws: str) -> tuple[Workspace, str]:
        """The workspace (NotFound if none), and what its key cap is worked out from as stored
        (its plan and own limits), for ``admin_add_key`` to check they are still the same."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise no_workspace(ws)
        with store_errors("read"):
            h = await self.redis.hgetall(ws_key(ws))
        workspace = workspace_from_hash(h)
        if workspace is None:
            raise no_workspace(ws)
        return workspace, f"{h.get('plan', '')}\n{h.get('limits', '')}"

    async def capped_workspace(self, ws: str) -> tuple[Workspace, str]:
        """The workspace and the plan and own limits it was read with (``_capped_workspace``):
        a check judged on its plan (self-service's rate limit) hands the latter to the write,
        which is refused if they changed since (``plan_changed``)."""
        return await self._capped_workspace(ws)

    async def list_keys(self, ws: str, status: str | None = None) -> list[KeyRecord]:
        """The workspace's keys, oldest first; ``status`` filters (active|expired|revoked)."""
        keys = await self.get_keys(ws, await self._key_ids(ws))
        now = self.clock()
        if status is not None:
            keys = [k for k in keys if k.status(now) == status]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def _key_ids(self, ws: str) -> list[str]:
        """Every id in the workspace's key set, read ``READ_CHUNK`` at a time (SSCAN): one
        SMEMBERS of a workspace's tens of thousands of ids is one command that every replica's
        per-request call waits behind."""
        ids: dict[str, None] = {}  # SSCAN may return an id twice (the set grew meanwhile)
        cursor: int | str = 0
        with store_errors("read"):
            while True:
                cursor, batch = await self.redis.sscan(ws_keys_key(ws), cursor,
                                                       count=READ_CHUNK)
                ids.update(dict.fromkeys(batch))
                if not int(cursor):
                    return list(ids)

    async def list_key_summaries(self, ws: str) -> list[KeySummary]:
        """What a listing orders and filters by, of each of the workspace's keys (in no order):
        a listing page then reads the records of its own keys only (``get_keys``), not every
        key of the workspace (each with its argon2 hash). A script call per ``LIST_STEP``
        keys (an SSCAN step and their fields, ``lua/admin_list_keys.lua``), never one for the
        whole workspace: every replica's per-request call waits while a script runs (one over
        50,000 keys held Redis for 0.4 s). A key added or removed during the read may be in
        the answer or not, as in a read just before or just after it; but a key read rotated
        (its 'rotated_to') comes with the key that replaced it, read on its own if the steps
        missed it (added behind the scan's cursor): a listing never shows an integration's key
        revoked by a rotation and no replacement."""
        started = self.clock()
        summaries: dict[str, KeySummary] = {}  # an id may come in two steps
        cursor = "0"
        while True:
            cursor, raw = await self._run("list_keys", (ws_keys_key(ws),),
                                          (key_key(ws, ""), cursor, LIST_STEP), what="read")
            summaries.update((s.id, s) for s in key_summaries(raw))
            if str(cursor) == "0":
                break
        await self._with_successors(ws, summaries, list(summaries.values()), started)
        return list(summaries.values())

    async def refresh_summaries(self, ws: str, summaries: dict[str, KeySummary],
                                key_ids: Sequence[str], started: float) -> None:
        """Read again the summaries of ``key_ids`` (keys of a listing's page whose records
        were found changed since ``summaries`` was read; a listing that began at ``started``)
        into ``summaries``: those deleted meanwhile are dropped, and a rotation's new key is
        added as ``list_key_summaries`` adds it. A few keys' reads, never the whole workspace
        scanned again."""
        found = await self._summaries_of(ws, key_ids)
        for key_id in set(key_ids) - {s.id for s in found}:
            summaries.pop(key_id, None)
        summaries.update((s.id, s) for s in found)
        await self._with_successors(ws, summaries, found, started)

    async def _with_successors(self, ws: str, summaries: dict[str, KeySummary],
                               read: Sequence[KeySummary], started: float) -> None:
        """Add to ``summaries`` the key each of ``read`` was rotated into, when the listing's
        steps missed it: only for a key revoked since shortly before the listing began
        (``ROTATION_SKEW``), a rotation during the read; a successor rotated in turn meanwhile
        brings its own, up to ``ROTATED_CHAIN`` rounds."""
        since = started - ROTATION_SKEW
        for _ in range(ROTATED_CHAIN):
            missing = sorted({s.rotated_to for s in read
                              if s.rotated_to and s.rotated_to not in summaries
                              and s.revoked_at is not None and s.revoked_at >= since})
            if not missing:
                return
            read = await self._summaries_of(ws, missing)
            if not read:
                return
            summaries.update((s.id, s) for s in read)

    async def _summaries_of(self, ws: str, key_ids: Sequence[str]) -> list[KeySummary]:
        """The ``KeySummary`` of each of ``key_ids`` that exists (a pipeline per
        ``READ_CHUNK`` keys; a handful, usually: keys rotations made, or a page's keys
        changed, during a listing's read)."""
        rows: list[Any] = []
        with store_errors("read"):
            for chunk in _chunks(key_ids):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key_id in chunk:
                        pipe.hmget(key_key(ws, key_id), SUMMARY_FIELDS)
                    rows += await pipe.execute()
        try:
            return [key_summary(row) for row in rows if row[0]]
        except (ValueError, TypeError) as exc:
            raise StoreError("the store holds a malformed key record") from exc

    async def get_keys(self, ws: str, key_ids: Sequence[str]) -> list[KeyRecord]:
        """The keys ``key_ids`` in that order, ``RECORD_CHUNK`` per round trip (a pipeline of
        every record of a big workspace had Redis buffer all their replies, ~2 KB each, at
        once, and parsed them in one stretch); one deleted meanwhile is left out."""
        keys: list[KeyRecord] = []
        with store_errors("read"):
            for chunk in _chunks(key_ids, RECORD_CHUNK):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key_id in chunk:
                        pipe.hgetall(key_key(ws, key_id))
                    hashes = await pipe.execute()
                keys += [k for h in hashes if (k := key_from_hash(h)) is not None]
        return keys

    async def _new_token(self, ws: str, environment: str,
                         room: Callable[[], Awaitable[None]] | None = None
                         ) -> tuple[str, str, str]:
        """(key id, token, argon2 hash) with the key id reserved in the global index.

        Hashes wait their turn here, one at a time, not in the argon2 pool's queue: that
        queue is first come, first served, and a workspace admin key sending 120 creates at
        once had another workspace's first request wait for all 120 hashes. Now a first request
        waits for one at most. Turns go round the workspaces waiting (``FairTurns``): another
        workspace's create or rotation waits for one hash of each workspace ahead of it, not
        for a burst.

        ``room`` (a read of the workspace's key cap, raising Conflict when there is no room)
        runs in the turn, before the hash (the id is released if it raises): the script checks
        the cap again, but a create refused there had hashed for nothing, and creates sent in
        bulk at the cap burned a core and held every other workspace's creates and rotations
        behind their hashes. Checked in the turn, a burst lets at most one hash through per key
        that fits."""
        for _ in range(ID_ATTEMPTS):
            token, parts = make_token(self.config.keys.prefix, environment)
            with store_errors("write"):
                reserved = await self.redis.set(key_index_key(parts.key_id), ws, nx=True)
            if reserved:
                async with self._hashing.turn(ws):
                    if room is not None:
                        try:
                            await room()
                        except Conflict:
                            await self._release_id(parts.key_id)
                            raise
                    hashed = await (asyncio.to_thread if self.argon2 is None
                                    else self.argon2.run)(self.hasher.hash, parts.secret)
                return parts.key_id, token, hashed
        raise StoreError("could not find a free key id")

    async def _room(self, ws: str, over: int,
                    refusal: Callable[[Workspace], Conflict]) -> None:
        """Raise ``refusal(workspace)`` when workspace ``ws`` already has its cap of active
        keys plus ``over`` (the add script's own test, read as it stands now)."""
        workspace, _ = await self._capped_workspace(ws)
        max_keys = self._max_keys(workspace)
        if max_keys < 0:
            return
        with store_errors("read"):
            active = await self.redis.zcount(ws_active_key(ws),
                                             f"({epoch_field(self.clock())}", "+inf")
        if active >= max_keys + over:
            raise refusal(workspace)

    def _cap(self, workspace: Workspace) -> str:
        """'its cap of N active keys (set by ...)': the cap, not a count (a lowered cap can
        leave more active keys than it), and where it comes from, as the workspace object
        shows the limits in force."""
        source = "the workspace's own limits" if any(
            name == "max_keys" for name, _ in workspace.overrides) \
            else f"its plan '{workspace.plan}'"
        return f"its cap of {self._max_keys(workspace)} active keys (set by {source})"

    def _at_cap(self, ws: str, workspace: Workspace) -> Conflict:
        return Conflict(f"Workspace '{shown_ws(ws)}' is at {self._cap(workspace)}; "
                        "revoke one first.", code="key_limit_reached")

    def _expired_at_cap(self, ws: str, key_id: str, workspace: Workspace) -> Conflict:
        return Conflict(f"Key '{shown(key_id, 12)}' has expired, so its successor is one more "
                        f"active key, and workspace '{shown_ws(ws)}' is at "
                        f"{self._cap(workspace)}; revoke a key first.",
                        code="key_limit_reached")

    def _over_cap_in_grace(self, ws: str, workspace: Workspace) -> Conflict:
        return Conflict(f"Workspace '{shown_ws(ws)}' is already over {self._cap(workspace)}, "
                        "and a rotation with a grace keeps both keys active until the grace "
                        "ends; rotate without a grace, or revoke a key first.",
                        code="key_limit_reached")

    async def _release_id(self, key_id: str) -> None:
        with store_errors("write"):
            await self.redis.delete(key_index_key(key_id))

    def _key_fields(self, *, key_id: str, ws: str, token: str, hashed: str, name: str,
                    description: str, environment: str, role: str | None,
                    scopes: Sequence[str], expires_at: float | None, rate_limit: str | None,
                    now: float, monthly_requests: int | None = None, enabled: bool = True,
                    meta: str = "{}", allowed_ips: Sequence[str] | None = None,
                    budget: str | None = None) -> tuple[KeyRecord, list[str]]:
        # The public prefix: the token up to and including the key id, whatever the configured
        # prefix and environment; never a character of the secret.
        head = len(self.config.keys.prefix) + len(environment) + 2
        record = KeyRecord(
            id=key_id, workspace=ws, name=name, description=description,
            environment=environment, role=role, scopes=tuple(scopes) if role is None else (),
            hash=hashed, prefix=token[:head + ID_LEN], created_at=now,
            expires_at=expires_at, revoked_at=None, last_used_at=None, rate_limit=rate_limit,
            rev=1, monthly_requests=monthly_requests, enabled=enabled, meta=meta,
            allowed_ips=None if allowed_ips is None else tuple(allowed_ips), budget=budget)
        fields = ["id", key_id, "workspace", ws, "name", name, "description", description,
                  "environment", environment, "role", role or "",
                  "scopes", json.dumps(list(record.scopes)), "hash", hashed,
                  "prefix", record.prefix, "created_at", epoch_field(now),
                  "expires_at", epoch_field(expires_at), "revoked_at", "", "last_used_at", "",
                  "rate_limit", rate_limit or "", *control_fields(
                      monthly_requests=monthly_requests, enabled=enabled, meta=meta,
                      allowed_ips=allowed_ips)]
        if budget is not None:
            fields += ["budget", budget]
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

    @_confirmed_or_taken_back
    async def create_key(self, ws: str, *, name: str, environment: str,
                         description: str = "", role: str | None = None,
                         scopes: Sequence[str] = (), expires_at: float | None = None,
                         rate_limit: str | None = None, monthly_requests: int | None = None,
                         enabled: bool = True, meta: str = "{}",
                         allowed_ips: Sequence[str] | None = None,
                         actor: str = OPERATOR, acting_rev: int | None = None,
                         acting_grants: Sequence[str] = (),
                         wanted: Callable[[], bool] | None = None,
                         plan_basis: str | None = None) -> NewKey:
        """Create a key bound to ``role`` (if given) or to ``scopes``. Raises NotFound (no such
        workspace) or Conflict ``key_limit_reached`` (the plan's active-key cap is reached;
        checked and applied in one script, so concurrent creates cannot overshoot).
        ``acting_rev``: the rev of the workspace admin key ``actor`` when its call was judged;
        Conflict, nothing written, if that key has changed (revoked, disabled, re-scoped) or
        expired since, or if the workspace role it is bound to no longer grants it keys:admin
        and each of ``acting_grants`` (the scopes the new key gets). ``wanted``: whether the
        caller is still there to take the token, asked once the hash is made (after waiting its
        turn): if not, nothing is written. ``plan_basis``: as for :meth:`update_key` (the
        script writes only on the plan and limits it is given, checked here to be those)."""
        workspace, cap_basis = await self._capped_workspace(ws)
        if plan_basis is not None and cap_basis != plan_basis:
            raise plan_changed(ws, "no key was created")
        for _ in range(ID_ATTEMPTS):
            key_id, token, hashed = await self._new_token(
                ws, environment, lambda: self._room(ws, 0, lambda w: self._at_cap(ws, w)))
            if wanted is not None and not wanted():
                await self._release_id(key_id)
                raise caller_gone("no key was created")
            now = self.clock()
            record, fields = self._key_fields(
                key_id=key_id, ws=ws, token=token, hashed=hashed, name=name,
                description=description, environment=environment, role=role, scopes=scopes,
                expires_at=expires_at, rate_limit=rate_limit, now=now,
                monthly_requests=monthly_requests, enabled=enabled, meta=meta,
                allowed_ips=allowed_ips)
            # No release of the id on a store error: the script may have run, and a key
            # must never lose its index entry (a stray entry is harmless, see the layout).
            for _ in range(ID_ATTEMPTS):
                reply = await self._unanswered_taken_back(ws, key_id, None, actor, self._run(
                    "add_key", (ws_key(ws), ws_keys_key(ws), ws_active_key(ws),
                                key_key(ws, key_id), ws_audit_key(ws), ws_roles_key(ws),
                                key_key(ws, actor), key_key(ws, actor),
                                undone_key(ws, key_id), ws_bindings_key(ws)),
                    (epoch_field(now), self._max_keys(workspace),
                     "+inf" if expires_at is None else epoch_field(expires_at), key_id,
                     self._audit_entry(now, actor, "key.create", key_id,
                                       self._key_details(record)), AUDIT_MAXLEN,
                     "", "", "", self._bound_role(role), cap_basis,
                     "" if acting_rev is None else acting_rev,
                     json.dumps(list(acting_grants)), *fields),
                    what="create key"))
                if reply != "stale_ws":
                    break
                # the workspace's cap changed while this create waited its turn to hash: its
                # cap as it is now (the hash stays good)
                workspace, cap_basis = await self._capped_workspace(ws)
                if plan_basis is not None and cap_basis != plan_basis:
                    await self._release_id(key_id)
                    raise plan_changed(ws, "no key was created")
            if reply == "ok":
                if wanted is not None and not wanted():  # gone while the store made it
                    self._take_back(ws, key_id, None, actor, "was made as its caller left")
                    raise caller_gone("the key created meanwhile is taken back")
                _note_made(ws, key_id, None, actor)
                return NewKey(record, token)
            await self._release_id(key_id)
            if reply == "no_workspace":
                raise no_workspace(ws)
            if reply == "no_role":  # deleted since the caller checked it
                raise unknown_role(ws, role or "")
            if reply == "limit":
                raise self._at_cap(ws, workspace)
            if reply == "actor_changed":
                raise acting_key_changed(actor, "no key was created")
            if reply == "stale_ws":  # out of tries with this hash: not a reason for another
                raise self._kept_changing(ws, reply, "a key was being created in it",
                                          "no key was created")
        raise StoreError("could not find a free key id")

    @_confirmed_or_taken_back
    async def rotate_key(self, ws: str, key_id: str, *, grace_seconds: int = 0,
                         actor: str = OPERATOR, max_expires_at: float | None = None,
                         expect_rev: int | None = None, acting_rev: int | None = None,
                         acting_grants: Sequence[str] = (),
                         wanted: Callable[[], bool] | None = None
                         ) -> tuple[KeyRecord, NewKey]:
        """Replace a key by a new one with the same name, description, environment, role or
        scopes and controls, sharing the old key's rate log and month count (``budget``: its
        own cap goes on where it was, its rate in the same window, and during a grace the two
        keys spend one budget; and, if the old key had an expiry of its own, the same lifetime:
        a grace it is in sets no lifetime). The old
        key is revoked now (grace 0) or expires after the grace (never later than it already
        would). ``max_expires_at`` caps the new key's expiry (self-service: the acting key's).
        Returns (old key as now, new key). Conflict if the key is revoked.

        The new key copies the old one as the script finds it: if the old key changed between
        the read here and the script (its rev moved, or its name, description or meta, which
        move no rev, are not those copied), the rotation is retried from a fresh read
        -- or, with ``expect_rev`` (the rev the caller checked, e.g. self-service's scope check),
        refused with Conflict. ``acting_rev``, ``wanted``: as for :meth:`create_key` (a
        rotation whose caller has gone neither revokes nor shortens the old key)."""
        workspace, cap_basis = await self._capped_workspace(ws)
        old = await self.require_key(ws, key_id)
        # The new key id and the hash of its secret are made once, then written as often as
        # the write meets a key or workspace changed since they were read: a retry re-reads
        # those, not the argon2 hash (which takes its turn with every other hash here).
        new_id = token = hashed = None
        reply = None
        try:
            for _ in range(ROTATE_ATTEMPTS):
                if old.revoked_at is not None:
                    raise revoked_key(key_id)
                if expect_rev is not None and old.rev != expect_rev:
                    raise changed_meanwhile(key_id)
                now = self.clock()
                if new_id is None:  # one id and one hash for every try (hashes wait in turn)
                    new_id, token, hashed = await self._new_token(
                        ws, old.environment, self._rotation_room(ws, old, now, grace_seconds))
                    now = self.clock()
                if wanted is not None and not wanted():
                    await self._release_id(new_id)
                    new_id = None
                    raise caller_gone("nothing was changed")
                expires_at = None
                own = old.own_expires_at  # not the end of a grace it is in (a retry, at once)
                if own is not None:  # the same lifetime as shown, to the second:
                    # rotating again and again never shortens it by the fraction it was made in
                    lifetime = whole_second(own) - whole_second(old.created_at)
                    expires_at = whole_second(now + max(1.0, lifetime))
                if max_expires_at is not None:
                    expires_at = min(max_expires_at, expires_at or max_expires_at)
                record, fields = self._key_fields(
                    key_id=new_id, ws=ws, token=token, hashed=hashed, name=old.name,
                    description=old.description, environment=old.environment, role=old.role,
                    scopes=old.scopes, expires_at=expires_at, rate_limit=old.rate_limit,
                    now=now, monthly_requests=old.monthly_requests, enabled=old.enabled,
                    meta=old.meta, allowed_ips=old.allowed_ips,
                    # one integration, one budget: the new key's requests go on in the old
                    # key's rate log and month count (its own cap goes on where it was, no
                    # fresh burst), and during a grace both keys spend the one budget
                    budget=old.budget_id)
                details = {"new_key": new_id, "grace_seconds": grace_seconds}
                reply = None  # the script may run and its answer be lost: then nothing released
                reply = await self._unanswered_taken_back(ws, new_id, old, actor, self._run(
                    "add_key", (ws_key(ws), ws_keys_key(ws), ws_active_key(ws),
                                key_key(ws, new_id), ws_audit_key(ws), ws_roles_key(ws),
                                key_key(ws, key_id), key_key(ws, actor),
                                undone_key(ws, new_id), ws_bindings_key(ws)),
                    (epoch_field(now), self._max_keys(workspace),
                     "+inf" if expires_at is None else epoch_field(expires_at), new_id,
                     self._audit_entry(now, actor, "key.rotate", key_id, details), AUDIT_MAXLEN,
                     key_id, "" if grace_seconds <= 0 else
                     epoch_field(whole_second(now + grace_seconds)),
                     # the role the copy is bound to must still exist, checked in this step as
                     # a create checks it: an expired key does not hold a role delete up, so one
                     # between the caller's check and here made an active key with no scopes
                     # (an active key does hold it up: rotating a leaked key is never refused
                     # for it)
                     old.rev, self._bound_role(old.role), cap_basis,
                     "" if acting_rev is None else acting_rev, json.dumps(list(acting_grants)),
                     *fields),
                    what="rotate key"))
                if reply == "ok":
                    made, new_id = new_id, None  # the new key's now
                    if wanted is not None and not wanted():  # gone while the store made it
                        self._take_back(ws, made, old, actor, "was made as its caller left")
                        raise caller_gone("the rotation made meanwhile is taken back")
                    _note_made(ws, made, old, actor)
                    try:
                        now_old = await self.require_key(ws, key_id)
                    except (StoreError, NotFound):  # the answer is the new key and its token:
                        now_old = old               # a read failing here must not lose them
                    return now_old, NewKey(record, token)
                if reply == "no_workspace":
                    raise no_workspace(ws)
                if reply == "not_found":
                    raise no_key(ws, key_id)
                if reply == "revoked":
                    raise revoked_key(key_id)
                if reply == "no_role":
                    raise role_gone(ws, key_id, old.role or "")
                if reply == "limit":
                    raise self._expired_at_cap(ws, key_id, workspace)
                if reply == "grace_limit":
                    raise self._over_cap_in_grace(ws, workspace)
                if reply == "successor_limit":
                    raise self._superseded_at_cap(ws, key_id, workspace)
                if reply == "actor_changed":
                    raise acting_key_changed(actor, "nothing was changed")
                if reply == "collision":  # the new id is taken after all: another one
                    await self._release_id(new_id)
                    new_id = None
                elif reply == "stale":  # another change (or rotation) of the key came first
                    old = await self.require_key(ws, key_id)
                elif reply == "stale_ws":  # its cap may have changed: read it again
                    workspace, cap_basis = await self._capped_workspace(ws)
                else:
                    raise StoreError(f"unexpected answer from the rotate script: {reply!r}")
        finally:
            # a key must never lose its index entry: released only when the script answered
            # that it added no key (a stray entry is harmless, see the layout)
            if new_id is not None and reply is not None:
                await self._release_id(new_id)
        if reply == "stale":  # changed under it every time: a conflict, never a 503
            raise changed_meanwhile(key_id)
        raise self._kept_changing(ws, reply, f"key '{shown(key_id, 12)}' was being rotated",
                                  "nothing was changed", ROTATE_ATTEMPTS)

    async def _unanswered_taken_back(self, ws: str, new_id: str, old: KeyRecord | None,
                                     actor: str, adding: Awaitable[Any]) -> Any:
        """The add script's reply; when none came (a store error: it may have run, and the
        caller, answered 503, never sees the new token), the create or rotation is taken back
        in the background as soon as the store answers (``_take_back``) before the error goes
        on. An 'undone' reply (a take-back came first) is a store error as well."""
        try:
            reply = await adding
        except StoreError as exc:
            self._take_back(ws, new_id, old, actor)
            exc.answer = TAKEN_BACK
            raise
        except asyncio.CancelledError:  # (the admin listener's shutdown, past its grace): the
            # script may have run, and nobody is answered with the token
            self._take_back(ws, new_id, old, actor, "was cancelled and may have run")
            raise
        if reply == "undone":
            exc = StoreError(f"key id {new_id} was taken back already")
            exc.answer = TAKEN_BACK
            raise exc
        return reply

    def _take_back(self, ws: str, new_id: str, old: KeyRecord | None, actor: str,
                   why: str = "was answered 503 and may have run") -> None:
        task = asyncio.ensure_future(self._taking_back_until_done(ws, new_id, old, actor, why))
        self._taking_back.add(task)
        task.add_done_callback(self._taking_back.discard)

    async def _taking_back_until_done(self, ws: str, new_id: str, old: KeyRecord | None,
                                      actor: str, why: str) -> None:
        what = (f"the rotation of key {old.id} (new key {new_id})" if old is not None
                else f"the creation of key {new_id}")
        log.warning("workspace %s: %s %s; it is taken back as soon as the store answers", ws,
                    what, why)
        deadline, pause = time.monotonic() + TAKE_BACK_FOR, 0.1
        action = "key.create.undone" if old is None else "key.rotate.undone"
        # one marker for every try: a try that ran and lost its every reply (redis-py's sends
        # of it included) is answered by the next try as it was done (a new marker's try found
        # the key gone and logged a create that ran as one that 'had not run'); kept while
        # this loop may try again
        marker = self._call_marker(key_key(ws, new_id))
        keep_ms = int(1000 * TAKE_BACK_FOR) + self._once_ttl
        try:
            while True:
                try:
                    now = self.clock()
                    details = {"new_key": new_id,
                               "reason": f"the token was never shown: the call {why}"}
                    entry = self._audit_entry(now, actor, action,
                                              new_id if old is None else old.id, details)
                    # the entry when the old key is not given back: its role was deleted
                    # meanwhile (lua/admin_take_back.lua)
                    kept = self._audit_entry(now, actor, action,
                                             new_id if old is None else old.id,
                                             dict(details, old_key=_KEPT))
                    reply = await self._run(
                        "take_back", (key_key(ws, new_id), ws_keys_key(ws), ws_active_key(ws),
                                      ws_audit_key(ws), undone_key(ws, new_id),
                                      key_key(ws, new_id if old is None else old.id),
                                      ws_key(ws), ws_bindings_key(ws), ws_roles_key(ws)),
                        (new_id, entry, AUDIT_MAXLEN, "" if old is None else old.id,
                         UNDONE_TTL, "" if old is None or old.expires_at is None
                         else epoch_field(old.expires_at),
                         json.dumps(dict.fromkeys(self.config.roles, True)), kept),
                        what="take back", marker=marker, keep_ms=keep_ms)
                    break
                except StoreError as exc:
                    if time.monotonic() + pause > deadline or self._closing.is_set():
                        log.error("workspace %s: %s could not be taken back %s (%s); list its "
                                  "keys and revoke key %s", ws, what,
                                  "before the store was closed" if self._closing.is_set()
                                  else f"within {TAKE_BACK_FOR:g}s", exc, new_id)
                        return
                    try:  # the pause, cut short by a close: one last try then
                        await asyncio.wait_for(self._closing.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
                    pause = min(2 * pause, 2.0)
            try:
                await self._release_id(new_id)
            except StoreError:
                pass  # a stray index entry reads as an unknown key (see the layout)
            if reply == "kept" and old is not None:
                log.warning("workspace %s: %s taken back: the new key removed; the old key %s "
                            "was not given back: its role '%s' was deleted meanwhile (perhaps "
                            "defined again since: another role) and it would have been active "
                            "with scopes nobody bound it to, or none. It stays as the rotation "
                            "left it (revoked, or expiring at the grace's end); create a new "
                            "key for its integration", ws, what, old.id, old.role)
            else:
                log.warning("workspace %s: %s taken back (%s)", ws, what, {
                    "absent": "it had not run", "removed": "the new key removed",
                    "restored": "the new key removed, the old key as it was"}.get(reply, reply))
        except asyncio.CancelledError:
            log.error("workspace %s: %s was not taken back before the store was closed; list "
                      "its keys and revoke key %s if it is there", ws, what, new_id)
            raise

    def _rotation_room(self, ws: str, old: KeyRecord, now: float, grace_seconds: int
                       ) -> Callable[[], Awaitable[None]]:
        """The cap check (``_room``) of a rotation of ``old`` as the add script makes it: an
        expired key's successor is a key like any other, and so is the successor of a key
        whose last rotation's key is still active; an active key's, with a grace, may go one
        over the cap; without a grace it replaces the old key and meets no cap."""
        if old.expires_at is not None and old.expires_at <= now:
            return lambda: self._room(ws, 0, lambda w: self._expired_at_cap(ws, old.id, w))

        async def room() -> None:
            if await self._successor_active(ws, old.id):
                await self._room(ws, 0, lambda w: self._superseded_at_cap(ws, old.id, w))
            elif grace_seconds > 0:
                await self._room(ws, 1, lambda w: self._over_cap_in_grace(ws, w))
        return room

    async def _successor_active(self, ws: str, key_id: str) -> bool:
        """Whether the key the last rotation of ``key_id`` made is active (as the add script
        reads it: 'successor', else 'rotated_to')."""
        with store_errors("read"):
            successor, rotated_to = await self.redis.hmget(key_key(ws, key_id),
                                                           ["successor", "rotated_to"])
            successor = successor or rotated_to
            if not successor:
                return False
            score = await self.redis.zscore(ws_active_key(ws), successor)
        return score is not None and score > self.clock()

    def _superseded_at_cap(self, ws: str, key_id: str, workspace: Workspace) -> Conflict:
        return Conflict(f"Key '{shown(key_id, 12)}' was rotated already and the key that "
                        f"rotation made is active, so rotating it again makes one more active "
                        f"key, and workspace '{shown_ws(ws)}' is at {self._cap(workspace)}. "
                        "Revoke the old key instead (or revoke another key first).",
                        code="key_limit_reached")

    @staticmethod
    def _kept_changing(ws: str, reply: str | None, doing: str, outcome: str,
                       attempts: int = ID_ATTEMPTS) -> Exception:
        """Out of tries, each refused because what it was judged on changed (``reply``
        'stale_ws': the workspace, 'stale': the key) or its new id was taken ('collision')."""
        if reply == "collision":
            return StoreError("could not find a free key id")
        what = f"Workspace '{shown_ws(ws)}'" if reply == "stale_ws" else "The key"
        return Conflict(f"{what} changed {attempts} times in a row while {doing}, each time "
                        f"between this call's read of it and its write; {outcome}. Retry.")

    @confirmed_write
    async def update_key(self, ws: str, key_id: str, *, name: Any = UNSET,
                         description: Any = UNSET, role: Any = UNSET, scopes: Any = UNSET,
                         expires_at: Any = UNSET, rate_limit: Any = UNSET,
                         monthly_requests: Any = UNSET, enabled: Any = UNSET, meta: Any = UNSET,
                         allowed_ips: Any = UNSET, actor: str = OPERATOR,
                         expect_rev: int | None = None, acting_rev: int | None = None,
                         acting_grants: Sequence[str] = (),
                         plan_basis: str | None = None) -> KeyRecord:
        """Change the given fields (UNSET = leave as is). ``role`` binds the key to a role,
        ``scopes`` to explicit scopes (the other binding is cleared); ``expires_at`` None
        removes the expiry. Bumps the key's rev: every replica applies it on the next request (a
        change of only name, description and/or meta, which no replica caches, bumps none).
        A new expiry for an expired key re-activates it: Conflict ``key_limit_reached`` if the
        plan's cap is reached; so is a later expiry (or none) for an active key while the
        workspace is over its cap (the old key of a rotation's grace: it would keep it over). With ``expect_rev`` (the rev the caller judged the change on,
        e.g. self-service's loosening checks), Conflict if the key changed since, and nothing
        is written. ``acting_rev``, ``acting_grants``: as for :meth:`create_key` (the scopes
        the change was judged to need of the acting key: those it binds the key to, and the key's
        own when it loosens or extends it). ``plan_basis``: the workspace's plan and limits a
        new ``rate_limit`` was judged against (``capped_workspace``): Conflict, nothing
        written, if they changed since."""
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
        fields += control_fields(**controls)
        details.update({k: v for k, v in controls.items() if k != "meta"})
        if "meta" in controls:
            details["meta"] = "changed"  # metadata can be large; the audit says it changed
        score = ""
        if expires_at is not UNSET:
            fields += ["expires_at", epoch_field(expires_at)]
            details["expires_at"] = rfc3339(expires_at)
            score = "+inf" if expires_at is None else epoch_field(expires_at)
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise no_workspace(ws)
        max_keys, cap_basis = -1, ""
        for _ in range(ID_ATTEMPTS):
            if score:
                workspace, cap_basis = await self._capped_workspace(ws)
                max_keys = self._max_keys(workspace)
            now = self.clock()
            reply = await self._run(
                "update_key", (key_key(ws, key_id), ws_active_key(ws), ws_audit_key(ws),
                               ws_roles_key(ws), ws_key(ws), ws_bindings_key(ws),
                               _acting_hash(ws, actor, key_id, acting_rev)),
                (key_id, score, epoch_field(now), max_keys,
                 self._audit_entry(now, actor, "key.update", key_id, details), AUDIT_MAXLEN,
                 "" if expect_rev is None else expect_rev,
                 self._bound_role(role),
                 # a new expiry brings an expired key back: the role it keeps must still exist
                 json.dumps(dict.fromkeys(self.config.roles, True))
                 if score and role is UNSET and scopes is UNSET else "", cap_basis,
                 "" if acting_rev is None else acting_rev, json.dumps(list(acting_grants)),
                 plan_basis or "", *fields))
            if reply != "stale_ws":  # else the cap changed since it was read: read it again
                break
        if reply == "stale_ws":  # its cap changed under it every time
            raise self._kept_changing(ws, reply, f"key '{shown(key_id, 12)}' was being changed",
                                      "nothing was changed")
        if reply == "no_role":  # deleted since the caller checked it
            raise unknown_role(ws, role)
        if reply == "actor_changed":
            raise acting_key_changed(actor, "nothing was changed")
        if reply == "plan_changed":
            raise plan_changed(ws, "nothing was changed")
        if isinstance(reply, list) and reply[:1] == ["unbound"]:
            raise Conflict(f"Key '{shown(key_id, 12)}' is bound to role "
                           f"'{shown(reply[1])}', which neither workspace '{shown_ws(ws)}' nor "
                           "the config defines any more: a new expiry would make it (or keep "
                           "it) active with no scopes. Give it a role or scopes in the same "
                           "change.")
        if reply == "stale":
            raise Conflict(f"Key '{shown(key_id, 12)}' changed while this change to it was being "
                           "checked; read it again and retry.")
        if reply == "limit":
            raise Conflict(f"Key '{shown(key_id, 12)}' has expired and workspace "
                           f"'{shown_ws(ws)}' is at {self._cap(workspace)}; a new expiry "
                           "would make it active again.", code="key_limit_reached")
        if reply == "over_limit":
            raise Conflict(f"Workspace '{shown_ws(ws)}' is over {self._cap(workspace)}: a "
                           f"later expiry for key '{shown(key_id, 12)}' would keep it over. "
                           "Revoke a key first (or let a rotation's grace end).",
                           code="key_limit_reached")
        key = key_from_hash(hash_pairs(reply))
        if key is None:
            raise no_key(ws, key_id)
        return key

    @confirmed_write
    async def revoke_key(self, ws: str, key_id: str, *, actor: str = OPERATOR,
                         acting_rev: int | None = None) -> KeyRecord:
        """Revoke for good (idempotent: revoking again changes nothing and audits nothing).
        ``acting_rev``: as for :meth:`create_key` (Conflict, nothing revoked, if the acting
        key changed since its call was judged, or its role no longer grants keys:admin)."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise no_workspace(ws)
        now = self.clock()
        reply = await self._run(
            "revoke_key", (key_key(ws, key_id), ws_active_key(ws), ws_audit_key(ws),
                           _acting_hash(ws, actor, key_id, acting_rev),
                           _acting_roles(ws, key_id, acting_rev)),
            (key_id, epoch_field(now), self._audit_entry(now, actor, "key.revoke", key_id, {}),
             AUDIT_MAXLEN, "" if acting_rev is None else acting_rev))
        if reply == "actor_changed":
            raise acting_key_changed(actor, "nothing was revoked")
        key = key_from_hash(hash_pairs(reply))
        if key is None:
            raise no_key(ws, key_id)
        return key

    @confirmed_write
    async def delete_key(self, ws: str, key_id: str, *, actor: str = OPERATOR,
                         acting_rev: int | None = None) -> KeyRecord:
        """Remove a revoked or expired key from listings for good (Conflict for an active
        key: revoke it first): no listing, count or admin call finds it again. Its audit
        entries stay, and so do its record for answering its token (``kg:gone``, without its
        name, description and meta) and its ``kg:keyid`` index: the token is still answered
        ``revoked_key`` or ``expired_key``, not ``invalid_key`` counted as a failed guess
        against the address of an integration nobody told. ``acting_rev``: as for
        :meth:`revoke_key`."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            raise no_workspace(ws)
        now = self.clock()
        reply = await self._run(
            "delete_key", (key_key(ws, key_id), ws_keys_key(ws), ws_active_key(ws),
                           ws_audit_key(ws), gone_key_key(ws, key_id),
                           _acting_hash(ws, actor, key_id, acting_rev),
                           _acting_roles(ws, key_id, acting_rev)),
            (key_id, epoch_field(now), self._audit_entry(now, actor, "key.delete", key_id, {}),
             AUDIT_MAXLEN, "" if acting_rev is None else acting_rev))
        if reply == "actor_changed":
            raise acting_key_changed(actor, "nothing was deleted")
        if reply == "active":
            raise Conflict(f"Key '{shown(key_id, 12)}' is active; revoke it (or let it expire) "
                           "before deleting it.")
        key = key_from_hash(hash_pairs(reply))
        if key is None:
            raise no_key(ws, key_id)
        return key


def _acting_hash(ws: str, actor: str, key_id: str, acting_rev: int | None) -> str:
    """The acting key's record as a script's key (``_acting_key.lua``). The operator's call
    (``acting_rev`` None) reads none: the target key's record stands in, so that the script
    names no key that does not exist. While a slot migrates, a multi-key script with a key
    missing from the node is answered TRYAGAIN: an operator's revoke of a key whose slot was
    migrating, with all its keys still in place, failed on the operator's own (absent)
    record."""
    return key_key(ws, key_id if acting_rev is None else actor)


def _acting_roles(ws: str, key_id: str, acting_rev: int | None) -> str:
    """The workspace's roles as a script's key for ``_acting_key.lua``: unread (and the
    target key's record in their place, see ``_acting_hash``) for the operator."""
    return key_key(ws, key_id) if acting_rev is None else ws_roles_key(ws)
