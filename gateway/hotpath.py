"""The per-request store calls: one Lua round trip per proxied request, plus the cold path's
failure throttle. Every call here is on the request path, so it goes through the lean
:class:`gateway.resp.RespClient` (standalone Redis) or redis-py (Cluster / Sentinel), behind
one seam: :meth:`RequestStore.authorize`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from importlib import resources
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError

from .errors import StoreError, describe
from .resp import RespClient, RespError, _encode
from .store import (daily_key, fail_ip_key, fail_key_key, key_daily_key, key_key, key_usage_key,
                    rate_key, usage_key, ws_key)


def _script(name: str) -> tuple[str, str]:
    text = resources.files("gateway").joinpath("lua", name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


AUTHORIZE, AUTHORIZE_SHA = _script("authorize.lua")
_AUTHORIZE_ARGS = 12
# The script's deadline (lua/authorize.lua ARGV[12]) is this share of the store timeout after
# the call is made: a reply to a call that ran before it reaches us before we give up on it.
DEADLINE_SHARE = 0.8
OFFSET_MAX_AGE = 60.0  # seconds between clock-offset measurements on the redis-py path

RECORD_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local m = redis.call('INCR', KEYS[2])
if m == 1 or redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return {n, m}
"""
RECORD_FAILURE_SHA = hashlib.sha1(RECORD_FAILURE.encode()).hexdigest()

ADD_USAGE = """
local n
for i = 1, #KEYS do
  local m = redis.call('INCRBY', KEYS[i], ARGV[1])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
  n = n or m
end
return n
"""
ADD_USAGE_SHA = hashlib.sha1(ADD_USAGE.encode()).hexdigest()


REFUND = """
local n
for i = 1, #KEYS do
  local m = redis.call('DECR', KEYS[i])
  if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i]) end
  n = n or m
end
return n
"""
REFUND_SHA = hashlib.sha1(REFUND.encode()).hexdigest()


class Decision(NamedTuple):
    """What the store decided for one request."""
    outcome: str            # ok | stale | rate | quota | key_quota
    month_used: int = 0
    rate_remaining: int = -1  # -1: no rate limit applies
    retry_after_ms: int = 0   # rate: when one more request will be admitted
    window_reset_ms: int = 0  # rate: until the oldest admitted request leaves the window
    key_used: int = 0         # the key's own count this month (when it has a cap, or counted)


class Slot(NamedTuple):
    """Where one request is counted: its workspace and key, the month and the UTC day."""
    workspace: str
    key_id: str
    period: str   # YYYY-MM
    day: str      # YYYY-MM-DD

    def counters(self) -> tuple[str, str, str, str]:
        """The four counters a forwarded request adds one to."""
        return (usage_key(self.workspace, self.period),
                key_usage_key(self.workspace, self.key_id, self.period),
                daily_key(self.workspace, self.day),
                key_daily_key(self.workspace, self.key_id, self.day))


def utc_day(now: float) -> str:
    """"YYYY-MM-DD" of ``now`` (epoch seconds), UTC."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


DAILY_TTL = 100 * 86400  # day counters: the usage history reaches 90 days back


class RequestStore:
    """Hot-path store client. ``url``: redis://, rediss://, unix://; others go via redis-py."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self._tag, self._seq = os.urandom(4).hex(), 0  # rate-log members unique across replicas
        self._heads: dict[tuple[str, str, str], bytes] = {}
        self._resp: RespClient | None = None
        self._redis: Any = None
        self.timeout = timeout
        self._offset: float | None = None    # redis-py path: Redis's clock minus ours
        self._offset_at = -1e9
        self._measuring: asyncio.Future | None = None
        if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
            self._resp = RespClient(url, timeout=timeout)
        else:
            # Sentinel (follows failovers) / Cluster (routes by slot): redis-py does it right.
            # ValueError on a bad URL, like RespClient.
            from .redis_urls import topology_client
            self._redis = topology_client(url, timeout=timeout, decode_responses=False)

    def _deadline(self) -> int:
        """The latest instant, in Redis's clock (µs), at which the authorize script may still
        count this request; 0 (none) while the clocks' offset is unknown."""
        if self._resp is not None:
            offset = self._resp.clock_offset
        else:
            offset = self._offset
            if time.monotonic() - self._offset_at > OFFSET_MAX_AGE and self._measuring is None:
                self._measuring = asyncio.ensure_future(self._measure_offset())
        if offset is None:
            return 0
        return int((time.monotonic() + offset + self.timeout * DEADLINE_SHARE) * 1e6)

    def _clock_stepped(self) -> None:
        """A call came back "late" long before its deadline could have passed: one of the
        clocks stepped since the offset was measured. Measure it again."""
        if self._resp is not None:
            self._resp.measure_clock()
        else:
            self._offset_at = -1e9

    async def _measure_offset(self) -> None:
        """Redis's clock minus our ``time.monotonic()``, for the redis-py path (Cluster:
        nodes keep NTP time, one node's reading stands for all), refreshed every
        ``OFFSET_MAX_AGE`` seconds."""
        try:
            sent = time.monotonic()
            seconds, micros = await self._redis.time()
            self._offset = seconds + micros / 1e6 - (sent + time.monotonic()) / 2
            self._offset_at = time.monotonic()
        except Exception:  # the store is down: keep the last offset, try again next call
            pass
        finally:
            self._measuring = None

    def _member(self, now_ms: int) -> str:
        self._seq += 1
        return f"{now_ms}:{self._tag}:{self._seq}"

    async def close(self) -> None:
        if self._measuring is not None:
            self._measuring.cancel()
            await asyncio.wait((self._measuring,))
        if self._resp is not None:
            await self._resp.close()
        elif self._redis is not None:
            await self._redis.aclose()

    async def ready(self) -> None:
        """Raise :class:`StoreError` (naming the cause) unless this client's own connection can
        run the per-request script: loads it (so the first request needs no NOSCRIPT round
        trip) and checks Redis answers with its digest. A wrong password, a missing ACL
        permission or an unreachable server all fail here."""
        try:
            if self._resp is not None:
                sha = await self._resp.call("SCRIPT", "LOAD", AUTHORIZE)
            else:
                sha = await self._redis.script_load(AUTHORIZE)
        except Exception as exc:
            raise StoreError(f"the per-request store connection cannot run its script: "
                             f"{describe(exc)}") from exc
        if isinstance(sha, bytes):
            sha = sha.decode()
        if sha != AUTHORIZE_SHA:
            raise StoreError("the per-request store connection cannot run its script: "
                             "Redis answered SCRIPT LOAD with an unexpected digest")

    async def _evalsha(self, sha: str, script: str, keys: tuple[str, ...],
                       args: tuple[Any, ...]) -> Any:
        try:
            if self._resp is not None:
                try:
                    return await self._resp.call("EVALSHA", sha, len(keys), *keys, *args)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    return await self._resp.call("EVAL", script, len(keys), *keys, *args)
            try:
                return await self._redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # a fresh or newly promoted server: send the script once
                return await self._redis.eval(script, len(keys), *keys, *args)
        except StoreError:
            raise
        except Exception as exc:  # connection lost, timeout, error reply: the store failed
            raise StoreError(f"store call failed: {describe(exc)}") from exc

    async def authorize(self, *, workspace: str, key_id: str, key_rev: int, ws_rev: int,
                        count: bool, rate_limit: int, rate_period_ms: int,
                        monthly_limit: int | None, period: str, counter_ttl: int,
                        now_ms: int, day: str = "", key_limit: int | None = None) -> Decision:
        started = time.monotonic()
        day = day or utc_day(now_ms / 1000)
        args = (now_ms, key_rev, ws_rev, "count" if count else "check", rate_limit,
                rate_period_ms, -1 if monthly_limit is None else monthly_limit, counter_ttl,
                self._member(now_ms), -1 if key_limit is None else key_limit, DAILY_TTL,
                self._deadline() if count else 0)
        reply = None
        if self._resp is not None:
            # The command's first half (EVALSHA, sha, the seven keys) is the same for every
            # request of a key in a day: encode it once.
            head = self._heads.get((workspace, key_id, day))
            if head is None:
                head = self._authorize_head(workspace, key_id, period, day)
            tail = "".join([f"${len(a)}\r\n{a}\r\n" for a in map(str, args)])
            try:
                reply = await self._resp.call_encoded(head + tail.encode())
            except RespError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise StoreError(f"store call failed: {describe(exc)}") from exc
            except Exception as exc:  # connection lost or timed out: the store failed
                raise StoreError(f"store call failed: {describe(exc)}") from exc
        if reply is None:
            reply = await self._evalsha(AUTHORIZE_SHA, AUTHORIZE,
                                        _authorize_keys(workspace, key_id, period, day), args)
        if reply[0] == b"late":  # ran after we would have given up: it counted nothing
            if time.monotonic() - started < self.timeout * DEADLINE_SHARE / 2:
                self._clock_stepped()
            raise StoreError("store call failed: Redis ran the call after its deadline "
                             "(paused or overloaded)")
        try:
            outcome = _OUTCOMES[reply[0]]
            return Decision(outcome, reply[1], reply[2], reply[4], reply[3], reply[5])
        except (KeyError, IndexError, TypeError):
            raise StoreError("unexpected answer from the authorize script") from None

    def _authorize_head(self, workspace: str, key_id: str, period: str, day: str) -> bytes:
        keys = _authorize_keys(workspace, key_id, period, day)
        head = _encode(("EVALSHA", AUTHORIZE_SHA, len(keys), *keys))
        head = b"*%d" % (3 + len(keys) + _AUTHORIZE_ARGS) + head[head.index(b"\r\n"):]
        if len(self._heads) > 100_000:
            self._heads.clear()
        self._heads[(workspace, key_id, day)] = head
        return head

    async def failure_counts(self, ip: str, key_id: str) -> tuple[int, int]:
        """Failed verifications in the current window: (from this IP, against this key id)."""
        try:
            if self._resp is not None:
                reply = await self._resp.call("MGET", fail_ip_key(ip), fail_key_key(key_id))
            else:  # Cluster: the two keys live in different slots
                reply = [await self._redis.get(fail_ip_key(ip)),
                         await self._redis.get(fail_key_key(key_id))]
        except Exception as exc:
            raise StoreError(f"store call failed: {describe(exc)}") from exc
        return int(reply[0] or 0), int(reply[1] or 0)

    async def record_failure(self, ip: str, key_id: str, window_seconds: int) -> None:
        if self._resp is not None:
            await self._evalsha(RECORD_FAILURE_SHA, RECORD_FAILURE,
                                (fail_ip_key(ip), fail_key_key(key_id)), (window_seconds,))
        else:
            for k in (fail_ip_key(ip), fail_key_key(key_id)):
                await self._evalsha(ADD_USAGE_SHA, ADD_USAGE, (k,), (1, window_seconds))

    async def refund(self, slot: Slot, ttl: int) -> None:
        """Take back one counted request that never reached the upstream, from every counter
        it was counted in."""
        await self._evalsha(REFUND_SHA, REFUND, slot.counters(), (ttl, ttl, DAILY_TTL, DAILY_TTL))

    async def add_usage(self, slot: Slot, n: int, ttl: int) -> int:
        """Add requests counted locally while the store was down (fail-open)."""
        return int(await self._evalsha(ADD_USAGE_SHA, ADD_USAGE, slot.counters(),
                                       (n, ttl, ttl, DAILY_TTL, DAILY_TTL)))


_OUTCOMES = {b"ok": "ok", b"stale": "stale", b"rate": "rate", b"quota": "quota",
             b"key_quota": "key_quota"}


def _authorize_keys(workspace: str, key_id: str, period: str, day: str) -> tuple[str, ...]:
    return (key_key(workspace, key_id), ws_key(workspace), usage_key(workspace, period),
            rate_key(workspace, key_id), key_usage_key(workspace, key_id, period),
            daily_key(workspace, day), key_daily_key(workspace, key_id, day))
