"""An upstream host that vanishes (power loss, a cut cable: no FIN, no RST) while keygate
relays a WebSocket tunnel to it, streams its answer or sends it a request body is found so
within ``server.timeouts.body``: the client's connection is ended, the upstream connection's
slot and the client's place under ``server.max_connections`` come free.

The upstream runs in a network namespace of its own and vanishes when the test takes its end
of the link down (tests/vanishing.py); keygate and the client run on this side, the client on
loopback. Its client sends a few bytes every 0.2 s (a WebSocket ping, a trickled upload): too
few to fill keygate's send buffer (the write stall timer never starts), and each resets the
tunnel's idle timer. Without a TCP user timeout and keep-alive probes on the upstream socket
such a tunnel or upload lived until TCP gave up retransmitting (~15 minutes), and a streamed
answer whose upstream went quiet after its head until the upstream's ``timeout`` (20 s here,
as long as a stream of events needs). The bound is the larger of ``server.timeouts.body``
and the upstream's ``timeout``: a live upstream that reads nothing (a zero window) is
allowed its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

import test_tls_upstream
from gateway.config import Route, ServerConfig, Timeouts, Upstream
from harness import eventually, gateway_under_test, make_config
from vanishing import needs_vanish, vanishing_link

BODY = 2.0  # server.timeouts.body under test
UPSTREAM_TIMEOUT = 3.0  # the upstream's timeout: a gap in a streamed answer this long ends it
VANISH = max(BODY, UPSTREAM_TIMEOUT)  # an upstream acknowledging nothing this long is gone
BOUND = VANISH + 4.0  # the connection must be gone by then (TCP's own give-up is ~15 minutes)

private_ca = test_tls_upstream.private_ca  # (a fixture)

# The upstream, in the namespace: a WebSocket handshake is switched (then whatever comes is
# read, nothing sent); a GET gets a chunked answer's head and three chunks, then nothing; a
# POST has its body read as it comes, never answered. It prints the port it listens on, then
# "switched", "streamed" or "reading" once it is there.
UPSTREAM = r"""
import base64, hashlib, socket, sys, threading, time
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        more = conn.recv(4096)
        if not more:
            return
        head += more
    lines = head.split(b"\r\n")
    fields = dict(l.split(b":", 1) for l in lines[1:] if b":" in l)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    if fields.get(b"upgrade", b"").lower() == b"websocket":
        accept = base64.b64encode(hashlib.sha1(
            fields[b"sec-websocket-key"] + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        print("switched", flush=True)
    elif lines[0].startswith(b"GET "):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            conn.sendall(b"b\r\ndata: tick\n\r\n")
            time.sleep(0.05)
        print("streamed", flush=True)
    else:
        print("reading", flush=True)
    while conn.recv(65536):
        pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

WS_HANDSHAKE = ("GET /open/feed HTTP/1.1|Host: g|Upgrade: websocket|Connection: Upgrade|"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==|Sec-WebSocket-Version: 13||")
STREAM_REQUEST = "GET /open/stream HTTP/1.1|Host: g|Accept: text/event-stream||"
UPLOAD_REQUEST = "POST /open/upload HTTP/1.1|Host: g|Transfer-Encoding: chunked||"
PING = bytes([0x89, 0x80]) + os.urandom(4)  # a masked WebSocket ping, no payload (RFC 6455)
CHUNK = b"1\r\nx\r\n"  # one byte of a chunked upload
CASES = pytest.mark.parametrize("request_text", [WS_HANDSHAKE, STREAM_REQUEST, UPLOAD_REQUEST],
                                ids=["websocket-tunnel", "streamed-answer", "trickled-upload"])


def _config(upstream_url: str):
    config = make_config(upstream_url, server=ServerConfig(
        host="127.0.0.1", access_log="json",
        timeouts=Timeouts(header=5.0, body=BODY, idle=30.0)),
        routes=(Route("/open/**", "api", ("GET", "POST"), (), True, websocket=True),))
    return dataclasses.replace(config, upstreams={
        "api": Upstream("api", upstream_url, UPSTREAM_TIMEOUT)})


@contextlib.asynccontextmanager
async def connected_client(redis_url, monkeypatch, request_text: str):
    """keygate, its upstream in a namespace and a client on loopback whose request reached the
    upstream (a tunnel switched, an answer's head and chunks relayed, an upload begun), its
    client sending a few bytes every 0.2 s (pings, the upload's bytes) while ``sending`` is
    set: (gateway, make the upstream vanish, the client's reader, ``sending``)."""
    with vanishing_link() as (_, address, ns, vanish):
        upstream = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-c", UPSTREAM, address,
            stdout=subprocess.PIPE)
        sender = None
        try:
            port = int(await asyncio.wait_for(upstream.stdout.readline(), 10))
            async with gateway_under_test(_config(f"http://{address}:{port}"), redis_url,
                                          monkeypatch) as g:
                reader, writer = await g.raw_connection()
                writer.write(request_text.replace("|", "\r\n").encode())
                there = await asyncio.wait_for(upstream.stdout.readline(), 10)
                assert there.strip() in (b"switched", b"streamed", b"reading"), there
                if request_text is not UPLOAD_REQUEST:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.split()[1] in (b"101", b"200"), head
                if request_text is STREAM_REQUEST:
                    got = b""
                    while got.count(b"data: tick") < 3:
                        got += await asyncio.wait_for(reader.read(4096), 5)
                sending = asyncio.Event()
                sending.set()

                async def send() -> None:
                    while True:
                        await asyncio.sleep(0.2)
                        if sending.is_set() and request_text is not STREAM_REQUEST:
                            writer.write(PING if request_text is WS_HANDSHAKE else CHUNK)

                sender = asyncio.ensure_future(send())
                try:
                    yield g, vanish, reader, sending
                finally:
                    sender.cancel()
                    writer.close()
        finally:
            upstream.kill()
            await upstream.wait()


async def _ended(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float | None]:
    """What the client read until its connection ended (None: still open ``within`` s on)."""
    got, start = b"", time.monotonic()
    try:
        async with asyncio.timeout(within):
            while more := await reader.read(65536):
                got += more
    except TimeoutError:
        return got, None
    except ConnectionError:
        pass
    return got, time.monotonic() - start


@needs_vanish
@CASES
async def test_a_vanished_upstream_is_dropped_within_the_body_timeout(
        redis_url, monkeypatch, capfd, request_text):
    """Tunnel and upload: keygate's bytes to the upstream go unacknowledged; streamed
    answer: nothing moves, and the keep-alive probes go unanswered. The client's connection
    is ended (a tunnel closed, as keygate relays its frames and writes none of its own: the
    client's WebSocket sees 1006, abnormal closure, and reconnects; an answer cut off, never
    ended as if complete; an upload answered 502), and the upstream connection's slot and
    the client's connection are given back."""
    async with connected_client(redis_url, monkeypatch, request_text) as (
            g, vanish, reader, _):
        g.logs(capfd)
        vanish()
        got, held = await _ended(reader, BOUND + 6)
        assert held is not None, \
            f"the client's connection still open {BOUND + 6:g} s after its upstream vanished"
        assert held <= BOUND, f"the client's connection ended {held:.1f} s after its upstream vanished"
        if request_text is WS_HANDSHAKE:
            assert got == b""  # nothing of keygate's in the tunnel
        elif request_text is STREAM_REQUEST:
            assert not got.endswith(b"0\r\n\r\n"), got  # cut off: never a complete answer
        else:
            assert got.startswith(b"HTTP/1.1 502 "), got
            assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == \
                "upstream_unavailable"
        pool = g.gw.pipeline.forwarder._pools["api"][0]
        await eventually(lambda: not pool.active and pool.opened == 0)
        assert not pool.active and pool.opened == 0  # its slot of max_connections
        await eventually(lambda: not g.gw.proxy_server.connections)
        assert not g.gw.proxy_server.connections  # the client's place under max_connections
        _, err = g.logs(capfd)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
    assert [line["path"] for line in lines] == [request_text.split()[1]]
    if request_text is STREAM_REQUEST:  # its gap meets the upstream's timeout as well
        assert lines[0]["error"] in ("upstream_unavailable", "upstream_timeout"), lines[0]
    elif request_text is not WS_HANDSHAKE:  # (a tunnel's end is no error: 101, as logged)
        assert lines[0]["error"] == "upstream_unavailable", lines[0]


@needs_vanish
@CASES
async def test_a_quiet_upstream_that_is_still_there_is_kept(redis_url, monkeypatch,
                                                          request_text):
    """The probes that find a vanished upstream are answered by a live one that sends
    nothing: a tunnel whose upstream never answers the client's pings, an answer whose
    upstream is quiet after its first chunks (within its timeout), an upload it reads without
    answering stay open past server.timeouts.body; and a tunnel whose client stopped pinging
    too (nothing moves either way: keep-alive probes only)."""
    async with connected_client(redis_url, monkeypatch, request_text) as (
            g, _, reader, sending):
        # quiet past the first keep-alive probe (after VANISH / 2), within the upstream's
        # timeout (a streamed answer's gap that long ends it, as it should)
        got, held = await _ended(reader, (UPSTREAM_TIMEOUT - 0.4) / 2)
        if request_text is WS_HANDSHAKE:  # (an upload that stops is the client's 408)
            sending.clear()
        more, held_too = await _ended(reader, (UPSTREAM_TIMEOUT - 0.4) / 2)
        assert held is None and held_too is None, "a live, quiet upstream was dropped"
        assert got + more == b""
        pool = g.gw.pipeline.forwarder._pools["api"][0]
        assert len(pool.active) == 1 and len(g.gw.proxy_server.connections) == 1


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_upstream_connections_carry_the_user_timeout_and_keepalive(
        redis_url, monkeypatch, private_ca, scheme):
    """Without root: each connection keygate opens to an upstream, plain or TLS, has the
    options set once, as it connects (a pooled connection keeps them for every request it
    serves). server.timeouts.body 2 s, the upstream's timeout 3 s: user timeout 3000 ms (the
    larger), first probe after 2 s, then every second."""
    context = None
    if scheme == "https":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(private_ca["cert"], private_ca["key"])

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        config = _config(f"{scheme}://localhost:{port}")
        if scheme == "https":
            config = dataclasses.replace(config, upstreams={"api": dataclasses.replace(
                config.upstreams["api"], ca_file=str(private_ca["ca"]))})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            for _ in range(2):  # the second on the pooled connection
                async with g.proxy.get("/open/hello") as r:
                    assert r.status == 200 and await r.text() == "hello"
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            conn, = pool.idle
            assert (conn.transport.get_extra_info("sslcontext") is not None) == \
                (scheme == "https")
            sock = conn.transport.get_extra_info("socket")
            tcp = socket.IPPROTO_TCP
            assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 3000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(tcp, socket.TCP_KEEPIDLE) == 2
            assert sock.getsockopt(tcp, socket.TCP_KEEPINTVL) == 1
    finally:
        await runner.cleanup()


def _threaded_upstream(serve) -> tuple[socket.socket, str]:
    """A plain-socket upstream on loopback with a small receive buffer (its window closes
    soon when it stops reading), each connection handled by ``serve(conn)`` in a thread of
    its own. Returns (server socket, url)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def _read_head(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """A request's head and what came after it in the same reads; None: the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _slow_reader(pause: float, got: list):
    """A plain-socket upstream on loopback with a small receive buffer: it reads a request's
    head, then reads nothing for ``pause`` seconds (its window closes: it is busy, not gone;
    its kernel answers every zero-window probe), then reads the whole body and answers 200
    with the number of bytes it read. Returns (server socket, url)."""
    def serve(conn: socket.socket) -> None:
        with conn:
            if (read := _read_head(conn)) is None:
                return
            head, body = read
            length = int([line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")][0])
            time.sleep(pause)
            n = len(body)
            try:
                while n < length:
                    more = conn.recv(1 << 20)
                    if not more:
                        break
                    n += len(more)
            except OSError:
                pass
            got.append(n)
            answer = str(n).encode()
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
            except OSError:
                pass

    return _threaded_upstream(serve)


async def test_a_live_upstream_that_pauses_reading_an_upload_is_not_dropped_as_vanished(
        redis_url, monkeypatch):
    """docs/configuration.md (upstreams.timeout): keygate waits the upstream's ``timeout``
    "for the upstream to read more of the request body" (then 504); docs/operations.md
    (Vanished upstreams): a live upstream is kept; only one that acknowledged nothing is
    dropped.
    An upstream (timeout 30 s) that stops reading a 32 MB upload for 5 s, busy, answers every
    zero-window probe: it is alive. But TCP_USER_TIMEOUT (server.timeouts.body, 2 s here)
    also aborts a connection whose data stays untransmitted for a zero window that long
    (tcp(7)): set to timeouts.body alone, keygate's kernel killed the connection after 2 s
    and the upload was answered 502 upstream_unavailable, not the upstream's 200. It is the
    larger of timeouts.body and the upstream's timeout now. (No root needed: loopback.)"""
    got: list[int] = []
    size = 32 << 20
    srv, url = _slow_reader(5.0, got)
    try:
        config = make_config(
            url, server=ServerConfig(host="127.0.0.1", access_log="json",
                                     max_body_bytes=64 << 20,
                                     timeouts=Timeouts(header=5.0, body=2.0, idle=30.0)),
            routes=(Route("/open/**", "api", ("POST",), (), True),))
        config = dataclasses.replace(config, upstreams={"api": Upstream("api", url, 30.0)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            async with g.proxy.post("/open/upload", data=b"x" * size) as r:
                body = await r.read()
                assert (r.status, body) == (200, str(size).encode()), (r.status, body[:300])
    finally:
        srv.close()


def _slow_ws_upstream(pause: float, total: int):
    """A WebSocket upstream on loopback with a small receive buffer: it switches the
    handshake, reads nothing for ``pause`` seconds (busy: its kernel answers every
    zero-window probe), then reads ``total`` bytes of frames and sends a text frame 'done'."""
    import base64
    import hashlib

    def serve(conn: socket.socket) -> None:
        with conn:
            if (read := _read_head(conn)) is None:
                return
            head, rest = read
            fields = {k.strip().lower(): v.strip() for k, v in
                      (line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)}
            accept = base64.b64encode(hashlib.sha1(
                fields[b"sec-websocket-key"] + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            time.sleep(pause)
            n = len(rest)
            try:
                while n < total:
                    more = conn.recv(1 << 20)
                    if not more:
                        return
                    n += len(more)
                conn.sendall(b"\x81\x04done")
                time.sleep(1)
            except OSError:
                return

    return _threaded_upstream(serve)


async def test_a_live_websocket_upstream_that_pauses_reading_keeps_its_tunnel(
        redis_url, monkeypatch):
    """The same kill on a WebSocket tunnel, where no upstream timeout applies at all:
    docs/websocket.md says a tunnel is closed when its upstream's host vanishes ("once it has
    acknowledged nothing for server.timeouts.body seconds"), or after timeouts.idle with no
    byte either way. An upstream application that consumes the client's frames slowly (it
    stops reading for 5 s; its kernel answers every probe) is alive, and bytes move; but
    the TCP user timeout, set to timeouts.body (2 s) alone, aborted the upstream connection
    on the zero window, and the tunnel was closed under the client (no 'done' frame: 1006).
    The upstream's timeout (30 s) bounds such a pause now, as it bounds an upload's."""
    frame = 1 << 20
    count = 24
    total = count * (frame + 14)  # each: FIN+binary, 127 + 8-byte length, 4-byte mask, body
    srv, url = _slow_ws_upstream(5.0, total)
    try:
        config = make_config(
            url, server=ServerConfig(host="127.0.0.1", access_log="json",
                                     timeouts=Timeouts(header=5.0, body=2.0, idle=30.0)),
            routes=(Route("/open/**", "api", ("GET",), (), True, websocket=True),))
        config = dataclasses.replace(config, upstreams={"api": Upstream("api", url, 30.0)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            reader, writer = await g.raw_connection()
            writer.write(b"GET /open/feed HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.split()[1] == b"101", head
            body = b"\x00" * frame  # masked with a zero mask: the payload as is
            one = b"\x82\x7f" + frame.to_bytes(8, "big")
            one = bytes([one[0], one[1] | 0x80]) + one[2:] + b"\x00\x00\x00\x00" + body
            for _ in range(count):
                writer.write(one)
            sending = asyncio.ensure_future(writer.drain())
            try:
                got = await asyncio.wait_for(reader.read(64), 20)
            except ConnectionError as exc:  # the tunnel aborted under the client
                got = repr(exc)
            finally:
                sending.cancel()
                writer.transport.abort()
            assert got == b"\x81\x04done", got
    finally:
        srv.close()
