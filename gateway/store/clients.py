"""The one seam between the per-request store and Redis: :class:`ScriptClient`, with an
implementation per kind of deployment.

* :class:`LeanClient` -- one standalone server (``redis://``, ``rediss://``, ``unix://``) over
  the lean :class:`~gateway.store.resp.RespClient`: a request's round trip costs a few µs of
  client CPU instead of redis-py's ~150 (see ``gateway/store/resp.py``).
* :class:`TopologyClient` -- Sentinel (follows failovers) and Cluster (routes by slot) over
  redis-py, which does both right.

Both run the scripts of ``gateway/store/lua/`` by digest and send the text only when the
server does not have it yet (a fresh or newly promoted server), and both know Redis's clock
relative to ours: for the authorize script's deadline, and as the one clock of every replica's
time decisions (``RequestStore.redis_clock``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol, Sequence

from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..redis_topology import track_writes
from ..redis_urls import STANDALONE_SCHEMES, scheme_of

from .resp import ClockSkew, RespClient, RespError, _bulk, _bulk_str4, _encode, clock_offset
from .scripts import Script

OFFSET_MAX_AGE = 60.0  # seconds between clock-offset measurements on a topology
HOT_HEADS = 1024  # encoded command heads kept (~0.4 KB each; see request.HOT_KEYS)


class ScriptClient(Protocol):
    """What :class:`~gateway.store.request.RequestStore` needs from a Redis connection.
    Failures surface as the client's own exceptions; the caller maps them to StoreError."""

    # True when a call whose connection died may be sent again (redis-py's retry): Redis may
    # have run it before the connection died, so a call that counts carries a marker
    # (``run_prepared_once``; lua/authorize.lua KEYS[8]) and a copy of it counts nothing.
    resends: bool

    @property
    def clock_offset(self) -> float | None:
        """Redis's clock minus our ``time.monotonic()``, seconds; None while unknown."""

    # Redis's wall clock minus ours (``time.time()``), seconds (``resp.clock_skew``): 0.0
    # while unknown, and when they agree to within the reading's round trip. Read per
    # request: a plain attribute.
    clock_skew: float

    def measure_clock(self) -> None:
        """Measure the offset (and the skew) again soon (a clock stepped since)."""

    async def script_load(self, script: Script) -> str:
        """Load ``script`` on the server; the digest Redis answers with."""

    async def run(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """EVALSHA ``script`` over ``keys`` (all in one slot), EVAL if the server lacks it."""

    def prepare(self, script: Script, keys: tuple[str, ...], fixed: tuple[Any, ...],
                n_varying: int) -> Any:
        """A call of ``script`` over ``keys`` whose ARGV starts with ``fixed`` and ends with
        ``n_varying`` more arguments given to each ``run_prepared``: what can be encoded once
        for many calls (an opaque value, kept by the caller)."""

    async def run_prepared(self, prepared: Any, varying: tuple[Any, ...]) -> Any:
        """``run`` of a prepared call, ARGV = its ``fixed`` followed by ``varying``."""

    # A client with ``resends`` also has
    # async def run_prepared_once(self, prepared, varying, marker: str, ttl_ms: int) -> Any:
    # ``run_prepared`` with ``marker`` appended to the keys and ``ttl_ms`` to the arguments.

    async def run_each_slot(self, script: Script, keys: Sequence[str], shared: tuple[Any, ...],
                            per_key: Sequence[Any]) -> None:
        """Run ``script`` over ``keys`` that may live in different slots, with ARGV =
        ``shared`` followed by one ``per_key`` item for each key."""

    async def get_each(self, keys: Sequence[str]) -> list[Any]:
        """GET of each of ``keys`` (which may live in different slots)."""

    async def close(self) -> None: ...


def connect(url: str, timeout: float) -> ScriptClient:
    """The client for ``url``; ValueError on a bad URL."""
    if scheme_of(url) in STANDALONE_SCHEMES:  # case-insensitive, as redis-py reads it
        return LeanClient(url, timeout=timeout)
    return TopologyClient(url, timeout=timeout)


class LeanClient(RespClient):
    """One standalone server: any keys go in one call, so no call needs splitting by slot.
    A call is never sent twice: a dead connection fails the calls in flight on it."""

    resends = False

    def __init__(self, url: str, *, timeout: float) -> None:
        # the store timeout bounds the connect too (the URL's socket_connect_timeout winning),
        # as on the admin path's redis-py client (redis_urls.standalone_client)
        super().__init__(url, timeout=timeout, connect_timeout=timeout)
        self._heads: dict[tuple[str, tuple[str, ...], int], bytes] = {}

    async def script_load(self, script: Script) -> str:
        sha = await self.call("SCRIPT", "LOAD", script.text)
        return sha.decode() if isinstance(sha, bytes) else sha

    async def run(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        # The command's first half (EVALSHA, digest, keys) is the same for every request of a
        # key in a day: it is encoded once, and only the arguments are encoded per call.
        head = self._heads.get((script.sha, keys, len(args)))
        if head is None:
            head = self._head(script, keys, len(args))
        try:
            return await self.call_encoded(head + _bulk(args))
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script.text, len(keys), *keys, *args)

    def prepare(self, script: Script, keys: tuple[str, ...], fixed: tuple[Any, ...],
                n_varying: int) -> Any:
        # EVALSHA, digest, keys and the fixed arguments, encoded once: a call then encodes
        # only its varying arguments (the authorize call: 4 of 12, ~2 µs less per request).
        head = _encode(("EVALSHA", script.sha, len(keys), *keys, *fixed))
        head = b"*%d" % (3 + len(keys) + len(fixed) + n_varying) + head[head.index(b"\r\n"):]
        return script, keys, fixed, head

    async def run_prepared(self, prepared: Any, varying: tuple[Any, ...]) -> Any:
        script, keys, fixed, head = prepared
        try:
            return await self.call_encoded(
                head + (_bulk_str4(varying) if len(varying) == 4 else _bulk(varying)))
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script.text, len(keys), *keys, *fixed, *varying)

    def _head(self, script: Script, keys: tuple[str, ...], n_args: int) -> bytes:
        head = _encode(("EVALSHA", script.sha, len(keys), *keys))
        head = b"*%d" % (3 + len(keys) + n_args) + head[head.index(b"\r\n"):]
        if len(self._heads) >= HOT_HEADS:
            self._heads.clear()
        self._heads[(script.sha, keys, n_args)] = head
        return head

    async def run_each_slot(self, script: Script, keys: Sequence[str], shared: tuple[Any, ...],
                            per_key: Sequence[Any]) -> None:
        await self.run(script, tuple(keys), (*shared, *per_key))

    async def get_each(self, keys: Sequence[str]) -> list[Any]:
        return await self.call("MGET", *keys)


class TopologyClient(ClockSkew):
    """Sentinel or Cluster over redis-py. Cluster nodes keep NTP time, so one node's clock
    stands for all; the offset and skew are measured in the background every
    ``OFFSET_MAX_AGE``."""

    resends = True  # redis-py sends a command again on a fresh connection when one dies

    def __init__(self, url: str, *, timeout: float) -> None:
        from ..redis_topology import TRY_AGAIN_UNTIL, topology_client
        self.redis = topology_client(url, timeout=timeout, decode_responses=False)
        self._try_again_until = TRY_AGAIN_UNTIL
        self._offset: float | None = None
        self._offset_at = -1e9
        self._measuring: asyncio.Future | None = None
        self._closing = False

    @property
    def clock_offset(self) -> float | None:
        # read per request: a host clock step (ClockSkew._clock_stepped, ~0.1 µs against
        # redis-py's ~150 µs round trip) has the clocks read again at once, not a minute later
        if self._measuring is None and (time.monotonic() - self._offset_at > OFFSET_MAX_AGE
                                        or self._clock_stepped()):
            self._measuring = asyncio.ensure_future(self._measure_offset())
        return self._offset

    def measure_clock(self) -> None:
        self._offset_at = -1e9

    def _clock_again(self) -> None:
        self._read_again = None
        if self._measuring is None and not self._closing:
            self._measuring = asyncio.ensure_future(self._measure_offset())

    async def _measure_offset(self) -> None:
        try:
            sent, sent_mono = time.time(), time.monotonic()
            reply = await self.redis.time()
            arrived, arrived_mono = time.time(), time.monotonic()
            self._offset = clock_offset(reply, arrived_mono)
            self._offset_at = arrived_mono
            loose = self._loose_offset(arrived_mono - sent_mono)
            if self._take_skew(reply, sent, arrived) or loose:
                self._read_again_soon()
        except Exception:  # the store is down: keep the last offset, try again next call
            pass
        finally:
            self._measuring = None

    async def script_load(self, script: Script) -> str:
        sha = await self.redis.script_load(script.text)
        return sha.decode() if isinstance(sha, bytes) else sha

    async def run(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        # ``unsent`` as the lean client's (resp.not_sent): none of the call's attempts wrote
        # it (redis_topology.track_writes), so Redis ran nothing. A timeout is never unsent,
        # as the lean client's is not (a connect that timed out wrote nothing either, but a
        # call that waits out the timeout is given up on as one that may have run). One
        # ContextVar set and reset per call, against redis-py's ~150 µs.
        with track_writes() as written:
            try:
                try:
                    return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:  # a fresh or newly promoted server: send the script once
                    return await self.redis.eval(script.text, len(keys), *keys, *args)
            except Exception as exc:
                if not written[0] and not isinstance(exc, (RedisTimeoutError, TimeoutError)):
                    exc.unsent = True  # type: ignore[attr-defined]
                raise

    def follow_master(self, callback: Any) -> bool:
        """Sentinel: have ``callback`` called (no arguments) whenever the Sentinels are found
        naming a new master (``redis_topology._SentinelMaster.on_new_master``); True. False
        on a Cluster, which has no such moment."""
        from ..redis_topology import _SentinelMaster
        if not isinstance(self.redis, _SentinelMaster):
            return False
        self.redis.on_new_master = callback
        return True

    def prepare(self, script: Script, keys: tuple[str, ...], fixed: tuple[Any, ...],
                n_varying: int) -> Any:
        return script, keys, fixed

    async def run_prepared(self, prepared: Any, varying: tuple[Any, ...]) -> Any:
        script, keys, fixed = prepared
        return await self.run(script, keys, (*fixed, *varying))

    async def run_prepared_once(self, prepared: Any, varying: tuple[Any, ...], marker: str,
                                ttl_ms: int) -> Any:
        """``run_prepared`` of a call that counts, with its marker key (in the call's slot)
        and the marker's TTL as its last key and argument (lua/authorize.lua KEYS[8]).
        Past the script's deadline (``varying[3]``, Redis's clock in µs; "0": none) a copy
        can only answer "late": a Cluster does not send it again after TRYAGAIN then."""
        script, keys, fixed = prepared
        deadline, offset = varying[3], self._offset
        if deadline == "0" or offset is None:
            return await self.run(script, (*keys, marker), (*fixed, *varying, ttl_ms))
        token = self._try_again_until.set(int(deadline) / 1e6 - offset)
        try:
            return await self.run(script, (*keys, marker), (*fixed, *varying, ttl_ms))
        finally:
            self._try_again_until.reset(token)

    async def run_each_slot(self, script: Script, keys: Sequence[str], shared: tuple[Any, ...],
                            per_key: Sequence[Any]) -> None:
        for key, arg in zip(keys, per_key):  # a Cluster script may only touch one slot
            await self.run(script, (key,), (*shared, arg))

    async def get_each(self, keys: Sequence[str]) -> list[Any]:
        return [await self.redis.get(key) for key in keys]

    async def close(self) -> None:
        """Each step bounded (``gateway.closing``): one that does not end in time is logged and
        left, and the next one is taken."""
        from ..closing import CLOSE_STEP_TIMEOUT, bounded, stop
        self._closing = True
        self._stop_reading_again()
        if self._measuring is not None:
            await stop(self._measuring, CLOSE_STEP_TIMEOUT, "the Redis clock reading")
        # a Sentinel client's close is three steps, each bounded (redis_topology)
        await bounded(self.redis.aclose(), 3 * CLOSE_STEP_TIMEOUT, "closing the Redis client")
