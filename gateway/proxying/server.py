"""The listeners' low-level aiohttp server: SPEC's JSON errors for requests aiohttp's parser
refuses, and the edge limits aiohttp lacks (a whole request head within
``server.timeouts.header``, at most ``server.max_connections`` client connections).

aiohttp offers no public hook for either, so this module subclasses its ``RequestHandler`` and
reads some of its private attributes (``_manager``, ``_loop``, ``_request_in_progress``,
``_messages``, ``_request_count``, ``_connections``, ``_kwargs``, ``_current_request``,
``_upgraded``, ``_payload_parser`` and the request's ``_cache``; on a parse error only, the C
parser's own list of the requests it completed before it: ``_parsed_before_error``; a WebSocket
tunnel takes a connection over with ``set_parser``, aiohttp's own seat for a WebSocket
reader). The proxy listener's
handler also runs a copy of aiohttp's ``RequestHandler.start`` without its per-request task
(``_InlineRequestHandler``), and with it the rest of that method's private state. They are used
here and nowhere else, so an aiohttp upgrade that moves them breaks one module (and
tests/test_edge_*.py say so); an upgrade that changes ``start`` only turns the copy off.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import inspect
import logging
import math
import re
import socket
import struct
import uuid
import warnings
from typing import Callable, Mapping

from aiohttp import hdrs, web, web_protocol
from aiohttp.helpers import ceil_timeout
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.http_writer import HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import BadRequest, GatewayError, RequestTimeout, body_cut_short
from .connection import ClientGone
from .response import WholeResponse
from .vanish import set_vanish_options, vanish_options

log = logging.getLogger("keygate")


_ERR_INFO = getattr(web_protocol, "_ErrInfo", None)  # what aiohttp queues for a parse error
try:  # a request as aiohttp's C parser makes it (see _parsed_before_error)
    from aiohttp._http_parser import RawRequestMessage as _C_MESSAGE
except ImportError:  # no C extension: the pure-Python parser
    _C_MESSAGE = None

# The end of a chunked body without a trailer section: the last chunk (zeros, perhaps an
# extension) and the empty line, as the last bytes a connection sent, but for empty lines the
# parser skips before a next request line (a client's stray CRLF after a body). A trailer
# field line can never match it (a field name holds no ';', and a line without ':' is refused).
_TRAILERLESS_END = re.compile(rb"\r\n0+(?:;[^\r\n]*)?\r\n\r\n(?:\r\n)*\Z")
_RECENT = 512  # the last bytes of each of a connection's last two reads it is judged by
# Where a request head ends: the first empty line after its first byte (aiohttp's request
# parsers, llhttp's and the pure-Python one, take CRLF line ends only: a bare LF is refused);
# and the empty lines the parser skips before a request line, no part of any head.
_HEAD_END = b"\r\n\r\n"
_BLANK_LINES = re.compile(rb"[\r\n]*")
# The largest request head (request line and header fields) taken, in bytes: nginx's default
# (4 x 8 KiB). aiohttp alone bounds a head only at 128 fields of 8 KiB (~1 MiB, ~2.4 MB of
# memory once parsed), which server.max_connections clients could each hold until
# server.timeouts.header: tens of GB.
HEAD_MAX = 32 * 1024
# The lingering close (nginx's lingering_close): a connection keygate closes after an answer
# while the client may still be sending (a refused body, a refused framing, requests pipelined
# behind) is half-closed once the answer is written (FIN after it), and what the client still
# sends is read and dropped until it closes too, for at most LINGER_TIME seconds in all and
# LINGER_IDLE seconds with nothing read. Closed at once instead, the kernel answers bytes still
# unread or still arriving with a reset, which drops whatever of the answers (the refusal, the
# 200 of a pipelined request already forwarded and counted) the client's kernel had not yet
# received, and makes a client still writing a body fail on its write before it reads the
# refusal. nginx lingers up to 30 s / 5 s; keygate's own answers are small and sent at once,
# so 2 s / 0.5 s let a loopback or LAN client finish its write and read them, while a
# lingering connection holds its place under server.max_connections (it counts as open, as it
# is) for 2 s at most: 10k of them hold 10k sockets for 2 s and no buffer (what is read is
# dropped), which server.max_connections already allows for server.timeouts.header.
LINGER_TIME = 2.0
LINGER_IDLE = 0.5


class HeadTooLarge(Exception):
    """A request head over ``HEAD_MAX``: answered 400 ``bad_request``, then closed."""

    message = f"The request head (request line and header fields) is over {HEAD_MAX // 1024} KiB."


class VersionRefused(Exception):
    """A request line whose version is not HTTP/1.1 or HTTP/1.0 (none at all: HTTP/0.9; or
    HTTP/2.0), which llhttp parses: answered 400 ``bad_request``, then closed, never served
    (it was forwarded as HTTP/1.1 and answered with its own version echoed)."""

    message = "keygate speaks HTTP/1.1 (and HTTP/1.0) only; send an HTTP/1.1 request line."


class FramingRefused(VersionRefused):
    """An HTTP/1.0 request with ``Transfer-Encoding``: its framing is faulty (RFC 9112 6.1),
    since an HTTP/1.0 hop in front reads no chunked body; answered 400 ``bad_request``, then
    closed, as nginx does (it was forwarded, kept alive, and what followed it served)."""

    message = ("An HTTP/1.0 request cannot carry Transfer-Encoding; send HTTP/1.1, or a "
               "Content-Length.")


def _remote(transport) -> str | None:
    """The peer address of ``transport``, as aiohttp's ``BaseRequest.remote`` gives it."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if peer is None:
        return None
    return str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer)


def _head_size(message) -> int:
    """The bytes of a parsed request head as parsed: the request line, each ``Name: value``
    line, the empty line. Less than the bytes sent by the optional blanks the parser strips
    (around a field's value, between the request line's parts): what a queued head holds in
    memory (``_bound_pipelined``), not what the 32 KiB bound on a head as sent is judged by
    (``_heads_as_sent``)."""
    return len(message.method) + len(message.path) + 14 + sum(
        len(name) + len(value) + 4 for name, value in message.raw_headers)


def _taken(transport) -> tuple[int, int]:
    """(taken, sent): counts that tell whether the peer of ``transport`` has taken any of
    what was written to it since an earlier look: it has if ``taken`` now is over ``sent``
    then. On Linux TCP, ``taken`` is the bytes its kernel acknowledged (``TCP_INFO``'s
    ``tcpi_bytes_acked``) and ``sent`` those plus the bytes in flight (``SIOCOUTQ`` less
    ``SIOCOUTQNSD``), which its kernel acknowledges into its receive buffer whether its
    application reads or not: anything acknowledged beyond them was let in by a read.
    Elsewhere both are the transport's buffer, negated (less left: taken), which bytes still
    written after a pause hide. Read when a write stall's timer fires or a closed connection
    is swept, not per write.

    Neither the transport's buffer nor the socket's send queue will do: the buffer does not
    move while a slow reader takes bytes (the kernel asks for more only once a third of a
    send buffer, megabytes on a fast link, is free), and aiohttp's writer goes on adding to it
    after a pause, up to its own 64 KiB limit, which hid a steady reader's bytes. Nor the
    acknowledged bytes alone: those in flight at the first look are acknowledged later, and a
    client that never read looked like one that did."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
            if len(info) >= _TCP_INFO_LEN:
                acked = struct.unpack_from("Q", info, _BYTES_ACKED)[0]
                fd = sock.fileno()
                in_flight = _ioctl_int(fd, _OUTQ) - _ioctl_int(fd, _OUTQ_NOT_SENT)
                return acked, acked + max(in_flight, 0)
        except (OSError, AttributeError, ValueError):  # closed, not TCP, not Linux
            pass
    left = -transport.get_write_buffer_size()
    return left, left


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 at byte 120 (Linux 4.1 and later)
_BYTES_ACKED = 120
_TCP_INFO_LEN = _BYTES_ACKED + 8
_OUTQ = 0x5411           # SIOCOUTQ (TIOCOUTQ): bytes not yet acknowledged, sent or not
_OUTQ_NOT_SENT = 0x894B  # SIOCOUTQNSD: bytes not yet sent


class BodyFramingBroken(ConnectionResetError):
    """The in-flight request's body can never be read whole: a ``ConnectionError`` like a
    client gone mid-body, which every reader of a body already answers with
    ``errors.body_cut_short``."""


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers requests its HTTP parser refuses (ambiguous framing, bad header
    syntax) itself, as text; keygate's contract is a JSON body for every error. On the proxy
    listener that answer is made, logged and counted by the server's ``on_unreadable``
    (``Pipeline.unreadable``), as is a head cut off at the header timeout (``head_timed_out``).

    It also holds the edge's limits that aiohttp lacks (``server.timeouts.header`` and
    ``server.max_connections``); idle keep-alive is aiohttp's own ``keepalive_timeout``."""

    # loop time the current request head started arriving (None: no head under way); the
    # server's sweep closes the connection once it is older than server.timeouts.header
    _head_since: float | None = None
    _last_payload = None  # the body stream of the newest request parsed on this connection
    _write_stall: asyncio.TimerHandle | None = None  # armed while the client takes no bytes
    _stall_mark = 0  # _taken(transport)'s sent when that timer was last armed
    _chunked = None   # the body stream of a chunked request whose end is not judged yet
    _before = b""     # the connection's read before the latest (its last _RECENT bytes)
    _latest = b""     # and its latest (likewise)
    _head_bytes = 0   # bytes received of the request head under way (see _count_head)
    _head_from = 0    # the connection's request count when that head began
    _head_tail = b""  # its last 3 bytes (none while only blank lines came): see _heads_as_sent
    _tunnel = None    # the WebSocket tunnel this connection became (gateway.proxying.tunnel)
    # while the request waits for its upstream: the timeout of a streamed answer's wait for
    # the upstream's next bytes (forward.py), or the future of the wait for the answer head
    # (upstream.py, the request body's sending included), or of a first request's wait for
    # its key's verification (auth.py). The client going ends it at once, as aiohttp does
    # not cancel the handler
    upstream_wait: asyncio.Timeout | asyncio.Future | None = None
    _kept = None      # the connection's transport, kept past force_close (it drops .transport)
    _unflushed_since: float | None = None  # when the sweep first saw it closed, bytes unsent
    _flush_mark = 0  # _taken(transport)'s sent then (or when its client last took some)
    # bytes held behind an upgrade not yet answered (aiohttp's _message_tail) whose first
    # HEAD_MAX hold no end of a head: never parsed if declined (None: not judged yet)
    _tail_over: bool | None = None
    _lingering: asyncio.TimerHandle | None = None  # while a lingering close runs (_linger)
    # requests are kept queued behind the one under way, the first of them closing the
    # connection: nothing more is parsed meanwhile (see _close_after_chunked)
    _parse_no_more = False
    _linger_end = 0.0   # when it ends at the latest (0: no lingering close begun)
    _linger_last = 0.0  # when it last read something (or began)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._kept = transport
        server = self._manager
        if getattr(server, "stopping", False):
            # accepted from the backlog as the listener closed, its handler made after the stop
            # closed the idle connections: new, so closed unread, as one arriving after the
            # close is refused. Left open it was neither idle nor in flight, and the drain
            # waited for its first request until its end (30 s).
            transport.abort()
            return
        limit = getattr(server, "max_connections", None)
        if limit is not None and len(server.connections) > limit:
            # over the bound: refused at once, so idle or slow clients cannot take the file
            # descriptors that the upstream and store connections need; or, on a server that
            # evicts, the connection waiting longest for a request is closed instead
            victim = server.idlest(self) if getattr(server, "evict_idle", False) else None
            if victim is None:
                server.refused_connections += 1
                if server.on_refused is not None:
                    server.on_refused()
                transport.abort()
                return
            victim.transport.abort()  # connection_lost frees its place
        if getattr(server, "header_timeout", None):
            self._head_since = self._loop.time()   # the first head is due from now
            server.sweep_heads()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:  # a WebSocket tunnel's bytes (aiohttp hands them to it):
            super().data_received(data)  # no request head, body or timeout to judge any more
            return
        if self._close or self._force_close:
            if self._linger_end:  # a lingering close: read and dropped
                self._linger_last = self._loop.time()
                return
            if self._rest_of_a_body_at_stop():
                # aiohttp drops every byte a closing connection receives, and a stopping
                # server (SIGTERM) closes them all: the rest of the body of a request in
                # flight must still come in, or that request stalls until the drain ends
                # and is cut off
                closing = self._close, self._force_close
                self._close = self._force_close = False
                try:
                    self.data_received(data)
                finally:
                    self._close = closing[0] or self._close
                    self._force_close = closing[1] or self._force_close
                return
        if self._parse_no_more:  # read and dropped, as aiohttp drops a closing one's
            return
        if data and self._head_since is None and not self._request_in_progress \
                and not self._messages \
                and (self._last_payload is None or self._last_payload.is_eof()):
            # the first bytes of the next request head (not the rest of a body that aiohttp
            # reads after a handler that did not read it)
            self._head_since = self._loop.time()
        if data:  # the tails of the last two reads: the end of a chunked body is judged by
            # them. A read is kept whole only when it is short (no copy for a usual request
            # head): a long one (up to 256 KiB) kept whole stayed with an idle connection
            self._before = self._latest
            self._latest = data if len(data) <= _RECENT else data[-_RECENT:]
        seen, body = self._request_count, self._last_payload
        in_body = body is not None and not body.is_eof()
        fed = body.total_bytes if in_body else 0
        super().data_received(data)
        if self._request_count != seen:
            new = self._request_count - seen
            self._head_since = None
            if self._head_bytes + len(data) <= HEAD_MAX and data.endswith(b"\r\n\r\n"):
                self._head_bytes = 0  # the usual read: a head, whole, ending the read
            else:  # a long read, the end of a long head, or bytes after a head or a body
                self._judge_heads(data, new, body.total_bytes - fed if in_body else 0,
                                  in_body and body is self._chunked)
            if len(self._messages) > 1:  # pipelined behind a request not yet answered
                self._bound_pipelined()
            if self._messages:
                message, self._last_payload = self._messages[-1]
                if message.__class__ is _ERR_INFO:
                    if new == 1 and self._rescue_parsed(
                            data, body.total_bytes - fed if in_body else 0,
                            in_body and body is self._chunked):
                        return  # the requests the read completed before its error, judged
                    if body is not None and not body.is_eof():
                        # the parser found the framing broken in the body of the request in
                        # flight: aiohttp queues its own 400 behind that request and leaves
                        # its body stream waiting, which then stalled until
                        # server.timeouts.body (a 408). The body fails at once instead (a
                        # 400, the connection closed).
                        body.set_exception(BodyFramingBroken("the request body's framing broke"))
                else:
                    if message.upgrade and not self._upgraded and \
                            _upgrade_drops_the_rest(message):
                        # aiohttp drops what follows it in this read and parses the next read
                        # from wherever it begins (a body taken for a request): nothing after
                        # it is served, its answer closes the connection
                        self._messages[-1] = (message._replace(should_close=True),
                                              self._last_payload)
                    if new == 1 and self._chunked is None and not message.chunked \
                            and message.version is HttpVersion11:
                        return  # the usual read: one HTTP/1.1 request, not chunked, none pending
                if self._refuse_versions(new):
                    return
            self._judge_chunked_ends(new)
            return
        if body is None or (body.is_eof() and body is not self._chunked):
            # (part of) a head: its bytes, less a body's end (after a chunked body, whose
            # framing total_bytes leaves out, _judge_chunked_ends closes on anything)
            self._count_head(data, body.total_bytes - fed if in_body else 0)
        if self._chunked is not None:
            self._judge_chunked_ends(0)

    def _rescue_parsed(self, data: bytes, body_end: int, chunked: bool) -> bool:
        """The parser refused the read ``data`` just received (aiohttp queued its 400 for all
        of it; it began with ``body_end`` bytes of an earlier body, ``chunked`` or not):
        serve the requests that read completed before the error, as they would have been had
        the error come in a later read; whether there were any. aiohttp's C parser raises for
        the whole read and keeps them in its own list, never handed over: a valid request
        followed in its read by a malformed one was answered only 400, and one saying
        ``Connection: close`` (or HTTP/1.0's close) followed by any byte too (llhttp's "Data
        after Connection: close"), where RFC 9112 9.6 has it answered and what follows
        ignored (as nginx does).

        Each request read whole is queued, judged as any (head bound, version, framing,
        chunked ends, pipelining bound); then the 400, unless the last of them closes the
        connection: nothing after it is read, it is not answered. Nothing more is parsed on
        the connection (the parser stays broken). Only on this error path: the usual read
        never gets here."""
        queued = self._messages
        if self._close or self._force_close or self._parse_no_more or \
                not isinstance(queued[-1][0].exc, HttpProcessingError):
            return False  # (a refusal of keygate's own: the connection is closing already)
        parsed = _parsed_before_error(self._parser)
        if not parsed:
            return False
        # the first head's bytes received in earlier reads (_judge_heads left them counted:
        # on the usual path, none, and every head in the read is within HEAD_MAX anyway)
        earlier = self._head_bytes if self._head_from == self._request_count - 1 else 0
        done = []
        for message, payload in parsed:
            if not payload.is_eof() or payload is EMPTY_PAYLOAD and \
                    hdrs.TRANSFER_ENCODING in message.headers:
                # not read whole: its body cut by the error, or its framing the error itself
                # (llhttp refuses a request's Transfer-Encoding other than chunked once its
                # head is parsed: aiohttp made it a request without a body): refused with it
                break
            done.append((message, payload))
            if message.should_close:  # the connection ends with it (RFC 9112 9.6)
                break
        parsed.clear()  # the parser's own list: never rescued twice
        if not done:
            return False
        refusal = queued.pop()
        queued.extend(done)
        new = len(done)
        if not done[-1][0].should_close:
            queued.append(refusal)
            new += 1
        self._request_count += new - 1  # (the refusal was counted)
        self._parse_no_more = True  # the parser can take no more: later reads are dropped
        self._head_bytes = 0
        sizes, _ = self._heads_as_sent(data, done, body_end, earlier, chunked)
        for i, size in enumerate(sizes, len(queued) - new):
            if size > HEAD_MAX:  # as sent: the bytes the client sent, blanks and all
                self._refuse_head(i)  # (drops what is queued behind it)
                return True
        if len(queued) > 1:
            self._bound_pipelined()
        self._last_payload = queued[-1][1] if queued else EMPTY_PAYLOAD
        if not self._refuse_versions(new):
            self._judge_chunked_ends(new)
        return True

    def _count_head(self, data: bytes, start: int) -> None:
        """The bytes of the read ``data`` from ``start`` on are more of a request head not yet
        whole: past ``HEAD_MAX`` the request is refused and nothing more is parsed, so the
        parser never holds more. (Its last bytes are kept once it has begun: see
        ``_heads_as_sent``.)"""
        if self._close or self._force_close:
            return
        if self._upgraded and self._payload_parser is None:
            # behind an upgrade not yet answered, held by aiohttp unparsed (its read_bufsize
            # bounds them): a tunnel's first bytes or, the upgrade declined, the client's next
            # request(s), heads and bodies, judged once parsed (finish_response). Only a next
            # head that does not end within HEAD_MAX is known to be over it now.
            held = self._message_tail
            if self._tail_over is None and len(held) > HEAD_MAX:
                self._tail_over = held.find(b"\r\n\r\n", 0, HEAD_MAX + 4) < 0
            return
        if self._head_from != self._request_count:  # the first bytes of a next head
            self._head_from = self._request_count
            self._head_bytes = 0
        arrived = len(data) > start
        if arrived and not self._head_bytes:
            # blank lines before a request line are no part of its head (the parser skips
            # them, RFC 9112 2.2): counted from its first other byte, and never its end
            start = _BLANK_LINES.match(data, start).end()
        received = max(len(data) - start, 0)
        if received:  # the head's last 3 bytes (see _heads_as_sent)
            tail = (self._head_tail if self._head_bytes else b"") + data[max(start,
                                                                            len(data) - 3):]
            self._head_tail = tail[-3:]
        self._head_bytes += received
        if arrived and self._head_since is None:
            # a head begun behind a request (in its read, or while it is answered): due from
            # now, as timeouts.header says, not left to timeouts.idle once that is answered
            # (head_overdue waits until nothing is queued or under way)
            self._head_since = self._loop.time()
        if self._head_bytes > HEAD_MAX:
            self._refuse_head(None)

    def finish_response(self, request, resp, start_time):
        """aiohttp's ``finish_response``, but for the answer to an upgrade (a WebSocket
        handshake, an ``h2c`` one...) that no tunnel took: what the client sent behind it is
        its next request(s), parsed now through ``data_received`` as if just received, so
        that each is judged at the edge like any (the head bound, the version and framing
        refusals, the end of a chunked body, the pipelining bound) and a body is a body.
        aiohttp's own re-parses them itself, out of sight of all of that: a trailer reached
        the upstream as a header of the next request. Only a next head that cannot end
        within ``HEAD_MAX`` is dropped unparsed, and the connection closes after the answer.

        Keyed on the connection's state as aiohttp's is (an upgrade parsed, nothing queued
        behind it, no tunnel), so it holds for the upgrade's own answer whatever was answered
        before it, under the copied ``start`` and aiohttp's stock one alike. (It returns
        aiohttp's coroutine: no frame more for the other answers.)"""
        if self._upgraded and self._payload_parser is None and not self._messages \
                and self._parser is not None:
            self._feed_held(request)
        return super().finish_response(request, resp, start_time)

    def _feed_held(self, request) -> None:
        """The upgrade ``request`` is answered without a tunnel: parse what is held behind it
        (see ``finish_response``)."""
        over, self._tail_over = self._tail_over, None
        held, self._message_tail = self._message_tail, b""
        self._parser.set_upgraded(False)
        self._upgraded = False
        if over:
            close_after(request)
            self.close()
        elif held:
            self._head_bytes, self._head_from = 0, self._request_count
            # judged while the upgrade's answer is under way: a refusal that closes the
            # connection after it makes that answer say so (its handler is done, and
            # _current_request no longer names it)
            under_way, self._current_request = self._current_request, request
            try:
                self.data_received(held)
            finally:
                self._current_request = under_way
            if self._head_bytes and self._head_since is None and not self._messages:
                self._head_since = self._loop.time()  # a head begun: due from now
            if self._buffer_paused:  # aiohttp held no more than read_bufsize
                self._resume_reading_if_drained()

    def _judge_heads(self, data: bytes, new: int, body_end: int, chunked: bool) -> None:
        """A read ``data`` that completed ``new`` requests (its first ``body_end`` bytes were
        the rest of an earlier request's body, ``chunked`` or not), but not the usual way:
        each new head over ``HEAD_MAX`` as sent is refused, and what follows them and their
        bodies in the read counts towards the next head (a client may pipeline). Not after a
        chunked body (its framing is no part of ``total_bytes``): ``_judge_chunked_ends``
        drops whatever follows one."""
        queued = self._messages
        if new == 1 and queued and queued[-1][0].__class__ is _ERR_INFO:
            return  # a parse error: _rescue_parsed judges the requests read before it
        # the first head's bytes received in earlier reads are counted already (not when
        # requests were parsed outside data_received since: a declined upgrade's tail)
        earlier = self._head_bytes if self._head_from == self._request_count - new else 0
        first = max(len(queued) - new, 0)
        sizes, end = self._heads_as_sent(data, list(queued)[first:], body_end, earlier,
                                         chunked)
        self._head_bytes = 0
        for i, size in enumerate(sizes, first):
            if size > HEAD_MAX:
                self._refuse_head(i)  # (drops what is queued behind it)
                return
        if end is not None and queued and queued[-1][1].is_eof() \
                and queued[-1][0].__class__ is not _ERR_INFO:  # a next head (none after
            # a parse error: nothing more is parsed; _rescue_parsed judges what came before)
            self._count_head(data, end)

    def _heads_as_sent(self, data: bytes, requests, at: int, earlier: int,
                       chunked: bool) -> tuple[list[int], int | None]:
        """The size as sent of the head of each of ``requests`` (the requests the read
        ``data`` completed, in order, each with its body stream), and where in ``data`` the
        last one's body ends (None when that is unknown). The read begins with ``at`` bytes
        of an earlier request's body (``chunked`` or not), or with the rest of a head of which
        ``earlier`` bytes came in earlier reads. Each head ends at the first empty line from
        its first byte (for a head begun earlier, that empty line may begin in its last bytes
        received, ``_head_tail``), and is followed by ``total_bytes`` of body. A head not
        found where it should be is sized by all the rest of the read: never less than sent.

        Measured in the bytes received, not from the parsed fields (``_head_size``), which
        leave out the optional blanks the parser strips: a head of 33 KB of blanks before a
        field's value was forwarded. After a chunked body (whose framing ``total_bytes``
        leaves out) where the next head begins is unknown: those heads, which
        ``_judge_chunked_ends`` drops anyway, are sized as parsed. Only for the reads that
        are not the usual one (one head, whole, ending the read within ``HEAD_MAX``)."""
        sizes: list[int] = []
        pos: int | None = None if chunked else at
        for message, payload in requests:
            if message.__class__ is _ERR_INFO:  # (nothing is parsed after it)
                sizes.append(0)
                pos = None
                continue
            if pos is None:
                sizes.append(_head_size(message))
                continue
            if earlier:  # the rest of a head begun in earlier reads
                start, size = 0, earlier
                earlier, tail = 0, self._head_tail
                # (begun: blank lines before it were not counted, and it has a tail)
                found = (tail + data[:3]).find(_HEAD_END)
                if found >= 0:  # its empty line began in an earlier read
                    end = found + 4 - len(tail)
                else:
                    found = data.find(_HEAD_END)
                    end = found + 4 if found >= 0 else -1
            else:
                start = _BLANK_LINES.match(data, pos).end()
                size = 0
                found = data.find(_HEAD_END, start)
                end = found + 4 if found >= 0 else -1
            if end < 0:  # (never expected) all the rest of the read, at least as parsed
                end = len(data)
                sizes.append(max(size + end - start, _head_size(message)))
            else:
                sizes.append(size + end - start)
            pos = None if message.chunked else end + payload.total_bytes
        return sizes, pos

    def _bound_pipelined(self) -> None:
        """Requests a client pipelines wait parsed, heads and all, in aiohttp's queue (up to
        32 of them, each up to ``HEAD_MAX``: a MB per connection until the first is answered).
        Once their heads take more than ``HEAD_MAX`` in all, they are dropped but for the next
        to answer (none when one is under way), which is answered with ``Connection: close``;
        the client sends the rest again (RFC 9112 9.3.2 lets a server make it)."""
        total = 0
        for message, _ in self._messages:
            if message.__class__ is not _ERR_INFO:
                # as parsed, not as sent: this bounds what the queued heads hold in memory,
                # and the blanks the parser stripped are held nowhere (each head's bytes as
                # sent are judged by _heads_as_sent as it is read)
                total += _head_size(message)
                if total > HEAD_MAX:
                    self._close_after_chunked(0 if self._request_in_progress else 1)
                    return

    def _refuse_versions(self, new: int) -> bool:
        """Refuse the first of the ``new`` requests just queued whose version is neither
        HTTP/1.1 nor HTTP/1.0 (see ``VersionRefused``), or that is HTTP/1.0 with a
        ``Transfer-Encoding`` (``FramingRefused``), as a head over ``HEAD_MAX`` is; whether
        one was. (llhttp gives those two versions as aiohttp's own constants; any other
        parser's equal tuples are compared.)"""
        queued = self._messages
        for i in range(max(len(queued) - new, 0), len(queued)):
            message = queued[i][0]
            if message.__class__ is _ERR_INFO:
                return False  # answered 400 and closed anyway; nothing parsed after it
            version = message.version
            if version is HttpVersion11 or version == HttpVersion11:
                continue
            if not (version is HttpVersion10 or version == HttpVersion10):
                self._refuse_head(i, VersionRefused())
                return True
            if hdrs.TRANSFER_ENCODING in message.headers:
                self._refuse_head(i, FramingRefused())
                return True
        return False

    def _refuse_head(self, index: int | None, exc: Exception | None = None) -> None:
        """Refuse a head over ``HEAD_MAX`` (or ``exc``'s) (queued at ``index``, or still
        coming in) with 400 and parse nothing after it; the connection closes after the next
        answer."""
        exc = exc or HeadTooLarge()
        refusal = (_ERR_INFO(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)
        if index is None:
            self._request_count += 1
            self._messages.append(refusal)
        else:
            self._messages[index] = refusal
        self._last_payload = EMPTY_PAYLOAD
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        # aiohttp parses nothing more, and answers only the request under way or else the
        # next queued: that answer says Connection: close (the refusal itself when it is
        # next), and a pipelining client sends what it queued behind again
        self._close_after_chunked(0 if self._request_in_progress else 1)

    def _rest_of_a_body_at_stop(self) -> bool:
        body = self._last_payload
        return getattr(self._manager, "stopping", False) and self._request_in_progress \
            and body is not None and not body.is_eof() and self.transport is not None

    def _judge_chunked_ends(self, new: int) -> None:
        """Serve nothing parsed after a chunked body that may have ended with trailers.

        aiohttp's C parser leaves the last field of a chunked body's trailer section pending
        (only the next field line flushes one) and hands it to the next request parsed on
        the connection as that request's first header: a request smuggled as trailers
        reached the upstream as a header of the next request, which behind a load balancer
        pooling client connections is another client's. The trailers themselves are never
        forwarded (keygate re-frames the body), so a connection goes on after a chunked body
        only when its end is known to hold none: its last chunk and the empty line were the
        last bytes received, with nothing parsed behind them. Otherwise what was parsed
        behind it is dropped and the connection closes once the chunked request is answered
        (a client pipelining behind a chunked body sends the rest again, as RFC 9112 9.3.2
        lets a server make it)."""
        queued = self._messages
        first = len(queued) - new
        pending = self._chunked
        for i in range(max(first, 0), len(queued)):
            message, payload = queued[i]
            if message.__class__ is _ERR_INFO:  # a parse error: answered 400, then closed
                self._chunked = None
                return
            if pending is not None:  # parsed after a chunked body, maybe with its trailer
                self._close_after_chunked(i)
                return
            if message.chunked:
                pending = payload
        self._chunked = None
        if pending is None:
            return
        if not pending.is_eof():
            self._chunked = pending  # judged once its end has been parsed
        elif _TRAILERLESS_END.search(self._tail()) is None:
            # (an end split over more than the last two reads is not recognised: the
            # connection is closed, as for one with trailers)
            self._close_after_chunked(len(queued))

    def _tail(self) -> bytes:
        """The connection's last ``_RECENT`` bytes received (fewer when the last two reads
        hold fewer), contiguous: the tails of both reads joined are not once the latest is
        longer than ``_RECENT``, and could then read as an end without trailers."""
        latest = self._latest
        if len(latest) >= _RECENT:
            return latest[-_RECENT:]
        return self._before[len(latest) - _RECENT:] + latest

    def _close_after_chunked(self, keep: int) -> None:
        """Parse nothing more on the connection: drop what is queued but its first ``keep``
        requests, and close it once the next of them is answered (the request under way,
        if there is one and none is kept)."""
        queued = self._messages
        while len(queued) > keep:
            queued.pop()
        for i, (message, payload) in enumerate(queued):  # answered with Connection: close
            if message.__class__ is not _ERR_INFO:
                queued[i] = (message._replace(should_close=True), payload)
        self._chunked = None
        if queued and self._request_in_progress:
            # kept behind the request under way (the requests sent behind an upgrade are
            # judged as it is answered): aiohttp's close() would end the connection after
            # that answer, and what was kept to be answered was never forwarded. The one
            # under way goes on as it would have; the first kept one's answer closes
            self._parse_no_more = True
            return
        # the chunked request, if under way: its answer says Connection: close
        close_after(self._current_request)
        self.close()  # nothing more is parsed; closed once the requests queued are answered

    def pause_writing(self) -> None:
        # The client stopped taking bytes (the transport's buffer is over its high-water
        # mark). aiohttp waits for it to drain without a timeout, on every answer's last write
        # (write_eof drains) and the head's, and no other timeout runs while a request is in
        # progress: a client that never reads would hold its connection, and its place under
        # server.max_connections, for ever. Armed only here, so an answer the client takes
        # costs nothing.
        super().pause_writing()
        timeout = getattr(self._manager, "write_timeout", None)
        if timeout and self._write_stall is None:
            self._stall_mark = _taken(self.transport)[1]
            self._write_stall = self._loop.call_later(timeout, self._reader_stalled, timeout)
        if self._tunnel is not None:  # the upstream waits until the client takes these
            self._tunnel.client_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        if self._tunnel is not None:
            self._tunnel.client_resumed()

    def _reader_stalled(self, timeout: float) -> None:
        """``timeout`` seconds since the client's transport paused, or since it last took
        bytes: closed if it took none of them since (a client reading steadily, but slower than
        the buffered part of its answer (an upstream read, up to 256 KiB) in a timeout, stays
        paused all along; its download was cut short). See ``_taken``."""
        self._write_stall = None
        transport = self.transport
        if transport is not None and (look := _taken(transport))[0] > self._stall_mark:
            self._stall_mark = look[1]
            self._write_stall = self._loop.call_later(timeout, self._reader_stalled, timeout)
            return
        if transport is not None:
            log.info("a client took no bytes of its answer for %g s; closed",
                     self._manager.write_timeout if self._manager else 0)
            self.transport.abort()  # connection_lost fails the waiting write: handler ends

    def linger(self) -> None:
        """Close the connection after its last answer the lingering way (see LINGER_TIME):
        half-closed once the answer is written (no half-close under TLS: asyncio has none; its
        close then sends close_notify), what the client still sends read and dropped, closed
        once the client closes too, LINGER_IDLE passes with nothing read or LINGER_TIME in all.
        Only for a connection keygate closes while the client may still send: not on the
        keep-alive path."""
        transport = self.transport
        if self._linger_end or transport is None or transport.is_closing():
            return
        self._close = True  # aiohttp parses nothing more; data_received drops every read
        loop = self._loop
        now = loop.time()
        self._linger_end = now + LINGER_TIME
        self._linger_last = now
        try:
            if transport.can_write_eof():
                transport.write_eof()  # FIN once the answer's bytes are written
            transport.resume_reading()  # (paused by a body's or the queue's flow control)
        except (OSError, RuntimeError):  # gone meanwhile
            transport.close()
            return
        self._lingering = loop.call_at(now + LINGER_IDLE, self._linger_check)

    def _linger_check(self) -> None:
        self._lingering = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if now < self._linger_end and now - self._linger_last < LINGER_IDLE:
            self._lingering = self._loop.call_at(
                min(self._linger_last + LINGER_IDLE, self._linger_end), self._linger_check)
            return
        # (an answer not all taken yet is still written: the close waits for it, and the
        # sweep cuts it off once server.timeouts.body passes, as after any close)
        transport.close()

    def force_close(self) -> None:
        transport = self.transport
        if transport is not None and transport.is_closing():
            # closed already (a lingering close that ended, a handler's close): not again.
            # asyncio's TLS transport closed twice drops its protocol, and every later call
            # on it (the stop's and the sweep's get_write_buffer_size, abort) then failed
            # with AttributeError: the stop did not complete, the sweep task died
            self.transport = None
        super().force_close()

    def connection_lost(self, exc) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        self._kept = None
        waiting = self.upstream_wait
        if waiting is not None:  # the client left (or vanished) while its request waited
            # for the upstream, which may be silent for up to its timeout: that wait ends
            # now, and the upstream connection is closed, not held until then
            self.upstream_wait = None
            if isinstance(waiting, asyncio.Timeout):  # between two chunks of its answer
                waiting.reschedule(self._loop.time())
            elif not waiting.done():  # for the answer head (its body still going up, or not)
                waiting.set_exception(ClientGone())
        super().connection_lost(exc)

    def flush_overdue(self, now: float, timeout: float) -> bool:
        """The connection was closed with bytes of an answer still in its buffer, and the
        client has not taken them for ``timeout`` seconds (since a sweep first saw it so).

        ``transport.close()`` waits for its buffer to be written, with no end: the write stall
        timer runs only while that buffer is over its high-water mark (64 KiB), so a client
        that stopped reading with less left there (the kernel's buffers full) kept a closed
        connection, and its place under ``server.max_connections``, for ever."""
        transport = self._kept
        if transport is None or not transport.is_closing() \
                or not transport.get_write_buffer_size():
            return False
        taken, sent = _taken(transport)
        if self._unflushed_since is None or taken > self._flush_mark:
            # (first seen, or the client took bytes since: a slow reader finishing its
            # download is no stalled one) the timeout runs from now
            self._unflushed_since, self._flush_mark = now, sent
        return now - self._unflushed_since >= timeout

    def waiting_since(self) -> float | None:
        """When this connection began to wait for a request head (its connection, or the
        first byte of a head under way); -1.0 for one idle between keep-alive requests (no
        time kept); None when a request is under way or queued, an answer is still being
        written (handed to the transport, not yet taken by the client), or it is closing."""
        transport = self.transport
        if self._request_in_progress or self._messages or self._linger_end \
                or transport is None or transport.is_closing() \
                or transport.get_write_buffer_size():
            return None
        return -1.0 if self._head_since is None else self._head_since

    def head_overdue(self, deadline: float) -> bool:
        """No whole request head since before ``deadline`` (a slow-loris, a stalled client)."""
        since = self._head_since
        return since is not None and since < deadline and not self._request_in_progress \
            and not self._messages and self.transport is not None

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            error = GatewayError("Internal error.")
        elif isinstance(exc, (HeadTooLarge, VersionRefused)):
            error = BadRequest(exc.message, status=status)
        elif isinstance(exc, LineTooLong):  # the parser's bound on one line of the head
            limit = exc.args[1] if len(exc.args) > 1 else None
            over = f"over {(limit + 2) // 1024} KiB" if isinstance(limit, int) else "too long"
            error = BadRequest(f"The request line or a header field is {over}; send a "
                               "shorter URL or query string, or smaller headers (a large "
                               "cookie).", status=status)
        else:  # the client's fault: no traceback in the log, no parser detail on the wire
            log.debug("refused a malformed request from %s: %s", request.remote,
                      _parser_reason(exc))
            error = BadRequest("The request is not valid HTTP/1.1.", status=status)
        response = None
        if status < 500:  # a request the parser refused (never the usual request's path)
            unreadable = getattr(self._manager, "on_unreadable", None)
            if unreadable is not None:  # the proxy listener: logged and counted
                try:
                    response = unreadable(error, request.remote, request.transport)
                except Exception:
                    log.exception("logging a request the parser refused failed")
        if response is None:
            response = error.response(uuid.uuid4().hex)
        # the admin listener's: the headers every answer of its app carries, which an answer
        # made here, outside the app (its on_response_prepare never runs), lacked (a console
        # URL over 8 KiB, a large cookie for the host); the proxy listener sets none
        for name, value in (getattr(self._manager, "answer_headers", None) or {}).items():
            response.headers.setdefault(name, value)
        response.force_close()
        return response

    def head_timed_out(self) -> None:
        """``server.timeouts.header`` passed without a whole request head: closed unanswered.
        One whose client sent some of a head (blank lines before a request line are none)
        is logged and counted (``on_unreadable``, 408 ``request_timeout``, nothing sent), as
        nginx logs a ``client_header_timeout`` once bytes came; one that sent nothing (a
        connection opened ahead of need, an idle keep-alive one) is not."""
        unreadable = getattr(self._manager, "on_unreadable", None)
        if unreadable is not None and self._head_bytes \
                and self._head_from == self._request_count and self._head_since is not None:
            try:
                unreadable(RequestTimeout("The request head did not arrive in time."),
                           _remote(self.transport), None,
                           self._loop.time() - self._head_since)
            except Exception:
                log.exception("logging a request head cut off at the header timeout failed")
        self.force_close()  # closes the transport


# Where the reason in a parser's message ends and its quote of the bytes refused begins: the
# C parser's "Invalid header value char:\n\n  b'Authorization: Bearer ...'", the Python
# parser's "Bad status line 'GET ...'". Those bytes may hold a token.
_QUOTED = re.compile(r""":\s*\n|:?\s*b?['"]""")


def _parser_reason(exc: BaseException | None) -> str:
    """Why aiohttp's HTTP parser refused a request, fit for a log: its reason, never the bytes
    it quotes (a header line or request line with a token or the operator token in it)."""
    if exc is None:
        return "-"
    if isinstance(exc, InvalidURLError):  # its message is the request target itself, unquoted
        return exc.__class__.__name__     # (an absolute-form one with a key in its query)
    message = str(getattr(exc, "message", "") or "").strip()
    reason = _QUOTED.split(message, 1)[0].strip()
    return f"{exc.__class__.__name__}: {reason}" if reason else exc.__class__.__name__


# The aiohttp code _InlineRequestHandler.start was copied from (start) and relies on the
# timing of (the handler's own coroutine, the response's finish, the connection's loss): with
# any other version of one of them the stock start() runs (only slower), so an upgrade cannot
# change behaviour.
_RELIED_ON = ("start", "_handle_request", "finish_response", "connection_lost")
_COPIED_FROM = "65fcd7c5cd7439114853afc24025c725ac789fcd2d80ee61ee505632bf9a5dab"


def _stock_digest() -> str:
    try:
        source = "".join(inspect.getsource(getattr(RequestHandler, name))
                         for name in _RELIED_ON)
    except (OSError, TypeError):  # no source shipped: treat as unknown
        return ""
    return hashlib.sha256(source.encode()).hexdigest()


INLINE_START = _stock_digest() == _COPIED_FROM


# What a request the parser refused is made from: aiohttp's stand-in, saying HTTP/1.1 rather
# than HTTP/1.0, so that the refusal's status line is keygate's own version (RFC 9110 2.5: the
# highest a server speaks of the request's major), as nginx answers; should_close stays set,
# so it says 'Connection: close'. (With aiohttp's stock start(), it still says HTTP/1.0.)
_ERROR = web_protocol.ERROR._replace(version=HttpVersion11)


class _InlineRequestHandler(_JsonErrorRequestHandler):
    """The proxy listener's connections: each request's handler runs in the connection's own
    task, instead of a new task per request.

    aiohttp's ``start()`` on Python < 3.12 wraps every request in ``loop.create_task`` (on 3.12+
    it starts that task eagerly) so a handler gets its own copy of the context variables. The
    proxy pipeline sets none, and the extra task cost a task creation and two loop turns per
    request: measured at 10 % of the gateway's CPU per request at 8 connections (148 → 129 µs,
    alternating rounds, bench/). Everything else below is aiohttp 3.14.5's ``start()`` as is,
    with its ``_handle_request`` inlined (a coroutine frame less to resume at each of a
    handler's awaits) and two changes (marked ``keygate:``): a transport the handler closed is
    finished at once (without the task's extra loop turn, ``connection_lost`` has not yet run
    for it when the handler returns), and the usual answer, a ``WholeResponse``, is written by
    ``WholeResponse.send_at_once`` instead of ``finish_response``'s coroutines (callgrind, bench
    target q at 8 connections: 381.1k → 375.3k instructions a request for both);
    ``INLINE_START`` checks that the installed aiohttp still has the code copied."""

    async def start(self) -> None:
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        resp = None
        assert self._request_factory is not None
        assert self._request_handler is not None

        while not self._force_close:
            if not self._messages:
                try:
                    # wait for next request
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = self._messages.popleft()

            # Free a parser slot; resume reading once drained to low water so
            # pipelining keeps flowing while this request is handled.
            if self._parser is not None:
                self._parser.message_consumed()
            if (
                self._buffer_paused
                and len(self._messages) <= self._msg_queue_resume_size
            ):
                self._resume_reading_if_drained()

            start = loop.time() if self._logging_enabled else None

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            if isinstance(message, web_protocol._ErrInfo):
                # make request_factory work
                request_handler = self._make_error_handler(message)
                message = _ERROR  # keygate: answered 'HTTP/1.1', not aiohttp's 'HTTP/1.0'
            else:
                request_handler = self._request_handler

            request = self._request_factory(
                message,
                payload,
                self,
                writer,
                self._task_handler or asyncio.current_task(loop),
            )
            try:
                try:  # keygate: awaited in this task, not in a new one; and aiohttp's
                    # _handle_request inlined (a coroutine less at each of the handler's awaits)
                    self._request_in_progress = True
                    try:
                        try:
                            self._current_request = request
                            resp = await request_handler(request)
                        finally:
                            self._current_request = None
                    except HTTPException as exc:
                        resp = exc
                        resp, reset = await self.finish_response(request, resp, start)
                    except asyncio.CancelledError:
                        raise
                    except asyncio.TimeoutError as exc:
                        self.log_debug("Request handler timed out.", exc_info=exc)
                        resp = self.handle_error(request, 504)
                        resp, reset = await self.finish_response(request, resp, start)
                    except Exception as exc:
                        resp = self.handle_error(request, 500, exc)
                        resp, reset = await self.finish_response(request, resp, start)
                    else:
                        # Deprecation warning (See #2415)
                        if getattr(resp, "__http_exception__", False):
                            warnings.warn(
                                "returning HTTPException object is deprecated "
                                "(#2415) and will be removed, "
                                "please raise the exception instead",
                                DeprecationWarning,
                            )
                        # keygate: the usual answer is prepared and written in one step
                        # (WholeResponse.send_at_once), then waited for as write_eof waits;
                        # any other goes through aiohttp's finish_response
                        reset = None
                        if resp.__class__ is WholeResponse and not self._upgraded:
                            request._finish()
                            try:
                                if resp.send_at_once(request):
                                    reset = False
                                    if self._paused and self.transport is not None:
                                        await self._drain_helper()
                            except ConnectionError:
                                reset = True
                            if reset is not None:
                                self.log_access(request, resp, start)
                        if reset is None:
                            resp, reset = await self.finish_response(request, resp, start)
                    finally:
                        self._request_in_progress = False
                        # (a waiter already cancelled: the stop's wait for this request ended
                        # at the drain time as the cut-off aborted it, and the stop has not
                        # yet run to forget it; setting it raised InvalidStateError)
                        waiter = self._handler_waiter
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)
                except ConnectionError:
                    self.log_debug("Ignored premature client disconnection")
                    break
                # keygate: a transport the handler closed or aborted (a 408, an upstream
                # failing mid-response) is done with. With a task of its own, the loop ran
                # connection_lost (force_close) before this point; here it has not yet, and
                # without this the lingering read would wait 10 s on the closed connection
                # (holding its max_connections slot) and a request pipelined behind would be
                # forwarded and counted, its answer never delivered.
                if self.transport is not None and self.transport.is_closing():
                    self.force_close()

                if reset:
                    self.log_debug("Ignored premature client disconnection 2")
                    break

                # notify server about keep-alive
                self._keepalive = bool(resp.keep_alive)

                # check payload
                if not payload.is_eof():
                    lingering_time = self._lingering_time
                    # keygate: the rest of a body is read only for a connection that goes on;
                    # one that closes after this answer lingers at the socket instead (linger).
                    # For LINGER_TIME at most (ProxyServer's lingering_time, lower with a
                    # lower server.timeouts.body), LINGER_IDLE with nothing read: a declared
                    # body that stalls after a refusal held the connection aiohttp's 10 s
                    # whatever the timeouts (a slowloris needing no key)
                    if not self._force_close and lingering_time and self._keepalive:
                        self.log_debug(
                            "Start lingering close timer for %s sec.", lingering_time
                        )

                        now = loop.time()
                        end_t = now + lingering_time

                        try:
                            while not payload.is_eof() and now < end_t:
                                async with ceil_timeout(min(end_t - now, LINGER_IDLE)):
                                    # read and ignore
                                    await payload.readany()
                                now = loop.time()
                        except (asyncio.CancelledError, asyncio.TimeoutError):
                            if (
                                (t := asyncio.current_task())
                                and t.cancelling()
                            ):
                                raise
                        except BodyFramingBroken:
                            # keygate: the body of a request answered from its head (a
                            # refusal) broke its framing: nothing more on this connection is
                            # readable, so it closes, quietly (this was aiohttp's "Unhandled
                            # exception" traceback, one per request anyone could send)
                            self.force_close()

                    # if payload still uncompleted
                    if not payload.is_eof() and not self._force_close:
                        self.log_debug("Uncompleted request.")
                        self.close()

                payload.set_exception(web_protocol._PAYLOAD_ACCESS_ERROR)

            except asyncio.CancelledError:
                self.log_debug("Ignored premature client disconnection")
                self.force_close()
                raise
            except Exception as exc:
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # Break reference cycle in case of exception
                if self.transport is None and resp is not None:
                    self.log_debug("Ignored premature client disconnection.")

            if self._keepalive and not self._close and not self._force_close:
                # start keep-alive timer
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(
                        close_time, self._process_keepalive
                    )
            else:
                break

        # remove handler, close transport if no handlers left
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                # keygate: a lingering close, unless the client asked for the close itself
                # (Connection: close, HTTP/1.0) after a request read whole: it sends no more
                if self._close or self._parse_no_more \
                        or request_handler is not self._request_handler \
                        or not message.should_close or not payload.is_eof():
                    self.linger()
                else:
                    self.transport.close()


def _parsed_before_error(parser) -> list | None:
    """The requests aiohttp's C parser completed (their heads, at least) in a read it then
    raised for: its own list of them (``HttpParser._messages``, a C attribute Python code
    cannot name, found among the objects the parser holds), or None (none, or another
    parser: the pure-Python one keeps none)."""
    if type(parser).__module__ != "aiohttp._http_parser":
        return None
    for held in gc.get_referents(parser):
        if held.__class__ is list and held and held[0].__class__ is tuple \
                and held[0][0].__class__ is _C_MESSAGE:
            return held
    return None


def _upgrade_drops_the_rest(message) -> bool:
    """Whether aiohttp's parser drops what a client sends behind ``message``, a request its
    HTTP parser (llhttp) reads as asking to upgrade (``Connection: upgrade`` and an
    ``Upgrade``): it holds the rest only for a WebSocket one (and CONNECT), as
    ``_http_parser.pyx`` has it; for any other (``h2c``...) llhttp stops at the request's end
    and the rest of that read is lost, the next read parsed from wherever it begins."""
    if message.method == "CONNECT":
        return False
    upgrade = message.headers.get("Upgrade", "")
    return not (upgrade.isascii() and upgrade.lower() == "websocket")


def upgrade_pending(request: web.BaseRequest) -> bool:
    """Whether aiohttp's parser read ``request`` as an upgrade too: it then parses nothing
    more on the connection, and keeps what follows the head aside (until the request is
    answered: then it parses it as the next request, unless the connection was taken over)."""
    protocol = request.protocol
    return getattr(protocol, "_upgraded", False) is True and not protocol._messages \
        and protocol._payload_parser is None


def close_after(request: web.BaseRequest | None) -> None:
    """The answer to ``request`` (if any) closes its connection (``Connection: close``)."""
    cache = getattr(request, "_cache", None)  # where BaseRequest.keep_alive is reified
    if isinstance(cache, dict):
        cache["keep_alive"] = False


def take_over(request: web.BaseRequest, feed, tunnel) -> None:
    """Hand the rest of ``request``'s connection to a WebSocket tunnel: the bytes already
    received behind its head, then every read, go to ``feed.feed_data`` (aiohttp's seat for
    a WebSocket reader), its end to ``feed.feed_eof``; the connection's write backpressure to
    ``tunnel.client_paused``/``client_resumed``."""
    protocol = request.protocol
    protocol._tunnel = tunnel
    protocol.set_parser(feed)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def continue_if_expected(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` before the body is waited for: such a client holds its
    body back until asked (RFC 9110 10.1.1), and the proxy listener is aiohttp's low-level
    server, which leaves that to the handler (as the admin listener does: ``EXPECTATION``)."""
    if continues(request) or request.version >= (1, 1) and expects_continue(request.headers):
        try:
            await request.writer.write(_CONTINUE)
        except ConnectionError:  # the client left before it was asked for its body
            raise body_cut_short() from None


def expects_continue(headers) -> bool:
    """Whether a request's ``Expect`` fields ask for ``100 Continue``: ``100-continue`` in any
    spelling (RFC 9110 10.1.1: case-insensitive), in any of the list's members, in any of
    the fields (``100-Continue``; ``100-continue, foo``; ``Expect: foo`` then ``Expect:
    100-continue``), as a front proxy may read them."""
    if hdrs.EXPECT not in headers:  # nearly every request: no generator made
        return False
    return any(member.strip().lower() == "100-continue"
               for value in headers.getall(hdrs.EXPECT) for member in value.split(","))


EXPECTATION = web.RequestKey("expectation", str)
# An app's headers for the answers its runner's server makes outside it (AdminRunner): the
# requests the HTTP parser refused, whose answers the app's on_response_prepare never sees
ANSWER_HEADERS = web.AppKey("answer_headers", Mapping)
"""The ``Expect`` field of a request to the admin listener, as sent: ``AdminRunner`` takes it
off the request's headers as the request is made, because aiohttp's ``Application`` answers
it itself (``100 Continue``, or its own text 417) before any middleware runs, so before the
caller is authenticated. The admin middleware answers it once the caller is admitted."""


def _deferring_expect(make_request):
    """``make_request`` (a server's request factory), with ``Expect`` taken off the request's
    headers and kept under ``EXPECTATION``. A request without one (nearly all) is made as is."""
    def make(message, payload, protocol, writer, task):
        if hdrs.EXPECT not in message.headers:
            return make_request(message, payload, protocol, writer, task)
        headers = CIMultiDict(message.headers)
        expectation = ", ".join(headers.popall(hdrs.EXPECT))
        message = message._replace(headers=CIMultiDictProxy(headers), raw_headers=tuple(
            (name, value) for name, value in message.raw_headers
            if name.lower() != b"expect"))
        request = make_request(message, payload, protocol, writer, task)
        request[EXPECTATION] = expectation
        return request
    return make


def continues(request: web.BaseRequest) -> bool:
    """Whether the client of ``request`` (to the admin listener) holds its body back until it
    is sent ``100 Continue`` (RFC 9110 10.1.1)."""
    return request.version >= (1, 1) and \
        request.get(EXPECTATION, "").strip().lower() == "100-continue"


async def answer_and_close(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Write ``response`` and close the connection at once: after a 408 the rest of a stalled
    body is not worth aiohttp's lingering read (up to 10 s, the connection held meanwhile)."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass
    if isinstance(request.protocol, _InlineRequestHandler):
        request.protocol.linger()  # the client may yet send: see LINGER_TIME
    elif request.transport is not None:
        request.transport.close()


def drop_vanished_peers(sockets, timeout: float) -> None:
    """Make the accepted connections of these listening sockets end once their peer has
    acknowledged nothing for ``timeout`` seconds (``server.timeouts.body``): a client whose
    machine vanished (power loss, a cut cable: no FIN, no RST) while keygate sent it bytes, or
    while nothing moved at all. Without it such a connection lived until TCP gave up
    retransmitting (~15 minutes on Linux), holding its upstream connection and its place under
    ``server.max_connections``: a trickling answer or WebSocket tunnel never fills the send
    buffer (so the write stall timer never starts) and resets the tunnel's idle timer.

    Set once on each listening socket: Linux copies these options to every connection it
    accepts, so a connection or a request costs nothing. ``TCP_USER_TIMEOUT`` aborts a
    connection whose sent bytes stay unacknowledged that long; keep-alive probes (the first
    after half of it without a byte from the peer, then every tenth of it) give a connection
    with nothing to send something to go unacknowledged, and a live peer answers them (it
    need not send a byte itself): ``gateway.proxying.vanish``."""
    options = vanish_options(timeout)
    for sock in sockets:
        set_vanish_options(sock, options)


class ProxyServer(web.Server):
    """A low-level aiohttp server whose parser errors are SPEC's JSON errors. The proxy
    listener uses it directly (one handler, no router); the admin listener via AdminRunner.

    ``header_timeout``: seconds for a whole request head; ``write_timeout``: seconds a
    client may take no bytes of its answer before its connection is closed
    (``server.timeouts.body``); ``max_connections``: open client
    connections beyond which a new one is closed at once (None: no bound), or with
    ``evict_idle`` the one waiting longest for a request (``idlest``); ``inline``: run
    each request's handler in its connection's task (the proxy listener; see
    ``_InlineRequestHandler``)."""

    def __init__(self, handler, *, header_timeout: float | None = None,
                 max_connections: int | None = None, inline: bool = False,
                 write_timeout: float | None = None, evict_idle: bool = False,
                 **kwargs) -> None:
        # the rest of a refused request's body, read to keep its connection: see LINGER_TIME
        kwargs["lingering_time"] = min(kwargs.get("lingering_time", LINGER_TIME), LINGER_TIME)
        super().__init__(handler, **kwargs)
        self.evict_idle = evict_idle
        self._handler_class = _InlineRequestHandler if inline and INLINE_START \
            else _JsonErrorRequestHandler
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.refused_connections = 0
        self.on_refused: Callable[[], None] | None = None  # told of each (a metric)
        # the proxy listener's: makes, logs and counts the answer to a request that could not
        # be read (Pipeline.unreadable): (error, peer, transport, waited) -> response. None
        # (the admin listener): its refusals are answered as they always were, unlogged
        self.on_unreadable: Callable[..., web.StreamResponse] | None = None
        # headers added to every answer made outside the handler (handle_error): the admin
        # listener's app's own (its ANSWER_HEADERS, set by AdminRunner); None on the proxy
        self.answer_headers: Mapping[str, str] | None = None
        self.stopping = False  # from pre_shutdown on: bodies in flight are still read
        self._sweeper: asyncio.Task | None = None

    def idlest(self, newcomer) -> "_JsonErrorRequestHandler | None":
        """For ``newcomer``, over the bound: the connection waiting longest for a request
        head, one idle between keep-alive requests only if none is (None when every other
        has a request under way). Only when the bound is reached: one pass over them."""
        chosen, chosen_since, idle = None, math.inf, None
        for handler in self._connections:
            if handler is newcomer:
                continue
            since = handler.waiting_since()
            if since is None:
                continue
            if since < 0:
                idle = idle or handler
            elif since < chosen_since:
                chosen, chosen_since = handler, since
        return chosen or idle

    def sweep_heads(self) -> None:
        """Make sure the header-timeout sweep runs while there are connections. One task per
        server checks every connection a few times per timeout, instead of a timer armed and
        cancelled for every request. It also aborts a closed connection whose client has not
        taken the rest of its answer within ``write_timeout`` (``flush_overdue``)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self._loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        timeout, flush = self.header_timeout, self.write_timeout
        every = min(1.0, timeout / 4)
        while self._connections:
            await asyncio.sleep(every)
            now = self._loop.time()
            deadline = now - timeout
            for handler in list(self._connections):
                if handler.head_overdue(deadline):
                    handler.head_timed_out()  # closes the transport
                elif flush and handler.flush_overdue(now, flush):
                    log.info("a client did not take the rest of its answer within %g s of "
                             "its connection's close; cut off", flush)
                    handler._kept.abort()  # connection_lost frees its place

    def pre_shutdown(self) -> None:
        """The listener has stopped accepting; requests in flight finish, then every
        connection closes. Their answers not yet begun say ``Connection: close`` (the
        request's keep-alive wish, which the answer's header follows, is set to no): a client
        or load balancer must not send its next request on a connection about to close
        (RFC 9112 9.6). Without it they went out as keep-alive and the close that followed
        reset whatever request was sent next on it. Runs once per stop, not per request."""
        self.stopping = True
        for handler in list(self._connections):
            tunnel = getattr(handler, "_tunnel", None)
            if tunnel is not None:  # open for as long as its users like: closed now, so
                tunnel.end()         # they reconnect to a replica that is not stopping
            close_after(getattr(handler, "_current_request", None))
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        handlers = list(self._connections)
        # aiohttp waits ``timeout`` for the requests in flight, then as long again for their
        # handlers before it cancels them: twice the drain time the operator was told (and
        # that terminationGracePeriodSeconds is sized by). At ``timeout``, what is still in
        # flight is cut off as a client that went is: its connection is aborted, which ends
        # the upstream wait or the streaming at once and logs its access line.
        cut = None if timeout is None else self._loop.call_later(
            timeout, self._cut_off, handlers, timeout)
        for handler in handlers:
            # No request under way nor one read and waiting: closed now, as pre_shutdown
            # meant to. aiohttp's close() there only cancels a handler's wait for a request:
            # one made in the same loop turn, not waiting yet, was just marked closing; the
            # bytes of its request were then dropped unread and aiohttp's shutdown waited
            # for a request that could not come until the drain's end (30 s).
            if not handler._request_in_progress and not handler._messages:
                handler.force_close()
        try:
            await super().shutdown(timeout)
        finally:
            if cut is not None:
                cut.cancel()
        if self.write_timeout:  # every connection is closed now, and forgotten: one whose
            # client does not take what it still holds is cut off as the sweep would have
            for handler in handlers:
                transport = getattr(handler, "_kept", None)
                if transport is not None and transport.get_write_buffer_size():
                    self._loop.call_later(self.write_timeout, transport.abort)

    @staticmethod
    def _cut_off(handlers: list, timeout: float) -> None:
        """The drain time is over: abort the connections of the requests still in flight."""
        left = [h for h in handlers if h._request_in_progress and h.transport is not None]
        if not left:
            return
        log.warning("shutdown: %d request%s still in flight after %g s cut off",
                    len(left), "" if len(left) == 1 else "s", timeout)
        for handler in left:
            handler.transport.abort()  # connection_lost: as when the client goes

    def __call__(self) -> RequestHandler:
        return self._handler_class(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` for the admin app, with JSON answers to unparseable requests too, and
    the proxy listener's head timeout (``header_timeout``) and write stall timeout
    (``write_timeout``): a slow-loris or a client that never reads is cut off there as well;
    ``max_connections`` bounds its open connections as ``server.max_connections`` does the
    proxy listener's, but at the bound the connection waiting longest for a request is closed
    rather than the new one: its callers (probes, a scraper, the CLI) send at once, so idle
    connections held open (a slowloris) cannot keep them out.

    Its connections run as the proxy listener's do (``_InlineRequestHandler``), for its
    lingering close (see LINGER_TIME): closed at once after a refusal (a 400 for the framing,
    a 408, a 413, a 501), a client still writing its body failed on a reset before it could
    read the answer. (The admin app's handlers set no context variable that a task of their
    own would have kept from the next request.) A request's ``Expect`` is the admin
    middleware's to answer (``EXPECTATION``). The answers its server makes outside the app (a
    request its parser refused) carry the app's ``ANSWER_HEADERS`` (the console's CSP,
    X-Frame-Options, nosniff, no-store): the path such a request named is not known, and
    it may be a page of the console's."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None,
                 write_timeout: float | None = None, max_connections: int | None = None,
                 **kwargs) -> None:
        # bodies as sent, as on the proxy listener: aiohttp's decoding of gzip/deflate failed
        # outside any handler (a traceback in the log per request, token or not), and the
        # admin API refuses a Content-Encoding anyway (middleware.read_whole_body)
        kwargs.setdefault("auto_decompress", False)
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        proxy_server = ProxyServer(server.request_handler,
                                   request_factory=_deferring_expect(server.request_factory),
                                   loop=server._loop, header_timeout=self._header_timeout,
                                   write_timeout=self._write_timeout, inline=True,
                                   max_connections=self._max_connections, evict_idle=True,
                                   **server._kwargs)
        proxy_server.answer_headers = self.app.get(ANSWER_HEADERS)
        return proxy_server
