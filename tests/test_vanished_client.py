"""A client whose machine vanishes (power loss, a cut cable: no FIN, no RST) while keygate
streams it an answer or relays its WebSocket tunnel is dropped within ``server.timeouts.body``,
and the upstream connection it held with it.

The client runs in a network namespace of its own and vanishes when the test takes its end of
the link down (tests/vanishing.py). keygate runs its real listeners (``start_listeners``) on the
other end; the upstream is a real aiohttp server on loopback that keeps sending a few bytes
every 0.2 s, so keygate's send buffer never fills and the tunnel is never idle. Without a TCP
user timeout, such a connection lived until TCP gave up retransmitting (~15 minutes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import time

import pytest
from aiohttp import web

from conftest import free_port
from gateway.app import running_gateway, start_listeners, stop_listeners
from gateway.config import Route, ServerConfig, Timeouts, Upstream

from harness import (ADMIN_TOKEN, bearer, eventually, gateway_under_test, make_config, raw_upstream,
                     serving)
from vanishing import needs_vanish, vanishing_link

BODY = 2.0  # server.timeouts.body under test
BOUND = BODY + 4.0  # the connection must be gone by then (TCP's own give-up is ~15 minutes)


# The client: sends its request, reads until it has seen the upstream's bytes, says so, then
# waits (its machine is about to vanish).
CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode().replace(b"|", b"\r\n"))
got = b""
while b"tick" not in got:
    more = s.recv(4096)
    if not more:
        sys.exit("closed before the upstream's bytes")
    got += more
print(got.split(b"\r\n", 1)[0].decode(), flush=True)
time.sleep(60)
"""

WS_HANDSHAKE = ("GET /open/feed HTTP/1.1|Host: g|Upgrade: websocket|Connection: Upgrade|"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==|Sec-WebSocket-Version: 13||")
STREAM_REQUEST = "GET /open/stream HTTP/1.1|Host: g||"


@contextlib.asynccontextmanager
async def trickling_upstream(ended: list[float], trickle: bool = True):
    """An upstream that sends ``tick`` every 0.2 s (``trickle``; else once, then nothing), on
    a WebSocket (``/open/feed``) or a chunked answer (``/open/stream``), until its connection
    fails or closes; ``ended`` gets the time."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            response: web.StreamResponse = web.WebSocketResponse()
            await response.prepare(request)
            send = response.send_str
        else:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)

            async def send(text: str) -> None:
                await response.write(text.encode())
        try:
            await send("tick")
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.2)
                if trickle:
                    await send("tick")
        except (ConnectionError, RuntimeError):
            pass
        finally:
            ended.append(time.monotonic())
        return response

    async with serving(handler) as url:
        yield url


@contextlib.asynccontextmanager
async def connected_client(redis_url, monkeypatch, request_text: str, ended: list[float], trickle: bool):
    """keygate on its real listeners, its upstream, and a client in a namespace that has sent
    ``request_text`` and seen the upstream's first bytes: (gateway, make the client vanish)."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    with vanishing_link() as (address, _, ns, vanish):
        async with trickling_upstream(ended, trickle) as upstream_url:
            port = free_port()
            config = make_config(upstream_url, server=ServerConfig(
                host=address, port=port, access_log="off",
                timeouts=Timeouts(header=5.0, body=BODY, idle=30.0)),
                routes=(Route("/open/**", "api", ("GET",), (), True, websocket=True),))
            config = dataclasses.replace(config, admin=dataclasses.replace(
                config.admin, port=free_port()), upstreams={
                    "api": Upstream("api", upstream_url, 10.0)})
            async with running_gateway(config, redis_url) as gw:
                runners = await start_listeners(gw)
                client = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address,
                    str(port), request_text, stdout=subprocess.PIPE)
                try:
                    first = await asyncio.wait_for(client.stdout.readline(), 10)
                    assert first.split()[1] in (b"101", b"200"), first
                    assert len(gw.proxy_server.connections) == 1
                    yield gw, vanish
                finally:
                    client.kill()
                    await client.wait()
                    await stop_listeners(runners)


REQUESTS = pytest.mark.parametrize("request_text", [WS_HANDSHAKE, STREAM_REQUEST],
                                   ids=["websocket-tunnel", "streamed-answer"])


@needs_vanish
@pytest.mark.parametrize("request_text, trickle", [
    (WS_HANDSHAKE, True), (STREAM_REQUEST, True), (WS_HANDSHAKE, False), (STREAM_REQUEST, False),
], ids=["websocket-tunnel-trickling", "streamed-answer-trickling", "websocket-tunnel-silent",
        "streamed-answer-silent"])
async def test_a_vanished_client_is_dropped_within_the_body_timeout(redis_url, monkeypatch,
                                                                    request_text, trickle):
    """Trickling: keygate's bytes go unacknowledged; silent: nothing moves (the tunnel would
    have been held until server.timeouts.idle, the answer until the upstream timeout), and the
    keep-alive probes go unanswered."""
    ended: list[float] = []
    async with connected_client(redis_url, monkeypatch, request_text, ended, trickle) as (gw, vanish):
        vanish()
        gone = time.monotonic()
        while not ended and time.monotonic() - gone < BOUND + 6:
            await asyncio.sleep(0.1)
        held = (ended[0] if ended else time.monotonic()) - gone
        print(f"keygate held the vanished client's upstream for {held:.1f} s")
        assert ended, f"the upstream connection still open {held:.0f} s after its client vanished"
        assert held <= BOUND, held
        deadline = time.monotonic() + 2
        while gw.proxy_server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not gw.proxy_server.connections  # its place under server.max_connections


@needs_vanish
@REQUESTS
async def test_a_quiet_client_that_is_still_there_is_kept(redis_url, monkeypatch, request_text):
    """The probes that find a vanished client are answered by a live one that sends nothing
    and is sent nothing: its tunnel or answer stays open past server.timeouts.body."""
    ended: list[float] = []
    async with connected_client(redis_url, monkeypatch, request_text, ended, False) as (gw, _):
        await asyncio.sleep(BOUND)
        assert not ended, "a live, quiet client was dropped"
        assert len(gw.proxy_server.connections) == 1


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
async def test_both_listeners_connections_carry_the_user_timeout_and_keepalive(
        redis_url, monkeypatch):
    """Without root: the options are set once on each listening socket, and every connection
    accepted on it has them (Linux copies them at accept; keygate sets nothing per
    connection). server.timeouts.body 2 s: user timeout 2000 ms, first probe after 1 s."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    config = make_config("http://127.0.0.1:9", server=ServerConfig(
        host="127.0.0.1", port=free_port(), access_log="off",
        timeouts=Timeouts(header=5.0, body=BODY, idle=30.0)))
    config = dataclasses.replace(config, admin=dataclasses.replace(
        config.admin, port=free_port()))
    async with running_gateway(config, redis_url) as gw:
        runners = await start_listeners(gw)
        try:
            for port, server in ((config.server.port, gw.proxy_server),
                                 (config.admin.port, runners[1].server)):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                deadline = time.monotonic() + 5
                while not server.connections and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                accepted = server.connections[0].transport.get_extra_info("socket")
                tcp = socket.IPPROTO_TCP
                assert accepted.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 2000
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(tcp, socket.TCP_KEEPIDLE) == 1
                assert accepted.getsockopt(tcp, socket.TCP_KEEPINTVL) == 1
                writer.close()
        finally:
            await stop_listeners(runners)


async def test_a_client_that_leaves_while_the_upstream_is_silent_frees_it_at_once(
        redis_url, monkeypatch):
    """A client that closes its connection (a FIN: a closed browser tab on a stream of
    events) between two chunks of a streamed answer: the upstream connection is closed then,
    not when the upstream next sends or its timeout (10 s here) runs out."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    ended: list[float] = []
    async with trickling_upstream(ended, trickle=False) as upstream_url:
        config = make_config(upstream_url, server=ServerConfig(
            host="127.0.0.1", port=free_port(), access_log="off",
            timeouts=Timeouts(header=5.0, body=BODY, idle=30.0)),
            routes=(Route("/open/**", "api", ("GET",), (), True),))
        config = dataclasses.replace(config, admin=dataclasses.replace(
            config.admin, port=free_port()), upstreams={
                "api": Upstream("api", upstream_url, 10.0)})
        async with running_gateway(config, redis_url) as gw:
            runners = await start_listeners(gw)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", config.server.port)
                writer.write(STREAM_REQUEST.replace("|", "\r\n").encode())
                got = b""
                while b"tick" not in got:
                    got += await asyncio.wait_for(reader.read(4096), 5)
                writer.close()
                left = time.monotonic()
                while not ended and time.monotonic() - left < 8:
                    await asyncio.sleep(0.05)
                assert ended, "the upstream connection outlived its client by 8 s"
                assert ended[0] - left < 1.0, ended[0] - left
                pools = gw.pipeline.forwarder._pools.values()
                assert all(not pool.active for pool, _, _ in pools)
            finally:
                await stop_listeners(runners)


@contextlib.asynccontextmanager
async def head_delaying_upstream(delay: float):
    """A raw upstream on loopback that answers a request for ``.../slow`` only after
    ``delay`` seconds (any other at once); yields (its URL, its connections' events): for each
    connection, when its first request had arrived whole and when keygate closed it."""
    events: list[dict] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = {"got": None, "closed": None, "answered": 0}
        events.append(seen)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if seen["got"] is None:
                    seen["got"] = time.monotonic()
                if b"/slow " in head.split(b"\r\n", 1)[0]:
                    try:  # keygate closing the connection meanwhile ends the wait
                        await asyncio.wait_for(reader.read(1), delay)
                        break
                    except TimeoutError:
                        pass
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                seen["answered"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            seen["closed"] = time.monotonic()
            writer.close()

    srv, url = await raw_upstream(answer)
    try:
        yield url, events
    finally:
        srv.close()


async def leaves_once_upstream_has_it(writer, events: list) -> None:
    """The client closes 0.2 s after the upstream got its request; the upstream's connection
    must close within 1 s of that (it was held until the upstream's head or timeout)."""
    await eventually(lambda: events and events[0]["got"] is not None)
    await asyncio.sleep(0.2)
    writer.close()
    left = time.monotonic()
    await eventually(lambda: events[0]["closed"] is not None, timeout=8)
    assert events[0]["closed"] is not None, "the upstream connection outlived its client"
    assert events[0]["closed"] - left < 1.0, events[0]["closed"] - left


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_client_that_leaves_before_the_upstream_answers_frees_it_at_once(
        redis_url, monkeypatch, capfd, method):
    """nginx's proxy_ignore_client_abort off: a client that closes its connection while
    keygate waits for the upstream's response head (the upstream takes 5 s) has the
    upstream connection closed then, not held until the head comes or the upstream's
    timeout (10 s) runs out. Logged as the client's doing (400 bad_request, as a client gone
    mid-upload is), counted (the request reached the upstream), and the pool is sane: the
    next request, on a fresh client connection, is answered at once."""
    async with head_delaying_upstream(5.0) as (url, events):
        config = make_config(url, upstreams={"api": Upstream("api", url, 10.0)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(role="editor")
            g.logs(capfd)
            reader, writer = await g.raw_connection()
            body = "|Content-Length: 5||hello" if method == "POST" else "||"
            writer.write(f"{method} /people/slow HTTP/1.1|Host: g|Authorization: Bearer "
                         f"{token}{body}".replace("|", "\r\n").encode())
            await leaves_once_upstream_has_it(writer, events)
            assert events[0]["answered"] == 0
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            await eventually(lambda: not pool.active and not pool.idle)
            assert pool.opened == 0
            async with g.proxy.request(method, "/people/1", headers=bearer(token),
                                       data=b"hello" if method == "POST" else None) as r:
                assert r.status == 200 and await r.read() == b"ok"
            assert len(events) == 2 and not pool.active and len(pool.idle) == 1
            assert await g.used() == 2  # the one the client left stays counted
            _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        assert [(line["path"], line["status"], line["error"]) for line in lines] == [
            ("/people/slow", 400, "bad_request"), ("/people/1", 200, None)]
        assert lines[0]["duration_ms"] < 1500, lines[0]



async def test_a_client_that_leaves_a_websocket_handshake_unanswered_frees_the_upstream(
        redis_url, monkeypatch, capfd):
    """The same for a WebSocket handshake the upstream takes 5 s to answer."""
    async with head_delaying_upstream(5.0) as (url, events):
        config = make_config(url, upstreams={"api": Upstream("api", url, 10.0)},
                             routes=(Route("/open/**", "api", ("GET",), (), True,
                                           websocket=True),))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            g.logs(capfd)
            reader, writer = await g.raw_connection()
            writer.write(WS_HANDSHAKE.replace("/open/feed", "/open/slow")
                         .replace("|", "\r\n").encode())
            await leaves_once_upstream_has_it(writer, events)
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            await eventually(lambda: not pool.active and pool.opened == 0)
            assert not pool.active and pool.opened == 0
            _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        assert [(line["path"], line["status"], line["error"]) for line in lines] == [
            ("/open/slow", 400, "bad_request")]


async def test_a_client_that_leaves_while_waiting_for_a_free_connection_is_never_sent(
        redis_url, monkeypatch, capfd):
    """With the upstream's one connection (max_connections 1) busy for 1 s, a second client
    waits for it and leaves meanwhile: once the connection comes free, its request is not sent
    upstream for nobody (nor counted); the connection stays pooled for the next request."""
    async with head_delaying_upstream(1.0) as (url, events):
        config = make_config(url, upstreams={"api": Upstream("api", url, 10.0,
                                                             max_connections=1)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key()
            g.logs(capfd)
            first = asyncio.ensure_future(g.proxy.get("/people/slow", headers=bearer(token)))
            await eventually(lambda: events and events[0]["got"] is not None)
            reader, writer = await g.raw_connection()
            writer.write(f"GET /people/2 HTTP/1.1|Host: g|Authorization: Bearer {token}||"
                         .replace("|", "\r\n").encode())
            await asyncio.sleep(0.2)
            writer.close()
            async with await first as r:
                assert r.status == 200 and await r.read() == b"ok"
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            await eventually(lambda: not pool.active and len(pool.idle) == 1)
            async with g.proxy.get("/people/3", headers=bearer(token)) as r:
                assert r.status == 200 and await r.read() == b"ok"
            assert len(events) == 1 and events[0]["answered"] == 2  # /people/2 never went
            assert await g.used() == 2
            _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        assert sorted((line["path"], line["status"], line["error"]) for line in lines) == [
            ("/people/2", 400, "bad_request"), ("/people/3", 200, None),
            ("/people/slow", 200, None)]


async def test_a_client_that_leaves_mid_upload_to_an_upstream_not_reading_frees_it_at_once(
        redis_url, monkeypatch, capfd):
    """An upload the upstream stopped reading (its buffers full: keygate waits to write the
    next bytes, not for the client's) and whose client then leaves: the upstream connection
    is closed then, not once the upstream's timeout (10 s) says it stopped reading; logged
    as a body cut short (400 bad_request), not counted (nothing whole went upstream)."""
    got: list[float] = []

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.append(time.monotonic())
        await asyncio.sleep(12)  # reads no byte of the body
        writer.close()

    srv, url = await raw_upstream(stalling)
    try:
        size = 64 * 1024 * 1024
        config = make_config(url, upstreams={"api": Upstream("api", url, 10.0)})
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, max_body_bytes=size))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(role="editor")
            g.logs(capfd)
            reader, writer = await g.raw_connection()
            writer.write(f"POST /people/stall HTTP/1.1|Host: g|Authorization: Bearer {token}|"
                         f"Content-Length: {size}||".replace("|", "\r\n").encode())
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            # the body in steps, until keygate waits to write to the upstream: the rest stays
            # in keygate's buffer of the client's body, under its high-water mark (keygate
            # still reads the client, and so sees it leave)
            conn = None
            for _ in range(size // 32768):
                writer.write(bytes(32768))
                await writer.drain()
                await asyncio.sleep(0.005)
                if got and pool.active:
                    conn = next(iter(pool.active))
                    if conn.write_ok is not None:
                        break
            assert conn is not None and conn.write_ok is not None, \
                "the upstream's buffers never filled"
            await asyncio.sleep(0.2)
            assert conn.write_ok is not None
            handler, = g.gw.proxy_server.connections
            assert not handler._reading_paused
            writer.transport.abort()
            left = time.monotonic()
            await eventually(lambda: conn.closed, timeout=8)
            assert conn.closed, "the upstream connection outlived its client"
            assert time.monotonic() - left < 1.0
            await eventually(lambda: pool.opened == 0 and not pool.active)
            assert await g.used() == 0
            _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        assert [(line["path"], line["status"], line["error"]) for line in lines] == [
            ("/people/stall", 400, "bad_request")]
    finally:
        srv.close()
