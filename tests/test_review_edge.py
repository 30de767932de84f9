"""Review of keygate's edge (r-edge): defects found by an adversarial pass over the proxy
listener, each proven here against a real gateway (real redis-server, a raw-socket upstream
that logs every byte it receives, a raw-socket client). Each test fails on the code reviewed
for the reason its docstring gives.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.config import Route

from harness import gateway_under_test, make_config
from test_edge_framing import RawUpstream


ROUTES = (Route("/public/**", "api", ("GET", "POST"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)))


@pytest.fixture
async def gw(redis_url, monkeypatch):
    up = await RawUpstream().start()
    config = make_config(f"http://127.0.0.1:{up.port}", routes=ROUTES)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        g.token, _ = await g.key(scopes=["people:read"])
        g.up = up
        yield g
    up.close()


def head(method: str, target: str, *lines: str, version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join((f"{method} {target} {version}", "Host: gateway", *lines))
            + "\r\n\r\n").encode()


async def one_segment(g, payload: bytes, wait: float = 3.0) -> bytes:
    """Send ``payload`` in one write (one TCP segment on loopback, so one read at the
    gateway), then read until the gateway closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", g.proxy_server.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = bytearray()
    try:
        writer.write(payload)
        await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except (asyncio.TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
    finally:
        writer.close()
    return bytes(out)


def seen_targets(g) -> list[bytes]:
    return [r.target for r in g.up.requests]


# --- 2. A request waiting for an upstream connection is passed by later ones -------------------
#
# upstreams.NAME.max_connections: "requests over it wait, within the timeout" (SPEC, Edge
# hardening). A connection coming free (UpstreamPool.take_back, upstream.py) is put back idle
# and the longest waiter is only woken (_wake_one): any request that reaches _checkout before
# the woken one runs (one made ready in the same turn of the loop: its head read, its key's
# store call answered) finds the connection idle and takes it. The woken waiter then finds
# none and queues again at the back (_checkout makes a new waiter, appended), however long it
# had waited. Under steady load at the bound the requests that waited longest are the ones
# answered 504 upstream_timeout, while later ones are served. (Upload slots are handed over to
# the longest waiter as they come free, "so no waiter may ever take a slot while it is free":
# the connections themselves are not.)


async def test_a_request_waiting_for_an_upstream_connection_is_not_passed_by_later_ones():
    """max_connections 1, connect timeout (the wait for a connection) 1 s. One request holds
    the connection; a second waits for it. Then, each time the connection comes free, a
    later request is already about to run (ready in the same turn of the loop, as under
    load): it takes the connection ahead of the one that has been waiting. The waiting
    request is never served and fails with UpstreamUnreached (504 ``upstream_timeout`` at
    the gateway) after its second, while a dozen requests that came after it were served.

    Expected: the request that waited gets the first connection to come free (FIFO, as the
    upload slots are handed over), and is answered."""
    from aiohttp import web

    from gateway.proxying.upstream import UpstreamPool
    from harness import serving

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def head(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: upstream".encode()

    async def whole(resp) -> None:
        while not resp._conn.complete:  # the tiny answer's body: here within a few ms
            await asyncio.sleep(0.005)

    async with serving(handler) as url:
        pool = UpstreamPool(url, connect_timeout=1.0, max_connections=1)
        loop = asyncio.get_running_loop()
        try:
            held = await pool.request(head("/first"), timeout=5.0)
            await whole(held)
            waiting = asyncio.ensure_future(pool.request(head("/waiting"), timeout=5.0))
            await asyncio.sleep(0.05)  # it waits for the one connection
            assert not waiting.done()
            later_served = 0
            end = loop.time() + 2.0
            while not waiting.done() and loop.time() < end:
                # a later request, ready to run in this turn of the loop...
                later = asyncio.ensure_future(pool.request(head("/later"), timeout=5.0))
                # ...as the answer under way ends and its connection comes free
                assert held.body_if_complete() == b"ok"
                held = await later
                await whole(held)
                later_served += 1
                await asyncio.sleep(0.1)
            held.body_if_complete()
            outcome = await asyncio.gather(waiting, return_exceptions=True)
            assert not isinstance(outcome[0], BaseException), \
                f"the request that waited first failed ({outcome[0]!r}) while " \
                f"{later_served} requests that came after it were served"
            assert later_served <= 1
        finally:
            await pool.close()
