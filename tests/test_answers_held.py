"""Answers held for slow clients after their upstream connection went back
(gateway.proxying.connection, UpstreamResponse._whole): the bytes counted against their bound
(``_detached``) are all counted down again, however the clients and the gateway end."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from gateway.config import Route, ServerConfig, Timeouts, Upstream
from harness import eventually, gateway_under_test, make_config, serving

PIECE, PIECES = b"z" * 8192, 25
BIG = len(PIECE) * PIECES


async def _answer(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    small = request.path == "/public/small"
    resp.content_length = 2 if small else BIG
    await resp.prepare(request)
    for _ in range(1 if small else PIECES):  # in pieces: not whole with its head
        await resp.write(b"ok" if small else PIECE)
        await asyncio.sleep(0.002)
    return resp


def _config(url: str, max_connections: int = 4):
    routes = (Route("/public/**", "api", ("GET",), (), True),)
    return make_config(url, routes=routes, server=ServerConfig(
        host="127.0.0.1", timeouts=Timeouts(header=5.0, body=3.0, idle=15.0)),
        upstreams={"api": Upstream("api", url, 2.0, max_connections=max_connections)})


async def _raw_client(loop, g, requests: bytes) -> socket.socket:
    """A raw client with 4 KiB buffers on both sides that sends ``requests`` and reads
    nothing: its answers' tails stay in keygate."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    server = g.gw.proxy_server
    before = set(server.connections)
    await loop.sock_connect(sock, ("127.0.0.1", g.proxy_server.port))
    assert await eventually(lambda: set(server.connections) - before, 5)
    [handler] = set(server.connections) - before
    handler.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await loop.sock_sendall(sock, requests)
    return sock


async def _read_all(loop, sock, answers: int) -> bytes:
    got = bytearray()
    async with asyncio.timeout(20):
        while got.count(b"HTTP/1.1 200 ") < answers or len(got) < answers * BIG:
            chunk = await loop.sock_recv(sock, 1 << 20)
            if not chunk:
                break
            got += chunk
    return bytes(got)


_BIG_REQ = b"GET /public/big HTTP/1.1\r\nHost: g\r\n\r\n"


async def test_held_bytes_settle_to_zero_over_mixed_slow_clients(
        redis_url, monkeypatch):
    """Clients that read their tails whole, pipeline three answers, go away
    before, while and after their tails are handed out, and are cut off by the body timeout:
    once all settled, no byte is still counted."""
    from gateway.proxying import connection
    assert connection._detached == 0
    async with serving(_answer) as url:
        async with gateway_under_test(_config(url), redis_url, monkeypatch) as g:
            loop = asyncio.get_running_loop()
            # 1. pipelined keep-alive client, reads nothing, then reads all three answers
            a = await _raw_client(loop, g, _BIG_REQ * 3)
            # 2. one that goes away before reading anything (a reset: unread bytes)
            b = await _raw_client(loop, g, _BIG_REQ * 2)
            # 3. one that reads a bit, then goes away mid-tail
            c = await _raw_client(loop, g, _BIG_REQ)
            # 4. one that never reads: cut off by the body timeout (3 s)
            d = await _raw_client(loop, g, _BIG_REQ * 2)
            assert await eventually(lambda: connection._detached > 0)
            await asyncio.sleep(0.5)
            b.close()
            await loop.sock_recv(c, 30000)
            await asyncio.sleep(0.2)
            c.close()
            got = await _read_all(loop, a, 3)
            assert got.count(b"HTTP/1.1 200 ") == 3, got[:200]
            a.close()
            await asyncio.sleep(4.5)  # d cut off by the write-stall timer
            d.close()
            assert await eventually(lambda: connection._detached == 0, 5), \
                connection._detached


async def test_held_bytes_settle_to_zero_after_a_stop_with_tails_held(
        redis_url, monkeypatch):
    """The gateway stopped (its listener closed, connections shut) while
    slow clients' tails are held: nothing stays counted afterwards."""
    from gateway.proxying import connection
    assert connection._detached == 0
    socks = []
    async with serving(_answer) as url:
        async with gateway_under_test(_config(url), redis_url, monkeypatch) as g:
            loop = asyncio.get_running_loop()
            for _ in range(3):
                socks.append(await _raw_client(loop, g, _BIG_REQ * 2))
            assert await eventually(lambda: connection._detached > 0)
            await asyncio.sleep(0.3)
        try:
            assert await eventually(lambda: connection._detached == 0, 8), \
                connection._detached
        finally:
            for s in socks:
                s.close()
