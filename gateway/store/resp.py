"""A lean Redis client for the per-request hot path: one connection, RESP by hand, hiredis.

Why not redis-py here: measured on this machine kind (measured per part; see bench/), one EVALSHA
through redis-py's asyncio client costs ~130-185 µs of client CPU, as much as all of the
proxying; the same round trip through one ``asyncio.Protocol`` whose writes are coalesced per
loop turn (but for a command to an idle connection, written at once) and whose replies are
parsed by hiredis costs ~11-24 µs. redis-py stays the
client for everything that is not per request (admin operations, Cluster, Sentinel).

Contract of :class:`RespClient`: ``await client.call(*args)`` sends one command and returns its
reply (bytes, int, list, None); a Redis error reply raises :class:`RespError`; a dead,
unreachable or stuck connection raises ``ConnectionError`` for every call in flight, and the
next call reconnects. Commands are pipelined on one connection; replies come back in order.
A call not answered in time raises :class:`TimedOut`, whose ``late`` future still gets the
reply if Redis sends it after all: Redis may have run the call.

"Stuck" is judged on Redis's time only: from when a command was written to the socket, and
after the loop has read what arrived. A stall of our own event loop (a gen-2 GC pause of a big
heap, a process starved of CPU) is not Redis being late, and must not fail every call in flight.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import socket
import time
from typing import Any

import hiredis
from redis.asyncio.connection import Connection
from redis.utils import check_protocol_version

from ..redis_urls import parse_standalone_url, tls_files_state


# redis-py's TCP keepalive (``socket_keepalive``): its default for a URL that does not say, and
# the TCP settings it gives a connection with it on (idle 30 s, probes 5 s apart, 3 of them)
KEEPALIVE_DEFAULT = inspect.signature(Connection.__init__).parameters["socket_keepalive"].default
try:
    from redis.asyncio.connection import get_default_socket_keepalive_options
except ImportError:  # a redis-py that sets SO_KEEPALIVE alone
    get_default_socket_keepalive_options = dict  # type: ignore[assignment]
KEEPALIVE_OPTIONS: dict[int, int] = get_default_socket_keepalive_options()

# A connection retired after a timeout is read on until the late replies are in (see
# RespClient._sweep_retired): for at most this many seconds, and at most this many of them.
RETIRED_MAX_AGE = 300.0
RETIRED_MAX = 8
# Of those, the ones Redis never answered on (made during a long pause, most likely): only the
# newest few. "Never answered" does not mean "ran nothing": Redis may have run their calls in
# time and held the replies with the rest (TIME's too), so they are kept like the others, but
# a long pause that makes one per timeout must not push out the connection that was in use
# when it began.
RETIRED_UNANSWERED_MAX = 2


class RespError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


def not_sent(message: str) -> ConnectionError:
    """The error of a call for which no connection to Redis could be made: it was never
    sent, so Redis never ran it (``unsent``: a caller may send it again without running it
    twice). A ``ConnectionError`` as any other, as logs name it."""
    error = ConnectionError(message)
    error.unsent = True  # type: ignore[attr-defined]
    return error


class TimedOut(ConnectionError):
    """Redis did not answer a call in time. Redis may have run it all the same (it ran the
    call, then stalled before its reply left): ``late`` resolves to the reply (an error reply
    as a :class:`RespError` value) if it still comes, and is cancelled if the connection goes
    first."""

    def __init__(self, message: str, late: asyncio.Future) -> None:
        super().__init__(message)
        self.late = late


def clock_offset(time_reply: Any, arrived: float) -> float:
    """Redis's clock minus our ``time.monotonic()``, seconds, from a TIME reply that reached
    us at ``arrived`` (monotonic; so a step of this host's wall clock cannot move it).

    Redis read its clock at some instant between sending and arrival; taking the arrival
    makes the offset at most one round trip too small, never too large. The per-request
    deadline built on it can then come early, never late. Halfway through the round trip
    was wrong by half of any stall: a connection opened while Redis is paused hears TIME
    only when it wakes, and its deadlines then fell after the client had given up. A round
    trip over ``CLOCK_OFFSET_MAX_RTT`` has the clock read again soon: a reply this loop read
    late (a collection, a starved CPU) made the offset too small by the stall, every
    deadline that much early."""
    seconds, micros = time_reply
    return int(seconds) + int(micros) / 1e6 - arrived


# Every this many seconds a connection reads Redis's clock again (TIME, from the watchdog's
# timer: nothing per request), so a host's wall clock stepped or drifting since the last
# reading is followed within a minute.
CLOCK_MAX_AGE = 60.0
# A TIME reading whose round trip took longer than this (Redis, the network or this loop
# stalled) pins Redis's clock down too loosely: a known skew is kept instead (the first one
# is used, being all there is), and the clock is read again CLOCK_READ_AGAIN_AFTER s later,
# not a minute later.
CLOCK_READING_MAX_RTT = 0.5
CLOCK_READ_AGAIN_AFTER = 1.0
# A TIME reading whose round trip took this much longer than the store's usual one
# (``ClockSkew._loose_offset``) made the offset (``clock_offset``) up to that much too small,
# every counting call's deadline that much early: it is read again CLOCK_READ_AGAIN_AFTER s
# later, not a minute later. Kept until then, a 0.4 s stall of the loop while a reply
# waited unread had calls Redis ran in time answered "late" (503) for a minute; an earlier
# offset is never kept instead, as Redis's clock may have stepped back meanwhile (an offset
# too large: deadlines late, calls counted after their 503).
CLOCK_OFFSET_MAX_RTT = 0.05
# This host's wall clock moved this far against its monotonic one since the last reading (an
# operator's `date -s`, an NTP step; NTP's slewing moves it at most ~30 ms in a minute): it
# stepped, and Redis's clock is read again at once rather than at the next minute's reading.
CLOCK_STEP = 0.1
# Clocks that agree this closely (beyond the reading's own round trip) count as agreeing:
# TIME has µs resolution, and keygate's finest time decision is the rate log's ms.
CLOCK_TOLERANCE = 0.001


def clock_skew(time_reply: Any, sent: float, arrived: float) -> float:
    """Redis's wall clock minus ours (``time.time()``), seconds, from a TIME reply to a
    command sent at ``sent`` that reached us at ``arrived`` (both ``time.time()``).

    Redis read its clock at some instant in between, so the skew is known only to within
    that round trip: 0.0 when no skew shows beyond it (plus ``CLOCK_TOLERANCE``), as for a
    Redis on this host, so that a replica whose clock is right keeps it exactly, and a test
    that injects its own clock keeps it; else the middle of the round trip, half of it off
    at most. Added to the wall clock, this is the "now" of a request's time decisions
    (expiry, the rate log, the month and day, last_used_at): one clock for every replica."""
    seconds, micros = time_reply
    redis = int(seconds) + int(micros) / 1e6
    if redis - arrived - CLOCK_TOLERANCE <= 0.0 <= redis - sent + CLOCK_TOLERANCE:
        return 0.0
    return redis - (sent + arrived) / 2


def _encode(args: tuple[Any, ...]) -> bytes:
    """RESP array of bulk strings."""
    return b"*%d\r\n%s" % (len(args), _bulk(args))


def _bulk(args: tuple[Any, ...]) -> bytes:
    """``args`` as RESP bulk strings, one after the other (no array header). The hot path's
    arguments are ASCII str and int: one f-string per argument and one encode (a loop: ~2.3
    µs for 12 arguments, against ~3.1 for a conditional comprehension that formats ints
    twice); anything else takes the general path."""
    out = []
    for a in args:
        if a.__class__ is not str:
            if a.__class__ is not int:
                return _bulk_general(args)
            a = str(a)
        out.append(f"${len(a)}\r\n{a}\r\n")
    try:
        return "".join(out).encode("ascii")
    except UnicodeEncodeError:
        return _bulk_general(args)


_FOUR_STR = (str, str, str, str)


def _bulk_str4(args: tuple[str, ...]) -> bytes:
    """``_bulk`` of four arguments, unrolled into one format when all four are str: the
    authorize call's varying arguments (callgrind: ~8.5k instructions per call, against ~13.4k
    through the loop)."""
    a, b, c, d = args
    if (a.__class__, b.__class__, c.__class__, d.__class__) != _FOUR_STR:
        return _bulk(args)
    try:
        return (f"${len(a)}\r\n{a}\r\n${len(b)}\r\n{b}\r\n${len(c)}\r\n{c}\r\n"
                f"${len(d)}\r\n{d}\r\n").encode("ascii")
    except UnicodeEncodeError:
        return _bulk_general(args)


def _bulk_general(args: tuple[Any, ...]) -> bytes:
    parts = []
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode() if not isinstance(a, str) else a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, on_lost) -> None:
        self.reader = hiredis.Reader(replyError=RespError)
        # Each command awaiting its reply, with when it was written: a one-item list shared
        # by the commands written together, ``inf`` until ``flush`` writes them.
        self.waiting: collections.deque[tuple[asyncio.Future, list[float]]] = \
            collections.deque()
        self.out: list[bytes] = []
        self.sent_at: list[float] = [math.inf]  # the write time of the commands in ``out``
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False    # no more calls are sent here
        self.gone = False      # the socket is closed, nothing is read any more
        self.answered = False  # Redis answered on this connection at least once
        self.retired_at: float | None = None  # when it stopped taking calls, still reading
        self._on_lost = on_lost

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()  # once: on Python 3.11 each call is a getpid()

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self.reader.gets()) is not False:
                if not waiting:  # a reply nobody asked for: the stream is out of step
                    self.abort(ConnectionError("unexpected reply from Redis"))
                    return
                fut = waiting.popleft()[0]
                if not fut.done():  # a caller that gave up: its reply is dropped, in order
                    if isinstance(reply, RespError) and self.retired_at is None:
                        fut.set_exception(reply)
                    else:  # a reply, or a late one (TimedOut.late): error replies as values
                        fut.set_result(reply)
        except hiredis.ProtocolError:  # not RESP: every call in flight fails, we reconnect
            self.abort(ConnectionError("Redis sent a malformed reply"))
            return
        if self.retired_at is not None and not waiting:  # every late reply is in
            self.abort(ConnectionError("connection to Redis retired"))

    def connection_lost(self, exc) -> None:
        self.abort(ConnectionError("connection to Redis lost"))

    def abort(self, exc: Exception) -> None:
        """Fail every call in flight (cancel the late replies still awaited), close."""
        if self.gone:
            return
        self.gone = True
        if not self.closed:
            self.closed = True
            self._on_lost(self)
        while self.waiting:
            fut = self.waiting.popleft()[0]
            if not fut.done():
                if self.retired_at is None:
                    fut.set_exception(exc)
                else:
                    fut.cancel()
        if self.transport is not None:
            self.transport.abort()

    def retire(self, now: float) -> None:
        """Redis did not answer in time: send nothing more here and fail every call in flight
        with :class:`TimedOut`, but keep reading. Redis may have run some of them and stalled
        before replying; a reply that still comes says what it did (``TimedOut.late``)."""
        if self.closed:
            return
        self.closed = True
        self.retired_at = now
        self._on_lost(self)
        # Commands still queued for this loop turn were never sent: they simply fail.
        unsent = len(self.out)
        self.out.clear()
        gone_unsent = ConnectionError("Redis did not answer in time")
        for _ in range(unsent):
            fut = self.waiting.pop()[0]
            if not fut.done():
                fut.set_exception(gone_unsent)
        sent, self.waiting = self.waiting, collections.deque()
        for fut, at in sent:
            late = self.loop.create_future()
            self.waiting.append((late, at))
            if not fut.done():
                fut.set_exception(TimedOut("Redis did not answer in time", late))
        if not self.waiting:
            self.abort(gone_unsent)

    def flush(self) -> None:
        out = self.out
        if out:
            data = b"".join(out)
            out.clear()  # first: a failing write must not leave ``out`` non-empty, which
            #              would stop every later command from scheduling a flush
            if not self.closed:
                # the watchdog's clock starts now, not when the commands were queued: a loop
                # stall between the two is ours, not Redis's
                self.sent_at[0] = time.monotonic()
                self.transport.write(data)

    def sent(self, fut: asyncio.Future) -> None:
        """``fut`` awaits the reply to a command written just now (not through ``out``)."""
        self.waiting.append((fut, [time.monotonic()]))


class ClockSkew:
    """``clock_skew``: Redis's wall clock minus ours, as both store clients keep it from their
    TIME readings (:meth:`_take_skew`). 0.0 until the first reading."""

    clock_skew = 0.0
    _skew_known = False
    # time.time() - time.monotonic() when the skew was last read (None: never)
    _wall_minus_mono: float | None = None
    # the store's usual round trip for a TIME reading (``_loose_offset``), and the timer of a
    # reading taken again soon (``_read_again_soon``)
    _usual_rtt = 0.001
    _read_again: asyncio.TimerHandle | None = None

    def _loose_offset(self, rtt: float) -> bool:
        """Whether a reading whose round trip took ``rtt`` s pins the offset down loosely:
        ``CLOCK_OFFSET_MAX_RTT`` over the store's usual round trip. The usual one follows the
        shortest readings at once, and longer ones by doubling at most a reading: a Redis
        60 ms away (another region) is read again a few times, then a minute apart as any
        (its readings come no closer), while one stall of the loop is never taken as usual."""
        loose = rtt > self._usual_rtt + CLOCK_OFFSET_MAX_RTT
        self._usual_rtt = max(0.001, min(rtt, 2 * self._usual_rtt))
        return loose

    def _read_again_soon(self) -> None:
        """Read the clock again ``CLOCK_READ_AGAIN_AFTER`` s from now (``_clock_again``), on
        a timer of its own: not at the watchdog's next look (a store timeout / 4 away, 2 s at
        an 8 s timeout), nor at the next request (the first after a quiet spell would get the
        offset read loosely)."""
        if self._read_again is not None:
            self._read_again.cancel()
        self._read_again = asyncio.get_running_loop().call_later(CLOCK_READ_AGAIN_AFTER,
                                                                 self._clock_again)

    def _clock_again(self) -> None:
        raise NotImplementedError

    def _stop_reading_again(self) -> None:
        if self._read_again is not None:
            self._read_again.cancel()
            self._read_again = None

    def _take_skew(self, time_reply: Any, sent: float, arrived: float) -> bool:
        """Take the skew a TIME reply sent at ``sent`` and heard at ``arrived`` (both
        ``time.time()``) shows (:func:`clock_skew`), unless its round trip was over
        ``CLOCK_READING_MAX_RTT`` (or below 0: a clock step) and a skew is known already. True when the reading was that
        loose: the caller reads the clock again soon (``_read_again_soon``)."""
        # (a round trip that ran backwards: the wall clock stepped back while it was made)
        loose = not 0.0 <= arrived - sent <= CLOCK_READING_MAX_RTT
        if not loose or not self._skew_known:
            self.clock_skew = clock_skew(time_reply, sent, arrived)
            self._skew_known = True
            self._wall_minus_mono = arrived - time.monotonic()
        return loose

    def _clock_stepped(self) -> bool:
        """Whether this host's wall clock stepped (``CLOCK_STEP``) since the skew was read:
        the skew no longer holds. Once per step: the next reading takes the new clock."""
        before = self._wall_minus_mono
        if before is None:
            return False
        now = time.time() - time.monotonic()
        if abs(now - before) <= CLOCK_STEP:
            return False
        self._wall_minus_mono = now  # said once; the reading it causes sets it again
        return True


class RespClient(ClockSkew):
    """One pipelined connection to a standalone Redis (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, *, timeout: float = 2.0, connect_timeout: float = 2.0,
                 max_pending: int = 100_000) -> None:
        # The same parse as the admin path's redis-py client (redis-py's own URL semantics):
        # a password or db in a unix:// query, ssl_ca_certs and the other TLS options.
        target = parse_standalone_url(url)
        self.path = target.unix_path
        self.host, self.port = target.host, target.port
        self.db = target.db
        self.username, self.password = target.username, target.password
        self._target = target
        self._ssl = target.ssl_context()
        self._tls_files = self._tls_files_now()
        # as in redis-py, the URL's options win over the arguments
        self.timeout = target.option_seconds("socket_timeout", timeout)
        self.connect_timeout = target.option_seconds("socket_connect_timeout", connect_timeout)
        self.client_name = target.options.get("client_name")
        # TCP keepalive as redis-py sets it for this URL (a unix socket has none)
        keepalive = target.options.get("socket_keepalive")
        self.keepalive = self.path is None and bool(
            KEEPALIVE_DEFAULT if keepalive is None else keepalive)
        # whether redis-py logs in with HELLO 3 for this URL (not ``protocol=2``): this client
        # reads RESP2 replies, so it sends the AUTH that HELLO 3 AUTH amounts to
        self._resp3_login = check_protocol_version(target.options.get("protocol"), 3)
        # Commands awaiting a reply on the connection. The watchdog bounds how long Redis may
        # lag, this bounds how much piles up meanwhile: past it a call fails at once (the
        # hot path answers 503) instead of growing memory without limit.
        self.max_pending = max_pending
        # Redis's clock minus our time.monotonic(), seconds, measured at each connect (None:
        # not yet known).
        self.clock_offset: float | None = None
        # clock_skew (ClockSkew) is measured with the offset and every CLOCK_MAX_AGE s after
        self._clock_asked_at = -math.inf  # monotonic: when the watchdog last asked
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._retired: list[_Protocol] = []  # timed out, still reading late replies

    def _tls_files_now(self) -> tuple | None:
        if self._ssl is None:
            return None
        tls = self._target.ssl_options
        return tls_files_state(tls.get("ssl_ca_certs"), tls.get("ssl_certfile"),
                               tls.get("ssl_keyfile"), tls.get("ssl_ca_path"))

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        factory = lambda: _Protocol(self._lost)  # noqa: E731
        if self._ssl is not None:
            # The CA or client certificate files rotated in place since the context was
            # built are read again (redis_urls.FreshTLS, as on the admin path): a few stat
            # calls a connection made, nothing per request.
            files = self._tls_files_now()
            if files != self._tls_files:
                try:
                    self._ssl = self._target.ssl_context()
                except ValueError as exc:
                    raise not_sent(f"cannot connect to Redis: {exc}") from None
                self._tls_files = files
        try:
            if self.path is not None:
                coro = loop.create_unix_connection(factory, self.path)
            else:
                coro = loop.create_connection(factory, self.host, self.port, ssl=self._ssl)
            _, proto = await asyncio.wait_for(coro, self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise not_sent(
                f"cannot connect to Redis: {exc.__class__.__name__}: {exc}") from exc
        if self.keepalive:
            sock = proto.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, value in KEEPALIVE_OPTIONS.items():
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError as exc:  # (as redis-py: the connection is not used)
                proto.abort(ConnectionError("connection to Redis not set up"))
                raise not_sent(f"cannot set TCP keepalive on the connection to Redis: "
                               f"{exc}") from exc
        hello = []
        # redis-py's rule (UsernamePasswordCredentialProvider): a user name alone logs in as
        # that user with an empty password (an ACL user with ``nopass``), not as ``default``
        if self.username:
            hello.append(("AUTH", self.username, self.password or ""))
        elif self.password is not None:
            # and redis-py's login: on RESP3 (its default) ``HELLO 3 AUTH default <password>``,
            # which a ``default`` user without a password accepts, where the legacy
            # ``AUTH <password>`` (what it sends on ``protocol=2``) is refused
            hello.append(("AUTH", "default", self.password) if self._resp3_login
                         else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        if self.client_name:
            hello.append(("CLIENT", "SETNAME", self.client_name))
        try:
            for cmd in hello:
                fut = loop.create_future()
                proto.sent(fut)
                proto.transport.write(_encode(cmd))
                try:
                    await asyncio.wait_for(fut, self.timeout)
                except RespError as exc:
                    raise not_sent(f"Redis refused {cmd[0]}: {exc}") from exc
                except asyncio.TimeoutError as exc:
                    raise not_sent(f"Redis did not answer {cmd[0]} in time") from exc
            # Redis's clock against ours (TIME): the per-request script's deadline is set in
            # Redis's clock. Sent, not awaited: the connection is usable at once, the offset
            # is known one round trip later.
            fut = loop.create_future()
            proto.sent(fut)
            sent, sent_mono = time.time(), time.monotonic()
            proto.transport.write(_encode(("TIME",)))
            fut.add_done_callback(lambda fut: self._clock_read(fut, sent, sent_mono))
        except BaseException:  # refused, stuck, lost, or close() cancelled us: never leak it
            proto.abort(ConnectionError("connection to Redis not set up"))
            raise
        if proto.closed:
            raise not_sent("connection to Redis lost while connecting")
        return proto

    def measure_clock(self) -> None:
        """Measure ``clock_offset`` and ``clock_skew`` again (one TIME call, not awaited):
        after a clock step, and every CLOCK_MAX_AGE s."""
        sent, sent_mono = time.time(), time.monotonic()
        self.call("TIME").add_done_callback(lambda fut: self._clock_read(fut, sent, sent_mono))

    def _clock_read(self, fut: asyncio.Future, sent: float, sent_mono: float) -> None:
        """``clock_offset`` and ``clock_skew`` from a TIME reply sent at ``sent``
        (``time.time()``; ``sent_mono``, ``time.monotonic()``): :func:`clock_offset`,
        :func:`clock_skew`."""
        if fut.cancelled() or fut.exception() is not None:
            return  # lost with the connection, or TIME refused (an ACL): keep what we had
        arrived, arrived_mono = time.time(), time.monotonic()
        try:
            self.clock_offset = clock_offset(fut.result(), arrived_mono)
            loose = self._loose_offset(arrived_mono - sent_mono)
            if self._take_skew(fut.result(), sent, arrived) or loose:
                self._read_again_soon()
        except (TypeError, ValueError):
            pass

    def _clock_again(self) -> None:
        self._read_again = None
        proto = self._proto
        if proto is not None and not proto.closed:  # (else the next connection reads it)
            self._clock_asked_at = time.monotonic()  # the minute starts again
            self.measure_clock()

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    def _arm_watchdog(self) -> None:
        """Every timeout/4 s: a reply overdue by more than ``timeout`` since its command was
        written retires the connection (one timer for all calls, instead of a wait_for per
        call on the hot path); the next call makes a new one.

        An overdue reply is judged again two loop turns later, after the loop has polled the
        socket: when the loop itself was stalled (a GC pause, a starved CPU), the reply may be
        waiting there unread, and this check may run in the same pass as the stall, before
        any read. Only a reply still missing then is Redis's."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            proto, now = self._proto, time.monotonic()
            if proto is not None and proto.waiting:
                fut, sent_at = proto.waiting[0]
                if now - sent_at[0] > self.timeout:
                    # judged two turns from now, after the loop polled the socket: uvloop runs
                    # due timers before it polls, so this check can run right after a stall
                    # of the loop, before the reply that arrived meanwhile is read
                    loop.call_soon(loop.call_soon, confirm, proto, fut)
            if self._retired:
                self._sweep_retired(now)
            if proto is not None and (now - self._clock_asked_at > CLOCK_MAX_AGE
                                      or self._clock_stepped()):
                if self._clock_asked_at != -math.inf:  # (the connection read it just now)
                    self.measure_clock()
                self._clock_asked_at = now
            self._watchdog = loop.call_later(self.timeout / 4, check)

        def confirm(proto: _Protocol, fut: asyncio.Future) -> None:
            if not proto.closed and proto.waiting and proto.waiting[0][0] is fut:
                now = time.monotonic()
                proto.retire(now)
                self._retired.append(proto)
                self._sweep_retired(now)  # the bounds hold at once, not a check later

        self._watchdog = loop.call_later(self.timeout / 4, check)

    def _sweep_retired(self, now: float) -> None:
        """Bound the retired connections. Each may hold replies to calls Redis ran just
        before it stalled, even one Redis never answered on (it may have run the calls and
        held every reply, TIME's too): it is kept until they come, for at most
        RETIRED_MAX_AGE, the RETIRED_MAX newest only, of those never answered on the
        RETIRED_UNANSWERED_MAX newest only."""
        keep = []
        for proto in self._retired:
            if not proto.gone and now - proto.retired_at > RETIRED_MAX_AGE:
                proto.abort(ConnectionError("gave up waiting for late replies"))
            if not proto.gone:
                keep.append(proto)
        unanswered = [proto for proto in keep if not proto.answered]
        for proto in unanswered[:-RETIRED_UNANSWERED_MAX]:
            proto.abort(ConnectionError("gave up waiting for late replies"))
        keep = [proto for proto in keep if not proto.gone]
        for proto in keep[:-RETIRED_MAX]:
            proto.abort(ConnectionError("gave up waiting for late replies"))
        self._retired = keep[-RETIRED_MAX:]

    async def _connection(self) -> _Protocol:
        """The one connection attempt in progress, shared by every caller waiting for it.
        Its outcome is recorded by the attempt itself (``_connected``), so that callers
        cancelled meanwhile neither start a second connection nor leave this one unowned."""
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(self._connect())
            task.add_done_callback(self._connected)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                raise not_sent("Redis client closed while connecting") from None
            raise

    def _connected(self, task: asyncio.Future) -> None:
        detached = self._connecting is not task  # close() let go of it meanwhile
        if not detached:
            self._connecting = None
        if task.cancelled() or task.exception() is not None:
            return
        proto = task.result()
        if detached:
            proto.abort(ConnectionError("Redis client closed while connecting"))
        if proto.closed:
            return
        if self._proto is not None and self._proto is not proto:
            self._proto.abort(ConnectionError("replaced by a new connection"))
        self._proto = proto
        if self._watchdog is None:
            self._arm_watchdog()

    def call(self, *args: Any) -> "asyncio.Future[Any]":
        """Queue one command; the returned future resolves to its reply."""
        proto = self._proto
        if proto is None or proto.closed:
            return asyncio.ensure_future(self._call_after_connect(args))
        return self._send(proto, args)

    async def _call_after_connect(self, args: tuple[Any, ...]) -> Any:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await self._send(proto, args)

    def call_encoded(self, command: bytes) -> "asyncio.Future[Any]":
        """Like ``call``, for a command already encoded as RESP."""
        proto = self._proto
        if proto is None or proto.closed:
            return asyncio.ensure_future(self._encoded_after_connect(command))
        return self._send_encoded(proto, command)

    async def _encoded_after_connect(self, command: bytes) -> Any:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await self._send_encoded(proto, command)

    def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> "asyncio.Future[Any]":
        return self._send_encoded(proto, _encode(args))

    def _send_encoded(self, proto: _Protocol, command: bytes) -> "asyncio.Future[Any]":
        loop = proto.loop or asyncio.get_running_loop()
        fut = loop.create_future()
        if proto.closed:  # lost between connecting and this send: nobody would answer
            fut.set_exception(ConnectionError("connection to Redis lost"))
            return fut
        if len(proto.waiting) >= self.max_pending:
            fut.set_exception(ConnectionError(
                f"{self.max_pending} Redis commands already waiting for a reply"))
            return fut
        if not proto.out:
            if not proto.waiting:
                # Nothing of ours is in Redis: written now, so Redis runs it while this loop
                # turn goes on with the other requests read with this one. Their commands,
                # made while this reply is awaited, go out together at the turn's end. Under
                # wrk at 8 connections this took keygate's core from 92% to 96% busy and its
                # throughput 1.07x up (bench A/B, CPU per request unchanged); writing every
                # command at once did not pay (more writes and reads a request).
                proto.waiting.append((fut, [time.monotonic()]))
                proto.transport.write(command)
                return fut
            loop.call_soon(proto.flush)
            proto.sent_at = [math.inf]  # these commands' write time, set when written
        proto.out.append(command)
        proto.waiting.append((fut, proto.sent_at))
        return fut

    async def close(self) -> None:
        """Close the connection (calls in flight get ``ConnectionError``) and stop the
        watchdog; a connection attempt in progress is abandoned. A later call reconnects."""
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():  # bounded: see gateway.closing
            from ..closing import CLOSE_STEP_TIMEOUT, stop
            await stop(task, CLOSE_STEP_TIMEOUT, "a connection attempt to Redis")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._stop_reading_again()
        if self._proto is not None:
            self._proto.abort(ConnectionError("client closed"))
            self._proto = None
        for proto in self._retired:
            proto.abort(ConnectionError("client closed"))
        self._retired.clear()
