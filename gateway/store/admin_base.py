"""The admin store's foundation: connection, script runner, errors, workspace reads."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Self, Sequence,
                    TypeVar)

from redis.exceptions import (AuthenticationError, AuthorizationError, RedisClusterException,
                              RedisError, ResponseError, TryAgainError)

from ..config import Config
from ..errors import BadRequest, Conflict, NotFound, StoreError, describe, shown
from ..models import ROLE_NAME_RE, Workspace, rfc3339
from ..redis_topology import TRY_AGAIN_AT_ONCE, TryAgainAtOnce, topology_client
from ..redis_urls import is_topology_url, standalone_client
from ..tokens import SecretHasher
from ..usage import effective_plan
from .keyspace import once_key, ws_key
from .records import WORKSPACE_ID_RE, shown_ws, workspace_from_hash
from .request import once_ttl_ms
from .scripts import load

OPERATOR = "operator"        # the audit actor of admin-API changes (self-service: the key id)
AUDIT_MAXLEN = 10_000
ID_ATTEMPTS = 8              # fresh key ids / slug suffixes tried before giving up
# The admin scripts that write. Each call of one names a marker of its own, in the workspace's
# slot (lua/_once.lua): redis-py sends a command again when its connection died before the reply
# came (redis_urls._retry, up to 3 times), and Redis may have run it already. A copy finds the
# marker and answers what the call answered, doing nothing again. Before, a copy of a workspace
# create found the id taken (409 for the workspace the call made, or a second workspace under
# a suffixed id), a copy of an update audited it and bumped the rev once more, a copy of a
# delete found nothing to delete (404 for a delete that happened).
WRITES = frozenset({"create_workspace", "update_workspace", "add_key", "update_key",
                    "revoke_key", "set_role", "delete_key", "take_back"})
# Admin scripts that write and need no marker: a copy that runs again does no harm (the key
# prefixes' record: a ZADD of the prefix with the time, recorded again).
IDEMPOTENT_WRITES = frozenset({"key_prefixes"})


def _client(url: str, timeout: float) -> Any:
    if "://" not in url:
        raise StoreError("the store URL needs a scheme: redis://, rediss://, unix://, "
                         "redis+sentinel:// or redis+cluster://")
    if is_topology_url(url):  # redis+sentinel://, redis+cluster:// (see gateway.redis_urls)
        return topology_client(url, timeout=timeout, decode_responses=True,
                               confirm_writes=True)
    return standalone_client(url, timeout=timeout, decode_responses=True)


def no_workspace(ws: str) -> NotFound:
    return NotFound(f"There is no workspace '{shown_ws(ws)}'.")


def no_key(ws: str, key_id: str) -> NotFound:
    return NotFound(f"Workspace '{shown_ws(ws)}' has no key '{shown(key_id, 12)}'.")


def unknown_role(ws: str, role: str) -> BadRequest:
    """A key bound to a role neither the workspace nor the config defines (the admin API's
    check, and the binding scripts' own when a delete came in between)."""
    named = role if ROLE_NAME_RE.fullmatch(role) else shown(role)  # a slug is never a token
    return BadRequest(f"The field 'role' names an unknown role '{named}'; it is neither "
                      f"a role of workspace '{shown_ws(ws)}' nor a configured role.")


def role_gone(ws: str, key_id: str, role: str) -> Conflict:
    """Rotating a key bound to a role nothing defines any more (an expired key outlives its
    role: it does not hold a delete up): its successor would be an active key with no scopes."""
    return Conflict(f"Key '{shown(key_id, 12)}' is bound to role '{shown(role)}', which neither "
                    f"workspace '{shown_ws(ws)}' nor the config defines any more; re-role it "
                    "(PATCH its 'role' or 'scopes') before rotating it.")


def revoked_key(key_id: str) -> Conflict:
    return Conflict(f"Key '{shown(key_id, 12)}' is revoked; a revoked key cannot be rotated.")


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Re-raise whatever the Redis client raises as :class:`StoreError` (never shown to clients)."""
    try:
        yield
    except StoreError:
        raise
    except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
        # RedisClusterException: e.g. no seed node of a Cluster answers (not a RedisError)
        raise StoreError(f"store {what} failed: {describe(exc)}") from exc


T = TypeVar("T")


def confirmed_write(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An admin write whose success is confirmed where the store can be wrong about it: on
    Sentinel, the node every command of the operation ran on must still be the master the
    Sentinels name once it is done (``gateway.redis_topology._ConfirmingSentinelMaster``), else
    :class:`StoreError` (503: the change could not be confirmed). A write that ran on a demoted
    master is thrown away with its data; it must not be answered as done. Standalone and
    Cluster clients have nothing to confirm (Cluster: a demoted node answers MOVED)."""
    @functools.wraps(method)
    async def write(self: "StoreBase", *args: Any, **kwargs: Any) -> T:
        confirming = getattr(self.redis, "writes_confirmed", None)
        if confirming is None:
            return await method(self, *args, **kwargs)
        with store_errors("write confirmation"):
            async with confirming():
                return await method(self, *args, **kwargs)
    return write


# Seconds each node may take to answer the eviction look's INFO (``eviction_problem``; at most
# the store timeout). INFO memory is answered at once by a Redis that answers at all; a node
# that does not (paused, its host gone silent) is not waited for the store timeout.
EVICTION_NODE_TIMEOUT = 1.0


def _eviction_in(info: Mapping[str, Any]) -> str | None:
    """The eviction problem one node's INFO memory shows, or None."""
    policy = str(info.get("maxmemory_policy", "noeviction"))
    try:
        limit = int(info.get("maxmemory") or 0)
    except (TypeError, ValueError):
        limit = 0
    if policy == "noeviction" or limit <= 0:
        return None
    lost = ("month and day counters and rate logs (quotas and rate limits start "
            "again from zero)" if policy.startswith("volatile-") else
            "keys, workspaces and counters (good keys answer 401 invalid_key, "
            "quotas start again from zero)")
    return (f"Redis evicts keys when full (maxmemory-policy {policy}, maxmemory "
            f"{limit} bytes): it will drop keygate's {lost}; set "
            f"maxmemory-policy noeviction (a full Redis then refuses writes: "
            f"503 store_unavailable) and size maxmemory to fit")


def _consumed(task: "asyncio.Future[Any]") -> None:
    """Retrieve a finished call's exception, so that asyncio does not log it as never
    retrieved."""
    if not task.cancelled():
        task.exception()


class FairTurns:
    """One holder at a time, the waiters served round the parties (workspaces) waiting, each
    party's own in the order they came: a party with many waiting takes one turn in each
    round, so a party that comes later waits for one turn of each party ahead of it, not for
    all their waiters. ``async with turns:`` takes a turn as a party of its own."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: dict[object, collections.deque[asyncio.Future[None]]] = {}  # the round

    @contextlib.asynccontextmanager
    async def turn(self, party: object) -> AsyncIterator[None]:
        await self._acquire(party)
        try:
            yield
        finally:
            self._release()

    async def __aenter__(self) -> None:
        await self._acquire(object())

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    async def _acquire(self, party: object) -> None:
        if not self._busy:  # (nobody waits while nobody holds it: a release hands it on)
            self._busy = True
            return
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(party, collections.deque())
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed the turn as it was cancelled: hand it on
            elif waiter in queue:  # (else a release passed it by already)
                queue.remove(waiter)
                if not queue and self._waiting.get(party) is queue:
                    del self._waiting[party]
            raise

    def _release(self) -> None:
        while self._waiting:
            party = next(iter(self._waiting))
            queue = self._waiting.pop(party)
            waiter = queue.popleft()
            if queue:
                self._waiting[party] = queue  # to the end of the round
            if not waiter.done():
                waiter.set_result(None)  # the turn passes to it (still busy)
                return
        self._busy = False


class StoreBase:
    """What every admin operation stands on: the redis-py connection, the admin scripts, the
    workspace reads and the audit entry. :class:`gateway.store.admin.Store` is the whole store.
    """

    def __init__(self, client: Any, config: Config, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.config = config  # and the hasher of new keys' secrets (see the setter)
        self.clock = clock
        # gateway.argon2_pool.Argon2Pool: where a serving gateway hashes new keys' secrets
        # (None: a thread of asyncio's default executor, as the CLI and tests do)
        self.argon2 = None
        # One new key's hash at a time: on the pool, a workspace admin sending creates in
        # bulk queued every hash ahead of other workspaces' first requests (see _new_token);
        # turns go round the workspaces waiting, so a burst of one holds up no other
        self._hashing = FairTurns()
        # the key prefixes read from the store (key_prefixes_seen) since start: the admin
        # API refuses their tokens in what it stores, as the config's
        self.key_prefixes_known: tuple[str, ...] = ()
        self._scripts = {name: client.register_script(load(f"admin_{name}").text)
                         for name in ("create_workspace", "update_workspace", "add_key",
                                      "update_key", "revoke_key", "set_role", "delete_key",
                                      "list_keys", "role_users", "take_back",
                                      "key_prefixes")}
        # creates and rotations answered 503 being taken back (KeyStore._take_back)
        self._taking_back: set[asyncio.Task[None]] = set()
        # set by close(): a take-back waiting between two tries makes its last one at once
        self._closing = asyncio.Event()
        # each write's marker (WRITES): ids unique across processes and replicas, kept longer
        # than redis-py goes on sending a call again (as the request path's markers are)
        self._call_tag, self._call_seq = os.urandom(8).hex(), 0
        self._once_ttl = once_ttl_ms(_client_timeout(client, config.store.timeout))

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """The config in force; a reload that changes ``keys.argon2`` hashes the secrets of
        keys created from then on with the new parameters."""
        a = config.keys.argon2
        if getattr(self, "_config", None) is None or self._config.keys.argon2 != a:
            self.hasher = SecretHasher(a.time_cost, a.memory_cost, a.parallelism)
        self._config = config

    @classmethod
    async def connect(cls, url: str, config: Config, *,
                      clock: Callable[[], float] = time.time) -> "Self":
        """A store on ``url``. Does not wait for Redis to answer (``ping`` tells readiness)."""
        with store_errors("connect"):
            try:
                client = _client(url, config.store.timeout)
            except ValueError as exc:
                raise StoreError(f"bad store URL: {exc}") from exc
        return cls(client, config, clock=clock)

    async def close(self) -> None:
        from ..closing import CLOSE_STEP_TIMEOUT, bounded
        # a take-back still pending makes one last try (the store may be answering again):
        # cancelled at once, the key nobody holds stood though Redis was there to take it back
        self._closing.set()
        if self._taking_back:
            await asyncio.wait(list(self._taking_back), timeout=CLOSE_STEP_TIMEOUT)
        for task in list(self._taking_back):
            task.cancel()
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            # bounded (gateway.closing): a close that does not end in time is logged and left
            await bounded(self.redis.aclose(), 3 * CLOSE_STEP_TIMEOUT,
                          "closing the admin store's Redis client")

    async def ping(self) -> bool:
        return await self.ping_problem() is None

    async def ping_problem(self) -> str | None:
        """None when Redis answers PING, else the cause (exception class and message)."""
        try:
            if await self.redis.ping():
                return None
            return "PING was not answered with PONG"
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            return describe(_refusal_within(exc))

    async def eviction_problem(self) -> str | None:
        """What is wrong with Redis's memory policy for keygate, or None. Redis evicts keys
        once it reaches ``maxmemory`` unless ``maxmemory-policy`` is ``noeviction``, and
        keygate's keys are its only copy of what it knows: under ``volatile-*`` the month and
        day counters and the rate logs (they have a TTL) go first, so quotas and rates start
        again from zero; under ``allkeys-*`` key records and workspaces go too (good keys
        answer 401 ``invalid_key``).

        One INFO call to each node keygate writes to: the Redis, the Sentinels' master, every
        primary of a Cluster (a replica holds nothing keygate writes; one that is promoted is
        looked at from the next look on), all at once, each for at most
        ``EVICTION_NODE_TIMEOUT`` seconds: a node that does not answer by then is not waited
        for (its call is cancelled). :class:`StoreError` when no node that answered would evict
        and one could not say (not answering, INFO refused): whether Redis evicts is then not
        known. Never on the request path (``Readiness`` runs it in the background)."""
        primaries = getattr(self.redis, "get_primaries", None)  # a Cluster
        if primaries is not None and not primaries():
            with store_errors("read of the Cluster's layout"):  # no command sent yet
                await self.redis.initialize()
        nodes = [None] if primaries is None else primaries()
        if not nodes:
            raise StoreError("the Cluster's primaries are not known")
        looks = [asyncio.ensure_future(self.redis.info("memory") if node is None else
                                       self.redis.info("memory", target_nodes=node))
                 for node in nodes]
        try:
            await asyncio.wait(looks, timeout=min(EVICTION_NODE_TIMEOUT,
                                                  self.config.store.timeout))
        finally:  # (also when this look is cancelled: a shutdown)
            for look in looks:
                if not look.done():
                    look.cancel()  # redis-py closes a connection whose read is cancelled
                look.add_done_callback(_consumed)
        silent = 0
        for look in looks:
            if not look.done() or look.cancelled():  # (a cancelled call ends a moment later)
                silent += 1
                continue
            if isinstance(look.exception(), (RedisError, RedisClusterException, OSError,
                                             asyncio.TimeoutError)):
                silent += 1
                continue
            reply = look.result()
            # a single Redis (and a Cluster's node, alone) answers its own info, a Cluster
            # asked for several nodes {node: info}
            for info in ([reply] if "maxmemory_policy" in reply else
                         [i for i in reply.values() if isinstance(i, dict)]):
                if problem := _eviction_in(info):
                    return problem
        if silent:
            raise StoreError(f"{silent} of {len(looks)} Redis node(s) did not say their "
                             f"maxmemory-policy within {EVICTION_NODE_TIMEOUT:g} s")
        return None

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                   what: str = "", marker: str | None = None,
                   keep_ms: int | None = None) -> Any:
        """Run the script ``lua/admin_<name>.lua``; ``what`` names the operation in errors.
        A script that writes (``WRITES``) is given a marker and its TTL, after the call's own
        keys and arguments: ``marker`` when given (a caller trying one operation again after a
        store error names its first try's, from ``_call_marker``: a try after one that ran
        answers what that one did), else a new one, in the slot of the workspace ``keys[0]``
        is of. It is kept ``keep_ms`` (as long as such a caller goes on trying), else past
        redis-py's own sends of the call.

        While that slot migrates (Cluster), the marker, a key that never exists before the
        call, is on neither node: both answer ``TRYAGAIN`` (a multi-key command, some keys
        missing) until the whole slot has moved, where the script's own keys, all still on
        the old owner, ran there (a revoke of a leaked key, a workspace change: 503 for the
        whole reshard). ``TRYAGAIN`` means Redis did not run it: the call is then sent at once
        without its marker, as before markers, and waits for the slot as any call does (its
        own keys split across the two nodes). The trade-off: such a call is not resend-safe
        (a reply lost then, a copy runs again), only during its slot's migration. Never when
        an attempt of the marked call failed on its connection (it may have run, its copy
        met the ``TRYAGAIN``): that stays the store error it was."""
        script = self._scripts[name]
        with store_errors(what or name.replace("_", " ")):
            if name not in WRITES:
                return await script(keys=list(keys), args=list(args))
            at_once = TryAgainAtOnce()
            token = TRY_AGAIN_AT_ONCE.set(at_once)
            try:
                return await script(keys=[*keys, marker or self._call_marker(keys[0])],
                                    args=[*args, keep_ms or self._once_ttl])
            except TryAgainError:
                if at_once.unsure:
                    raise
            finally:
                TRY_AGAIN_AT_ONCE.reset(token)
            return await script(keys=list(keys), args=list(args))

    def _call_marker(self, key: str) -> str:
        """A new marker for one write (``WRITES``), in the slot of ``key``'s workspace (its
        ``{ws}`` hash tag: a Cluster runs the script on that one slot)."""
        self._call_seq += 1
        ws = key[key.index("{") + 1:key.index("}")]
        return once_key(ws, f"admin:{self._call_tag}:{self._call_seq}")

    def _audit_entry(self, now: float, actor: str, action: str, target: str,
                     details: Mapping[str, Any]) -> str:
        return json.dumps({"at": rfc3339(now), "actor": actor, "action": action,
                           "target": target, "details": dict(details)})

    # --- workspaces ---------------------------------------------------------------------------

    async def get_workspace(self, ws: str) -> Workspace | None:
        if not WORKSPACE_ID_RE.fullmatch(ws):
            return None
        with store_errors("read"):
            return workspace_from_hash(await self.redis.hgetall(ws_key(ws)))

    async def require_workspace(self, ws: str) -> Workspace:
        workspace = await self.get_workspace(ws)
        if workspace is None:
            raise no_workspace(ws)
        return workspace

    def _bound_role(self, role: Any) -> str:
        """The workspace role a binding to ``role`` needs to find in the store, for the
        binding's script to check in its own step ('' when a configured role of that name
        stands behind it, or there is no role)."""
        return role if isinstance(role, str) and role and role not in self.config.roles else ""

    def _max_keys(self, workspace: Workspace) -> int:
        """The active-key cap in force for ``workspace`` (-1: none), as the scripts take it."""
        plan = effective_plan(self.config, workspace)
        return -1 if plan.max_keys is None else plan.max_keys


def _client_timeout(client: Any, timeout: float) -> float:
    """The longest socket timeout ``client`` keeps (a URL's ``socket_timeout`` wins over the
    config's, as redis-py reads it), at least ``timeout``."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool if pool is not None else client, "connection_kwargs", None) or {}
    seen = [timeout]
    for name in ("socket_timeout", "socket_connect_timeout"):
        try:
            seen.append(float(kwargs.get(name) or 0))
        except (TypeError, ValueError):
            pass
    return max(seen)


def _refusal_within(exc: BaseException) -> BaseException:
    """The refusal of a Redis that answered (wrong password, ACL) that ``exc`` wraps, else
    ``exc``: over a unix socket redis-py raises a refused AUTH as a plain ``ConnectionError``
    whose cause is the ``AuthenticationError``, and start-up read that as "no Redis there"."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain, never a cycle worth following further
        if seen is None:
            break
        if isinstance(seen, (AuthenticationError, AuthorizationError, ResponseError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc
