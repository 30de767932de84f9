"""The per-request store: one Lua round trip per proxied request (``lua/authorize.lua``),
the cold path's failure throttle, and the pipeline's refunds and fail-open catch-up.

Every call goes through one :class:`~gateway.store.clients.ScriptClient` -- the lean RESP
client for a standalone server, redis-py for Sentinel and Cluster -- so nothing here depends
on which one it is. The admin operations are :class:`gateway.store.admin.Store`'s.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, Callable, NamedTuple

from ..errors import StoreError, describe
from ..usage import utc_day
from .clients import ScriptClient, connect
from .keyspace import (daily_key, fail_ip_key, fail_key_key, fail_operator_key,
                       gone_key_key, key_daily_key, key_index_key,
                       key_key, key_usage_key, once_key, own_calls_rate_key, rate_key, ready_key, usage_key,
                       write_key, ws_key, ws_roles_key)
from .scripts import Script, load

AUTHORIZE = load("authorize")
ADD_USAGE = load("add_usage")
FAILURE_RESET = load("failure_reset")
REFUND = load("refund")
LEDGER_WRITE = load("ledger_write")
READ_KEY = load("read_key")
READY = load("ready")
RECOUNT = load("recount")
# The script's deadline (lua/authorize.lua ARGV[13]) is this share of the store timeout after
# the call is made: a reply to a call that ran before it reaches us before we give up on it,
# unless Redis stalled between running the call and replying; that reply comes late, and a
# request it counted is taken back then (StoreError.counted_late).
DEADLINE_SHARE = 0.8
# A key's calls to keygate's own /_keygate/ endpoints (usage, self-service key management,
# whose listing reads the workspace's keys): at most this many (calls, per ms), whatever the
# key's rate limit, in a log of their own (kg:rate:{ws}:<id>:own). They count in no usage.
OWN_CALLS_RATE = (20, 1000)
DAILY_TTL = 100 * 86400  # day counters: the usage history reaches 90 days back
# How long Redis remembers that a ledger write ran (lua/ledger_write.lua), renewed by every
# copy of it that arrives. Copies come from the ledger's retries (every second or so while it
# waits) and from what sat in a paused Redis's socket buffers (run as it wakes): an hour is far
# beyond both. ~100 bytes per write, and writes happen only after the store failed.
WRITE_ID_TTL = 3600
# What a ledger write answers (``RequestStore.add_usage``, lua/ledger_write.lua)
WRITTEN, ALREADY, NO_WORKSPACE, NO_KEY = 1, 0, -1, -2  # NO_KEY: written for the workspace only
# How long a counting authorize call's marker (kg:once:{ws}:<request-id>, Sentinel and
# Cluster only) outlives the call: longer than redis-py can take to send the call again after
# its connection died (reconnecting, asking the Sentinels or re-reading the slots: each bounded
# by the store timeout, a few times over). ~100 bytes per counted request while it lives.
def once_ttl_ms(timeout: float) -> int:
    return int(1000 * (5 + 10 * timeout))


# A counting call given up on (Sentinel, Cluster) is asked about (its marker) at once and, while
# the store does not answer, again after these seconds; at most MAX_ASKING at a time (a store
# that is down fails every request: beyond that they are not asked about, as before).
MARKER_ASKS_AFTER = (0.5, 1.0, 2.0)
MAX_ASKING = 1024


# Sentinel: the counting calls of the last RECOUNT_WINDOW seconds (at most RECOUNT_KEPT) are
# remembered, so that once the Sentinels name a new master, those of them that ran on the old
# one and never reached the new one are counted there again (``_recount``). A failover on
# command (SENTINEL FAILOVER) promotes the replica while the old master goes on taking writes
# until every client has moved: ~1 s of traffic was answered 200 and never counted. The window
# stays within half a marker's life (``once_ttl_ms``), so a marker has not expired when asked.
RECOUNT_WINDOW = 10.0
RECOUNT_KEPT = 65536
RECOUNT_BATCH = 256  # markers in one recount call
log = logging.getLogger("keygate.store")


# Keys whose authorize call (key names and, in the lean client, the command encoded up to the
# per-request arguments) is kept ready: a lookup costs ~0.2 µs, building it ~3.5. Each key
# kept costs ~1.3 KB: keeping every key of the day (up to 100,000) took ~130 MB for 100k keys
# (bench/memory.py), so only the most recent ones are, and a busy key is one of them.
HOT_KEYS = 1024


class StoredKey(NamedTuple):
    """A key's hash and its workspace's, as stored (empty when absent), and the workspace's
    definition of the key's role (JSON scopes; None when the workspace defines none). A key
    deleted from listings is its record kept for its token (``kg:gone``): ``gone``."""
    key: dict[str, str]
    workspace: dict[str, str]
    role: str | None

    @property
    def gone(self) -> bool:
        return "deleted_at" in self.key


def _fields(flat: list) -> dict[str, str]:
    """An HGETALL reply (name, value, name, value, ...) as a dict of str."""
    it = (v.decode() if isinstance(v, bytes) else v for v in flat)
    return dict(zip(it, it))


class Decision(NamedTuple):
    """What the store decided for one request."""
    outcome: str            # ok | stale | rate | quota | key_quota
    month_used: int = 0
    rate_remaining: int = -1  # -1: no rate limit applies
    retry_after_ms: int = 0   # rate: when one more request will be admitted
    window_reset_ms: int = 0  # rate: until one more is left (a refusal: retry_after_ms)
    key_used: int = 0         # the key's own count this month (when it has a cap, or counted)
    rate_member: str = ""     # this request's entry in the key's rate log ("" or "-": none),
    # for a refund to take back the rate it spent


_new_tuple = tuple.__new__


class Slot(NamedTuple):
    """Where one request is counted: its workspace and key, the month and the UTC day, and the
    key id its rate log and own month count go under (``KeyRecord.budget_id``: its own id, or
    the id of the key a rotation replaced)."""
    workspace: str
    key_id: str
    period: str   # YYYY-MM
    day: str      # YYYY-MM-DD
    budget: str

    def counters(self) -> tuple[str, str, str, str]:
        """The four counters a forwarded request adds one to."""
        return (usage_key(self.workspace, self.period),
                key_usage_key(self.workspace, self.budget, self.period),
                daily_key(self.workspace, self.day),
                key_daily_key(self.workspace, self.key_id, self.day))


class RequestStore:
    """Hot-path store client. ``url``: redis://, rediss://, unix:// (the lean client);
    redis+sentinel://, redis+cluster:// (redis-py). ValueError on a bad URL."""

    # Told each authorize round trip's seconds, failed ones too (the metrics' histogram). A
    # hook rather than a wrapper: the hottest call keeps one coroutine and no re-packed kwargs.
    on_authorize: Callable[[float], None] | None = None

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._tag, self._seq = os.urandom(4).hex(), 0  # rate-log members unique across replicas
        self._prepared: dict[tuple, Any] = {}
        self._resp: ScriptClient = connect(url, timeout)  # lean RESP, or redis-py for a topology
        # a socket_timeout in the URL wins (redis-py's semantics): the deadline the script is
        # given is a share of the timeout the client really keeps
        self.timeout = getattr(self._resp, "timeout", timeout)
        # a client that may send a call again marks each counting call (see ``once_ttl_ms``)
        self._resends = self._resp.resends
        self._once_tag, self._once_seq = os.urandom(8).hex(), 0
        self._once_ttl = once_ttl_ms(self.timeout)
        self._asking: set[asyncio.Future] = set()  # _marked's questions under way
        # Sentinel: the recent counting calls (``RECOUNT_WINDOW``) and the recounts under way
        self._counted: collections.deque | None = None
        self._recounting: set[asyncio.Future] = set()
        follow = getattr(self._resp, "follow_master", None)
        if follow is not None and follow(self._new_master):
            self._counted = collections.deque(maxlen=RECOUNT_KEPT)

    def redis_clock(self, clock: Callable[[], float]) -> Callable[[], float]:
        """``clock`` (this host's wall clock, or a test's) moved onto Redis's: plus the skew
        the connection measured between ``time.time()`` and Redis's TIME
        (``resp.clock_skew``; 0.0 while unknown, and where the two agree). Every replica's
        time decisions (a key's expiry and grace, the rate log, the month and day a request
        counts in, last_used_at, the admin API's timestamps) then agree to within a store
        round trip, whatever the replicas' own clocks say. ~40 ns a call more than ``clock``."""
        resp = self._resp

        def now() -> float:
            return clock() + resp.clock_skew
        return now

    def _member(self, now_ms: str) -> str:
        self._seq += 1
        return f"{now_ms}:{self._tag}:{self._seq}"

    async def close(self) -> None:
        """Bounded (``gateway.closing``): a question or a close step that does not end in
        time is logged and left."""
        from ..closing import CLOSE_STEP_TIMEOUT, stop
        asking = list(self._asking)
        for task in asking:
            task.cancel()
        for task in asking:
            await stop(task, CLOSE_STEP_TIMEOUT, "a question whether a call counted")
        for task in list(self._recounting):
            task.cancel()
            await stop(task, CLOSE_STEP_TIMEOUT, "counting again on a new master")
        await self._resp.close()

    async def ready(self) -> None:
        """Raise :class:`StoreError` (naming the cause) unless this client's own connection can
        run the per-request script: loads it (so the first request needs no NOSCRIPT round
        trip), checks Redis answers with its digest, and that a script may write there (the
        per-request script counts). A wrong password, a missing ACL permission, an
        unreachable server, a read-only replica or a full Redis all fail here."""
        self._resp.clock_offset  # a client that measures its clocks lazily starts now
        try:
            sha = await self._resp.script_load(AUTHORIZE)
            if sha == AUTHORIZE.sha:
                await self._resp.run(READY, (ready_key(),), ())
        except Exception as exc:
            raise StoreError(f"the per-request store connection cannot run its script: "
                             f"{describe(exc)}") from exc
        if sha != AUTHORIZE.sha:
            raise StoreError("the per-request store connection cannot run its script: "
                             "Redis answered SCRIPT LOAD with an unexpected digest")

    async def authorize(self, *, workspace: str, key_id: str, key_rev: int, ws_rev: int,
                        count: bool, rate_limit: int, rate_period_ms: int,
                        monthly_limit: int | None, period: str, counter_ttl: int,
                        now_ms: int, budget: str, day: str = "",
                        key_limit: int | None = None, peek: bool = False, stamp: bool = False,
                        rate_burst: int = 0, spend: bool = False) -> Decision:
        """``count``: admit and count the request; else, with ``peek``, judge the rate and
        quotas as counting would but count nothing; else, with ``spend`` (keygate's own
        endpoints), admit the call within ``OWN_CALLS_RATE`` (the key's calls of this kind,
        in a log of their own: its rate limit is left to its requests) and stamp
        ``last_used_at``, judging no quota, reading no counter (``month_used`` and
        ``key_used`` are 0) and counting nothing; else confirm the state
        only, and with ``stamp`` set the key's ``last_used_at`` when it is current.
        ``budget``: the key id its rate log and own month count go under
        (``KeyRecord.budget_id``; it never changes for a key id, so the call prepared for the
        key id stays right).
        ``rate_burst``: a cap per second on top of a per-minute ``rate_limit`` (0: none;
        ``RateLimit.burst``)."""
        started = time.monotonic()
        day = day or utc_day(now_ms / 1000)
        # What stays the same for every request of this key today is encoded once
        # (lua/authorize.lua ARGV[1..9]); a request adds its time, TTL, member and deadline.
        if count:
            mode = "count"
        else:
            mode = "peek" if peek else "spend" if spend else "use" if stamp else "check"
            if spend:  # keygate's own endpoints: their own log and bound
                rate_limit, rate_period_ms = OWN_CALLS_RATE
                rate_burst = 0
        fixed = (key_rev, ws_rev, mode, rate_limit, rate_period_ms,
                 -1 if monthly_limit is None else monthly_limit,
                 -1 if key_limit is None else key_limit, DAILY_TTL, rate_burst)
        prepared = self._prepared.get((workspace, key_id, period, day, fixed))
        if prepared is None:
            prepared = self._prepare(workspace, key_id, period, day, fixed, budget)
        # ARGV[12], the rate log's member, is read only under a rate limit: "-" without one
        # saves formatting a unique string per request. The deadline is the latest instant, in
        # Redis's clock (µs), at which the script may still count this request ("0", none,
        # while the clocks' offset is unknown or in any mode but "count").
        # The four go as str: the lean client encodes four str in one unrolled format.
        offset = self._resp.clock_offset
        now = str(now_ms)
        member = self._member(now) if rate_limit and (count or spend) else "-"
        varying = (now, str(counter_ttl), member,
                   str(int((started + offset + self.timeout * DEADLINE_SHARE) * 1e6))
                   if count and offset is not None else "0")
        marker = None
        try:
            if count and self._resends:
                marker = self._marker(workspace)
                reply = await self._resp.run_prepared_once(prepared, varying, marker,
                                                           self._once_ttl)
            else:
                reply = await self._resp.run_prepared(prepared, varying)
        except Exception as exc:  # connection lost, timeout, error reply: the store failed
            error = StoreError(f"store call failed: {describe(exc)}")
            late = getattr(exc, "late", None)  # the lean client's TimedOut
            if count and late is not None:
                error.counted_late = _counted(late)
                error.rate_member = member
            elif marker is not None and len(self._asking) < MAX_ASKING:
                error.counted_late = self._marked(marker)
                error.rate_member = member
            raise error from exc
        finally:
            if self.on_authorize is not None:
                self.on_authorize(time.monotonic() - started)
        if reply[0] == b"late":  # ran after we would have given up: it counted nothing
            if time.monotonic() - started < self.timeout * DEADLINE_SHARE / 2:
                # Far too early for the deadline to have passed: a clock stepped since the
                # offset was measured.
                self._resp.measure_clock()
            raise StoreError("store call failed: Redis ran the call after its deadline "
                             "(paused or overloaded)")
        if marker is not None and self._counted is not None and reply[0] == b"ok":
            # (Sentinel: the redis-py round trip costs ~150 µs; this append, ~0.1)
            self._counted.append((started, marker, workspace, key_id, budget, period, day,
                                  counter_ttl))
        try:
            # tuple.__new__: what Decision(...) does, without its Python-level __new__
            return _new_tuple(Decision, (_OUTCOMES[reply[0]], reply[1], reply[2], reply[4],
                                         reply[3], reply[5], member))
        except (KeyError, IndexError, TypeError):
            raise StoreError("unexpected answer from the authorize script") from None

    def _marker(self, workspace: str) -> str:
        """A new marker for one call that must run once (``once_ttl_ms``)."""
        self._once_seq += 1
        return once_key(workspace, f"{self._once_tag}:{self._once_seq}")

    def _marked(self, marker: str) -> asyncio.Future[bool]:
        """Whether a counting call given up on (Sentinel, Cluster) counted its request: its
        marker is there. Asked at once, then ``MARKER_ASKS_AFTER`` later while the store does
        not answer; cancelled if it never does. (A copy of the call still in Redis's buffers
        runs after its deadline, which has passed: it counts nothing.)"""
        async def ask() -> bool:
            for pause in (0.0, *MARKER_ASKS_AFTER):
                await asyncio.sleep(pause)
                try:
                    (value,) = await self._resp.get_each((marker,))
                    return value is not None
                except Exception:  # the store is still down: ask again
                    continue
            raise asyncio.CancelledError  # unknown: nothing taken back

        task = asyncio.ensure_future(ask())
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)
        return task

    def _new_master(self) -> None:
        """The Sentinels name a new master: count again there what the old one took."""
        if len(self._recounting) < 4:  # (a flapping group: the pending ones cover it)
            task = asyncio.ensure_future(self._recount(time.monotonic()))
            self._recounting.add(task)
            task.add_done_callback(self._recounting.discard)

    async def _recount(self, noticed: float) -> None:
        """Once the calls in flight on the old master have ended (a store timeout after the
        connections were moved), each request counted in the ``RECOUNT_WINDOW`` before the new
        master was ``noticed`` whose marker the new master lacks is counted there
        (lua/recount.lua). Its count ran on the old master after the promotion, or had not
        reached the replica when the old master died: it was answered 200, and its count is
        gone with the old master's data. A chunk the store fails is tried once more."""
        from ..redis_topology import MASTER_CHECK_INTERVAL
        await asyncio.sleep(self.timeout + MASTER_CHECK_INTERVAL)
        since = noticed - min(RECOUNT_WINDOW, self._once_ttl / 2000)
        groups: dict[tuple, list[str]] = {}
        earliest: dict[tuple, float] = {}  # by group: its first call's start (monotonic)
        for started, marker, ws, key_id, budget, period, day, ttl in list(self._counted or ()):
            if started >= since:
                group = (ws, key_id, budget, period, day, ttl)
                groups.setdefault(group, []).append(marker)
                earliest[group] = min(started, earliest.get(group, started))
        wall = time.time() - time.monotonic()  # monotonic → epoch, for lua/_held_for.lua
        todo = [(group, markers[i:i + RECOUNT_BATCH]) for group, markers in groups.items()
                for i in range(0, len(markers), RECOUNT_BATCH)]
        counted = checked = dropped = 0
        for attempt in range(2):
            failed = []
            for group, markers in todo:
                ws, key_id, budget, period, day, ttl = group
                slot = Slot(ws, key_id, period, day, budget)
                try:
                    n = int(await self._resp.run(
                        RECOUNT, (*slot.counters(), ws_key(ws), key_key(ws, key_id),
                                  key_key(ws, budget), *markers),
                        (self._once_ttl, ttl, ttl, DAILY_TTL, DAILY_TTL,
                         f"{wall + earliest[group]:.3f}")))
                    checked += len(markers)
                    if n < 0:  # the new master lacks the workspace (or another has its id)
                        dropped -= n
                    else:
                        counted += n
                except Exception as exc:  # the new master does not answer yet
                    failed.append((group, markers))
                    error = exc
            todo = failed
            if not todo:
                break
            await asyncio.sleep(1.0)
        lost = sum(len(markers) for _, markers in todo)
        if dropped:
            log.error("the Sentinels named a new master that lacks %d requests counted in the "
                      "%.0f s before, and the workspace they were counted for (or holds one "
                      "created again with its id since): they are not counted there (Redis "
                      "lost data: a master promoted before it had synced, or one restored "
                      "from an older backup)", dropped, noticed - since)
        if counted or lost:
            log.warning("the Sentinels named a new master: %d of %d requests counted in the "
                        "%.0f s before were not there and are counted again%s", counted,
                        checked + lost, noticed - since,
                        f"; {lost} could not be checked ({describe(error)}) and may stay "
                        f"uncounted" if lost else "")

    def _prepare(self, workspace: str, key_id: str, period: str, day: str,
                 fixed: tuple[Any, ...], budget: str) -> Any:
        spend = fixed[2] == "spend"  # fixed[2]: the mode; spend: the key's own calls' log
        keys = (key_key(workspace, key_id), ws_key(workspace), usage_key(workspace, period),
                own_calls_rate_key(workspace, key_id) if spend else rate_key(workspace, budget),
                key_usage_key(workspace, budget, period),
                daily_key(workspace, day), key_daily_key(workspace, key_id, day))
        prepared = self._resp.prepare(AUTHORIZE, keys, fixed, 4)
        if len(self._prepared) >= HOT_KEYS:
            self._prepared.clear()
        self._prepared[(workspace, key_id, period, day, fixed)] = prepared
        return prepared

    async def key_workspace(self, key_id: str) -> str | None:
        """The workspace a key id belongs to (None: no such key)."""
        try:
            (ws,) = await self._resp.get_each((key_index_key(key_id),))
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc
        return ws.decode() if isinstance(ws, bytes) else ws

    async def read_key(self, ws: str, key_id: str) -> StoredKey:
        """The key, its workspace and the workspace's definition of the key's role, in one
        round trip on this connection (the cold path and refreshes: through redis-py these
        were three or four round trips at ~0.2 ms of the event loop's CPU each). A key
        deleted from listings: its record kept for its token (``StoredKey.gone``)."""
        try:
            key, workspace, role = await self._resp.run(
                READ_KEY, (key_key(ws, key_id), ws_key(ws), ws_roles_key(ws),
                           gone_key_key(ws, key_id)), ())
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc
        return StoredKey(_fields(key), _fields(workspace),
                         role.decode() if isinstance(role, bytes) else None)

    async def failure_counts(self, ip: str, key_id: str | None) -> tuple[int, int]:
        """Failed verifications in the current window: (from this IP, against this key id;
        0 when ``key_id`` is None, the per-key limit being off)."""
        counters = (fail_ip_key(ip),) if key_id is None else (fail_ip_key(ip), fail_key_key(key_id))
        try:
            reply = await self._resp.get_each(counters)
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc
        return int(reply[0] or 0), int(reply[1] or 0) if key_id is not None else 0

    async def failure_resets_ms(self, ip: str | None, key_id: str | None,
                                window_seconds: int) -> list[int]:
        """Milliseconds until each named failure counter resets (its PTTL: -2 when it is
        gone), from this IP and against this key id; None skips one. A counter set to reset
        past ``window_seconds`` from now (a reload lowered it), or never, is set to reset then
        (lua/failure_reset.lua)."""
        counters = [k for k in (ip and fail_ip_key(ip), key_id and fail_key_key(key_id)) if k]
        window = (window_seconds * 1000,)
        try:
            return [int(await self._resp.run(FAILURE_RESET, (k,), window)) for k in counters]
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc

    async def record_failure(self, ip: str, key_id: str | None, window_seconds: int) -> None:
        """Count one failed verification from ``ip`` and against ``key_id`` (None: not per key,
        the per-key limit being off); each count lives ``window_seconds`` from its first
        failure."""
        counters = (fail_ip_key(ip),) if key_id is None else (fail_ip_key(ip), fail_key_key(key_id))
        try:
            if self._resends:  # a copy sent again after its connection died adds nothing
                for counter in counters:  # a marker in each counter's slot (lua/add_usage.lua):
                    # its hash tag is the counter's name, which has no braces (an IP, a /64, a
                    # base62 key id); one that had would be counted as before, unmarked
                    if "{" in counter or "}" in counter:
                        await self._resp.run(ADD_USAGE, (counter,), (1, window_seconds))
                        continue
                    self._once_seq += 1
                    marker = once_key(counter, f"{self._once_tag}:{self._once_seq}")
                    await self._resp.run(ADD_USAGE, (counter, marker),
                                         (1, window_seconds, self._once_ttl, "once"))
            else:
                await self._resp.run_each_slot(ADD_USAGE, counters, (1,),
                                               (window_seconds,) * len(counters))
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc

    async def record_operator_failure(self, ip: str, window_seconds: int) -> int:
        """Count one wrong operator token from ``ip`` (the admin listener's throttle, its own
        counter: wrong API keys from an address must not lock its operator out); answers the
        count in its window, this one included. Lives ``window_seconds`` from the first."""
        counter = fail_operator_key(ip)
        try:
            if self._resends and "{" not in counter and "}" not in counter:
                self._once_seq += 1  # a copy sent again after its connection died adds nothing
                marker = once_key(counter, f"{self._once_tag}:{self._once_seq}")
                return int(await self._resp.run(ADD_USAGE, (counter, marker),
                                                (1, window_seconds, self._once_ttl, "once")))
            return int(await self._resp.run(ADD_USAGE, (counter,), (1, window_seconds)))
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc

    async def operator_failures_reset_ms(self, ip: str, window_seconds: int) -> int:
        """Milliseconds until ``ip``'s count of wrong operator tokens resets (-2: gone), as
        :meth:`failure_resets_ms` reads the others'."""
        try:
            return int(await self._resp.run(FAILURE_RESET, (fail_operator_key(ip),),
                                            (window_seconds * 1000,)))
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc

    async def refund(self, slot: Slot, ttl: int, rate_member: str = "") -> None:
        """Take back one counted request that never reached the upstream, from every counter
        it was counted in and, given its ``rate_member`` (``Decision.rate_member``), from the
        key's rate log."""
        keys: tuple[str, ...] = (rate_key(slot.workspace, slot.budget),
                                 *slot.counters())
        args: tuple[Any, ...] = (rate_member, ttl, ttl, DAILY_TTL, DAILY_TTL)
        if self._resends:  # a copy sent again after its connection died takes back nothing
            keys, args = (*keys, self._marker(slot.workspace)), (*args, self._once_ttl, "once")
        await self._run(REFUND, keys, args)

    async def take_back_rate(self, slot: Slot, rate_member: str) -> None:
        """Take ``rate_member`` out of the key's rate log, and nothing else: a request that was
        counted after the gateway had given up on its call (answered 503) spent its rate."""
        await self._run(REFUND, (rate_key(slot.workspace, slot.budget),),
                        (rate_member,))

    async def add_usage(self, slot: Slot, n: int, ttl: int, write_id: str,
                        since: float | None = None) -> int:
        """Add ``n`` requests counted locally while the store was down (fail-open; negative:
        taken back), once per ``write_id`` however often it is sent. ``since``: when the
        earliest of them was served (epoch s; None: now). Answers ``WRITTEN``, ``ALREADY`` (a
        write of that id had already run) or, for a count (``n`` > 0): ``NO_WORKSPACE``, the
        slot's workspace is not in the store or was created after ``since`` (Redis lost
        keygate's data; one created again with that id inherits nothing), nothing was
        written; ``NO_KEY``, only the key is gone (deleted meanwhile): written to the
        workspace's counters, not the key's (lua/ledger_write.lua, lua/_held_for.lua)."""
        ws = slot.workspace
        return int(await self._run(LEDGER_WRITE,
                                   (write_key(ws, write_id), ws_key(ws),
                                    key_key(ws, slot.key_id), key_key(ws, slot.budget),
                                    *slot.counters()),
                                   (n, WRITE_ID_TTL,
                                    f"{time.time() if since is None else since:.3f}",
                                    ttl, ttl, DAILY_TTL, DAILY_TTL)))

    async def _run(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        try:
            return await self._resp.run(script, keys, args)
        except Exception as exc:  # connection lost, timeout, error reply: the store failed
            error = StoreError(f"store call failed: {describe(exc)}")
            error.unsent = getattr(exc, "unsent", False)  # resp.not_sent
            raise error from exc


def _counted(late: asyncio.Future) -> asyncio.Future[bool]:
    """Whether an authorize call given up on counted its request, from its late reply
    (``late``, the raw reply): only "ok" counts. Cancelled if no reply comes."""
    counted = late.get_loop().create_future()

    def read(reply: asyncio.Future) -> None:
        if counted.done():
            return
        if reply.cancelled():
            counted.cancel()
        else:
            r = reply.result()
            counted.set_result(isinstance(r, list) and len(r) > 1 and r[0] == b"ok")

    late.add_done_callback(read)
    return counted


_OUTCOMES = {b"ok": "ok", b"stale": "stale", b"rate": "rate", b"quota": "quota",
             b"key_quota": "key_quota"}
