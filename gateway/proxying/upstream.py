"""A lean HTTP/1.1 client for upstreams: keep-alive pool, llhttp parsing, streaming both ways.

Why not aiohttp's ClientSession: measured per part (see bench/), it costs ~190-250 µs of CPU per request against ~40-90 µs for a protocol-level client over the
same socket — more than everything else keygate does per request. This client keeps what a
proxy needs and nothing else:

- one pool of idle keep-alive connections per upstream (LIFO, capped, none kept idle longer
  than ``idle_ttl``: a middlebox may drop an idle flow silently, and a request sent on it would
  only end at the head timeout);
- the request head is written as given (the proxy has already cleaned the headers); the body
  streams from any async chunk source with write backpressure (``pause_writing``), framed with
  ``Content-Length`` when known, else chunked;
- the response is parsed by llhttp (httptools), strict: a malformed response is an error,
  never passed on; its body streams out with read backpressure (``pause_reading``);
- a connection is reused only after a complete response that allows keep-alive, and when the
  request body was completely sent;
- timeouts: connect, and time to the response head counted from the end of the request body
  (an upstream that stops reading the request body for that long also times out);
- uploads still streaming when they take a connection (their body not yet all received from
  the client: it may trickle in for as long as the client likes) hold at most
  ``max_streaming`` of the connections at once (half of ``max_connections``, at least one);
  requests whose body is complete (none, or all of it already read) may use every one, so a
  trickle of slow uploads can never leave the other requests without a connection; and one
  owner's uploads (a workspace, or a public route's client address) hold at most ``share`` of
  those (half, at least one), so one tenant's slow uploads never take every upload slot;
- a request that fails on a reused idle connection before any response byte (the upstream
  closed it meanwhile) is retried once when it had no body and a safe method (GET, HEAD,
  OPTIONS, TRACE); any other is not (the upstream may have acted on it, or its body was
  consumed from the client): it fails as a 502, never silently sent twice;
- TLS to an ``https://`` upstream is asyncio's own ``SSLProtocol`` over a plain TCP
  connection of the running loop, whatever the loop: uvloop's TLS transport (0.23) drops the
  records it has not decrypted yet when the FIN comes while reading is paused (uvloop PR
  #661): a large answer ended by close_notify was cut short under backpressure. It is
  ``UpstreamTLS``, which also reads the records of an early answer still in the socket when a
  body write fails on the upstream's reset, as the plain TCP connection reads its bytes;
- an upstream whose machine vanishes (power loss, a cut cable: no FIN, no RST) is found so
  within ``vanish_timeout`` (``server.timeouts.body``): each new connection gets a TCP user
  timeout and keep-alive probes as it connects (``gateway.proxying.vanish``), once per
  connection, never per request. Without them a tunnel the client pings, an upload it
  trickles, or an answer that went quiet after its head held the connection, its client and
  their slots until TCP gave up retransmitting (~15 minutes), or the upstream's ``timeout``.

This module is the pool; one connection, its parsing and the response it hands out are
``gateway.proxying.connection``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from urllib.parse import urlsplit

from .connection import (BodyFramingError, BodySource, ClientGone, UploadShareFull,
                         UploadSlotsFull, UpstreamConnectError, UpstreamConnection,
                         UpstreamProtocolError, UpstreamResponse, UpstreamTimeout,
                         UpstreamTLS, UpstreamUnreached)
from .vanish import set_vanish_options, vanish_options

MAX_IDLE = 256
IDLE_TTL = 30.0   # seconds an idle connection is trusted (a middlebox may drop it silently)
SWEEP_MIN = 0.01  # seconds between head-timeout sweeps at the least (a timeout of a few ms)
# Request lines that may be sent again after the upstream hung up without an answer: the safe
# methods (RFC 9110 9.2.1), as Go's http.Transport replays. A POST, PATCH, PUT or DELETE the
# upstream may have acted on is a 502 instead, never sent twice.
_REPLAYABLE = (b"GET ", b"HEAD ", b"OPTIONS ", b"TRACE ")


class UpstreamPool:
    """Keep-alive connections to one upstream origin (``http://host:port`` or ``https://``)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_idle: int = MAX_IDLE,
                 ssl_context: ssl.SSLContext | None = None, idle_ttl: float = IDLE_TTL,
                 max_connections: int = 100, vanish_timeout: float | None = None) -> None:
        """``ssl_context``: for ``https://``, the context to verify the upstream with (e.g.
        one trusting a private CA); by default the system's trust store.

        ``max_connections`` bounds the connections open to the upstream (in use, idle or being
        made); a request over it waits for one, up to ``connect_timeout``. Of those, requests
        whose body is still streaming in from the client (``request(streaming=True)``) hold at
        most ``max_streaming`` at once: half, at least one (all of them when
        ``max_connections`` is 1); and the uploads of one owner (``request(owner=...)``) at
        most ``share`` of those: half, at least one (with ``max_streaming`` 1 that one slot:
        no fairness is possible).

        ``vanish_timeout``: seconds after which a connection whose upstream acknowledges
        nothing (sent bytes, keep-alive probes) is ended, its machine gone
        (``gateway.proxying.vanish``); None: TCP's own (~15 minutes)."""
        parts = urlsplit(url)
        self.tls = (ssl_context or ssl.create_default_context()) \
            if parts.scheme == "https" else None
        if self.tls is not None:  # HTTP/1.1 is what this client speaks: said in the handshake
            self.tls.set_alpn_protocols(["http/1.1"])
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        # computed once: set on each connection as it is made (a pooled one keeps them)
        self._vanish = vanish_options(vanish_timeout) if vanish_timeout is not None else []
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self.idle: list[UpstreamConnection] = []
        self.active: set[UpstreamConnection] = set()
        self.max_connections = max_connections
        self.opened = 0                                  # connections holding a slot
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        # connections handed to a waiter that has not run yet: one lost meanwhile leaves its
        # slot to that waiter (it opens a new connection in it, keeping its turn)
        self._handed: set[UpstreamConnection] = set()
        # Upload slots: a client trickling its body (a byte now and then never stalls it for
        # server.timeouts.body) holds its connection as long as it likes; such requests hold
        # at most max_streaming connections, so that requests with a complete body always
        # find one. A slot is held from before the connection is taken until the body's sender
        # stops (all sent, failed or cancelled); a slot freed with uploads waiting is handed to
        # the longest waiter allowed to take it.
        self.max_streaming = max(1, max_connections // 2)
        self.streaming = 0                               # upload slots held
        # The fair share: one owner (a keyed request's workspace; on a public route, the
        # client address) holds at most `share` upload slots, so that one tenant's trickling
        # uploads cannot make every other tenant's wait and fail. An owner at its share waits
        # (within the same deadline) for one of its own slots to come free; an upload without
        # an owner (None) is bound by max_streaming alone.
        self.share = max(1, self.max_streaming // 2)
        self._uploading: dict[object, int] = {}          # upload slots held, by owner
        self._upload_waiters: collections.deque[tuple[asyncio.Future, object]] = \
            collections.deque()                          # (waiter, its owner), longest first
        # The time-to-head timeouts: one sweep over the connections in use, a few times per
        # timeout, instead of a timer armed and cancelled for each request (uvloop's
        # call_later + cancel cost ~2 µs, a tenth of all the pool's own work per request).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0
        # Closed (a reload retired it, or shutdown): a connection handed back is closed, not
        # kept. One opened while the pool closed was not active yet, so close() missed it.
        self.closed = False
        # What the owner made ``ssl_context`` from (the digest of an upstream's ca_file): a
        # reload compares it with the file's contents now (gateway.proxying.forward)
        self.ca_digest: bytes | None = None

    def retire(self) -> None:
        """Keep no connection from now on: the idle ones are closed, and each one in use is
        closed when its request ends. Requests may still use the pool (within its bound)."""
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def close_tunnels(self) -> None:
        """Close the connections that switched to a WebSocket tunnel (their protocol is the
        tunnel's now, no longer the connection's own parser)."""
        for conn in list(self.active):
            transport = conn.transport
            if transport is not None and transport.get_protocol() is not conn:
                conn.close()

    def in_use(self) -> bool:
        """A request uses the pool or waits for it: an exchange under way, a connection being
        opened, a waiter (of a retired pool, whose idle connections are closed: any open)."""
        return bool(self.active or self.opened or self._waiters or self._upload_waiters)

    def take_back(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.head, conn.complete, conn.error, conn.got_bytes = None, False, None, False
        conn.on_complete = None
        conn.head_bytes = 0
        if conn.reading_paused:  # a whole body taken while reading was paused
            conn.reading_paused = False
            conn.transport.resume_reading()
        conn.chunks.clear()
        conn.buffered, conn.skip_body, conn.until_close = 0, False, False
        conn.sender = None  # its body was all sent (else the connection is not taken back)
        conn.idle_since = conn.loop.time()
        self._give(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if conn.counted:
            conn.counted = False
            if conn not in self._handed:  # (else its slot is its waiter's: _wait_turn)
                self._free_slot()

    # A connection or a connection slot that comes free while requests wait for one is handed
    # to the longest waiter at once, as upload slots are: a request that reaches _checkout in
    # the meantime (ready in the same turn of the loop, as under load) finds none free and
    # queues behind them. Only woken, the longest waiter found the connection taken by such a
    # request and queued again at the back: under steady load at max_connections the requests
    # that had waited longest were the ones answered 504.

    def _give(self, conn: UpstreamConnection) -> None:
        """``conn``, open and reusable, came free: to the longest waiter, else idle."""
        if self._waiters and _hand_first(self._waiters, conn):
            self._handed.add(conn)
        else:
            self.idle.append(conn)

    def _free_slot(self) -> None:
        """A connection slot came free: the longest waiter takes it (to open a connection in),
        else it is free."""
        if not (self._waiters and _hand_first(self._waiters, _SLOT)):
            self.opened -= 1

    def _queued(self) -> bool:
        """Whether a request waits for a connection (a waiter given up but not yet out of the
        queue does not)."""
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        return bool(waiters)

    async def _checkout(self, deadline: float | None = None,
                        fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """An idle connection (reused: True) or a new one, within ``max_connections``; waiting
        for one at most until ``deadline`` (loop time; by default ``connect_timeout`` from the
        moment it starts waiting). ``fresh``: a new one while there is room for it (a retry
        after an idle connection the upstream had dropped: it drops its idle ones together).

        While requests wait, one arriving queues behind them, whatever is free: connections
        and slots coming free are handed to the longest waiter (``_give``, ``_free_slot``)."""
        while True:
            slot = False
            if not (self._waiters and self._queued()):
                while self.idle and not (fresh and self.opened < self.max_connections):
                    conn = self.idle.pop()
                    if conn.loop.time() - conn.idle_since > self.idle_ttl:
                        # the newest idle connection is too old: so are all the others
                        stale, self.idle = self.idle, []
                        for old in stale + [conn]:
                            old.close()
                        break
                    if not conn.closed:
                        return conn, True
                if self.opened < self.max_connections:
                    self.opened += 1
                    slot = True
            if not slot:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.connect_timeout
                handed = await self._wait_turn(deadline)
                if handed is not None:
                    return handed, True
            # a slot held (taken, or handed over): a new connection in it
            try:
                conn = await self._connect()
            except BaseException:
                self._free_slot()
                raise
            if conn.closed:  # lost before we could hold it: its slot is free again
                self._free_slot()
                continue
            conn.counted = True
            return conn, False

    async def _wait_turn(self, deadline: float) -> UpstreamConnection | None:
        """Wait until ``deadline`` (loop time) for a connection to be handed over, or a slot
        (None: counted already, to open a connection in; also when the connection handed
        over was lost before this ran)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                handed = await waiter
        except BaseException as exc:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed one as we gave up (timed out, or the client went): passed on
                handed = waiter.result()
                if handed is _SLOT:
                    self._free_slot()
                else:
                    self._handed.discard(handed)
                    if handed.closed:
                        self._free_slot()  # the slot it held was left to us
                    elif self.closed:
                        handed.close()  # (the pool closed meanwhile: its slot goes on)
                    else:
                        self._give(handed)
            if isinstance(exc, TimeoutError):
                raise UpstreamUnreached(
                    f"no free connection to the upstream within {self.connect_timeout:g} s"
                    f" (max_connections {self.max_connections})") from None
            raise
        if handed is _SLOT:
            return None
        self._handed.discard(handed)
        return None if handed.closed else handed

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            if self.tls is None:
                transport, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: UpstreamConnection(self), self.host,
                                           self.port),
                    self.connect_timeout)
                self._drop_if_vanished(transport)
            else:
                conn = await asyncio.wait_for(self._connect_tls(loop), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise UpstreamUnreached("connect timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(_why(exc)) from exc
        return conn

    async def _connect_tls(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        """A TLS connection (SNI and verification for ``self.host``, with ``self.tls``): what
        ``loop.create_connection(ssl=...)`` does, with asyncio's ``SSLProtocol`` on any loop.
        Unlike uvloop's, it keeps the records already read when the FIN comes while the
        answer's reading is paused, and hands them on once reading resumes."""
        conn = UpstreamConnection(self)
        handshake = loop.create_future()
        tls = UpstreamTLS(loop, conn, self.tls, handshake, server_side=False,
                          server_hostname=self.host,
                          ssl_handshake_timeout=self.connect_timeout)
        transport, _ = await loop.create_connection(lambda: tls, self.host, self.port)
        try:
            self._drop_if_vanished(transport)  # the TCP connection's (the handshake's too)
            await handshake
        except BaseException:
            transport.close()
            raise
        return conn

    def _drop_if_vanished(self, transport: asyncio.BaseTransport) -> None:
        """Set the options that find a vanished upstream on a new connection's socket."""
        if self._vanish:
            try:
                set_vanish_options(transport.get_extra_info("socket"), self._vanish)
            except OSError:  # closed meanwhile: its loss is reported as any other
                pass

    async def request(self, head: bytes, *, body: BodySource | None = None,
                      content_length: int | None = None, timeout: float = 30.0,
                      is_head: bool = False, streaming: bool = False,
                      owner: object = None, client=None) -> UpstreamResponse:
        """Send ``head`` (request line + headers, without the final CRLF and without any
        framing header) and the body; return once the response head has arrived.

        ``streaming``: ``body`` is not all received yet (the client may still be sending it,
        as slowly as it likes): the request takes one of the ``max_streaming`` upload slots
        first, waiting for one within ``connect_timeout`` (``UploadSlotsFull``). ``owner``
        (hashable: its workspace, say) holds at most ``share`` of them: over that, the upload
        waits for one of its own to come free, within the same time (``UploadShareFull``).
        Read only when ``streaming``.

        ``client``: the client connection's handler (``server._JsonErrorRequestHandler``),
        if the exchange is to end when the client goes: while it waits for the answer head
        (its body being sent included), ``client.upstream_wait`` holds that wait, which the
        handler's ``connection_lost`` fails with ``ClientGone``; the upstream connection is
        then closed. A client already gone (``client.transport`` None) once a connection is
        found is ``ClientGone`` with ``sent`` False, and nothing is sent."""
        if streaming:
            return await self._streamed(head, body, content_length, timeout, is_head, owner,
                                        client)
        for attempt in (0, 1):
            conn, reused = await self._checkout(fresh=attempt == 1)
            self.active.add(conn)
            try:
                return await self._exchange(conn, head, body, content_length, timeout, is_head,
                                            client)
            except UpstreamProtocolError:
                # an idle connection the upstream had closed: retry once if nothing was sent
                # that cannot be sent again (the upstream may have read the request and acted
                # on it before it hung up: only a safe method is sent twice)
                if attempt == 0 and reused and body is None and not conn.got_bytes \
                        and head.startswith(_REPLAYABLE):
                    continue
                raise
        raise UpstreamProtocolError("upstream closed the connection")

    async def upgrade(self, head: bytes, *, timeout: float = 30.0,
                      client=None) -> UpstreamResponse:
        """Send a WebSocket handshake ``head`` (no body) and return once the response head has
        arrived. A ``101`` is final here (``request`` fails on one): its connection is the
        caller's to tunnel over (``gateway.proxying.tunnel``), still holding its slot of
        ``max_connections`` until it closes. Any other answer is an ordinary response whose
        connection is closed after it, never reused (the upstream may have read the handshake
        otherwise than keygate did). ``client``: as ``request``'s."""
        for attempt in (0, 1):
            conn, reused = await self._checkout(fresh=attempt == 1)
            self.active.add(conn)
            conn.upgrade_wanted = True
            try:
                resp = await self._exchange(conn, head, None, None, timeout, False, client)
            except UpstreamProtocolError:
                if attempt == 0 and reused and not conn.got_bytes:  # a GET: sent again
                    continue
                raise
            resp.keep_alive = False
            return resp
        raise UpstreamProtocolError("upstream closed the connection")

    async def _streamed(self, head: bytes, body: BodySource, content_length: int | None,
                        timeout: float, is_head: bool, owner: object,
                        client=None) -> UpstreamResponse:
        """``request`` for a body still streaming in: within an upload slot, held until the
        body's sender stops (all sent, the client or the upstream failed, or cancelled; an
        exchange that fails has closed its connection). Never retried: the body is consumed."""
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        await self._upload_slot(deadline, owner)
        held = True

        def release(_: object = None) -> None:
            nonlocal held
            if held:
                held = False
                self._release_upload(owner)
        try:
            conn, _ = await self._checkout(deadline)  # one wait: both within connect_timeout
            self.active.add(conn)
            resp = await self._exchange(conn, head, body, content_length, timeout, is_head,
                                        client)
        except BaseException:
            release()
            raise
        sender = resp.sender
        if sender is None or sender.done():
            release()
        else:  # still sending (the upstream answered early): free once it stops
            sender.add_done_callback(release)
        return resp

    async def _upload_slot(self, deadline: float, owner: object = None) -> None:
        """Take an upload slot for ``owner``, waiting for one it may take until ``deadline``
        (then ``UploadShareFull`` when ``owner`` holds its share, else ``UploadSlotsFull``)."""
        if self.streaming < self.max_streaming and (
                owner is None or self._uploading.get(owner, 0) < self.share):
            # no waiter could take this slot (one that could was handed it as it came free):
            # taking it jumps no queue
            self._take_upload(owner)
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (waiter, owner)
        self._upload_waiters.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter  # a slot is handed over: already counted, for owner
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_upload(owner)  # handed one as we gave up: pass it on
            else:
                try:
                    self._upload_waiters.remove(entry)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                held = self._uploading.get(owner, 0) if owner is not None else 0
                if held >= self.share:
                    raise UploadShareFull(
                        f"no upload slot of its own free within {self.connect_timeout:g} s: "
                        f"its owner's uploads still streaming hold {held} of the "
                        f"{self.max_streaming} upload slots (at most {self.share} each)",
                        owner, self.share) from None
                raise UploadSlotsFull(
                    f"no upload slot free within {self.connect_timeout:g} s: uploads still "
                    f"streaming hold {self.streaming} of the {self.max_connections} "
                    f"connections (at most {self.max_streaming})") from None
            raise

    def _take_upload(self, owner: object) -> None:
        self.streaming += 1
        if owner is not None:
            self._uploading[owner] = self._uploading.get(owner, 0) + 1

    def _release_upload(self, owner: object = None) -> None:
        """``owner``'s upload slot came free: to the longest waiter allowed to take it (under
        both bounds: ``max_streaming``, and its owner's ``share``), else back to the pool.

        Only a slot coming free lets a waiter take one, and it is handed over at once: so no
        waiter may ever take a slot while it is free, and an upload that finds one free
        takes it without passing anyone."""
        self.streaming -= 1
        if owner is not None:
            left = self._uploading[owner] - 1
            if left:
                self._uploading[owner] = left
            else:
                del self._uploading[owner]
        waiters = self._upload_waiters
        if not waiters:
            return
        uploading, share = self._uploading, self.share
        for i, (waiter, their) in enumerate(waiters):
            if waiter.done():  # cancelled, not yet out of the queue
                continue
            if their is None or uploading.get(their, 0) < share:
                del waiters[i]
                self._take_upload(their)
                waiter.set_result(None)
                return

    async def _exchange(self, conn: UpstreamConnection, head: bytes, body: BodySource | None,
                        content_length: int | None, timeout: float,
                        is_head: bool, client=None) -> UpstreamResponse:
        loop = conn.loop
        if client is not None and client.transport is None:
            # the client went while a connection was found: nothing is sent for it, and
            # the connection, unused, goes back; no longer a handshake's (``upgrade``), or a
            # later request's 101 on it would be taken for a switch that request asked for
            conn.upgrade_wanted = False
            self.take_back(conn)
            gone = ClientGone()
            gone.sent = False
            raise gone
        waiter = conn.head = loop.create_future()
        conn.skip_body = is_head
        sent = [body is None]
        sender = None
        if body is None:
            self._await_head(conn, timeout)
            conn.transport.write(head + b"\r\n\r\n")
        else:
            framing = (b"\r\nContent-Length: %d\r\n\r\n" % content_length
                       if content_length is not None else b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.transport.write(head + framing)
            sender = conn.sender = asyncio.ensure_future(
                self._send_body(conn, waiter, body, content_length, sent, timeout))
        if client is not None:  # the client going ends this wait (connection_lost)
            client.upstream_wait = waiter
        try:
            await waiter
        except BaseException as exc:
            conn.close()  # which cancels the sender
            if exc.__class__ is ClientGone:
                exc.sent = sent[0]
            if sender is not None and not sender.done() and \
                    not isinstance(exc, asyncio.CancelledError):
                # ended before the caller answers: else it would still be waiting for the
                # client's next body bytes when aiohttp reads the rest of that body to drop it
                await asyncio.wait((sender,))
            raise
        finally:
            conn.head_due = None
            if client is not None:
                client.upstream_wait = None
        return UpstreamResponse(conn, self, sent)

    def _await_head(self, conn: UpstreamConnection, timeout: float) -> None:
        """The response head is due within ``timeout`` from now (else UpstreamTimeout)."""
        loop = conn.loop
        conn.head_due = loop.time() + timeout
        every = timeout / 4  # not max(): 3.11 parses its arguments as keywords
        if every < SWEEP_MIN:
            every = SWEEP_MIN
        if self._sweep is None or every < self._sweep_every:
            if self._sweep is not None:
                self._sweep.cancel()
            self._sweep_every = min(1.0, every)
            self._sweep = loop.call_later(self._sweep_every, self._sweep_heads, loop)

    def _sweep_heads(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the exchanges whose response head is overdue; again in ``_sweep_every`` while
        any connection waits for one (a timeout fires up to a quarter of it late)."""
        now, waiting, swept = loop.time(), False, False
        try:
            for conn in list(self.active):
                due = conn.head_due
                if due is None:
                    continue
                if now >= due:
                    conn.head_due = None
                    waiter = conn.head
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(UpstreamTimeout("no response head in time"))
                        conn.close()
                else:
                    waiting = True
            swept = True
        finally:  # re-armed if anything went wrong above: a sweep that stops never fires again
            self._sweep = loop.call_later(self._sweep_every, self._sweep_heads, loop) \
                if waiting or not swept else None

    async def _send_body(self, conn: UpstreamConnection, waiter: asyncio.Future, body: BodySource,
                         content_length: int | None, sent: list[bool], timeout: float) -> None:
        """Stream the request body; a failure of the body source (client gone, body too
        large) fails the exchange with that same exception.

        With ``content_length`` the bytes written are exactly that many: a source that gives
        more (or ends sooner) fails the exchange and closes the connection before the request
        is complete upstream (the last chunk is written only once the source has ended), so
        whatever the source does, the upstream never acts on it nor reads the rest as a
        request of its own.

        The time-to-head timeout starts once the body is sent (a slow client's long upload
        is not an upstream timeout); meanwhile an upstream that stops reading the body for
        ``timeout`` seconds is one."""
        write = conn.transport.write
        chunked = content_length is None
        left = content_length or 0
        try:
            while True:
                chunk = await body()
                if not chunk:
                    if not chunked and left:
                        raise BodyFramingError(
                            f"request body ended {left} bytes short of its Content-Length")
                    break
                if conn.closed:
                    return
                if not chunked:
                    left -= len(chunk)
                    if left < 0:
                        raise BodyFramingError("request body longer than its Content-Length")
                    if left == 0 and await body():
                        # held back until the source has ended: a source giving more never
                        # completes a request upstream
                        raise BodyFramingError("request body longer than its Content-Length")
                write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if conn.write_ok is not None:
                    try:
                        await asyncio.wait_for(asyncio.shield(conn.write_ok), timeout)
                    except asyncio.TimeoutError:
                        raise UpstreamTimeout("upstream stopped reading the request body") \
                            from None
            if chunked and not conn.closed:
                write(b"0\r\n\r\n")
            sent[0] = True
            if not waiter.done() and not conn.closed:
                self._await_head(conn, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not waiter.done():
                waiter.set_exception(exc)
            conn.close()

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.idle) + list(self.active):
            conn.close()
        self.idle.clear()
        self.active.clear()
        for waiter in (*self._waiters, *(w for w, _ in self._upload_waiters)):
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("upstream pool closed"))
                waiter.exception()
        self._waiters.clear()
        self._upload_waiters.clear()


def _why(exc: BaseException) -> str:
    """Why a connection could not be made, for the log (never for the client): the error's
    class and what it says; for a refused certificate OpenSSL's reason ("certificate has
    expired", "Hostname mismatch, ...", "unable to get local issuer certificate"), as nginx
    logs "upstream SSL certificate verify error: (10:certificate has expired)"."""
    name = exc.__class__.__name__
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{name}: {exc.verify_message} (verify code {exc.verify_code})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{name}: {exc.reason}"
    said = str(exc)
    return f"{name}: {said}" if said else name


_SLOT = object()  # what a waiter for a connection is handed when a slot (not one) came free


def _hand_first(waiters: "collections.deque[asyncio.Future]", handed: object) -> bool:
    """Hand ``handed`` to the longest of ``waiters`` still waiting (False: none is)."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(handed)
            return True
    return False
