"""WebSocket tunnels: a route with ``websocket: true`` lets a WebSocket handshake (RFC 6455
4.1) through, and once the upstream has switched protocols, relays bytes both ways unparsed.

The handshake is a request like any other up to the forwarding step (the pipeline checks key,
scopes, address, rate and quotas, and counts it once); it is then sent upstream with the
identity headers as ``Forwarder.request_head`` builds them for any request, and keygate's
own ``Connection: Upgrade`` and ``Upgrade: websocket`` (the client's hop-by-hop headers, and
whatever its ``Connection`` named, are dropped as always).

Only a ``101`` whose ``Upgrade`` is ``websocket`` and whose ``Sec-WebSocket-Accept`` answers the
client's key switches: a ``101`` that is not that is a 502 (an upstream that did not really
switch would otherwise read the client's next bytes as HTTP requests of its own, checked by
nobody); any other status is relayed as an ordinary response, and the connection it came on is
closed after it. The bytes a client sends behind its handshake wait in aiohttp's buffer until
the 101: never written to an upstream that has not switched (declined, aiohttp parses them as
the client's next request, checked like any other).

Once switched: bytes go both ways as they come, with backpressure (a side whose transport is
over its high-water mark stops the other side's reads until it drains); the tunnel ends when
either side closes, or after ``server.timeouts.idle`` seconds without a byte either way, or at
shutdown. While open it holds its client connection (``server.max_connections``) and its
upstream connection (``upstreams.NAME.max_connections``). When it ends, the pipeline writes
the request's one access-log line: status 101, the tunnel's whole duration, ``bytes_in`` and
``bytes_out`` counting what was relayed each way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from typing import Awaitable, Callable, Mapping

from aiohttp import hdrs, web
from multidict import istr

from ..cors import origin_of
from ..errors import BadGateway, BadRequest, client_closed
from .connection import (ClientGone, UpstreamConnection, UpstreamConnectError,
                         UpstreamProtocolError, UpstreamResponse, UpstreamTimeout)
from .headers import NotUtf8Headers, response_headers
from .response import keep_header_bytes
from .server import close_after, take_over, upgrade_pending

log = logging.getLogger("keygate.proxy")

RECHECK_EVERY = 10.0  # seconds between checks that an open tunnel's key still allows it
# (server.websocket_recheck's default)
CHECKS_AT_ONCE = 256  # keys checked together (store round trips in flight) at each check

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_KEY = istr("Sec-WebSocket-Key")
_UPGRADE, _CONNECTION = hdrs.UPGRADE, hdrs.CONNECTION
_X_REQUEST_ID = istr("X-Request-Id")


def websocket_handshake(request: web.BaseRequest) -> str | None:
    """The ``Sec-WebSocket-Key`` of a request that asks to become a WebSocket: ``GET`` over
    HTTP/1.1 with one ``Upgrade: websocket`` and ``Connection`` naming ``upgrade``, as aiohttp's
    parser read it too. None: not such a request (it is forwarded as any other, ``Upgrade``
    dropped: ``h2c`` and every other protocol included). Raises ``BadRequest`` for a handshake
    keygate does not forward: one with a body, or without a valid key."""
    headers = request.headers
    upgrade = headers.getall(_UPGRADE, ())
    if len(upgrade) != 1 or upgrade[0].strip().lower() != "websocket" or \
            request.method != "GET" or request.version != (1, 1):
        return None
    if not any(token.strip().lower() == "upgrade"
               for value in headers.getall(_CONNECTION, ()) for token in value.split(",")):
        return None
    if hdrs.TRANSFER_ENCODING in headers or request.content_length:
        close_after(request)  # its body is not read: nothing behind it is read as a request
        raise BadRequest("A WebSocket handshake carries no body.")
    keys = headers.getall(_KEY, ())
    try:
        valid = len(keys) == 1 and len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise BadRequest("A WebSocket handshake needs one Sec-WebSocket-Key: 16 bytes, "
                         "base64-encoded.")
    if not upgrade_pending(request):  # aiohttp read it otherwise: an ordinary request
        return None
    return keys[0].strip()


def _accept(key: str) -> bytes:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest())


def _switched(resp: UpstreamResponse, key: str) -> bool:
    """Whether the upstream's 101 is a WebSocket's (RFC 6455 4.2.2): ``Upgrade: websocket``
    and the ``Sec-WebSocket-Accept`` of the client's key."""
    upgrade = [v for n, v in resp.headers if n.lower() == b"upgrade"]
    accept = [v for n, v in resp.headers if n.lower() == b"sec-websocket-accept"]
    return [a.strip() for a in accept] == [_accept(key)] and \
        [u.strip().lower() for u in upgrade] == [b"websocket"]


class TunnelResponse(web.StreamResponse):
    """The client's ``101``. Its end is the tunnel's: nothing is written after the head
    (aiohttp's ``write_eof`` would frame an empty body), and the connection is never reused."""

    bytes_in = 0  # relayed from the client (its access-log ``bytes_in``)
    switched_at = 0.0  # time.perf_counter() when the 101 went out (the metrics' duration)

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def tunnel(forwarder, request: web.BaseRequest, upstream, principal, request_id: str,
                 limit_headers: Mapping[str, str], *, trace=None, rules=None,
                 watch: Callable[[Tunnel], None] | None = None, held=None
                 ) -> web.StreamResponse:
    """``Forwarder.forward`` for a WebSocket handshake (``websocket_handshake`` said so): the
    upstream's answer, and when it switched, the tunnel, run until it ends. ``watch`` is
    handed the tunnel once it is open (``TunnelWatch.watch``); ``held`` (the request's hold
    on its quota, ``gateway.pipeline.Held``) is released once the upstream answered."""
    if rules is None:
        rules = forwarder.header_rules
    key = request.headers[_KEY].strip()
    pool, base, host = forwarder._pool(upstream)
    head = forwarder.request_head(request, principal, request_id, base + request.raw_path,
                                  host, trace=trace, rules=rules,
                                  last="Connection: Upgrade\r\nUpgrade: websocket")
    started = time.perf_counter()
    client = request.protocol  # its going ends the wait for the answer (connection_lost)
    if not hasattr(client, "upstream_wait"):  # not keygate's own server (some tests')
        client = None
    try:
        resp = await pool.upgrade(head, timeout=upstream.timeout, client=client)
    except ClientGone as exc:  # the client went before the upstream answered its handshake
        raise client_closed(reached_upstream=exc.sent) from None
    except (UpstreamTimeout, UpstreamConnectError, UpstreamProtocolError, OSError,
            ValueError) as exc:
        raise forwarder.upstream_failed(exc, upstream) from None
    if held is not None:
        held.release()
    if forwarder.on_upstream is not None:
        forwarder.on_upstream(upstream.name, time.perf_counter() - started)
    if resp.status != 101:  # declined: an ordinary answer (its connection closed after it)
        return await forwarder._stream_back(request, resp, request_id, limit_headers, upstream,
                                            False, rules)
    conn = resp._conn
    if conn.error is not None or not _switched(resp, key):
        resp.close()
        log.warning("upstream %s answered a WebSocket handshake with a 101 that does not "
                    "switch to WebSocket (Upgrade or Sec-WebSocket-Accept wrong)", upstream.name)
        raise BadGateway(f"The upstream '{upstream.name}' answered the WebSocket handshake "
                         f"wrongly.")
    out = response_headers(resp.headers, rules)
    if out.__class__ is NotUtf8Headers:
        keep_header_bytes(request.writer)
    for name, value in limit_headers.items():
        out[name] = value
    out[_X_REQUEST_ID] = request_id
    if rules.cors is not None:  # keygate's Access-Control-* on every answer, a 101's too
        rules.cors.label_forwarded(out, origin_of(request.headers))
    out[_CONNECTION] = "Upgrade"
    out[_UPGRADE] = "websocket"
    response = TunnelResponse(status=101, headers=out)
    response.force_close()
    relay = Tunnel(request, conn, forwarder.config.server.timeouts.idle)
    try:
        try:
            await response.prepare(request)
        except ConnectionError:  # the client left meanwhile
            relay.end()
        else:
            relay.start()
            if watch is not None and not relay.done.done():
                watch(relay)
        response.switched_at = time.perf_counter()
        await relay.done
    finally:
        relay.end()
        response.body_bytes_sent = relay.bytes_out
        response.bytes_in = relay.bytes_in
    return response


class Tunnel:
    """Bytes both ways between a client connection (aiohttp's, taken over through
    ``gateway.proxying.server.take_over``) and an upstream connection that switched."""

    def __init__(self, request: web.BaseRequest, conn: UpstreamConnection, idle: float) -> None:
        self.request = request
        self.conn = conn
        self.loop = conn.loop
        self.client = request.transport
        self.upstream = conn.transport
        self.idle = idle
        self.bytes_in = self.bytes_out = 0
        self.last = self.loop.time()
        self.done: asyncio.Future = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._upstream_full = False  # the upstream's transport is over its high-water mark

    def start(self) -> None:
        self.upstream.set_protocol(_UpstreamSide(self))
        tail, self.conn.tunnel_tail = self.conn.tunnel_tail, b""
        if tail:
            self.to_client(tail)
        if self.conn.closed or self.client is None or self.client.is_closing() or \
                getattr(self.request.protocol._manager, "stopping", False):
            # one side went away before the tunnel was up (its tail delivered), or the
            # gateway is stopping (ProxyServer.pre_shutdown closed the tunnels open then)
            self.end()
            return
        take_over(self.request, _ClientFeed(self), self)  # the client's early bytes go now
        # A side whose buffer those first writes filled paused before this tunnel took the
        # connection over, so the pause reached no tunnel: the other side stays unread until
        # it drains (client_resumed, upstream_resumed), or nothing bounded what keygate held
        if self._upstream_full:
            self.client.pause_reading()  # (aiohttp's set_parser may have resumed it)
        if not self.request.protocol.writing_paused:
            self.upstream.resume_reading()
        self._timer = self.loop.call_at(self.last + self.idle, self._idle_check)

    # -- relaying --
    def to_client(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.last = self.loop.time()
        self.client.write(data)

    def to_upstream(self, data: bytes) -> None:
        if self.done.done():
            return
        self.bytes_in += len(data)
        self.last = self.loop.time()
        self.upstream.write(data)

    # backpressure: the side that cannot take more stops the other side's reads
    def client_paused(self) -> None:
        self.upstream.pause_reading()

    def client_resumed(self) -> None:
        if not self.done.done():
            self.upstream.resume_reading()

    def upstream_paused(self) -> None:
        self._upstream_full = True
        if self.client is not None:
            self.client.pause_reading()

    def upstream_resumed(self) -> None:
        self._upstream_full = False
        if self.client is not None and not self.done.done():
            self.client.resume_reading()

    # -- the end --
    def _idle_check(self) -> None:
        self._timer = None
        if self.done.done():
            return
        if self.loop.time() - self.last >= self.idle:
            log.info("a WebSocket tunnel was idle for %g s; closed", self.idle)
            self.end()
        else:
            self._timer = self.loop.call_at(self.last + self.idle, self._idle_check)

    def end(self) -> None:
        """Close both sides (what either has buffered is still written) and free the upstream
        connection's slot once that connection has closed. Idempotent."""
        if self.done.done():
            return
        self.done.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        conn.closed = True
        if self.client is not None:
            self.client.close()
        upstream = self.upstream
        if not upstream.is_closing():
            # an upstream that never reads what is still buffered for it is cut off later
            pending = upstream.get_write_buffer_size()
            upstream.close()
            if pending:
                # open until then, it keeps its place under the upstream's max_connections
                # (freed by _UpstreamSide.connection_lost): given back now, abandoned tunnels
                # held connections to the upstream beyond that bound
                self.loop.call_later(self.idle, upstream.abort)
                return
        conn.pool.forget(conn)


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection's protocol once it switched (it was the pool's parser)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.to_client(data)

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost ends the tunnel

    def connection_lost(self, exc) -> None:
        tunnel = self.tunnel
        tunnel.end()
        tunnel.conn.pool.forget(tunnel.conn)  # (once a slot is held: forget is idempotent)

    def pause_writing(self) -> None:
        self.tunnel.upstream_paused()

    def resume_writing(self) -> None:
        self.tunnel.upstream_resumed()


class _ClientFeed:
    """Seated where aiohttp feeds a WebSocket's frames (``RequestHandler.set_parser``): what
    the client sends goes upstream as is."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.tunnel.to_upstream(data)
        return False, b""

    def feed_eof(self) -> None:
        self.tunnel.end()


class TunnelWatch:
    """The open tunnels, and the check that closes them once they would no longer be let
    through: every ``every`` seconds, each tunnel's route as the config reads now
    (``route_now``: a reload that changed or removed it closes the tunnel), then, for keyed
    handshakes, one store round trip per key, route scopes and client address with tunnels
    open (``still_allowed``: the pipeline's state check, counting nothing): a key revoked,
    expired, disabled, re-scoped or whose address is no longer allowed closes them, as does a
    reload that no longer accepts their token's prefix or environment. A store that cannot
    answer leaves them open (the next check decides)."""

    def __init__(self, still_allowed: Callable[[object, tuple[str, ...], str, tuple[str, str]],
                                               Awaitable[object | None]],
                 route_now: Callable[[str], object],
                 every: float = RECHECK_EVERY) -> None:
        self.still_allowed = still_allowed  # the key as confirmed, or None: refused now
        self.route_now = route_now  # the route a handshake on this path matches now, or None
        self.every = every
        # (key id, scopes, client, the token's (prefix, environment)) →
        # [key, {tunnel: (raw path, route)}]; key None: public
        self._open: dict[tuple, list] = {}
        self._task: asyncio.Task | None = None
        self._changed: asyncio.Event | None = None  # set when ``every`` changes (a reload)

    def recheck_every(self, every: float) -> None:
        """Check every ``every`` seconds from now on (``server.websocket_recheck``, at start
        and at each reload): a wait already begun is measured again from the last check, so
        a shorter interval acts without waiting out the longer one."""
        if every != self.every:
            self.every = every
            if self._changed is not None:
                self._changed.set()

    def watch(self, key, scopes: tuple[str, ...], client: str, raw_path: str,
              route, token_kind: tuple[str, str] | None = None) -> Callable[[Tunnel], None]:
        group = (None if key is None else key.key_id, scopes, client, token_kind)

        def opened(relay: Tunnel) -> None:
            entry = self._open.get(group)
            if entry is None:
                entry = self._open[group] = [key, {}]
            entry[1][relay] = (raw_path, route)
            relay.done.add_done_callback(lambda _: self._closed(group, relay))
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._run())
        return opened

    def _closed(self, group: tuple, relay: Tunnel) -> None:
        entry = self._open.get(group)
        if entry is not None:
            entry[1].pop(relay, None)
            if not entry[1]:
                del self._open[group]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        changed = self._changed = asyncio.Event()
        checked = loop.time()
        while self._open:
            wait = checked + self.every - loop.time()
            if wait > 0:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue  # (the interval may have changed meanwhile: measured again)
            checked = loop.time()
            keyed = []
            for group, entry in list(self._open.items()):
                for relay, (raw_path, route) in list(entry[1].items()):
                    if self.route_now(raw_path) != route:
                        log.info("closed a WebSocket tunnel on %s: a reload changed its route",
                                 route.path)
                        relay.end()
                if entry[1] and entry[0] is not None:
                    keyed.append((group, entry))
            # the keys' round trips together (the store client pipelines them), a bounded
            # number at a time: one after another, a revoked key's tunnels waited for every
            # key before it (thousands of keys over a store a millisecond away: seconds)
            for at in range(0, len(keyed), CHECKS_AT_ONCE):
                await asyncio.gather(*(self._check(group, entry)
                                       for group, entry in keyed[at:at + CHECKS_AT_ONCE]))

    async def _check(self, group: tuple, entry: list) -> None:
        """One key's tunnels (``entry``): closed if the key no longer allows them."""
        try:
            key = await self.still_allowed(entry[0], group[1], group[2], group[3])
        except Exception:  # a bug: logged, never the end of the watch
            log.exception("checking the key of open WebSocket tunnels failed")
            return
        if key is None:
            log.info("closed %d WebSocket tunnel(s) of key %s: the key no longer allows them",
                     len(entry[1]), group[0])
            for relay in list(entry[1]):
                relay.end()
        else:
            entry[0] = key

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
