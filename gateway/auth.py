"""Authentication: token → a verified key, with a process-local verification cache.

A key's secret is argon2-verified at most once per process per ``keys.cache_ttl``; the cache
remembers a BLAKE2s digest of the verified token (never the token) and the key's state at a
revision. The cache never decides alone whether the state is current: every request's one
store round trip (``gateway/store/lua/authorize.lua``) compares revisions, and a stale entry is
re-read before anything is decided, so revocation and re-scoping act on the very next request at every
replica without waiting for a TTL.

The cold path (a key not in the cache) waits for a turn in a bounded, fair queue
(``gateway.verify_queue``), reads the key, then verifies on a bounded thread pool that takes
only the CPU the event loop leaves or lends it (``gateway.argon2_pool``), never on the loop;
concurrent first requests for one key and secret share one verification, and failed verifications are throttled per client IP (and per key id when
``keys.failures.per_key`` is set) *before* argon2 runs.
"""

from __future__ import annotations

import asyncio
from hashlib import blake2s as _blake2s
import ipaddress
from itertools import islice
import json
import logging
import secrets
import time
from typing import Callable

from .config import Config, Plan, RateLimit
from .errors import (GatewayError, ServiceUnavailable, StoreError, TooManyRequests,
                     Unauthorized, client_closed, invalid_token)
from .store.keyspace import key_index_key
from .store.records import WORKSPACE_ID_RE, key_from_hash, workspace_from_hash
from .store.request import RequestStore
from .usage import effective_plan, key_rate_limit
from .models import KeyRecord, Principal, Workspace
from .tokens import (Argon2CouldNotRun, MalformedHash, MalformedToken, ParsedToken,
                     SecretHasher, parse_token)
from .trust import throttle_client
from .argon2_pool import Argon2Pool
from .verify_queue import VerifyQueue

MAX_CACHED_KEYS = 100_000
# When the cache is full, a hundredth of it is made room at once: one pass over its oldest
# entries per that many new keys, instead of one per key (a dict whose oldest entries were
# deleted walks their empty slots to find the next: ~34 µs at 100k entries, each time).
ROOM_MADE = 100
FAILURE_RESETS_KEPT = 4096  # failure counters whose reset instant is remembered (~0.5 MB)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CachedKey:
    """A verified key as the cache keeps it, in one object: who its requests act as (it is
    their ``Principal``: ``workspace``, ``key_id``, ``scopes``, ``plan``), the key's state the
    access check and the authorize script read (named as in ``KeyRecord``), the workspace
    record and the limits it was derived with, and the verification itself.

    Only what deciding a request needs (bench/memory.py): a stripped ``KeyRecord`` copy, a
    ``Principal`` and an entry holding both took 352 of the ~600 bytes a cached key cost; this
    took 144 then (184 since: its environment, config role and ``gone``). The argon2 hash,
    name, description, meta, prefix and timestamps other than expiry are not kept (answers
    that show a key read it from the store), nor read of ``workspace_record`` but its id,
    plan, limits and rev: a change of only those fields, a workspace's name, moves no rev
    (``lua/_new_rev.lua``), so what is kept of them may be older than the store's."""

    __slots__ = ("key_id", "scopes", "expires_at", "revoked_at", "enabled", "rev",
                 "monthly_requests", "workspace_record", "limits", "rate", "secret_digest",
                 "verified_until", "generation", "networks", "budget", "used", "environment",
                 "config_role", "gone")

    def __init__(self, key: KeyRecord, workspace: Workspace, principal: Principal,
                 limits: Plan | None, rate: RateLimit | None, secret_digest: bytes,
                 verified_until: float, generation: int = 0,
                 networks: tuple[IPNetwork, ...] | None = None,
                 config_role: str | None = None) -> None:
        """``key``, ``workspace``: the records as read; ``principal``: the key's effective
        scopes (its ``workspace`` and ``plan`` are the records'); ``limits``: the plan in
        force for the workspace; ``rate``: the key's rate limit in force; ``config_role``:
        the role whose scopes ``principal`` has, when the config defines them (the key is
        bound to a role its workspace did not define when it was read; None for a key's own
        scopes or a workspace's role, which are store state)."""
        self.key_id = key.id
        self.scopes: frozenset[str] = principal.scopes
        self.expires_at = key.expires_at
        self.revoked_at = key.revoked_at
        self.enabled = key.enabled
        self.rev = key.rev
        self.monthly_requests = key.monthly_requests  # the key's own cap (None: none)
        self.workspace_record = workspace
        self.limits = limits
        self.rate = rate
        self.secret_digest = secret_digest    # BLAKE2s of the verified token (the cache key)
        self.verified_until = verified_until  # time.monotonic() deadline of the verification
        self.generation = generation  # the config it was derived with (plan, rate, role scopes)
        self.networks = networks      # the key's allowed_ips (None: any address)
        self.budget = key.budget_id   # the key id its rate log and own month count go under
        self.used = False  # served from the cache since it last made room (_make_room)
        self.environment = key.environment  # its token's (a reload removing it drops it)
        self.config_role = config_role  # what a reload re-derives without the store
        # deleted from listings (DELETE .../keys/{id}): revoked or expired for good, its
        # record kept for its token (kg:gone); its refusal needs no confirming (no call can
        # change it), and its token is never answered as an unknown key's failed guess
        self.gone = False

    @property
    def id(self) -> str:
        """The key id, under ``KeyRecord``'s name."""
        return self.key_id

    def with_scopes(self, scopes: frozenset[str]) -> "CachedKey":
        """A copy (never cached) whose requests have ``scopes`` instead."""
        copy = object.__new__(CachedKey)
        for name in CachedKey.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.scopes = scopes
        return copy

    # --- as a Principal (forwarded upstream, handed to the self-service endpoints) ---------------

    @property
    def workspace(self) -> str:
        return self.workspace_record.id

    @property
    def plan(self) -> str:
        return self.workspace_record.plan

    def has_scope(self, scope: str) -> bool:
        return "ALL" in self.scopes or scope in self.scopes

    # --- the limits -----------------------------------------------------------------------------

    @property
    def monthly_limit(self) -> int | None:
        return self.limits.monthly_requests if self.limits else None

    @property
    def key_limit(self) -> int | None:
        """The key's own monthly cap (None: only the workspace's applies)."""
        return self.monthly_requests

    def allows(self, client_ip: str) -> bool:
        """Whether the key may be used from ``client_ip`` (its allow-list; IPv4-mapped IPv6
        addresses compare as IPv4, as the failure throttle sees them)."""
        if self.networks is None:
            return True
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


class _Verification:
    """A cold-path verification under way (``Authenticator._inflight``): its task, how many
    requests wait on it, and whether it has a turn yet. One that no request waits on any more
    while it waits for a turn is cancelled: its place in the queue goes to those still there
    (once it holds a turn it runs to its end, so an attacker leaving cannot keep a failure
    from being counted).

    ``client``: the throttle client (``throttle_client``) whose queue and failure limit it
    runs under, its first requester's. ``refused_client``: it was refused 429 for that
    client's failures alone (not the key id's): a request from another client that shared it
    is verified on its own instead (so is one it shared that was refused 503 ``overloaded``
    before a turn, the queue being bounded per client). ``failed``: its argon2 run failed
    and was counted against ``client``: a request from another client that shared it counts
    it against its own as well."""

    __slots__ = ("task", "waiting", "turned", "client", "refused_client", "failed")

    def __init__(self, client: str = "") -> None:
        self.task: asyncio.Future | None = None
        self.waiting = 0
        self.turned = False
        self.client = client
        self.refused_client = False
        self.failed = False


def too_many_failures(wait: int) -> TooManyRequests:
    """The 429 of a client (or key id) over its failure limit; ``wait``: Retry-After, s."""
    return TooManyRequests(
        "Too many failed attempts with invalid keys; wait before trying again.",
        code="too_many_failures", headers={"Retry-After": str(wait)})


def token_digest(raw_token: str) -> bytes:
    """What the cache is keyed by: BLAKE2s-256 of the whole token. The token itself is never
    kept; a token that once verified is known well-formed, so a hit skips parsing it again.
    BLAKE2s rather than SHA-256: CPython's own, without OpenSSL's per-call context set-up
    (callgrind: ~1.7k instructions a request instead of ~6k; keygate serve 372.9k → 368.1k)."""
    return _blake2s(raw_token.encode("utf-8", "surrogateescape")).digest()


# A workspace found gone from the store (lost data) is said at most this often (seconds).
LOST_STORE_SAID_EVERY = 60.0
log = logging.getLogger("keygate.store")
auth_log = logging.getLogger("keygate")


class Authenticator:
    def __init__(self, config: Config, store, requests: RequestStore, metrics=None,
                 clock: Callable[[], float] = time.time) -> None:
        self.generation = 0             # bumped by a reload: cached entries are re-derived
        self.config = config
        self.under = (config, 0)        # (config, generation): a request's snapshot of both
        # the generation the cache was last cleared at (a reload changing keys.prefix, or
        # removing one of keys.environments: its keys only): the cache's epoch. An entry
        # whose request took its snapshot (``under``) before it, its token parsed under keys
        # settings since replaced, is not put back by a read that spanned the clear
        # (``_remember``).
        self.epoch = 0
        self.store = store              # gateway.store.Store (redis-py; cold path only)
        self.requests = requests        # hot path
        self.metrics = metrics
        self.clock = clock
        self._prepared: tuple | None = None  # keys.argon2, hasher, decoy: made by prepare()
        self._decoy_for(config)
        self.argon2 = Argon2Pool()  # as many threads as the CPU limit allows, followed
        # A turn per argon2 thread, plus one, so a thread never idles while a turn reads the
        # key from the store.
        self.queue = VerifyQueue(self.argon2.size + 1,
                                 config.keys.verify_queue.per_ip,
                                 config.keys.verify_queue.total)
        self.argon2.on_resize = lambda threads: self.queue.resize(threads + 1)
        self._per_key_limit = config.keys.failures.per_key
        self._running: dict[str, int] = {}  # client IP / key id → verifications running
        self._finished: dict[str, asyncio.Event] = {}  # set when one of them finishes
        # failure counter ("ip <addr>" / "key <id>") -> time.monotonic() it resets, learnt
        # refusing a request over its limit: the next refusals answer Retry-After from it
        # instead of asking the store again (see _failures_reset_in). Bounded.
        self._failure_resets: dict[str, float] = {}
        # token digest → verified key. One token can verify for a key id (the id, secret and
        # checksum are the token's body; the prefix is the config's, whose change clears
        # this), so the cache needs no index by key id.
        self.cache: dict[bytes, CachedKey] = {}
        self.capacity = MAX_CACHED_KEYS
        # by token digest; (digest, throttle client) for one a refusal for another client's
        # sake started (``authenticate``)
        self._inflight: dict[bytes | tuple[bytes, str], _Verification] = {}
        self._interned: dict = {}  # shared workspaces and scope sets (see entry())
        self._prefix = config.keys.prefix
        self._environments = frozenset(config.keys.environments)
        self._hit = metrics.tally(metrics.key_cache.labels("hit")) if metrics else None
        self._miss = metrics.tally(metrics.key_cache.labels("miss")) if metrics else None
        # workspaces found gone since the last line about a lost store, and when it was said
        self._gone: set[str] = set()
        self._gone_said = -float("inf")
        # argon2 runs that could not be made since the last line saying so, and when it was
        self._not_run = 0
        self._not_run_said = -float("inf")

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` (a reload). Verified secrets stay verified (no argon2 re-run); each
        cached key's plan, rate and role scopes are re-read on its next request. A changed
        token prefix drops the cache, and an environment no longer accepted drops its keys:
        their tokens no longer parse. An environment added drops nothing (every token that
        verified still parses): its keys stay verified, exempt from the failure throttle."""
        prefix_changed = config.keys.prefix != self._prefix
        removed = self._environments - frozenset(config.keys.environments)
        if config.keys.failures != self.config.keys.failures:
            self._failure_resets.clear()  # over its limit then, perhaps not under the new one
        self.config = config
        self._prefix = config.keys.prefix
        self._environments = frozenset(config.keys.environments)
        self._per_key_limit = config.keys.failures.per_key
        if config.keys.argon2 != self._decoy_params:
            self._decoy_for(config)
        self.queue.per_ip = config.keys.verify_queue.per_ip  # bounds for the next arrivals
        self.queue.total = config.keys.verify_queue.total
        self.argon2.reread_cpu_limit()  # a pod resized in place: a reload follows it
        self.generation += 1
        self.under = (config, self.generation)
        if prefix_changed or removed:
            if prefix_changed:
                self.cache.clear()
            else:
                for digest in [d for d, e in self.cache.items() if e.environment in removed]:
                    del self.cache[digest]
            self.epoch = self.generation  # what began before this no longer goes in (_remember)

    def _decoy_for(self, config: Config) -> None:
        """What a token whose key id has no key (or none in its environment) is verified
        against: a hash of nothing anyone holds, with the parameters new keys are hashed with
        (the admin store's, reloaded with ``keys.argon2``), so that its refusal costs what a
        wrong secret's does. One argon2 hash, at start-up and at a reload that changes them:
        a reload's is made beforehand on the argon2 pool (``prepare``), never on the loop."""
        a = config.keys.argon2
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == a:
            _, self.hasher, self._decoy_hash = prepared
        else:  # at start-up (or a reconfigure nobody prepared: tests)
            self.hasher = SecretHasher(a.time_cost, a.memory_cost, a.parallelism)
            self._decoy_hash = self.hasher.hash(secrets.token_hex(16))
        self._decoy_params = a

    async def prepare(self, config: Config) -> list[str]:
        """Before a reload's swap: the decoy hash for ``config``'s ``keys.argon2`` if they
        change, made on the argon2 pool (at the new cost it held the event loop, every request
        with it, for the whole hash); problems if they cannot hash at all (the reload is then
        refused, nothing changed)."""
        a = config.keys.argon2
        if a == self._decoy_params:
            return []
        hasher = SecretHasher(a.time_cost, a.memory_cost, a.parallelism)
        try:
            decoy = await self.argon2.run(hasher.hash, secrets.token_hex(16))
        except Exception as exc:  # argon2's HashingError (the memory cannot be had)
            return [f"keys.argon2: no key could be hashed with these parameters ({exc})"]
        self._prepared = (a, hasher, decoy)
        return []

    def close(self) -> None:
        self.argon2.shutdown()

    # --- the step the pipeline awaits ---------------------------------------------------------

    async def authenticate(self, raw_token: str, client_ip: str, request=None) -> CachedKey:
        """The verified key for ``raw_token``, or a named error (malformed, invalid, throttled).

        ``request``: on keygate's own listener (whose connection handler ends the future it
        holds as ``upstream_wait`` when the client goes), a request whose client goes while its
        key waits to be verified ends then (``client_closed``), and leaves the verification
        queue if no other request waits on the same verification. Looked at on the cold path
        only.

        Does not judge expiry or revocation: the pipeline does, against the store."""
        digest = token_digest(raw_token)
        entry = self.cache.get(digest)
        if entry is not None and time.monotonic() < entry.verified_until and (
                entry.generation == self.generation or self._within_ttl(entry)):
            if self._hit is not None:
                self._hit.inc()
            entry.used = True
            if entry.generation != self.generation:  # derived under a config since reloaded
                under = self.under
                try:
                    fresh = await self.refresh(entry, under)
                except StoreError:
                    if under[0].store.on_store_error != "open":
                        raise
                    # fail-open: a key verified here goes through while the store is down,
                    # a reload since or not (the pipeline decides from its cached state)
                    if self.metrics:
                        self.metrics.store_errors.inc()
                    return self.failing_open(entry, under)
                if fresh is None:
                    raise invalid_token("invalid_key", "The API key is not valid.")
                return fresh
            return entry
        token = self.parse(raw_token)  # only tokens that never verified get here
        if self._miss is not None:
            self._miss.inc()
        # the config this request began under (its route, upstream and header rules were
        # taken under it): the key is derived under it too, whatever a reload does meanwhile
        under = self.under
        client = throttle_client(client_ip)
        verification = self._inflight.get(digest)
        # joining a verification that runs under another client's queue and failure limit
        joined = verification is not None and verification.client != client
        if verification is None:
            verification = self._start(token, digest, digest, client, entry, under[1])
        watch = getattr(request, "protocol", None)
        try:
            if joined and entry is None:  # (one that verified before is no guess: _start)
                await self._join(verification, digest, token.key_id, client, watch)
            try:
                return await self._as_of(
                    await self._outcome(verification, digest, watch, joined), under)
            except (TooManyRequests, ServiceUnavailable) as exc:
                # Shared with a first requester from another client address and refused for
                # that address alone (its failures; its queue full, overloaded before a turn):
                # the limits are per client, so this request is verified under its own
                # (shared with others of its client). One argon2 per token otherwise.
                if not joined or not (verification.refused_client or (
                        exc.code == "overloaded" and not verification.turned)):
                    raise
            except Unauthorized:
                # the shared run's guess failed: a failure of this request's client too, as
                # had it been sent alone (the key id's count is the run's: one argon2 run)
                if joined and verification.failed:
                    await self.requests.record_failure(
                        client, None, self.config.keys.failures.window_seconds)
                raise
            inflight = (digest, client)
            verification = self._inflight.get(inflight)
            if verification is None:
                verification = self._start(token, digest, inflight, client, entry,
                                           under[1])
            return await self._as_of(await self._outcome(verification, inflight, watch), under)
        except StoreError:
            # on_store_error: open lets keys verified in this process through while the store
            # is down: this token verified here (only its cache_ttl ran out), and the key's
            # hash never changes, so it still would; the pipeline decides from its cached state
            if entry is not None and self.config.store.on_store_error == "open":
                if self.metrics:  # the key's read failed: a store error all the same (a
                    self.metrics.store_errors.inc()  # raised one the pipeline counts)
                return self.failing_open(entry, under)
            raise

    def failing_open(self, entry: CachedKey, under: tuple[Config, int]) -> CachedKey:
        """``entry`` as fail-open lets it through under ``under`` (the config its request
        began under, and its generation) while its key cannot be read: its state as last read
        (the store's), but the scopes of a role the config defines as that config gives them
        (a reload during the outage takes a scope from the role: it is never forwarded with
        it). A workspace's own role, and a key's own scopes, are store state: as last read."""
        if entry.config_role is None or entry.generation == under[1]:
            return entry
        scopes = frozenset(under[0].roles.get(entry.config_role, ()))
        return entry if scopes == entry.scopes else entry.with_scopes(self._shared(scopes))

    async def _as_of(self, entry: CachedKey, under: tuple[Config, int]) -> CachedKey:
        """``entry`` as derived under the config ``under`` (config, generation): a request
        that shared a verification begun under another config (a reload between the two)
        re-reads the key under its own. Cold path only; the same entry almost always."""
        if entry.generation == under[1]:
            return entry
        fresh = await self.refresh(entry, under)
        if fresh is None:
            raise invalid_token("invalid_key", "The API key is not valid.")
        return fresh

    def _start(self, token: ParsedToken, digest: bytes, inflight, client: str,
               entry: CachedKey | None, parsed: int) -> _Verification:
        """A verification of ``token`` under ``client``'s queue and failure limit, shared as
        ``_inflight[inflight]`` (the digest; the digest and the client for one of a request a
        shared verification was refused for another client's sake).

        It runs as its own task, not inside the first request: a first request cancelled
        (client gone, shutdown) must not cancel it under the others waiting on it, nor waste
        the argon2 run already under way. An entry past its TTL (``entry``) is this very
        token, verified here before: its re-verification is no guess, and others' failures
        must not refuse it. ``parsed``: the generation ``token`` was parsed under (the
        request's ``under``), which a cache clear since then keeps the result out of."""
        verification = _Verification(client)
        task = asyncio.ensure_future(self._verify(token, digest, client,
                                                  verified_before=entry is not None,
                                                  verification=verification, parsed=parsed))
        verification.task = task
        self._inflight[inflight] = verification
        task.add_done_callback(lambda t: self._verified(inflight, t))
        return verification

    async def _join(self, verification: _Verification, inflight, key_id: str,
                    client: str, watch) -> None:
        """Before a request joins ``verification``, run under another client's failure
        limit: its own client's (429 ``too_many_failures``, as sent alone: first failure
        wins). Meanwhile it counts as waiting on the verification, which others leaving
        therefore do not cancel under it; refused, it leaves it as one gone would. Its
        client going during the check (a slow store; its own client's runs to wait for)
        ends it ``client_closed`` then, as ``_wait_while_there`` would: the connection
        handler ends ``watch.upstream_wait``, held here for that."""
        verification.waiting += 1
        refused = True
        check = asyncio.ensure_future(
            self._within_failure_limits(key_id, client, per_key=False))
        gone = None
        if hasattr(watch, "upstream_wait"):
            gone = asyncio.get_running_loop().create_future()
            watch.upstream_wait = gone
        try:
            if gone is None:
                await check
            else:
                try:
                    await asyncio.wait((check, gone), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if watch.upstream_wait is gone:
                        watch.upstream_wait = None
                if gone.done():  # gone, even if its check came in the same pass
                    raise client_closed(reached_upstream=False)
                check.result()
            refused = False
        finally:
            if not check.done():
                check.cancel()
            elif not check.cancelled():
                check.exception()  # retrieved: re-raised above, or nobody's any more
            if gone is not None:
                if not gone.done():
                    gone.cancel()
                elif not gone.cancelled():
                    gone.exception()  # retrieved: ClientGone
            verification.waiting -= 1
            if refused:
                self._abandon(verification, inflight)

    async def _outcome(self, verification: _Verification, inflight, watch,
                       joined: bool = False) -> CachedKey:
        """The verification's result for one request waiting on it."""
        if hasattr(watch, "upstream_wait"):
            return await self._wait_while_there(verification, inflight, watch, joined)
        # none, or not keygate's own handler (the admin listener's key check): a waiter
        # all the same, whose verification a request leaving must not cancel under it
        verification.waiting += 1
        try:
            return await asyncio.shield(verification.task)
        finally:
            verification.waiting -= 1

    def _within_ttl(self, entry: CachedKey) -> bool:
        """Whether an entry cached before a reload is still verified under the
        ``keys.cache_ttl`` now in force: one that a shorter TTL ends is ended (then verified
        again, as one whose TTL ran out). Only on an entry's first use after a reload."""
        until = time.monotonic() + self.config.keys.cache_ttl
        if entry.verified_until > until:
            entry.verified_until = until
        return time.monotonic() < entry.verified_until

    def accepts(self, prefix: str, environment: str) -> bool:
        """Whether tokens of ``prefix`` and ``environment`` are still accepted (a reload may
        have changed ``keys.prefix`` or ``keys.environments``: then such a token is a 401
        ``malformed_key``). For an open WebSocket tunnel's check: its token is not kept."""
        return prefix == self._prefix and environment in self._environments

    def parse(self, raw_token: str) -> ParsedToken:
        """The token's parts: shape, prefix, checksum and environment checked (401
        ``malformed_key`` otherwise). No store call."""
        try:
            return parse_token(raw_token, self._prefix, self._environments)
        except MalformedToken as exc:
            raise invalid_token("malformed_key", f"The API key is malformed: {exc}.") from None

    async def _wait_while_there(self, verification: _Verification, inflight,
                                watch, joined: bool = False) -> CachedKey:
        """The verification's result, unless the client goes first (``watch.upstream_wait``
        ended by its connection handler): the request then ends as ``client_closed``, and a
        verification nobody waits on any more that has no turn yet is cancelled, freeing its
        place in the queue (per client address and in total) for requests still there.

        ``joined``: run under another client's limits, whose refusal (429, 503) may send this
        request to a verification of its own: not if its client went in the same pass."""
        task, loop = verification.task, asyncio.get_running_loop()
        result = asyncio.shield(task)
        gone = loop.create_future()
        watch.upstream_wait = gone
        verification.waiting += 1
        try:
            await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request cancelled (a shutdown): as a cancelled await
            result.cancel()    # of the shield would, so its outcome is nobody's to log
            raise
        finally:
            verification.waiting -= 1
            if watch.upstream_wait is gone:
                watch.upstream_wait = None
        if not gone.done():
            gone.cancel()
        elif not gone.cancelled():
            gone.exception()  # retrieved: ClientGone
        if result.done():  # answered, though the client may have gone just now
            if joined and not gone.cancelled() and not result.cancelled() and isinstance(
                    result.exception(), (TooManyRequests, ServiceUnavailable)):
                raise client_closed(reached_upstream=False)  # no run of its own for nobody
            return result.result()
        result.cancel()  # the task itself goes on for whoever still waits on it
        self._abandon(verification, inflight)
        raise client_closed(reached_upstream=False)

    def _abandon(self, verification: _Verification, inflight) -> None:
        """A request stopped waiting on ``verification``: if nobody waits on it any more and
        it has no turn yet, it is cancelled (its place in the queue goes to those there)."""
        task = verification.task
        if not verification.waiting and not verification.turned and not task.done():
            if self._inflight.get(inflight) is verification:
                del self._inflight[inflight]  # a request coming now starts one anew
            task.cancel()

    def _verified(self, inflight, task: asyncio.Task) -> None:
        verification = self._inflight.get(inflight)
        if verification is not None and verification.task is task:
            del self._inflight[inflight]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters re-raise it, or nobody waits any more

    async def refresh(self, entry: CachedKey,
                      under: tuple[Config, int] | None = None) -> CachedKey | None:
        """Re-read a key whose stored revision moved on. None when it no longer exists.

        ``under``: the config (and its generation) to derive it under, a request's own (the
        one its route was matched under); by default the config in force now. Taken before
        the read: a reload while it reads leaves the entry derived under the config the
        request began with (stale, so the key's next request derives it anew), never half
        of each (SPEC: requests in flight finish on the old config)."""
        config, generation = under or self.under  # (also the cache epoch it may go back in)
        key, workspace, role, gone = await self._read(entry.workspace, entry.key_id)
        fresh = None if key is None else self._entry_for(
            key, workspace, role, entry.secret_digest, entry.verified_until, generation,
            config, gone)
        if workspace is None:
            self._workspace_gone(entry.workspace)
        if fresh is None:
            self._forget(entry)
            return None
        self._remember(fresh, generation)
        return fresh

    # --- cold path ----------------------------------------------------------------------------

    async def _verify(self, token: ParsedToken, digest: bytes, client_ip: str,
                      verified_before: bool = False,
                      verification: _Verification | None = None, *,
                      parsed: int) -> CachedKey:
        """Wait for a turn (503 overloaded when the queue is full), then check the failure
        throttle and verify. Only verifications that *failed* count against the throttle;
        a verification waiting in the queue is never refused as a failure.

        ``verified_before``: this token (its digest) verified in this process and only its
        ``cache_ttl`` ran out. The throttle bounds the argon2 runs that guesses cost; this is
        no guess, so it is not refused for failures others sent from the same address (a NAT,
        an office) or against the same public key id. Should it fail, its entry is dropped:
        the exemption holds once. Its key is read before it takes a turn, so that no turn is
        held while the store is waited on (a hung Redis and fail-open: every key whose TTL
        ran out waits out one store timeout, at once, not in turns of a few)."""
        if not verified_before:  # known over its limit: refused before it takes a place
            self._refuse_known_over_limit(token.key_id, client_ip, verification)
        read = await self._key_of(token) if verified_before else None
        # one verified before waits for a turn but is never refused one (docs/errors.md: a key
        # already verified is never refused 503 overloaded): the cache bounds how many there
        # are (one verification per cached token at a time)
        async with self.queue.turn(client_ip, bounded=not verified_before):
            if verification is not None:
                verification.turned = True  # from now on it runs to its end
            if not verified_before:
                await self._within_failure_limits(token.key_id, client_ip, verification)
            running = [client_ip] + ([token.key_id] if self._per_key_limit else [])
            for name in running:
                self._running[name] = self._running.get(name, 0) + 1
            try:
                return await self._verify_counted(token, digest, client_ip, verification,
                                                  parsed, read)
            finally:
                for name in running:
                    if (n := self._running[name] - 1) > 0:
                        self._running[name] = n
                    else:
                        del self._running[name]
                    if (done := self._finished.pop(name, None)) is not None:
                        done.set()

    async def _within_failure_limits(self, key_id: str, client_ip: str,
                                     verification: _Verification | None = None,
                                     per_key: bool = True) -> None:
        """429 too_many_failures once the stored failures reach a limit. While they are below
        it, verifications of this process still running for the same IP (or key id) are what
        could still fail: one that could push past the limit waits for them to finish rather
        than run argon2 beyond the limit (an attacker's concurrent wrong guesses then cost at
        most ``per_ip`` argon2 runs per window and process).

        ``per_key`` False: the client IP's limit alone (a request joining a verification that
        judges the key id's)."""
        limits = self.config.keys.failures
        per_key = self._per_key_limit if per_key else None
        while True:
            by_ip, by_key = await self.requests.failure_counts(client_ip,
                                                               key_id if per_key else None)
            over_ip, over_key = by_ip >= limits.per_ip, bool(per_key and by_key >= per_key)
            if over_ip or over_key:
                wait = await self._failures_reset_in(client_ip if over_ip else None,
                                                     key_id if over_key else None)
                if verification is not None and not over_key:
                    verification.refused_client = True  # for client_ip's failures alone
                raise too_many_failures(wait)
            if by_ip + self._running.get(client_ip, 0) < limits.per_ip:
                if not per_key or by_key + self._running.get(key_id, 0) < per_key:
                    return
                await self._finished.setdefault(key_id, asyncio.Event()).wait()
            else:
                await self._finished.setdefault(client_ip, asyncio.Event()).wait()

    def _refuse_known_over_limit(self, key_id: str, client_ip: str,
                                 verification: _Verification | None) -> None:
        """429 too_many_failures at once, before a place in the verification queue is taken,
        for a client IP (or, with ``per_key``, a key id) this process already refused for its
        failures in the counter's current window (its reset is remembered: a fixed window,
        whose counter only grows until then). Queued, a throttled address's guesses held
        places in ``verify_queue.total`` until their turn only to be refused then: 16 such
        addresses filled the default 4096, and legitimate first requests got 503 overloaded.
        No store call: the same answer the turn would give, from what the refusal learnt."""
        known = self._failure_resets
        if not known:
            return
        now, window = time.monotonic(), self.config.keys.failures.window_seconds
        resets = (known.get("ip " + client_ip),
                  known.get("key " + key_id) if self._per_key_limit else None)
        over = [at for at in resets if at is not None and now < at <= now + window]
        if not over:
            return
        if verification is not None and (resets[1] is None or resets[1] not in over):
            verification.refused_client = True  # for client_ip's failures alone
        ms = int((max(over) - now) * 1000)
        raise too_many_failures(max(1, min(window, -(-ms // 1000))))

    async def _failures_reset_in(self, client_ip: str | None, key_id: str | None) -> int:
        """Whole seconds (at least 1, rounded up) until the counters over their limit reset:
        each is a fixed window from its first failure (lua/add_usage.lua), not a whole
        ``window_seconds`` from now. The window itself if that cannot be read."""
        window = self.config.keys.failures.window_seconds
        # A counter's reset is a fixed instant (its TTL, set at its first failure and moved
        # only into a window a reload lowered): once read it is remembered, so a flood of
        # refused guesses costs the store one read per counter and window rather than one or
        # two more per guess. One remembered past the window in force is asked again (the
        # read brings the counter within it: lua/failure_reset.lua).
        known, now = self._failure_resets, time.monotonic()
        names = ("ip " + client_ip if client_ip is not None else None,
                 "key " + key_id if key_id is not None else None)
        at = [known.get(n, 0.0) if n is not None else None for n in names]
        ask = [n is not None and not now < a <= now + window for n, a in zip(names, at)]
        if any(ask):
            try:
                resets = iter(await self.requests.failure_resets_ms(
                    client_ip if ask[0] else None, key_id if ask[1] else None, window))
            except StoreError:  # the counts were just read: refuse as before, with the window
                if self.metrics:
                    self.metrics.store_errors.inc()
                return window
            if len(known) >= FAILURE_RESETS_KEPT:
                known.clear()
            for i, asked in enumerate(ask):
                if asked:
                    ms = next(resets, -2)
                    at[i] = now + (window if ms == -1 else max(ms, 0) / 1000)
                    if ms != -2:  # a counter gone: its next window starts with a failure
                        known[names[i]] = at[i]
        ms = max((int((a - now) * 1000) for a in at if a is not None), default=0)
        return max(1, min(window, -(-ms // 1000)))

    async def _key_of(self, token: ParsedToken) -> tuple:
        """(config, generation) taken before the reads, then the key's workspace id, the key,
        its workspace, the workspace's definition of its role (Nones: no such key) and
        whether the key was deleted from listings (``_read``)."""
        # the config the key is derived under, taken with its generation before the first
        # await: a reload while this runs leaves the entry stale, derived under the config the
        # request began with, never under half of each (its route was matched under it)
        under = self.under
        workspace_id = await self.requests.key_workspace(token.key_id)
        if workspace_id:
            key, workspace, role, gone = await self._read(workspace_id, token.key_id)
        else:
            # no such key id: a read all the same, so that an unknown id costs the store
            # round trips a wrong secret does, as the decoy argon2 run costs what a real one
            # does. Of a "workspace" named as the key id's index entry, which no workspace
            # id can be: its hash tag puts the read in the slot of the lookup that just
            # answered (Cluster), so a node down elsewhere never turns it into a 503
            await self.requests.read_key(key_index_key(token.key_id), token.key_id)
            key, workspace, role, gone = None, None, None, False
        return under, workspace_id, key, workspace, role, gone

    async def _verify_counted(self, token: ParsedToken, digest: bytes, client_ip: str,
                              verification: _Verification | None, parsed: int,
                              read: tuple | None = None) -> CachedKey:
        """Verify ``token`` against its key (``read``: as ``_key_of`` read it; None: read
        now), counting a failure."""
        (config, generation), workspace_id, key, workspace, role, gone = \
            read if read is not None else await self._key_of(token)
        limits = config.keys.failures
        try:
            if key is not None and key.environment == token.environment:
                ok = await self.argon2.run(self.hasher.verify, key.hash, token.secret)
            else:  # no such key: the same run, so that its timing tells no key id exists
                await self.argon2.run(self.hasher.verify, self._decoy_hash, token.secret)
                ok = False
        except MalformedHash as exc:  # answered as every malformed record is (503)
            raise StoreError(f"the store holds a malformed key hash ({token.key_id!r}): "
                             f"{exc}") from exc
        except Argon2CouldNotRun as exc:  # no answer about the secret: nothing is counted
            raise self._could_not_run(exc) from exc
        if self.metrics:
            self.metrics.argon2.labels("ok" if ok else "fail").inc()
        if not ok:
            self.cache.pop(digest, None)  # an entry past its TTL: no longer a token that verified
            await self.requests.record_failure(  # per key id only when that limit is on
                client_ip, token.key_id if self._per_key_limit else None, limits.window_seconds)
            if verification is not None:
                verification.failed = True  # its joiners from other clients count it too
            raise invalid_token("invalid_key", "The API key is not valid.")
        entry = self._entry_for(key, workspace, role, digest,
                                time.monotonic() + config.keys.cache_ttl, generation, config,
                                gone)
        if entry is None:  # the workspace vanished under the key
            self._workspace_gone(workspace_id)
            self.cache.pop(digest, None)
            raise invalid_token("invalid_key", "The API key is not valid.")
        self._remember(entry, parsed)
        return entry

    def _could_not_run(self, exc: Argon2CouldNotRun) -> GatewayError:
        """The 500 of a verification whose argon2 run could not be made (its ``memory_cost``
        or a thread could not be had: a memory limit, strict overcommit, many runs at once).
        It says nothing about the secret, so it is no failed verification: nothing is
        counted and a cached entry stays. Logged as an error at most every
        ``LOST_STORE_SAID_EVERY`` s, with how many runs failed so since."""
        self._not_run += 1
        now = time.monotonic()
        if now - self._not_run_said >= LOST_STORE_SAID_EVERY:
            auth_log.error("argon2 could not run (%s): %d verification(s) answered 500 "
                           "internal_error since the last such line; give keygate more memory "
                           "or lower keys.argon2.memory_cost", exc, self._not_run)
            self._not_run, self._not_run_said = 0, now
        return GatewayError("The API key could not be verified now; retry in a moment.")

    def _workspace_gone(self, ws: str) -> None:
        """A workspace this process served keys of (or whose key is still stored) is no longer
        in the store. No API call deletes a workspace: Redis lost data. Said as an error at
        most every ``LOST_STORE_SAID_EVERY`` s, with how many workspaces were found so since;
        without it, the operator saw only 401s (the requests answer ``invalid_key``)."""
        self._gone.add(ws)
        now = time.monotonic()
        if now - self._gone_said < LOST_STORE_SAID_EVERY:
            return
        others = len(self._gone) - 1
        log.error("workspace '%s' is no longer in the store%s, though its keys were stored and "
                  "no API call deletes a workspace: Redis lost data (restarted without "
                  "persistence, FLUSHDB or FLUSHALL, keys evicted under maxmemory, or an older "
                  "backup restored); their keys answer 401 invalid_key. Restore the store "
                  "from a backup, or create the workspaces and issue their keys again",
                  ws, f" (and {others} more workspace(s) since the last such line)"
                  if others > 0 else "")
        self._gone.clear()
        self._gone_said = now

    async def _read(self, ws: str, key_id: str
                    ) -> tuple[KeyRecord | None, Workspace | None, str | None, bool]:
        """The key, its workspace, the workspace's definition of the key's role (JSON) and
        whether the key was deleted from listings (its record kept for its token: revoked or
        expired for good), in one round trip on the request path's connection."""
        if not WORKSPACE_ID_RE.fullmatch(ws):
            return None, None, None, False
        stored = await self.requests.read_key(ws, key_id)
        return (key_from_hash(stored.key), workspace_from_hash(stored.workspace), stored.role,
                stored.gone)

    def _entry_for(self, key: KeyRecord, workspace: Workspace | None, role: str | None,
                   digest: bytes, verified_until: float, generation: int,
                   config: Config, gone: bool = False) -> CachedKey | None:
        """The cache entry, with the key's scopes now: its own, or its role's (the workspace's
        definition shadows the config's; a role neither defines grants nothing), derived
        under ``config`` (generation ``generation``). None when the workspace is gone.
        ``gone``: the key was deleted from listings (``CachedKey.gone``)."""
        if workspace is None:
            return None
        config_role = None
        if key.role is None:
            scopes = key.scopes
        elif role is not None:
            try:
                scopes = tuple(json.loads(role))
            except ValueError as exc:
                raise StoreError("the store holds a malformed workspace role") from exc
        else:
            scopes = tuple(config.roles.get(key.role, ()))
            config_role = key.role
        entry = self.entry(key, workspace, scopes, digest, verified_until, generation, config,
                           config_role)
        entry.gone = gone
        return entry

    def entry(self, key: KeyRecord, workspace: Workspace, scopes, digest: bytes,
              verified_until: float, generation: int | None = None,
              config: Config | None = None, config_role: str | None = None) -> CachedKey:
        """The cache entry for a verified key, kept lean (bench/memory.py): only what deciding
        a request needs, in one ``CachedKey``; workspaces, plans, rate limits, scope sets and
        allow-lists equal to ones already cached are shared (all immutable). ``config``: the
        config ``generation`` is (both default to those in force); ``config_role``: the role
        of ``config`` that ``scopes`` are (``CachedKey``)."""
        if config is None:
            config = self.config
        workspace = self._shared(workspace)
        plan = effective_plan(config, workspace)  # the workspace's own limits included
        if workspace.overrides:  # a plan of its own: one per distinct set of limits
            plan = self._shared(plan)
        rate = key_rate_limit(config, plan, key.rate_limit)
        if key.rate_limit:       # parsed from the key's own "N/s": one per distinct limit
            rate = self._shared(rate)
        networks = None if key.allowed_ips is None else self._shared(
            tuple(ipaddress.ip_network(n, strict=False) for n in key.allowed_ips))
        principal = Principal(workspace.id, key.id, self._shared(frozenset(scopes)),
                              workspace.plan)
        return CachedKey(key, workspace, principal, plan, rate, digest, verified_until,
                         self.generation if generation is None else generation, networks,
                         config_role)

    def _shared(self, value):
        """One instance per distinct immutable value among cached keys."""
        shared = self._interned.get(value)
        if shared is None:
            if len(self._interned) >= MAX_CACHED_KEYS:
                self._interned.clear()
            shared = self._interned[value] = value
        return shared

    def _remember(self, entry: CachedKey, began: int) -> None:
        """Cache ``entry``, whose request took its snapshot (``under``) at generation
        ``began``, before its token was parsed or the entry it re-reads was found. Begun
        before the cache was last cleared (a reload changed keys.prefix or removed one of
        keys.environments while its key was read), it is not cached: its token was accepted
        under keys settings since replaced, and a cached entry is never parsed again. It still
        answers its own request (finishing on the old config). Cold path only: after a store
        read."""
        if began < self.epoch:
            return
        cache = self.cache
        cache.pop(entry.secret_digest, None)  # a re-read entry moves to the newest end
        if len(cache) >= self.capacity:
            self._make_room()
        cache[entry.secret_digest] = entry

    def _make_room(self) -> None:
        """Drop a hundredth of the full cache (at least one entry), by second chance: its
        entries are in the order they were verified (dicts keep insertion order), and the
        oldest are looked at first; one served from the cache since it was last looked at
        moves to the newest end, unmarked, instead of being dropped.

        Dropping the oldest whatever its use (as before) let a stream of new keys, more
        within ``keys.cache_ttl`` than the cache holds (an attacker's valid throwaway keys, or
        a long tail of rarely used ones), push out every key in steady use: each paid argon2
        again, queued behind that stream. Now a key seen once is dropped first, and one in
        use stays as long as it is used once per pass. A pass looks at no more than 8 times
        what it drops: if fewer than a hundredth of those were unused (more keys in steady
        use than the cache holds), the oldest left make up the hundredth, so that the next
        new keys find room without looking again."""
        cache = self.cache
        want = max(1, self.capacity // ROOM_MADE)
        dropped = 0
        for digest in list(islice(cache, 8 * want)):
            entry = cache.pop(digest)
            if entry.used:
                entry.used = False
                cache[digest] = entry  # a second chance, at the newest end
            else:
                dropped += 1
                if dropped == want:
                    break
        if dropped < want:  # (one walk past the slots emptied above, not one per entry)
            for digest in list(islice(cache, want - dropped)):
                del cache[digest]

    def _forget(self, entry: CachedKey) -> None:
        self.cache.pop(entry.secret_digest, None)
