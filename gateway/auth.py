"""Authentication: token → a verified key, with a process-local verification cache.

A key's secret is argon2-verified at most once per process per ``keys.cache_ttl``; the cache
remembers a SHA-256 digest of the verified secret (never the secret) and the key's state at a
revision. The cache never decides alone whether the state is current: every request's one
store round trip (``lua/authorize.lua``) compares revisions, and a stale entry is re-read
before anything is decided, so revocation and re-scoping act on the very next request at every
replica without waiting for a TTL.

The cold path (a key not in the cache) reads the key, then verifies in a thread pool, never on
the event loop; concurrent first requests for one key and secret share one verification, and
failed verifications are throttled per client IP and per key id *before* argon2 runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .config import Config, Plan, RateLimit
from .errors import TooManyRequests, invalid_token
from .hotpath import RequestStore
from .limits import key_rate_limit
from .models import KeyRecord, Principal, Workspace
from .tokens import ParsedToken, SecretHasher

MAX_CACHED_KEYS = 100_000


@dataclass
class CachedKey:
    """A verified key and the state it was verified at."""
    key: KeyRecord
    workspace: Workspace
    principal: Principal
    plan: Plan | None
    rate: RateLimit | None
    secret_digest: bytes
    verified_until: float  # time.monotonic() deadline for the argon2 verification

    @property
    def monthly_limit(self) -> int | None:
        return self.plan.monthly_requests if self.plan else None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Authenticator:
    def __init__(self, config: Config, store, requests: RequestStore, metrics=None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store              # gateway.store.Store (redis-py; cold path only)
        self.requests = requests        # hot path
        self.metrics = metrics
        self.clock = clock
        a = config.keys.argon2
        self.hasher = SecretHasher(a.time_cost, a.memory_cost, a.parallelism)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
        self.cache: dict[str, CachedKey] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future] = {}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- the step the pipeline awaits ---------------------------------------------------------

    async def authenticate(self, token: ParsedToken, client_ip: str) -> CachedKey:
        """The verified key for ``token``, or a named error. Does not judge expiry/revocation."""
        digest = _digest(token.secret)
        entry = self.cache.get(token.key_id)
        if entry is not None and time.monotonic() < entry.verified_until \
                and hmac.compare_digest(entry.secret_digest, digest):
            if self.metrics:
                self.metrics.key_cache.labels("hit").inc()
            return entry
        if self.metrics:
            self.metrics.key_cache.labels("miss").inc()
        flight = (token.key_id, digest)
        if (fut := self._inflight.get(flight)) is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[flight] = fut
        try:
            entry = await self._verify(token, digest, client_ip)
            fut.set_result(entry)
            return entry
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # followers re-raise it; nobody else needs to retrieve it
            raise
        finally:
            del self._inflight[flight]

    async def refresh(self, entry: CachedKey) -> CachedKey | None:
        """Re-read a key whose stored revision moved on. None when it no longer exists."""
        key = await self.store.get_key(entry.key.workspace, entry.key.id)
        if key is None:
            self.cache.pop(entry.key.id, None)
            return None
        fresh = await self._load(key, entry.secret_digest, entry.verified_until)
        if fresh is None:
            self.cache.pop(entry.key.id, None)
            return None
        self._remember(fresh)
        return fresh

    # --- cold path ----------------------------------------------------------------------------

    async def _verify(self, token: ParsedToken, digest: bytes, client_ip: str) -> CachedKey:
        limits = self.config.keys.failures
        by_ip, by_key = await self.requests.failure_counts(client_ip, token.key_id)
        if by_ip >= limits.per_ip or by_key >= limits.per_key:
            raise TooManyRequests(
                "Too many failed attempts with invalid keys; wait before trying again.",
                code="too_many_failures", headers={"Retry-After": str(limits.window_seconds)})
        workspace_id = await self.store.key_workspace(token.key_id)
        key = await self.store.get_key(workspace_id, token.key_id) if workspace_id else None
        ok = False
        if key is not None and key.environment == token.environment:
            ok = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.hasher.verify, key.hash, token.secret)
            if self.metrics:
                self.metrics.argon2.labels("ok" if ok else "fail").inc()
        if not ok:
            await self.requests.record_failure(client_ip, token.key_id, limits.window_seconds)
            raise invalid_token("invalid_key", "The API key is not valid.")
        entry = await self._load(key, digest, time.monotonic() + self.config.keys.cache_ttl)
        if entry is None:  # the workspace vanished under the key
            raise invalid_token("invalid_key", "The API key is not valid.")
        self._remember(entry)
        return entry

    async def _load(self, key: KeyRecord, digest: bytes, verified_until: float) -> CachedKey | None:
        workspace = await self.store.get_workspace(key.workspace)
        if workspace is None:
            return None
        scopes = await self.store.effective_scopes(key.workspace, key)
        plan = self.config.plans.get(workspace.plan)
        principal = Principal(workspace.id, key.id, frozenset(scopes), workspace.plan)
        return CachedKey(key, workspace, principal, plan,
                         key_rate_limit(self.config, plan, key.rate_limit),
                         digest, verified_until)

    def _remember(self, entry: CachedKey) -> None:
        cache = self.cache
        cache.pop(entry.key.id, None)
        if len(cache) >= MAX_CACHED_KEYS:  # drop the oldest entry (dicts keep insertion order)
            del cache[next(iter(cache))]
        cache[entry.key.id] = entry
