"""A lingering close: when keygate refuses a request and closes its connection while the client
is still sending, the client still gets the answer (and the answers before it), then EOF.

Closing a socket with unread bytes in its receive buffer, or receiving bytes after the close,
makes the kernel send RST, and a RST makes the client's kernel drop what it had not read yet:
the JSON refusal, or the 200 of a pipelined request already forwarded and counted. keygate
half-closes instead (its answer, then FIN), reads and discards what the client still sends for
a bounded time, then closes (nginx's lingering_close). Raw sockets on loopback, a real gateway,
a real Redis and a real upstream.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.config import Route, ServerConfig, Timeouts
from gateway.proxying import server as proxy_server

from harness import eventually, gateway_under_test, make_config
from harness import raw_connect as connect, raw_read_to_end as read_to_end
from harness import raw_send_all as send_all, raw_send_refused, raw_statuses as statuses

# the bounds (read here so that this file still runs, and fails, on code without them)
LINGER_TIME = getattr(proxy_server, "LINGER_TIME", 2.0)
LINGER_IDLE = getattr(proxy_server, "LINGER_IDLE", 0.5)

ROUTES = (Route("/public/**", "api", ("GET", "POST"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)))


def config_for(upstream_url: str, **server) -> object:
    server.setdefault("timeouts", Timeouts(header=5.0, body=5.0, idle=5.0))
    return make_config(upstream_url, routes=ROUTES,
                       server=ServerConfig(host="127.0.0.1", **server))


def whole_json_error(answer: bytes, status: bytes, code: bytes) -> bool:
    """The last answer in ``answer`` is ``status`` with its whole JSON body naming ``code``."""
    at = max(answer.rfind(b"HTTP/1.1 " + status + b" "), answer.rfind(b"HTTP/1.0 " + status))
    if at < 0:
        return False
    head, _, body = answer[at:].partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return len(body) == length and code in body and body.endswith(b"}")


async def test_a_body_refused_early_is_answered_whole_while_the_client_is_still_sending(
        redis_url, upstream, monkeypatch):
    """A 1 MB body declared over server.max_body_bytes is refused 413 before it is read: the
    client, still writing it, then reads the whole JSON 413 and EOF (it got a reset)."""
    config = config_for(str(upstream.make_url("")), max_body_bytes=1000)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        body = b"x" * 1_000_000
        for attempt in range(3):
            sock = await connect(g.proxy_server.port)
            try:
                head = (b"POST /people/x HTTP/1.1\r\nHost: g\r\n%s\r\nContent-Length: %d\r\n"
                        b"\r\n" % (b"Authorization: Bearer " + token.encode(), len(body)))
                sent, answer, end = await raw_send_refused(sock, head, body)
            finally:
                sock.close()
            assert (sent, end) == (True, "eof"), (attempt, sent, end, answer[:300])
            assert statuses(answer) == [b"413"], answer[:300]
            assert whole_json_error(answer, b"413", b'"body_too_large"'), answer
        assert await g.used() == 0
        assert upstream.requests == []


async def test_earlier_pipelined_answers_survive_a_refusal_while_the_client_still_sends(
        redis_url, upstream, monkeypatch):
    """Two GETs, then a request with a bare-LF header, pipelined: keygate forwards and counts
    both GETs, refuses the third 400 and closes. More pipelined requests, written later,
    arrive after that close. The client reads both 200s, the 400 and EOF;
    before, the reset the late bytes drew dropped them (the 200s counted all the same)."""
    config = config_for(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        token, _ = await g.key(scopes=["people:read"])
        auth = b"Authorization: Bearer " + token.encode()
        stream = (b"GET /people/1 HTTP/1.1\r\nHost: g\r\n%s\r\n\r\n"
                  b"GET /people/2 HTTP/1.1\r\nHost: g\r\n%s\r\n\r\n"
                  b"GET /people/3 HTTP/1.1\r\nHost: g\r\nX-Bad: y\nX-More: z\r\n\r\n" % (auth, auth))
        bad = stream.index(b"GET /people/3")
        for attempt in range(3):
            before = await g.used()
            sock = await connect(g.proxy_server.port)
            try:
                counted = g.gw.proxy_server.requests_count
                await send_all(sock, stream[:bad])  # (a read the parser refuses is
                assert await eventually(              # refused whole)
                    lambda: g.gw.proxy_server.requests_count - counted == 2, 5)
                await send_all(sock, stream[bad:])
                assert await eventually(
                    lambda: g.gw.proxy_server.requests_count - counted == 3, 5)
                await asyncio.sleep(0.1)  # keygate has answered all three and closed
                await send_all(sock, b"GET /people/4 HTTP/1.1\r\nHost: g\r\n%s\r\n\r\n"
                                     % auth * 200)
                answer, end = await read_to_end(sock)
            finally:
                sock.close()
            assert await g.used() - before == 2
            assert (end, statuses(answer)) == ("eof", [b"200", b"200", b"400"]), \
                (attempt, end, answer)
            assert whole_json_error(answer, b"400", b'"bad_request"'), answer


async def test_a_client_that_keeps_sending_is_cut_off_after_the_lingering_bound(
        redis_url, upstream, monkeypatch):
    """A lingering connection is bounded: a client that keeps sending after its refusal has
    it whole (the client may read it at once), and is cut off within LINGER_TIME."""
    config = config_for(str(upstream.make_url("")), max_body_bytes=1000)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        server = g.gw.proxy_server
        sock = await connect(g.proxy_server.port)
        loop = asyncio.get_running_loop()
        try:
            await send_all(sock, b"POST /public/x HTTP/1.1\r\nHost: g\r\n"
                                 b"Content-Length: 100000000\r\n\r\n")
            assert await eventually(lambda: server.connections, 5)
            began = loop.time()

            async def keep_sending() -> None:
                while await send_all(sock, b"y" * 4096):
                    await asyncio.sleep(0.02)

            sending = asyncio.ensure_future(keep_sending())
            try:
                got = bytearray()
                while b"}" not in got:
                    got += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
                assert whole_json_error(bytes(got), b"413", b'"body_too_large"'), got
                gone = await eventually(lambda: not server.connections,
                                        LINGER_TIME + 2)
                took = loop.time() - began
            finally:
                sending.cancel()
        finally:
            sock.close()
        assert gone, "a client that keeps sending holds its lingering connection"
        assert LINGER_TIME - 0.3 <= took <= LINGER_TIME + 1.5, took


async def test_a_client_silent_after_its_refusal_is_closed_after_the_idle_bound(
        redis_url, upstream, monkeypatch):
    """A client that sends nothing more after a refused body, nor closes, is closed once
    LINGER_IDLE passes with nothing read: it gets the answer, then EOF."""
    config = config_for(str(upstream.make_url("")), max_body_bytes=1000)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        server = g.gw.proxy_server
        loop = asyncio.get_running_loop()
        sock = await connect(g.proxy_server.port)
        try:
            await send_all(sock, b"POST /public/x HTTP/1.1\r\nHost: g\r\n"
                                 b"Content-Length: 5000\r\n\r\n" + b"z" * 3000)
            began = loop.time()
            answer, end = await read_to_end(sock)
            took = loop.time() - began
        finally:
            sock.close()
        assert end == "eof" and whole_json_error(answer, b"413", b'"body_too_large"'), answer
        assert await eventually(lambda: not server.connections, 2)
        assert took <= LINGER_IDLE + 1.0, took


async def test_a_lingering_connection_counts_towards_max_connections(
        redis_url, upstream, monkeypatch):
    """A connection lingering after its refusal still holds its place under
    server.max_connections (it holds a socket), and frees it within the bound."""
    config = config_for(str(upstream.make_url("")), max_body_bytes=1000, max_connections=1)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        server = g.gw.proxy_server
        sock = await connect(g.proxy_server.port)
        try:
            await send_all(sock, b"POST /public/x HTTP/1.1\r\nHost: g\r\n"
                                 b"Content-Length: 100000\r\n\r\n")
            got = bytearray()
            while b"}" not in got:
                got += await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(sock, 65536), 5)
            assert len(server.connections) == 1  # lingering: read, discarded, bounded
            refused = server.refused_connections
            other = await connect(g.proxy_server.port)
            other.close()
            assert await eventually(lambda: server.refused_connections == refused + 1, 2)
            assert await eventually(lambda: not server.connections,
                                    LINGER_TIME + 1)
        finally:
            sock.close()
        async with g.proxy.get("/public/ok") as r:
            assert r.status == 200


async def test_large_answers_pipelined_before_a_refusal_reach_a_client_that_still_sends(
        redis_url, monkeypatch):
    """The bad case: two GETs with large answers, then a request with a bare-LF header, and
    the client goes on writing while it reads slowly (a small receive buffer). keygate closed
    after its 400 with the late bytes unread, and the kernel's reset threw away what of the
    200s it had not yet sent: both were forwarded and counted, the client got part of them
    and ECONNRESET. Now it gets both 200s whole, the 400, then EOF."""
    big = b"b" * 600_000

    async def answer(request):
        from aiohttp import web
        return web.Response(body=big, content_type="application/octet-stream")

    from harness import serving
    async with serving(answer) as url:
        config = config_for(url)
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme", plan="unlimited")
            token, _ = await g.key(scopes=["people:read"])
            auth = b"Authorization: Bearer " + token.encode()
            server = g.gw.proxy_server
            loop = asyncio.get_running_loop()
            for attempt in range(2):
                before = await g.used()
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", g.proxy_server.port))
                counted = server.requests_count
                try:
                    await send_all(sock, b"GET /people/1 HTTP/1.1\r\nHost: g\r\n%s\r\n\r\n"
                                         b"GET /people/2 HTTP/1.1\r\nHost: g\r\n%s\r\n\r\n"
                                   % (auth, auth))
                    assert await eventually(lambda: server.requests_count - counted >= 1, 5)
                    await send_all(sock, b"GET /people/3 HTTP/1.1\r\nHost: g\r\n"
                                         b"X-Bad: y\nX: z\r\n\r\n")

                    async def keep_sending() -> None:
                        while await send_all(sock, b"GET /people/4 HTTP/1.1\r\n" * 4):
                            await asyncio.sleep(0.005)

                    sending = asyncio.ensure_future(keep_sending())
                    got = bytearray()
                    end = "timeout"
                    try:
                        async with asyncio.timeout(10):
                            while True:
                                await asyncio.sleep(0.001)  # a slow reader
                                chunk = await loop.sock_recv(sock, 16384)
                                if not chunk:
                                    end = "eof"
                                    break
                                got += chunk
                    except ConnectionError:
                        end = "reset"
                    finally:
                        sending.cancel()
                finally:
                    sock.close()
                assert await g.used() - before == 2
                assert (end, statuses(bytes(got))) == ("eof", [b"200", b"200", b"400"]), \
                    (attempt, end, len(got), statuses(bytes(got)))
                assert got.count(big) == 2
                assert whole_json_error(bytes(got), b"400", b'"bad_request"'), got[-400:]


async def test_many_lingering_connections_all_end_within_the_bound_and_others_are_served(
        redis_url, upstream, monkeypatch):
    """300 clients each send a request keygate refuses and closes on, and stay open without a
    word more: each gets its answer, and every connection is gone within the idle bound (no
    buffer or timer left behind), while other clients are served meanwhile."""
    config = config_for(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        server = g.gw.proxy_server
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for _ in range(300):
                sock = await connect(g.proxy_server.port)
                socks.append(sock)
                await send_all(sock, b"GET /public/x HTTP/1.1\r\nHost: g\r\nX-Bad: y\nX: z\r\n\r\n")
            async with g.proxy.get("/public/ok", headers={"Connection": "close"}) as r:
                assert r.status == 200
            began = loop.time()
            assert await eventually(lambda: not server.connections, LINGER_TIME + 3), \
                len(server.connections)
            assert loop.time() - began <= LINGER_TIME + 1.5
            answers = await asyncio.gather(*(read_to_end(s, 5) for s in socks))
        finally:
            for sock in socks:
                sock.close()
        for answer, end in answers:
            assert end == "eof" and whole_json_error(answer, b"400", b'"bad_request"'), answer


@pytest.mark.parametrize("listener, path, refusal", [
    ("proxy", b"/people/1", (b"401", b"missing_key")),
    ("proxy", b"/nowhere", (b"404", b"no_route")),
    ("admin", b"/admin/v1/workspaces", (b"401", b"unauthorized")),
])
async def test_a_refused_request_whose_declared_body_stalls_is_closed_within_the_bounds(
        redis_url, upstream, monkeypatch, listener, path, refusal):
    """A request refused from its head (401, 404) that declared a small body and sends its
    first bytes, then nothing, is answered at once; keygate then read the rest of the body to
    keep the connection alive for aiohttp's fixed lingering_time (10 s), whatever
    server.timeouts said: with {header: 1, body: 2, idle: 2} such a connection was held ~10 s,
    a place under the connection bound held by a slowloris with no key that outlived the
    header timeout meant to stop it. The rest of such a body is read for LINGER_TIME at most
    (and the body timeout if lower), LINGER_IDLE with nothing read, then the connection is
    closed."""
    config = config_for(str(upstream.make_url("")),
                        timeouts=Timeouts(header=1.0, body=2.0, idle=2.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        server = g.proxy_server if listener == "proxy" else g.admin_server
        loop = asyncio.get_running_loop()
        sock = await connect(server.port)
        try:
            await send_all(sock, b"GET " + path + b" HTTP/1.1\r\nHost: g\r\n"
                                 b"Content-Length: 1000\r\n\r\nab")
            began = loop.time()
            answer, end = await read_to_end(sock, 15)
            took = loop.time() - began
        finally:
            sock.close()
        assert whole_json_error(answer, *refusal), answer[:300]
        assert end != "timeout" and took <= LINGER_IDLE + 1.0, \
            f"the connection was held {took:.1f} s after its refusal"
