"""A lean HTTP/1.1 client for upstreams: keep-alive pool, llhttp parsing, streaming both ways.

Why not aiohttp's ClientSession: measured on this machine kind (measured per part; see bench/) it
costs ~190-250 µs of CPU per request against ~40-90 µs for a protocol-level client over the
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
- a request that fails on a reused idle connection before any response byte (the upstream
  closed it meanwhile) is retried once when it had no body; one with a body is not (its body
  was consumed from the client): it fails as a 502, never silently sent twice.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024
MAX_IDLE = 256
MAX_HEAD = 1024 * 1024  # bytes read before the response head is complete (1xx included)
IDLE_TTL = 30.0   # seconds an idle connection is trusted (as the aiohttp path's keepalive_timeout)


class UpstreamConnectError(Exception):
    """Could not connect (refused, unreachable, DNS, TLS)."""


class UpstreamTimeout(Exception):
    """The upstream did not answer (connect or response head) in time."""


class UpstreamUnreached(UpstreamTimeout):
    """Timed out before anything was sent: connecting, or waiting for a free connection."""


class UpstreamProtocolError(Exception):
    """The upstream broke HTTP: malformed response, or closed mid-response."""


class BodyFramingError(UpstreamProtocolError):
    """The request body source gave more or fewer bytes than the Content-Length sent."""


class _OutOfStep(Exception):
    """The upstream sent a message nobody asked for."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.head: asyncio.Future | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.got_bytes = False
        self.reading_paused = False
        self.body_waiter: asyncio.Future | None = None
        self.error: Exception | None = None
        self.write_ok: asyncio.Future | None = None  # set while the transport is paused
        self.skip_body = False                       # HEAD: the head ends the message
        self.keep_alive = False
        self.until_close = False
        self.idle_since = 0.0
        self.status = 0
        self.head_bytes = 0
        self.interim = False                         # parsing a 1xx (not the final answer)
        self.head_timer: asyncio.TimerHandle | None = None
        self.out_of_step = False
        self.counted = False                         # holds one of the pool's connection slots

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head is None or self.complete:
            # bytes on an idle connection or after the complete answer: the upstream is out
            # of step with us; they are never read as the next request's answer
            self.close()
            return
        self.got_bytes = True
        if not self.head.done():
            # an upstream sending headers without end would otherwise grow ``headers`` until
            # the head timeout
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._fail(UpstreamProtocolError("response head from upstream too large"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols"))
        except Exception as exc:  # HttpParserError, or a callback's (wrapped or not)
            if self.out_of_step:  # a second message in the same read: drop it, keep ours
                self.close()
                self._wake()
            else:
                self._fail(UpstreamProtocolError(f"malformed response from upstream: {exc}"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool._forget(self)
        if not self.complete and self.until_close and self.head is not None and self.head.done():
            self.complete, self.keep_alive = True, False
            self._wake()
        elif not self.complete:
            self._fail(UpstreamProtocolError("upstream closed the connection"))
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_exception(UpstreamProtocolError("upstream closed the connection"))
            self.write_ok.exception()  # marked retrieved: the sender may not be waiting on it

    def pause_writing(self) -> None:
        self.write_ok = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_result(None)
        self.write_ok = None

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        if self.complete:
            self.out_of_step = True
            raise _OutOfStep()
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # 100 Continue, 102, 103 Early Hints: llhttp reports each as a message without a
            # body; the final answer follows on the same connection (101 raises Upgrade)
            self.interim = True
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it after the message
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        # an HTTP/1.0-style body with neither length nor chunks ends when the upstream closes
        self.until_close = not framed and not self.skip_body and \
            status >= 200 and status not in (204, 304)
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.skip_body:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # -- helpers --
    def _wake(self) -> None:
        w = self.body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here; raised again by the awaiting request
        self._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.pool._forget(self)


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with ``chunks()``."""

    def __init__(self, conn: _Connection, pool: "UpstreamPool", body_sent: Callable[[], bool]) -> None:
        self._conn, self._pool, self._body_sent = conn, pool, body_sent
        self.status = conn.status
        self.headers = conn.headers
        self.keep_alive = conn.keep_alive and not conn.skip_body
        self._done = False

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived with the head (the common small case)."""
        conn = self._conn
        if conn.complete and conn.error is None:
            body = b"".join(conn.chunks)
            conn.chunks.clear()
            self.release()
            return body
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    chunk = conn.chunks.popleft()
                    conn.buffered -= len(chunk)
                    if conn.reading_paused and conn.buffered < HIGH_WATER // 2:
                        conn.reading_paused = False
                        conn.transport.resume_reading()
                    yield chunk
                    continue
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    break
                conn.body_waiter = asyncio.get_running_loop().create_future()
                await conn.body_waiter
                conn.body_waiter = None
        except BaseException:
            conn.close()
            raise
        self.release()

    def release(self) -> None:
        """Back to the pool if reusable, else closed."""
        conn = self._conn
        self._done = True
        if conn.closed:
            return
        if self.keep_alive and conn.complete and conn.error is None and self._body_sent():
            self._pool._idle_push(conn)
        else:
            conn.close()


    def close(self) -> None:
        """Abandon the response: its connection is closed unless already released (so that
        a caller that fails half-way never leaves an upstream connection open and unowned)."""
        if not self._done:
            self._done = True
            self._conn.close()


BodySource = Callable[[], Awaitable[bytes]]  # returns b"" at the end


class UpstreamPool:
    """Keep-alive connections to one upstream origin (``http://host:port`` or ``https://``)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_idle: int = MAX_IDLE,
                 ssl_context: ssl.SSLContext | None = None, idle_ttl: float = IDLE_TTL,
                 max_connections: int = 100) -> None:
        """``ssl_context``: for ``https://``, the context to verify the upstream with (e.g.
        one trusting a private CA); by default the system's trust store.

        ``max_connections`` bounds the connections open to the upstream (in use, idle or being
        made); a request over it waits for one, up to ``connect_timeout``."""
        parts = urlsplit(url)
        self.tls = (ssl_context or ssl.create_default_context()) \
            if parts.scheme == "https" else None
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self.idle: list[_Connection] = []
        self.active: set[_Connection] = set()
        self.max_connections = max_connections
        self.opened = 0                                  # connections holding a slot
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    def _idle_push(self, conn: _Connection) -> None:
        self.active.discard(conn)
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.head, conn.complete, conn.error, conn.got_bytes = None, False, None, False
        conn.head_bytes = 0
        if conn.reading_paused:  # a whole body taken while reading was paused
            conn.reading_paused = False
            conn.transport.resume_reading()
        conn.chunks.clear()
        conn.buffered, conn.skip_body, conn.until_close = 0, False, False
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if conn.counted:
            conn.counted = False
            self.opened -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        """A connection went idle or a slot came free: the longest waiter may take it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _checkout(self) -> tuple[_Connection, bool]:
        """An idle connection (reused: True) or a new one, within ``max_connections``."""
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            while self.idle:
                conn = self.idle.pop()
                if loop.time() - conn.idle_since > self.idle_ttl:
                    # the newest idle connection is too old: so are all the others
                    stale, self.idle = self.idle, []
                    for old in stale + [conn]:
                        old.close()
                    break
                if not conn.closed:
                    return conn, True
            if self.opened < self.max_connections:
                self.opened += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self.opened -= 1
                    self._wake_one()
                    raise
                if conn.closed:  # lost before we could hold it: its slot is free again
                    self.opened -= 1
                    self._wake_one()
                    continue
                conn.counted = True
                return conn, False
            if deadline is None:
                deadline = loop.time() + self.connect_timeout
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken as we gave up: pass the turn on
                if isinstance(exc, TimeoutError):
                    raise UpstreamUnreached(
                        f"no free connection to the upstream within {self.connect_timeout:g} s"
                        f" (max_connections {self.max_connections})") from None
                raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port,
                                       ssl=self.tls,
                                       server_hostname=self.host if self.tls else None),
                self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise UpstreamUnreached("connect timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(exc.__class__.__name__) from exc
        return conn

    async def request(self, head: bytes, *, body: BodySource | None = None,
                      content_length: int | None = None, timeout: float = 30.0,
                      is_head: bool = False) -> UpstreamResponse:
        """Send ``head`` (request line + headers, without the final CRLF and without any
        framing header) and the body; return once the response head has arrived."""
        for attempt in (0, 1):
            conn, reused = await self._checkout()
            self.active.add(conn)
            try:
                return await self._exchange(conn, head, body, content_length, timeout, is_head)
            except UpstreamProtocolError:
                # an idle connection the upstream had closed: retry once if nothing was sent
                # that cannot be sent again
                if attempt == 0 and reused and body is None and not conn.got_bytes:
                    continue
                raise
        raise UpstreamProtocolError("upstream closed the connection")

    async def _exchange(self, conn: _Connection, head: bytes, body: BodySource | None,
                        content_length: int | None, timeout: float,
                        is_head: bool) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        waiter = conn.head = loop.create_future()
        conn.skip_body = is_head
        sent = [body is None]
        sender = None
        if body is None:
            conn.head_timer = loop.call_later(timeout, self._head_timeout, conn, waiter)
            conn.transport.write(head + b"\r\n\r\n")
        else:
            framing = (b"\r\nContent-Length: %d\r\n\r\n" % content_length
                       if content_length is not None else b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.transport.write(head + framing)
            sender = asyncio.ensure_future(
                self._send_body(conn, waiter, body, content_length, sent, timeout))
        try:
            await waiter
        except BaseException:
            conn.close()
            if sender is not None and not sender.done():
                sender.cancel()
            raise
        finally:
            if conn.head_timer is not None:
                conn.head_timer.cancel()
                conn.head_timer = None
        return UpstreamResponse(conn, self, lambda: sent[0])

    @staticmethod
    def _head_timeout(conn: _Connection, waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout("no response head in time"))
            conn.close()

    async def _send_body(self, conn: _Connection, waiter: asyncio.Future, body: BodySource,
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
                conn.head_timer = asyncio.get_running_loop().call_later(
                    timeout, self._head_timeout, conn, waiter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not waiter.done():
                waiter.set_exception(exc)
            conn.close()

    async def close(self) -> None:
        for conn in list(self.idle) + list(self.active):
            conn.close()
        self.idle.clear()
        self.active.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("upstream pool closed"))
                waiter.exception()
        self._waiters.clear()
