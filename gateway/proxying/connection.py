"""One upstream connection: an ``asyncio.Protocol`` parsing responses with llhttp
(httptools), the response it hands out, and the errors of the upstream client.

The pool that owns connections (``gateway.proxying.upstream``) is seen here only through
``ConnectionOwner``: a connection tells it when it closed, a response when it may be reused.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from asyncio import sslproto
from typing import AsyncIterator, Awaitable, Callable, Protocol

import httptools

HIGH_WATER = 256 * 1024
# Bytes of answers held for clients after their upstream connection went back
# (UpstreamResponse._whole), in this process: each at most ~HIGH_WATER, and at most this many
# in all. Past it an answer's connection waits for its client to take it, as before: memory
# stays bounded whatever number of clients read slowly (with ``server.max_connections`` at
# 10000, ~2.5 GiB otherwise).
DETACHED_MAX = 64 * 1024 * 1024
_detached = 0
MAX_HEAD = 1024 * 1024  # bytes read before the response head is complete (1xx included)

BodySource = Callable[[], Awaitable[bytes]]  # returns b"" at the end


_FRAMING = (b"content-length", b"transfer-encoding")  # the headers that say where a body ends
_FRAMING_LENGTHS = (14, 17)


def _chunked_framing(value: bytes) -> bool:
    """Whether a response's Transfer-Encoding (all its lines, joined by commas) frames the body
    as chunks; False: the body ends when the upstream closes (RFC 9112 6.3), as llhttp reads
    it. Raises UpstreamProtocolError for a coding keygate cannot pass on: Transfer-Encoding is
    hop-by-hop and keygate re-frames the body, so another coding would reach the client
    stripped of its name, and ``chunked`` before another coding is read to close by llhttp
    with its chunk framing left in the body. ``chunked`` twice (RFC 9112 6.1: a sender never
    applies it more than once) is unpicked once by llhttp: the inner framing would reach the
    client as content."""
    if value == b"chunked":  # nearly every upstream: one line, one value
        return True
    codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
    if any(c not in (b"identity", b"chunked") for c in codings) or \
            b"chunked" in codings and codings[-1] != b"chunked":
        raise UpstreamProtocolError("upstream used a transfer coding other than chunked")
    if codings.count(b"chunked") > 1:
        raise UpstreamProtocolError("upstream applied the chunked transfer coding twice")
    return bool(codings) and codings[-1] == b"chunked"


def _announces_a_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response head frames a body: any Transfer-Encoding, or a Content-Length
    other than 0 (for a 204 or 304, which has none whatever its head says)."""
    for name, value in headers:
        if len(name) in _FRAMING_LENGTHS and name.lower() in _FRAMING:
            if len(name) == 17 or value.strip().lstrip(b"0") != b"":
                return True
    return False


class UpstreamConnectError(Exception):
    """Could not connect (refused, unreachable, DNS, TLS)."""


class UpstreamTimeout(Exception):
    """The upstream did not answer (connect or response head) in time."""


class UpstreamUnreached(UpstreamTimeout):
    """Timed out before anything was sent: connecting, or waiting for a free connection."""


class UploadSlotsFull(UpstreamUnreached):
    """Timed out waiting for one of the connections uploads still streaming may hold: the
    other uploads in flight hold all of them (``UpstreamPool.max_streaming``)."""


class UploadShareFull(UploadSlotsFull):
    """Timed out waiting for an upload slot while the upload's owner (its workspace, or a
    public route's client address) holds its share of them (``UpstreamPool.share``)."""

    def __init__(self, message: str, owner: object, share: int) -> None:
        super().__init__(message)
        self.owner, self.share = owner, share


class UpstreamProtocolError(Exception):
    """The upstream broke HTTP: malformed response, or closed mid-response."""


class BodyFramingError(UpstreamProtocolError):
    """The request body source gave more or fewer bytes than the Content-Length sent."""


class ClientGone(Exception):
    """The client's connection closed (or vanished and was found so) while its request waited
    for the upstream's answer head: the exchange ends, its upstream connection is closed.
    ``sent``: whether the whole request had gone upstream by then (the pool says)."""

    sent = True


class _OutOfStep(Exception):
    """The upstream sent a message nobody asked for."""


class ConnectionOwner(Protocol):
    """What a connection and its response are handed: the pool they go back to."""

    def forget(self, conn: "UpstreamConnection") -> None:
        """``conn`` closed: it holds no idle place and no connection slot any more."""

    def take_back(self, conn: "UpstreamConnection") -> None:
        """``conn`` finished a response and may be reused: keep it idle (or close it)."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream, parsing its responses with llhttp (httptools)."""

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set with the transport
        self.closed = False
        self.head: asyncio.Future | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.got_bytes = False
        self.reading_paused = False
        self.body_waiter: asyncio.Future | None = None
        # told (a loop turn later) when the whole answer is in: the response streaming it
        # (UpstreamResponse._whole), which gives the connection back at once
        self.on_complete: Callable[[], object] | None = None
        self.error: Exception | None = None
        self.write_ok: asyncio.Future | None = None  # set while the transport is paused
        self.skip_body = False                       # HEAD: the head ends the message
        self.keep_alive = False
        self.until_close = False
        self.ended = False                           # the peer ended it cleanly: eof_received
        self.idle_since = 0.0
        self.status = 0
        self.head_bytes = 0
        self.interim = False                         # parsing a 1xx (not the final answer)
        self.in_trailers = False                     # past the final response's head
        self.head_due: float | None = None           # loop time the response head is due by
        self.out_of_step = False
        self.counted = False                         # holds one of the pool's connection slots
        self.sender: asyncio.Future | None = None    # the task writing the request body
        # a WebSocket handshake (UpstreamPool.upgrade): a 101 is its final answer, and the
        # bytes after that head (``tunnel_tail``) are the tunnel's first
        self.upgrade_wanted = False
        self.tunnel_tail = b""

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport
        # The loop, once: on Python 3.11 every asyncio.get_running_loop() is a getpid()
        # system call, and a request would make several.
        self.loop = asyncio.get_running_loop()

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
        except httptools.HttpParserUpgrade as exc:
            if self.upgrade_wanted and self.status == 101:
                # the tunnel's first bytes, if any came with the head; nothing more is read
                # until the tunnel takes the transport over (gateway.proxying.tunnel)
                self.tunnel_tail = data[exc.args[0]:] if exc.args else b""
                if self.transport is not None:
                    self.transport.pause_reading()
            else:  # a 101 nobody asked for: its bytes are never read as HTTP
                self._fail(UpstreamProtocolError("upstream switched protocols"))
        except Exception as exc:  # HttpParserError, or a callback's (wrapped or not)
            if self.out_of_step or self.complete:
                # bytes after our whole answer: a second message in the same read, or
                # anything after one that said Connection: close (which llhttp takes as an
                # error, not a next message): dropped, ours kept, the connection closed
                self.close()
                self._wake()
            else:
                self._fail(UpstreamProtocolError(f"malformed response from upstream: {exc}"))

    def eof_received(self) -> bool:
        # the end of a body read to the close (RFC 9112 6.3): a FIN over TCP; over TLS only a
        # close_notify (9.8). The TLS is asyncio's SSLProtocol on every loop (UpstreamPool.
        # _connect_tls), which reports a bare FIN here too: told apart by what the session read
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        self.ended = ssl_object is None or self._close_notified(ssl_object)
        return False

    def _close_notified(self, ssl_object) -> bool:
        """Whether the TLS session ``ssl_object`` received the peer's close_notify. Its
        transport has read every record by the time it reports the end: a read then gives
        b"" after a close_notify, SSLWantReadError after a bare FIN (any data is passed on)."""
        while True:
            try:
                data = ssl_object.read(65536)
            except ssl.SSLError:  # SSLWantReadError: the records stopped, no close_notify
                return False
            if not data:
                return True
            self.data_received(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._stop_sender()
        self.pool.forget(self)
        if exc is not None and not self.complete and self.head is not None:
            self._read_what_came()
        if not self.complete and self.until_close and self.ended and \
                self.head is not None and self.head.done():
            # a body read to close ends at a clean close only (eof_received): a reset, or
            # over TLS a FIN without close_notify (a peer gone mid-body, a cut path), cut it
            # short, and the client's connection is aborted as for any upstream failure
            self.complete, self.keep_alive = True, False
            self._wake()
        elif not self.complete:
            self._fail(UpstreamProtocolError("upstream closed the connection"))
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_exception(UpstreamProtocolError("upstream closed the connection"))
            self.write_ok.exception()  # marked retrieved: the sender may not be waiting on it

    def _read_what_came(self) -> None:
        """Parse what the upstream sent before the error that closed the connection: an
        upstream answering early (a 413 at the head of an upload) and hanging up without
        reading the body makes its kernel reset the connection; the next write of the body
        fails on that reset, and the transport closes at once without reading the answer
        already received. The socket is still open while ``connection_lost`` runs: its
        unread bytes are read here, and parsed as if they had come before the error. Over
        TLS the records are read and decrypted by ``UpstreamTLS.connection_lost`` before this
        runs (the socket is closed by then)."""
        transport = self.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return
        read_unread(transport, self.data_received,
                    lambda: self.complete or self.error is not None)

    def pause_writing(self) -> None:
        self.write_ok = self.loop.create_future()

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
        self.in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp reports a chunked body's trailer fields here too, after the head: they are
        # dropped (keygate re-frames the body), never merged into the headers passed back
        # (RFC 9110 6.5.1), where a trailing Set-Cookie or Content-Type would act as a header
        if not self.in_trailers:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101 and self.upgrade_wanted:  # the handshake's answer: final
                self.status, self.keep_alive, self.until_close = 101, False, False
                self.complete = True  # no body: what follows the head is the tunnel's
                if self.head is not None and not self.head.done():
                    self.head.set_result(None)
                return
            # 100 Continue, 102, 103 Early Hints: llhttp reports each as a message without a
            # body; the final answer follows on the same connection (101 raises Upgrade)
            self.interim = True
            return
        self.status = status
        self.in_trailers = True  # any field from here on is a trailer of this response
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it after the message
        # a loop, not any(<generator>): any() stopping early closes the generator, and its
        # GeneratorExit made a frame object and a traceback on every response
        framed = False
        coding = None  # Transfer-Encoding, every line of it (llhttp reads them as one list)
        for name, value in self.headers:
            if len(name) in _FRAMING_LENGTHS and name.lower() in _FRAMING:
                if len(name) == 14:  # Content-Length (llhttp refuses it beside
                    framed = True    # Transfer-Encoding before this runs)
                    break
                coding = value if coding is None else coding + b"," + value
        if coding is not None:
            framed = _chunked_framing(coding)
            if self.parser.get_http_version() == "1.0":
                # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing;
                # read as it says, but the connection is closed after it, never reused
                self.keep_alive = False
        if status == 204 or status == 304:
            self.until_close = False
            if (framed or coding is not None) and _announces_a_body(self.headers):
                # RFC 9112 6.3 ends a 204/304 at its head (llhttp does), but its head said a
                # body follows: an upstream that sends one anyway would have those bytes read
                # as the answer to the next request on this connection, another client's
                # (a 304 may state the 200's length, RFC 9110 8.6: no telling it apart).
                # Closed after it, never reused, as after a HEAD answer.
                self.keep_alive = False
        else:  # a body with neither length nor chunks (HTTP/1.0-style) ends at the close
            self.until_close = not framed and not self.skip_body
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
        if self.on_complete is not None:  # (not from within the parser's callback)
            self.loop.call_soon(self.on_complete)

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
        self._stop_sender()
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def _stop_sender(self) -> None:
        """Stop the request body's sender: nothing more can be written here. Left running,
        it went on waiting for the client's next body bytes after the exchange had ended
        (an upstream answering before the whole body came), beside aiohttp's own lingering
        read of that stream once the answer was out: a RuntimeError for two readers, an
        error in the log and the client's connection reset mid-upload."""
        sender, self.sender = self.sender, None
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()


def read_unread(transport: asyncio.BaseTransport, feed: Callable[[bytes], object],
                done: Callable[[], bool]) -> None:
    """Hand ``feed`` the bytes still unread in the socket of ``transport`` (a TCP one whose
    ``connection_lost`` is running: its socket is not closed yet), until ``done()``, nothing
    more has come, or the socket's error (the reset) is reached."""
    sock = transport.get_extra_info("socket")
    try:
        peer = socket.socket(fileno=os.dup(sock.fileno()))
    except (AttributeError, OSError, ValueError):  # no socket, or already closed
        return
    with peer:
        peer.setblocking(False)
        while not done():
            try:
                data = peer.recv(65536)
            except OSError:  # nothing more (EAGAIN), or the reset itself
                return
            if not data:
                return
            feed(data)


class UpstreamTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol over the upstream's TCP connection (``UpstreamPool.
    _connect_tls``), which also reads what came before an error closed it: the records of an
    upstream's early answer to an upload (a 413 at its head, then a close with the body
    unread, which its kernel turns into a reset) are still in the socket when the next body
    write fails on that reset, and the transport closes without reading them. They are read
    and decrypted here, before the loss is reported, and reach the connection's parser as
    over plain TCP (``UpstreamConnection._read_what_came``)."""

    def connection_lost(self, exc) -> None:
        try:
            app, transport = self._app_protocol, self._transport
            if exc is not None and transport is not None and \
                    self._state == sslproto.SSLProtocolState.WRAPPED and \
                    isinstance(app, UpstreamConnection) and app.head is not None and \
                    not app.complete:
                self._read_what_came(app, transport)
        finally:  # whatever happened above: the loss is reported, the pool slot freed
            super().connection_lost(exc)

    def _read_what_came(self, app: UpstreamConnection, transport) -> None:
        """Decrypt what the upstream sent before the error and hand it to ``app``, until its
        answer is complete, fails, or nothing more came. Straight from the session, not
        through ``buffer_updated``: that decrypts nothing while the app's reading is paused,
        which its own buffering of a large answer (over ``HIGH_WATER``) or a slow client sets,
        and the rest of the answer was dropped with the socket. The app buffers what it
        gets, as over plain TCP (no more than the socket held); the session's incoming
        buffer holds one read (64 KiB) at most, decrypted before the next."""
        sslobj, incoming = self._sslobj, self._incoming
        stopped = False

        def decrypt() -> None:
            nonlocal stopped
            while not (app.complete or app.error is not None):
                try:
                    data = sslobj.read(65536)
                except ssl.SSLWantReadError:  # a record not all there yet: read on
                    return
                except ssl.SSLError:  # a broken record: nothing more is read
                    stopped = True
                    return
                if not data:  # the upstream's close_notify: the end of a body read to it
                    stopped = True
                    self._call_eof_received()
                    return
                app.data_received(data)
            stopped = True

        decrypt()  # the records already read but held while the app's reading was paused

        def feed(data: bytes) -> None:
            incoming.write(data)
            decrypt()

        if not stopped:
            read_unread(transport, feed, lambda: stopped)


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with ``chunks()``."""

    def __init__(self, conn: UpstreamConnection, pool: ConnectionOwner,
                 body_sent: list[bool]) -> None:
        """``body_sent[0]``: the request body is all written (the sender sets it when done)."""
        self._conn, self._pool, self._body_sent = conn, pool, body_sent
        self.status = conn.status
        self.headers = conn.headers
        self.keep_alive = conn.keep_alive and not conn.skip_body
        self._done = False
        self._sender = conn.sender
        # the body's tail once the whole answer was in and its connection went back (_whole),
        # and its bytes not yet handed out (counted in _detached)
        self._rest: collections.deque[bytes] | None = None
        self._rest_bytes = 0

    @property
    def sender(self) -> asyncio.Future | None:
        """The task writing the request body (None for a request without one)."""
        return self._sender

    def sending(self) -> bool:
        """Whether the request body's sender still runs (then ``settled`` is to be awaited)."""
        sender = self._sender
        return sender is not None and not sender.done()

    async def settled(self) -> None:
        """Once the answer is passed on: wait until the request body's sender has stopped
        (cancelled when the exchange ended before the whole body was sent: an upstream that
        answered early). Cancelled only, it would still be waiting for the client's next
        body bytes when aiohttp starts reading the rest of that body to drop it."""
        sender = self._sender
        if sender is not None and not sender.done():
            self.close()  # the request is incomplete upstream: never reused
            sender.cancel()
            await asyncio.wait((sender,))

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
        global _detached
        conn = self._conn
        conn.on_complete = self._whole
        try:
            while True:
                rest = self._rest
                if rest is not None:  # all in, the connection gone back: the tail from here
                    while rest:
                        chunk = rest.popleft()
                        self._rest_bytes -= len(chunk)
                        _detached -= len(chunk)
                        yield chunk
                    return
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
                waiter = conn.body_waiter = conn.loop.create_future()
                await waiter
                if conn.body_waiter is waiter:
                    conn.body_waiter = None
        except BaseException:
            self.close()
            raise
        finally:  # a tail the client never took (gone, cut off) is counted no more
            _detached -= self._rest_bytes
            self._rest_bytes = 0
        self.release()

    def _whole(self) -> None:
        """The upstream's whole answer is in (``on_message_complete``): its connection is
        given back now, the body's tail kept here, however long the client takes to read it.
        Held until the client had taken the last bytes, one client reading nothing held a
        connection for as long as its write-stall timer allowed, and with the upstream's
        ``max_connections`` taken so, every other request waited, then 504 (nginx's
        proxy_buffering frees it the same way). Not while the request body is still being
        sent: that connection is closed, not reused, and its sender stopped at the end. Nor
        while the answers held so would exceed ``DETACHED_MAX``."""
        global _detached
        conn = self._conn
        if self._done or conn.closed or not conn.complete or conn.error is not None \
                or not self._body_sent[0] or _detached + conn.buffered > DETACHED_MAX:
            return
        self._rest, conn.chunks = conn.chunks, collections.deque()
        self._rest_bytes, conn.buffered = conn.buffered, 0
        _detached += self._rest_bytes
        self.release()

    def release(self) -> None:
        """Back to the pool if reusable, else closed. Once: the connection may be another
        request's by the next call."""
        if self._done:
            return
        conn = self._conn
        self._done = True
        conn.on_complete = None
        if conn.closed:
            return
        if self.keep_alive and conn.complete and conn.error is None and self._body_sent[0]:
            self._pool.take_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response: its connection is closed unless already released (so that
        a caller that fails half-way never leaves an upstream connection open and unowned)."""
        if not self._done:
            self._done = True
            self._conn.close()
