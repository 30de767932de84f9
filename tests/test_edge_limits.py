"""Slow, stalled and too many callers; refusals that must not be billed.

Real gateway, real Redis, real upstreams on loopback; the clients are raw sockets that behave
as a slow-loris or a stalled uploader would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import time
import tracemalloc

import pytest
from aiohttp import ClientSession, web

from gateway.config import Route, ServerConfig, Timeouts, Upstream

from harness import (bearer, closed_within, drips_until_closed, eventually, gateway_under_test,
                     make_config, raw_upstream, serving)

ROUTES = (Route("/public/**", "api", ("GET", "POST"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)))


def edge_config(upstream_url: str, **server) -> object:
    server.setdefault("timeouts", Timeouts(header=1.0, body=1.0, idle=2.0))
    return make_config(upstream_url, routes=ROUTES,
                       server=ServerConfig(host="127.0.0.1", **server))


# --- header, body and idle timeouts -----------------------------------------------------------

async def test_a_request_head_dripped_slowly_is_cut_off_at_the_header_timeout(
        redis_url, upstream, monkeypatch):
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        reader, writer = await g.raw_connection()
        started = time.monotonic()
        closed = await drips_until_closed(reader, writer,
                                          b"GET /public/x HTTP/1.1\r\nHost: g\r\n", 6.0)
        assert closed, "a slow-loris kept its connection past the header timeout"
        assert 0.8 < time.monotonic() - started < 5.0   # 1 s and the sweep; a loaded CI box
        assert upstream.requests == []


async def test_a_connection_that_never_sends_is_closed_at_the_header_timeout(
        redis_url, upstream, monkeypatch):
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        reader, writer = await g.raw_connection()
        closed, _ = await closed_within(reader, 3.0)
        writer.close()
        assert closed


async def test_idle_keep_alive_connections_close_after_the_idle_timeout(
        redis_url, upstream, monkeypatch):
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        reader, writer = await g.raw_connection()
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: g\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        started = time.monotonic()
        closed, _ = await closed_within(reader, 5.0)
        writer.close()
        assert closed
        assert 1.5 < time.monotonic() - started < 4.0  # idle (2 s), not the header timeout


async def test_a_stalled_body_is_408_frees_the_upstream_connection_and_is_not_counted(
        redis_url, monkeypatch):
    upstream_conns: list[int] = []

    async def slow_reader(reader, writer):       # an upstream that reads whatever it gets
        upstream_conns.append(1)
        try:
            while await reader.read(65536):
                pass
        finally:
            upstream_conns.pop()
            writer.close()

    srv, url = await raw_upstream(slow_reader)
    try:
        async with gateway_under_test(edge_config(url), redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(scopes=["people:read"])
            reader, writer = await g.raw_connection()
            writer.write(b"POST /people/x HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
                         + token.encode() + b"\r\nContent-Length: 100\r\n\r\n0123456789")
            started = time.monotonic()
            closed, answer = await closed_within(reader, 5.0)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert body["error"]["code"] == "request_timeout"
            assert closed and time.monotonic() - started < 3.0
            await asyncio.sleep(0.2)
            assert upstream_conns == []               # the upstream connection was let go
            assert await g.used() == 0           # keygate's own refusal: not billed
    finally:
        srv.close()


# --- connection bounds --------------------------------------------------------------------------

async def test_client_connections_over_max_connections_are_refused_and_the_rest_served(
        redis_url, upstream, monkeypatch):
    config = edge_config(str(upstream.make_url("")), max_connections=5,
                         timeouts=Timeouts(header=30, body=30, idle=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        idle = [await g.raw_connection() for _ in range(5)]
        await asyncio.sleep(0.1)
        reader, writer = await g.raw_connection()
        closed, _ = await closed_within(reader, 2.0)
        writer.close()
        assert closed, "a connection over server.max_connections was kept"
        assert g.gw.proxy_server.refused_connections >= 1
        # and an operator sees it: the only trace of a refused connection (no request, no log)
        assert g.counter("keygate_connections_refused_total") == \
            g.gw.proxy_server.refused_connections
        for _, w in idle[:2]:
            w.close()
        await asyncio.sleep(0.2)
        async with g.proxy.get("/public/ok") as r:      # room again: served
            assert r.status == 200
        for _, w in idle[2:]:
            w.close()


def _rss() -> int:
    """This process's resident memory, bytes, once what is freed went back to the system."""
    import gc
    from gateway.argon2_pool import release_freed_memory
    gc.collect()
    release_freed_memory()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
async def test_idle_connections_after_an_upload_do_not_each_keep_their_last_reads(
        redis_url, upstream, monkeypatch):
    """Each connection kept its last two socket reads whole (for judging a chunked body's
    end, which needs their last 512 bytes) for as long as it lived: after an upload, up to
    2 x 256 KiB per idle keep-alive connection. 10,000 such connections (the default
    server.max_connections) held gigabytes; 100 here held ~50 MB."""
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=30, body=30,
                                                                       idle=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        body = b"a" * 1_000_000
        head = b"POST /no/route HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n" % len(body)
        before = _rss()
        held = []
        for _ in range(100):
            reader, writer = await g.raw_connection()
            writer.write(head + body)
            await writer.drain()
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
            held.append(writer)
        await asyncio.sleep(0.2)
        grown = _rss() - before
        for writer in held:
            writer.close()
        assert grown < 15 * 2 ** 20, f"100 idle connections cost {grown / 2 ** 20:.0f} MB"


@contextlib.asynccontextmanager
async def behind_a_slow_request(redis_url, monkeypatch):
    """A gateway before an upstream whose ``/public/slow`` answers once ``release`` is set
    (every other path at once): requests pipelined behind a slow one wait in the queue.

    The upstream timeout is as long as the client timeouts (30 s): the slow request is held
    until the test releases it, never given up on by the gateway first. With the tests' 2 s,
    50 connections pipelining 1 MB each on a loaded CI machine took long enough to set up
    (0.37 s of the 2 s on a quiet one, plus the 1 s hold) that the slow request was
    answered 504 upstream_timeout before its release, not the 200 the test waits for."""
    release = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/public/slow":
            await release.wait()
        return web.Response(text="ok")

    async with serving(answer) as url:
        config = edge_config(url, timeouts=Timeouts(header=30, body=30, idle=30))
        config = dataclasses.replace(config, upstreams={"api": Upstream("api", url, 30.0)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            yield g, release


def _fields(total: int, each: int = 1000) -> bytes:
    """Header fields of ``total`` bytes at most, ``each`` bytes a line."""
    line = lambda i: b"X-Pad-%04d: " % i + b"p" * (each - 16) + b"\r\n"  # noqa: E731
    return b"".join(line(i) for i in range(total // each))


async def _answer(reader) -> tuple[int, dict]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split(b" ")[1]), json.loads(body) if body.startswith(b"{") else {}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
async def test_a_request_head_over_32_kib_is_refused_at_once_and_never_held(
        redis_url, upstream, monkeypatch):
    """aiohttp bounds a head only at 128 fields of 8 KiB: a client could send ~1 MiB of
    header fields, never end the head, and hold it (~2.4 MB parsed) until the header
    timeout, on each of server.max_connections connections. A head over 32 KiB is refused
    (400 bad_request) as soon as it is over, and the connection closed."""
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=30, body=30,
                                                                       idle=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        before = _rss()
        held = []
        for _ in range(50):
            reader, writer = await g.raw_connection()
            writer.write(b"GET /public/x HTTP/1.1\r\nHost: g\r\n" + _fields(120 * 8000, 8000))
            await writer.drain()
            held.append((reader, writer))
        await asyncio.sleep(0.5)
        grown = _rss() - before
        for _, w in held:
            w.close()
        assert grown < 20 * 2 ** 20, f"50 unfinished heads held {grown / 2 ** 20:.0f} MB"
        reader, writer = await g.raw_connection()  # 34 KiB, no end: answered at once
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: g\r\n" + _fields(34 * 1024))
        closed, answer = await closed_within(reader, 3.0)
        writer.close()
        assert closed and b" 400 " in answer.partition(b"\r\n")[0], answer[:100]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "bad_request"
        assert "32 KiB" in body["error"]["message"]
        assert upstream.requests == []


@pytest.mark.parametrize("head, limit", [
    # fillers no answer can hold by chance: not hex digits, which a request id is made of
    (b"GET /public/x HTTP/1.1\r\nHost: g\r\nCookie: " + b"z" * 9000 + b"\r\n\r\n", "8 KiB"),
    # the proxy's request line is bounded by the whole head's 32 KiB alone (a long path is
    # bad_path, a long query forwarded)
    (b"GET /public/x?q=" + b"q" * 33000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", "32 KiB")],
    ids=["header-field", "request-line"])
async def test_a_line_over_its_bound_is_refused_saying_so(head, limit, redis_url, upstream,
                                                          monkeypatch):
    """docs/errors.md: one header field over 8 KiB (a large cookie), or a request line over
    the head's 32 KiB (a long query string), is 400 ``bad_request``. Its message said "The
    request is not valid HTTP/1.1.", which sends a caller looking for a framing bug in a
    request that is only too long. The message now says which limit it hit and what to
    shorten (never the bytes)."""
    config = edge_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        reader, writer = await g.raw_connection()
        writer.write(head)
        closed, answer = await closed_within(reader, 3.0)
        writer.close()
        assert closed and b" 400 " in answer.partition(b"\r\n")[0], answer[:100]
        message = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]
        assert limit in message and "not valid HTTP" not in message, message
        assert b"zzz" not in answer and b"qqq" not in answer
        assert upstream.requests == []


async def test_heads_over_32_kib_are_refused_however_they_arrive_and_heads_under_it_served(
        redis_url, upstream, monkeypatch):
    config = edge_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        start = b"GET /public/x HTTP/1.1\r\nHost: g\r\n"
        under, over = _fields(31 * 1024), _fields(34 * 1024)

        async def sent(*pieces: bytes, requests: int = 1) -> list[tuple[int, dict]]:
            reader, writer = await g.raw_connection()
            answers = []
            try:
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                while len(answers) < requests:
                    answers.append(await _answer(reader))
                    if answers[-1][0] == 400:
                        break
            finally:
                writer.close()
            return answers

        # whole, in one write: served under the bound, refused over it
        assert [s for s, _ in await sent(start + under + b"\r\n")] == [200]
        [(status, body)] = await sent(start + over + b"\r\n")
        assert status == 400 and body["error"]["code"] == "bad_request"
        # a field at a time
        lines = (start + under + b"\r\n").split(b"\r\n")
        assert [s for s, _ in await sent(*(line + b"\r\n" for line in lines[:-1]))] == [200]
        lines = (start + over).split(b"\r\n")  # and no end: refused once over, not at its end
        [(status, _)] = await sent(*(line + b"\r\n" for line in lines[:-1]))
        assert status == 400
        # a body is no part of a head: a 1 MB upload in one write, and a head that follows it
        upload = b"POST /public/x HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n"
        assert [s for s, _ in await sent(upload + b"u" * 1_000_000 + start + under[:20000],
                                         under[20000:] + b"\r\n", requests=2)] == [200, 200]
        # behind a small request in the same write: a long head is still counted
        assert [s for s, _ in await sent(start + b"\r\n" + start + over[:30000],
                                         over[30000:] + b"\r\n", requests=2)] == [200, 400]
        assert [s for s, _ in await sent(start + b"\r\n" + start + under + b"\r\n",
                                         requests=2)] == [200, 200]
        # nor is a chunked body's framing: 48 KB of it in one write, answered once
        reader, writer = await g.raw_connection()
        writer.write(b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"1\r\nc\r\n" * 8000 + b"0\r\n\r\n")
        assert (await _answer(reader))[0] == 200
        with pytest.raises(TimeoutError):  # and nothing after it
            await asyncio.wait_for(reader.read(1), 0.5)
        writer.close()


async def test_a_head_begun_in_the_read_that_ends_a_long_one_is_counted_from_its_start(
        redis_url, upstream, monkeypatch):
    """A read that ends a head begun in earlier reads and begins the next: the next head's
    bytes in it were counted less the first head's earlier part, so a head grew to ~62 KiB
    unrefused and was held until the header timeout."""
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=30, body=30,
                                                                       idle=30))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        start = b"GET /public/x HTTP/1.1\r\nHost: g\r\n"
        first = start + _fields(30 * 1024) + b"\r\n"
        reader, writer = await g.raw_connection()
        writer.write(first[:-10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(first[-10:] + start + _fields(20 * 1024))  # 20 KiB of the next head
        assert (await _answer(reader))[0] == 200
        writer.write(_fields(13 * 1024))                        # and 13 KiB more: 33 KiB
        closed, answer = await closed_within(reader, 3.0)
        writer.close()
        assert closed, "a head of 33 KiB under way was held"
        assert b" 400 " in answer.partition(b"\r\n")[0], answer[:100]
        assert len(upstream.requests) == 1


async def test_a_head_over_32_kib_pipelined_behind_a_request_under_way_closes_after_its_answer(
        redis_url, monkeypatch):
    """Once a connection closes, aiohttp answers only the request under way: the 400 queued
    behind it never went out, and the answer before the close said keep-alive. That answer
    now says Connection: close, so the client knows to send the rest again."""
    async with behind_a_slow_request(redis_url, monkeypatch) as (g, release):
        reader, writer = await g.raw_connection()
        writer.write(b"GET /public/slow HTTP/1.1\r\nHost: g\r\n\r\n"
                     b"GET /public/x HTTP/1.1\r\nHost: g\r\n" + _fields(34 * 1024))
        await writer.drain()
        await asyncio.sleep(0.3)
        release.set()
        closed, answers = await closed_within(reader, 5.0)
        writer.close()
        assert closed
        head = answers.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head, head


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
async def test_requests_pipelined_behind_a_slow_one_hold_at_most_32_kib_of_heads(
        redis_url, monkeypatch):
    """Pipelined requests wait parsed in aiohttp's queue, up to 32 of them: 32 heads of
    31 KiB behind a slow request held ~2.2 MB per connection until it was answered. Past
    32 KiB of queued heads they are dropped, and the request under way is answered with
    Connection: close (the client sends the rest again)."""
    async with behind_a_slow_request(redis_url, monkeypatch) as (g, release):
        pipelined = b"GET /public/x HTTP/1.1\r\nHost: g\r\n" + _fields(31 * 1024) + b"\r\n"
        before = _rss()
        conns = []
        for _ in range(50):
            reader, writer = await g.raw_connection()
            writer.write(b"GET /public/slow HTTP/1.1\r\nHost: g\r\n\r\n" + pipelined * 32)
            conns.append((reader, writer))
        await asyncio.sleep(1.0)
        grown = _rss() - before
        release.set()
        closed, answers = await closed_within(conns[0][0], 5.0)
        for _, writer in conns:
            writer.close()
        assert grown < 25 * 2 ** 20, f"50 pipelining clients held {grown / 2 ** 20:.0f} MB"
        assert closed
        assert answers.count(b"HTTP/1.1 200 OK") == 1, answers[:300]  # the slow one,
        assert b"Connection: close" in answers                # closing the connection
        reader, writer = await g.raw_connection()  # small pipelined requests: all answered
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: g\r\n\r\n" * 20)
        assert [(await _answer(reader))[0] for _ in range(20)] == [200] * 20
        writer.close()


async def test_upstream_connections_are_bounded_and_requests_over_the_bound_wait(
        redis_url, aiohttp_server, monkeypatch):
    active, peak = 0, 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.2)
        active -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    server = await aiohttp_server(app)
    config = edge_config(str(server.make_url("")))
    config = dataclasses.replace(config, upstreams={
        "api": Upstream("api", str(server.make_url("")), 5.0, max_connections=2)})
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        async def one() -> int:
            async with g.proxy.get("/public/x") as r:
                return r.status
        statuses = await asyncio.gather(*(one() for _ in range(8)))
    assert statuses == [200] * 8
    assert peak == 2


async def test_waiting_for_an_upstream_connection_past_the_timeout_is_504_and_not_counted(
        redis_url, aiohttp_server, monkeypatch):
    # The first request holds the pool's only connection for 2.5 s: its answer's head comes at
    # once (so its own timeout never fires), then the body drips. The second starts once the
    # first's head is here, so it must wait for the connection, past the 1 s timeout. (With
    # a stuck head instead, both timers end at ~1 s and which fires first is a race: the
    # second then sometimes got the freed connection and reached the upstream.) The upstream
    # shares the test's event loop: a loop not scheduled for longer than the timeout less a
    # drip's 0.1 s fires the first's read timeout before its next drip (0.5 s was once too
    # short, in a fresh-clone run beside three other suites).
    async def dripping(request: web.Request) -> web.StreamResponse:
        if request.path == "/people/stuck":
            await asyncio.sleep(1.5)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(25):
            await asyncio.sleep(0.1)
            await response.write(b"x")
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", dripping)
    server = await aiohttp_server(app)
    config = edge_config(str(server.make_url("")))
    config = dataclasses.replace(config, upstreams={
        "api": Upstream("api", str(server.make_url("")), 1.0, max_connections=1)})
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        auth = {"Authorization": f"Bearer {token}"}
        async with g.proxy.get("/people/x", headers=auth) as first:
            assert first.status == 200                   # the connection is now held
            started = time.monotonic()
            async with g.proxy.get("/people/x", headers=auth) as second:
                waited = time.monotonic() - started
                assert second.status == 504
                assert (await second.json())["error"]["code"] == "upstream_timeout"
            assert 0.9 < waited < 2.2
            assert await first.read() == b"x" * 25      # the held one was not disturbed
        # the first reached the upstream (counted); the second never got a connection
        assert await g.used() == 1
        # one that reached the upstream and timed out waiting for the answer is counted
        async with g.proxy.get("/people/stuck", headers=auth) as stuck:
            assert stuck.status == 504
        assert await g.used() == 2


def test_the_open_file_limit_is_raised_to_fit_max_connections():
    import resource
    from gateway.app import raise_open_file_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4000:
        pytest.skip(f"the hard open-file limit ({hard}) is too low to raise into")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        config = make_config("http://127.0.0.1:9", server=ServerConfig(max_connections=2000))
        assert raise_open_file_limit(config) == 2000
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 2000 + 1024 + 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_max_connections_shrinks_to_what_the_hard_open_file_limit_can_hold(tmp_path):
    """Under a 1024 hard limit the default 10000 cannot fit: the bound in force leaves the
    descriptors upstream and store connections need (run in a child: hard limits only fall)."""
    import subprocess
    import sys
    code = ("import resource, sys; sys.path.insert(0, 'tests');"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
            "from harness import make_config; from gateway.app import raise_open_file_limit;"
            "print(raise_open_file_limit(make_config('http://127.0.0.1:9')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    bound = int(out.stdout.strip())
    assert 0 < bound <= 1024 - 1024 // 2
    assert "cannot fit server.max_connections" in out.stderr


def test_under_a_low_hard_limit_clients_and_upstreams_together_fit_the_open_file_limit():
    """raise_open_file_limit: when the hard limit cannot fit max_connections + reserve, the
    bound is max(soft - reserve, soft // 2): with several upstreams the reserve is larger than
    soft // 2, so the client bound falls back to half the limit and clients plus the upstream
    connections the config allows exceed it (EMFILE on upstream connects, the very failure
    issue 10 reported). Eight upstreams at the default 100, hard limit 1024."""
    import subprocess
    import sys
    code = ("import dataclasses, resource, sys; sys.path.insert(0, 'tests');"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
            "from harness import make_config; from gateway.config import Upstream;"
            "from gateway.app import raise_open_file_limit;"
            "c = make_config('http://127.0.0.1:9');"
            "c = dataclasses.replace(c, upstreams={f'u{i}': Upstream(f'u{i}', "
            "'http://127.0.0.1:9', 2.0) for i in range(8)});"
            "print(raise_open_file_limit(c), resource.getrlimit(resource.RLIMIT_NOFILE)[0],"
            " sum(u.max_connections for u in c.upstreams.values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    bound, soft, upstream_fds = map(int, out.stdout.split())
    assert bound + upstream_fds + 64 <= soft, (
        f"{bound} client connections + {upstream_fds} upstream connections do not fit an "
        f"open-file limit of {soft}")



# --- refusals are never billed ------------------------------------------------------------------

async def test_a_declared_body_over_the_limit_is_413_and_not_counted(redis_url, upstream,
                                                                     monkeypatch):
    config = edge_config(str(upstream.make_url("")), max_body_bytes=1000)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        auth = {"Authorization": f"Bearer {token}"}
        async with g.proxy.post("/people/x", data=b"x" * 5000, headers=auth) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"

        async def chunks():
            for _ in range(10):
                yield b"y" * 500
        async with g.proxy.post("/people/x", data=chunks(), headers=auth) as r:
            assert r.status == 413
        assert await g.used() == 0
        async with g.proxy.post("/people/x", data=b"z" * 10, headers=auth) as r:
            assert r.status == 200
        assert await g.used() == 1
        assert [rec["body_len"] for rec in upstream.requests] == [10]


@contextlib.asynccontextmanager
async def key_endpoint_caller(redis_url, upstream, monkeypatch):
    """A raw connection to a gateway with server.timeouts.body 1 s, and a keys:admin token:
    yields ``(reader, writer, token)``."""
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=5.0, body=1.0,
                                                                       idle=30.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(role="admin")
        reader, writer = await g.raw_connection()
        try:
            yield reader, writer, token
        finally:
            writer.close()


async def test_a_stalled_body_to_a_key_endpoint_is_408_and_closed(redis_url, upstream,
                                                                   monkeypatch):
    """The self-service key endpoints on the proxy listener read their (small JSON) body
    whole; a client that declares a body and stops sending it is answered 408 once
    server.timeouts.body has passed, and its connection closed, like a stalled body to an
    upstream, instead of holding the connection for as long as it likes."""
    async with key_endpoint_caller(redis_url, upstream, monkeypatch) as (reader, writer, token):
        started = time.monotonic()
        writer.write(f"POST /_keygate/v1/keys HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"name\": ".encode())
        closed, got = await closed_within(reader, 5.0)
        took = time.monotonic() - started
        assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert 0.9 <= took < 3, took


async def test_a_key_endpoint_answers_100_continue_before_it_waits_for_the_body(redis_url,
                                                                               upstream,
                                                                               monkeypatch):
    """A client sending ``Expect: 100-continue`` to /_keygate/v1/keys holds its body back
    until it sees ``100 Continue`` (RFC 9110 10.1.1: the server MUST send it, or a final
    answer, once it has the head). keygate sends it for a forwarded request; the key endpoints
    read their body whole within server.timeouts.body, so without it a client that waits
    (as RFC 9110 lets it) is answered 408 for a body it was never asked for."""
    async with key_endpoint_caller(redis_url, upstream, monkeypatch) as (reader, writer, token):
        body = json.dumps({"name": "made", "scopes": ["people:read"]}).encode()
        writer.write(f"POST /_keygate/v1/keys HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                     f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 201 "), head
        # asked for and read whole: nothing is left to be read as a next request
        assert b"connection: close" not in head.lower(), head


async def test_the_admin_listener_takes_expect_after_it_has_judged_the_call(redis_url, upstream,
                                                                           monkeypatch):
    """aiohttp's router answered `Expect` on the admin listener before any of keygate's own
    code ran: any other expectation than 100-continue (`Expect: foo`, even on a GET) was a
    plain-text `417 Unknown Expect: foo` with no JSON error body and no X-Request-Id; and
    `100 Continue` went out before the token was checked, inviting a caller with no token
    (or one declaring 2 MB, over the 1 MiB limit) to send its body, only to be refused
    after. Now (docs/errors.md) an unknown expectation is a JSON 417 `bad_request`, and 100
    Continue is sent only to an admitted call whose declared body fits; else its final
    answer comes at once. Through the test harness's admin server, which is now keygate's
    own AdminRunner as `serve` runs it (a plain TestServer did not defer Expect at all)."""
    from harness import ADMIN_TOKEN

    async def exchange(port: int, head: str, body: bytes = b"") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head.encode())
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if first.startswith(b"HTTP/1.1 100 "):
                writer.write(body)
                first += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = re.search(rb"Content-Length: (\d+)", first)
            rest = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5) \
                if length else b""
            return first + rest
        finally:
            writer.close()

    config = edge_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        port, auth = g.admin_server.port, f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
        for head in (f"GET /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n{auth}Expect: foo\r\n\r\n",
                     "GET /nothing HTTP/1.1\r\nHost: x\r\nExpect: foo\r\n\r\n"):
            got = await exchange(port, head)
            assert got.startswith(b"HTTP/1.1 417 ") and b"X-Request-Id: " in got, got
            assert b'"code": "bad_request"' in got and b"application/json" in got, got
        body = json.dumps({"id": "acme", "name": "Acme"}).encode()
        post = ("POST /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n{auth}Expect: 100-continue\r\n"
                "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
        got = await exchange(port, post.format(auth="", length=len(body)), body)
        assert got.startswith(b"HTTP/1.1 401 ") and b'"unauthorized"' in got, got
        got = await exchange(port, post.format(auth=auth, length=2_000_000), b"x" * 2_000_000)
        assert got.startswith(b"HTTP/1.1 413 ") and b'"body_too_large"' in got, got
        got = await exchange(port, post.format(auth=auth, length=len(body)), body)
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 "), got
        status, _ = await g.admin_json("GET", "/workspaces/acme")
        assert status == 200


async def test_a_key_endpoint_refuses_a_declared_body_over_the_limit_before_asking_for_it(
        redis_url, upstream, monkeypatch):
    """`Expect: 100-continue` with a Content-Length over the key endpoints' 1 MiB was answered
    `100 Continue`: the client uploaded its 2 MB, then got 413. The size is known from the
    head, so the 413 comes at once, and the body is never asked for."""
    async with key_endpoint_caller(redis_url, upstream, monkeypatch) as (reader, writer, token):
        writer.write(f"POST /_keygate/v1/keys HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                     f"Expect: 100-continue\r\nContent-Length: 2000000\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 413 "), head
        closed, _ = await closed_within(reader, 3.0)  # its body, unread, ends the connection
        assert closed


async def test_a_stalled_body_to_the_admin_api_is_408_and_closed(redis_url, upstream,
                                                                 monkeypatch):
    """An authenticated admin caller (operator token or a workspace admin key) that declares a
    body and stops sending it is answered 408 once server.timeouts.body has passed, and its
    connection closed, instead of holding an admin connection for as long as it likes."""
    from harness import ADMIN_TOKEN

    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=5.0, body=1.0,
                                                                       idle=30.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.admin_server.port)
        try:
            started = time.monotonic()
            writer.write(f"POST /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         f"{{\"id\": ".encode())
            closed, got = await closed_within(reader, 5.0)
            took = time.monotonic() - started
            assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
            assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == \
                "request_timeout"
            assert 0.9 <= took < 3, took
        finally:
            writer.close()



async def test_a_body_cut_short_is_the_clients_400_not_a_500_nor_an_upstream_error(
        redis_url, upstream, monkeypatch, capfd, caplog):
    """A client that declares a body and closes its connection before sending all of it: the
    body can never arrive, by the client's doing. The key endpoints answered that as keygate's
    own 500 ``internal_error`` with a traceback in the log; a proxied route as 502
    ``upstream_unavailable``, counted in keygate_upstream_errors_total (which the shipped
    alert watches) though the upstream did nothing wrong. Both are now 400 ``bad_request``
    in the access log, and nothing is counted against the quota."""
    from prometheus_client.parser import text_string_to_metric_families
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=5.0, body=5.0,
                                                                       idle=30.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(role="admin")
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200  # verified and counted: 1
        g.logs(capfd)
        for target in ("/_keygate/v1/keys", "/people"):
            reader, writer = await g.raw_connection()
            writer.write(f"POST {target} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100\r\n\r\n{{\"name\": ".encode())
            await writer.drain()
            await asyncio.sleep(0.3)  # admitted, waiting for the rest of the body
            writer.close()
            await asyncio.sleep(0.3)
        _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        assert [(line["status"], line["error"]) for line in lines
                if line["method"] == "POST"] == [(400, "bad_request")] * 2, err
        async with g.admin.get("/metrics") as r:
            exposition = await r.text()
        assert not [s for f in text_string_to_metric_families(exposition) for s in f.samples
                    if s.name == "keygate_upstream_errors_total" and s.value], exposition
        assert await g.used() == 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_chunked_body_framed_wrongly_mid_body_is_400_at_once_not_a_408(
        redis_url, upstream, monkeypatch):
    """docs/errors.md: a request that is not valid HTTP/1.1 (bad framing) is 400
    ``bad_request``. A chunked body whose framing breaks after the head was admitted (here a
    chunk size that is not hex) is found by aiohttp's parser, which queues its own 400 behind
    the request in flight and leaves that request's body stream waiting: the request then
    stalled until ``server.timeouts.body`` (60 s by default) and was answered 408. The body
    now fails at once: 400, not counted, the connection closed."""
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=5.0, body=3.0,
                                                                       idle=30.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        reader, writer = await g.raw_connection()
        try:
            writer.write(f"POST /people HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                         f"\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n".encode())
            await writer.drain()
            await asyncio.sleep(0.3)  # admitted, waiting for the rest of the body
            started = time.monotonic()
            writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 6)
            took = time.monotonic() - started
            closed, rest = await closed_within(reader, 3.0)  # and nothing more on it
            assert closed and b"HTTP/1.1" not in rest, rest
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 400"), head
        assert took < 2, took
        assert await g.used() == 0
        assert upstream.requests == []  # no upstream connection for an unfinished body


async def test_a_chunked_body_framed_wrongly_mid_body_is_400_at_once_on_the_admin_api(
        redis_url, upstream, monkeypatch):
    """The same on the admin listener (AdminRunner, as ``keygate serve`` runs it): 400
    ``bad_request`` at once, one answer, the connection closed. (This held before the proxy
    listener's fix too: the admin app runs each request in its own task, and aiohttp answers
    the parse error and closes; the test keeps it so.)"""
    from aiohttp import web

    from gateway.proxying.server import AdminRunner
    from harness import ADMIN_TOKEN
    config = edge_config(str(upstream.make_url("")), timeouts=Timeouts(header=5.0, body=3.0,
                                                                       idle=30.0))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        runner = AdminRunner(g.gw.admin_app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
            writer.write(f"POST /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
                         f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         f"4\r\n{{\"id\"\r\n".encode())
            await writer.drain()
            await asyncio.sleep(0.3)  # the handler is reading the body
            started = time.monotonic()
            writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 6)
            took = time.monotonic() - started
            closed, rest = await closed_within(reader, 3.0)
            writer.close()
        finally:
            await runner.cleanup()
    assert head.split(b" ")[1] == b"400", (head, rest)
    assert took < 2, took
    assert closed and b"\r\n\r\n" not in rest, rest  # one answer, then closed
    assert json.loads(rest)["error"]["code"] == "bad_request", rest


@contextlib.asynccontextmanager
async def admin_listener(redis_url, upstream, monkeypatch, **runner):
    """The admin listener as ``keygate serve`` runs it (AdminRunner, with ``runner`` too) for
    a gateway on edge_config, on a free loopback port: yields the runner."""
    from gateway.proxying.server import AdminRunner
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        runner = AdminRunner(g.gw.admin_app, handle_signals=False, access_log=None, **runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield runner
        finally:
            await runner.cleanup()


async def test_a_content_encoded_body_to_the_admin_api_is_400_never_500_or_a_traceback(
        redis_url, upstream, monkeypatch, caplog):
    """The admin listener (AdminRunner, as ``keygate serve`` runs it) let aiohttp decode
    gzip/deflate request bodies: a body that did not decode was a 500 ``internal_error`` with
    two tracebacks in the log, and one sent without a token still logged aiohttp's
    "Unhandled exception" traceback (anyone reaching the listener could fill the log with
    them); br and zstd were "not valid HTTP/1.1". The admin API takes JSON as sent, as the
    self-service endpoints on the proxy listener do: any Content-Encoding is a 400."""
    import gzip
    import logging

    from harness import ADMIN_TOKEN
    caplog.set_level(logging.WARNING)
    async with admin_listener(redis_url, upstream, monkeypatch) as runner:
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/admin/v1/workspaces"
        answers = []
        async with ClientSession() as s:
            for coding, body in (("gzip", b'{"id": "acme", "name": "A"}'),
                                 ("deflate", b"not deflated"),
                                 ("gzip", gzip.compress(b'{"id": "acme", "name": "A"}')),
                                 ("br", b"x"), ("zstd", b"x"), ("x-unknown", b"{}")):
                for auth in (bearer(ADMIN_TOKEN), {}):
                    async with s.post(url, data=body, headers={
                            **auth, "Content-Type": "application/json",
                            "Content-Encoding": coding}) as r:
                        answers.append((coding, bool(auth), r.status,
                                        (await r.json())["error"]["code"]))
            async with s.get(url, headers=bearer(ADMIN_TOKEN)) as r:
                assert (await r.json())["items"] == []  # nothing was made
    assert [a for a in answers if a[2:] != ((400, "bad_request") if a[1]
                                            else (401, "unauthorized"))] == []
    assert [(r.name, r.getMessage()) for r in caplog.records
            if r.levelno >= logging.ERROR] == []


async def test_a_connect_to_the_admin_listener_is_refused_and_nothing_after_it_is_read(
        redis_url, upstream, monkeypatch):
    """aiohttp's parser ends a CONNECT at its head and, once it is answered, reads the bytes
    after it (the body its Content-Length declared) as the next request: on the admin
    listener that body was served as a request of its own. 501, and the connection closes."""
    async with admin_listener(redis_url, upstream, monkeypatch) as runner:
        port = runner.addresses[0][1]
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        for target in (b"/admin/v1/workspaces", b"127.0.0.1:443", b"/healthz"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: a\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
            answer = await asyncio.wait_for(reader.read(), 5)  # the whole: it closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 501 "), (target, answer[:200])
            assert answer.count(b"HTTP/1.1 ") == 1, (target, answer)
            assert b'"not_implemented"' in answer


# --- a client that stops reading its answers ---------------------------------------------------

async def _stop_reading(g, request: bytes, times: int):
    """A raw client with a tiny receive buffer that sends ``request`` ``times`` times,
    pipelined, and never reads a byte of the answers."""
    import socket
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.proxy_server.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(request * times)
    return writer


async def test_clients_that_stop_reading_keygates_own_answers_are_cut_off_and_free_their_slots(
        redis_url, upstream, monkeypatch):
    """Every answer's last write waits for the client to take the bytes (aiohttp drains on
    write_eof), with no timeout: neither header, body nor idle applies while a request is in
    progress. A client with no key that pipelines requests for a small error answer (here a
    404) and never reads held its connection, and its place under server.max_connections, for
    ever; a few thousand such sockets shut everyone else out. A client that does not take its
    answer for server.timeouts.body seconds is cut off, as one stalling a streamed answer is."""
    config = edge_config(str(upstream.make_url("")), max_connections=2)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        stuck = [await _stop_reading(g, b"GET /no/route HTTP/1.1\r\nHost: g\r\n\r\n", 30000)
                 for _ in range(2)]
        try:
            await asyncio.sleep(4.0)   # past every timeout in the config (body 1 s, idle 2 s)
            async with g.proxy.get("/public/ok") as r:
                assert r.status == 200, "two clients that stopped reading hold every slot"
        except Exception as exc:  # the listener refused the connection: full
            raise AssertionError(f"two clients that stopped reading hold every client "
                                 f"connection slot: {exc!r}") from None
        finally:
            for w in stuck:
                w.close()



async def test_a_client_reading_a_long_answer_slowly_but_steadily_is_not_cut_off(
        redis_url, monkeypatch):
    """server.timeouts.body closes a client that takes *none* of its answer for that long
    (docs/configuration.md). The timer ran from the transport pausing (keygate's buffer over
    its high-water mark) to it resuming (under its low-water mark), so a client reading
    steadily, but slower than keygate's buffered part of the answer (an upstream read, up to
    256 KiB) a timeout, never got the buffer that low in time and had its download cut short:
    at the shipped 60 s, any client under ~4 KiB/s (a poor mobile link). Bytes the client
    takes are progress: the timer starts again, and only a client that took nothing for the
    whole timeout is closed. Here: ~40 KiB/s for over 3 body timeouts (1 s), then the rest
    read at once must be the whole answer."""
    body = b"x" * (4 << 20)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    async with serving(answer) as url:
        async with gateway_under_test(edge_config(url), redis_url, monkeypatch) as g:
            got, why = await _slow_reader(asyncio.get_running_loop(), g.proxy_server.port,
                                          g.gw.proxy_server, 4096, 0.1, 3.5, len(body),
                                          "/public/big")
    assert (got, why) == (len(body), None), \
        f"a client reading ~40 KiB/s got {got} of {len(body)} bytes: {why}"


async def test_a_client_still_taking_its_last_answer_slowly_after_a_close_gets_all_of_it(
        redis_url, monkeypatch):
    """A connection closed with part of an answer still in keygate's buffer (here by the
    keep-alive idle time, server.timeouts.idle, which runs from the answer's last write into
    the buffers) was cut off, the rest dropped, server.timeouts.body after the close, however
    steadily its client was still taking it: the flush was judged by time, not by bytes
    taken. Only a client that took none of it for that long is cut off; this one gets its
    whole answer.

    keygate's socket gets a small send buffer here, so that a 60 KB answer outlasts idle (2 s)
    + body (1 s) at ~10 KiB/s: written at once, its handler done, most of it in keygate's own
    buffer."""
    body = b"y" * 60_000

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    async with serving(answer) as url:
        async with gateway_under_test(edge_config(url), redis_url, monkeypatch) as g:
            got, why = await _slow_reader(asyncio.get_running_loop(), g.proxy_server.port,
                                          g.gw.proxy_server, 1024, 0.1, 4.5, len(body),
                                          "/public/small")
    assert (got, why) == (len(body), None), \
        f"a client still taking its answer got {got} of {len(body)} bytes: {why}"

async def _slow_reader(loop, port: int, server, per_read: int, every: float, for_s: float,
                       length: int, path: str = "/public/stream") -> tuple[int, str | None]:
    """A client (4 KiB receive buffer, keygate's side given a 4 KiB send buffer: the kernel's
    autotuning grows it to megabytes on loopback) asking for ``path`` and reading ``per_read``
    bytes every ``every`` s for ``for_s`` s, then the rest at once; the body bytes it got and
    why it stopped early, if it did."""
    import socket
    from harness import eventually
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    before = set(server.connections)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    assert await eventually(lambda: set(server.connections) - before, 5)
    [handler] = set(server.connections) - before
    handler.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    got = bytearray()
    try:
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
        started = time.monotonic()
        while time.monotonic() - started < for_s:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, per_read), 3.0)
            if not chunk:
                return len(got), f"closed after {len(got)} bytes at {time.monotonic() - started:.1f} s"
            got += chunk
            await asyncio.sleep(every)
        head_end = got.find(b"\r\n\r\n") + 4
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        async with asyncio.timeout(20):
            while len(got) < head_end + length:
                chunk = await loop.sock_recv(sock, 1 << 20)
                if not chunk:
                    break
                got += chunk
        return len(got) - head_end, None
    except ConnectionError as exc:
        return len(got), f"cut off after {len(got)} bytes: {exc!r}"
    finally:
        sock.close()


async def test_a_slow_steady_reader_of_a_streamed_answer_in_small_chunks_is_not_cut_off(
        redis_url, monkeypatch):
    """README: "A client that takes none of its answer for `body` seconds is cut off; one that
    takes it slowly but steadily (a long download over a poor link) is not, however long it
    takes." An upstream streaming its answer in small pieces (2 KiB, an event stream, a
    download relayed as it comes) to clients reading ~16 KiB/s (8 KiB every 0.5 s; body
    timeout 1 s, so 8-16 KiB taken in every timeout): they were cut off. The stall timer's mark
    (_stall_mark, what the client had not taken) is read when the transport pauses, but
    aiohttp's writer goes on writing after the pause until its own 64 KiB counter runs over
    (StreamWriter.write drains only past LIMIT): up to 64 KiB more is added behind the mark,
    so a client taking less than that in the first timeout reads as one that took nothing
    (_reader_stalled: ``left < _stall_mark`` fails) and is aborted. (Seen: paused at 75,776
    bytes not taken, 112,640 a second later though the client read 8-16 KiB meanwhile; with
    aiohttp's LIMIT patched to 0, no write after the pause, all three clients get it all.)
    At the shipped 60 s the same cuts off clients under ~1 KiB/s."""
    from aiohttp import web
    from gateway.config import Route, ServerConfig, Timeouts
    from harness import gateway_under_test, make_config, serving
    piece, pieces = b"z" * 2048, 600

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(piece) * pieces
        await resp.prepare(request)
        for _ in range(pieces):
            await resp.write(piece)
            await asyncio.sleep(0.003)
        return resp

    routes = (Route("/public/**", "api", ("GET",), (), True),)
    async with serving(stream) as url:
        config = make_config(url, routes=routes, server=ServerConfig(
            host="127.0.0.1", timeouts=Timeouts(header=5.0, body=1.0, idle=5.0)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            loop = asyncio.get_running_loop()
            results = []
            for _ in range(3):
                results.append(await _slow_reader(loop, g.proxy_server.port, g.gw.proxy_server,
                                                  8192, 0.5, 3.5, len(piece) * pieces))
            assert [why for _, why in results] == [None] * 3, results
            assert [n for n, _ in results] == [len(piece) * pieces] * 3

_BIG = 8192 * 25  # /public/big's size (_one_connection_upstream)


@contextlib.asynccontextmanager
async def _one_connection_upstream(redis_url, monkeypatch, timeout: float):
    """keygate in front of an upstream it may open one connection to (``timeout`` its
    upstream timeout), answering /public/small with ``ok`` and /public/big with ``_BIG``
    bytes in pieces (not whole with its head). Yields (g, slow, small): ``slow(for_s)``, a
    task of a client that reads the head of /public/big, then nothing for ``for_s`` s, then
    all of it (``_slow_reader``'s result); ``small()``, the status and body of
    /public/small."""
    from aiohttp import web
    from harness import serving
    piece = b"z" * 8192

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        small = request.path == "/public/small"
        resp.content_length = 2 if small else _BIG
        await resp.prepare(request)
        for _ in range(1 if small else _BIG // len(piece)):  # not whole with its head
            await resp.write(b"ok" if small else piece)
            await asyncio.sleep(0.002)
        return resp

    routes = (Route("/public/**", "api", ("GET",), (), True),)
    async with serving(answer) as url:
        config = make_config(url, routes=routes, server=ServerConfig(
            host="127.0.0.1", timeouts=Timeouts(header=5.0, body=10.0, idle=15.0)),
            upstreams={"api": Upstream("api", url, timeout, max_connections=1)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            loop = asyncio.get_running_loop()

            def slow(for_s: float) -> asyncio.Future:
                return asyncio.ensure_future(_slow_reader(
                    loop, g.proxy_server.port, g.gw.proxy_server, 4096, for_s, for_s, _BIG,
                    path="/public/big"))

            async def small() -> tuple[int, bytes]:
                async with g.proxy.get("/public/small") as r:
                    return r.status, await r.read()
            yield g, slow, small


async def test_a_client_not_reading_its_answer_does_not_hold_the_upstream_connection(
        redis_url, monkeypatch):
    """An answer the upstream has sent whole needs its connection no more. It was held until
    the client had taken the answer's last bytes: with upstreams.max_connections 1, one
    client that read nothing of a 200 KiB answer held the only connection for as long as
    its write-stall timer allowed (about two body timeouts) and every other request waited
    for it, then 504. The connection now goes back to the pool as soon as the whole answer
    is in (nginx's proxy_buffering does the same), while the rest of the answer is written
    to the slow client as it takes it."""
    async with _one_connection_upstream(redis_url, monkeypatch, 2.0) as (g, slow, small):
        reader = slow(3.0)  # its head (4 KiB), then nothing for 3 s, then all of it
        await asyncio.sleep(0.5)  # its answer is all in keygate by now
        started = time.monotonic()
        assert await small() == (200, b"ok")
        assert time.monotonic() - started < 1.0
        assert not reader.done()  # still not reading
        assert await reader == (_BIG, None)  # and then it got it all


async def test_answers_held_for_slow_clients_are_bounded_in_all(redis_url, monkeypatch):
    """An answer's tail held after its upstream connection went back costs memory for as
    long as its client takes to read it: up to ~256 KiB each, and with 10000 client
    connections ~2.5 GiB. They are bounded in all (DETACHED_MAX, here made one and a half
    answers' tails): past it, an answer's connection waits for its client as before. What a
    client took, or never took because it went away, is counted no more."""
    from gateway.proxying import connection
    async with _one_connection_upstream(redis_url, monkeypatch, 1.0) as (g, slow, small):
        first = slow(4.0)
        await asyncio.sleep(0.5)
        held = connection._detached
        assert held > 0  # its tail (what the kernel and the transport did not take)
        monkeypatch.setattr(connection, "DETACHED_MAX", held + held // 2)
        assert (await small())[0] == 200
        second = slow(4.0)  # its tail would pass the bound: it keeps the connection
        await asyncio.sleep(0.5)
        assert connection._detached == held
        assert (await small())[0] == 504  # waited the upstream timeout for it
        assert await first == (_BIG, None)
        assert await second == (_BIG, None)
        assert connection._detached == 0
        # one that goes away without reading more: its tail is counted no more
        gone = slow(30.0)
        assert await eventually(lambda: connection._detached > 0)
        gone.cancel()  # (its socket closed, unread bytes in it: a reset)
        assert await eventually(lambda: connection._detached == 0)
        assert (await small())[0] == 200


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    """A chunked body's content, and what follows its last chunk (the trailers' end)."""
    out, at = bytearray(), 0
    while True:
        eol = data.index(b"\r\n", at)
        size = int(data[at:eol].split(b";")[0], 16)
        at = eol + 2
        if size == 0:
            return bytes(out), data[at:]
        out += data[at:at + size]
        assert data[at + size:at + size + 2] == b"\r\n"
        at += size + 2


async def test_an_answer_given_back_early_reaches_its_client_whole_after_a_103_with_trailers_pipelined(
        redis_url, monkeypatch):
    """A raw upstream (max_connections 1) answers /public/big with a 103, then a chunked
    200 KiB body (each piece distinct) and a trailer; /public/small with 5 bytes. Client A
    (a raw socket, 4 KiB buffers) sends /public/big and, pipelined, /public/small, then reads
    nothing for 1.5 s. Meanwhile client B's /public/small must be answered on the upstream
    connection A's answer no longer needs, and then A must get exactly its own two answers,
    whole, in order. The upstream must see the three requests, each whole, one after the
    other on one connection."""
    import socket
    from aiohttp import ClientSession
    from gateway.config import Route, ServerConfig, Timeouts, Upstream
    from harness import gateway_under_test, make_config

    pieces = [bytes([65 + i % 26]) * 8000 + b"%05d" % i for i in range(25)]
    big = b"".join(pieces)
    seen: list[list[bytes]] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads: list[bytes] = []
        seen.append(heads)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                if b" /public/big " in head:
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                 b"Content-Type: application/octet-stream\r\n\r\n")
                    for p in pieces:
                        writer.write(b"%x\r\n%s\r\n" % (len(p), p))
                        await writer.drain()
                        await asyncio.sleep(0.002)
                    writer.write(b"0\r\nX-Checksum: abc\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    routes = (Route("/public/**", "api", ("GET",), (), True),)
    config = make_config(url, routes=routes, server=ServerConfig(
        host="127.0.0.1", timeouts=Timeouts(header=5.0, body=10.0, idle=15.0)),
        upstreams={"api": Upstream("api", url, 2.0, max_connections=1)})
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            before = set(g.gw.proxy_server.connections)
            await loop.sock_connect(sock, ("127.0.0.1", g.proxy_server.port))
            assert await eventually(lambda: set(g.gw.proxy_server.connections) - before, 5)
            [handler] = set(g.gw.proxy_server.connections) - before
            handler.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await loop.sock_sendall(sock, b"GET /public/big HTTP/1.1\r\nHost: g\r\n\r\n"
                                          b"GET /public/small HTTP/1.1\r\nHost: g\r\n\r\n")
            await asyncio.sleep(0.6)  # A's answer is all in keygate; A reads nothing
            async with ClientSession() as b:
                started = time.monotonic()
                async with b.get(f"http://127.0.0.1:{g.proxy_server.port}/public/small") as r:
                    assert (r.status, await r.read()) == (200, b"small")
                assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.9)
            got = bytearray()
            async with asyncio.timeout(20):
                while got.count(b"small") < 1 or not got.endswith(b"small"):
                    chunk = await loop.sock_recv(sock, 1 << 20)
                    if not chunk:
                        break
                    got += chunk
            sock.close()
        got = bytes(got)
        assert got.startswith(b"HTTP/1.1 200 "), got[:300]
        head_end = got.index(b"\r\n\r\n") + 4
        head = got[:head_end].lower()
        assert b"transfer-encoding: chunked" in head, head
        body, rest = _dechunk(got[head_end:])
        assert body == big, (len(body), len(big))
        assert b"X-Checksum" not in rest
        assert rest.startswith(b"\r\nHTTP/1.1 200 ") or rest.startswith(b"HTTP/1.1 200 "), \
            rest[:200]
        second = rest[rest.index(b"HTTP/1.1"):]
        assert second.endswith(b"\r\n\r\nsmall"), second
        assert second.count(b"HTTP/1.1") == 1
        # the upstream: one connection, the three requests one after the other
        requests = [h for heads in seen for h in heads]
        assert len(requests) == 3, seen
        assert [h.split(b" ")[1] for h in requests].count(b"/public/small") == 2
    finally:
        server.close()
        await server.wait_closed()


async def _pipeline_until_a_tail_is_stuck(port: int, server, request: bytes):
    """A raw client with a tiny receive buffer that never reads: it sends ``request`` again
    and again, each once the last was answered, until the kernel buffers are full and an
    answer's tail is left in the buffer of keygate's ``server`` on ``port``, under its 64 KiB
    high-water mark (so no write is paused). Returns (socket, requests sent)."""
    import socket
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    assert await eventually(lambda: server.connections, 5)
    [handler] = server.connections
    counted = server.requests_count
    for sent in range(1, 5000):
        await loop.sock_sendall(sock, request)
        # polled every 1 ms: an answer takes about that, and the buffers fill after a few
        # hundred (at eventually()'s 20 ms, ~350 of them took 8 s)
        assert await eventually(lambda: server.requests_count - counted == sent
                                and handler.transport is not None
                                and not handler._request_in_progress, 5, every=0.001)
        assert not handler._paused
        if handler.transport.get_write_buffer_size() > 0:
            return sock, sent
    raise AssertionError("the kernel buffers never filled")


async def _cut_short(sock, sent: int) -> bool:
    """Whether the client on ``sock`` (which read nothing) gets less than its ``sent`` answers
    whole before its connection ends (within 5 s, or this fails)."""
    got = bytearray()
    try:
        async with asyncio.timeout(5):
            while chunk := await asyncio.get_running_loop().sock_recv(sock, 65536):
                got += chunk
    except ConnectionError:
        pass
    end = got.rfind(b"\r\n\r\n")  # of the last head received (no body here holds one)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)",
                           got[got.rfind(b"HTTP/1.1 ", 0, end):end])[1])
    return got.count(b"HTTP/1.1 200 OK\r\n") < sent or len(got) - end - 4 < length


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
async def test_a_client_that_stops_reading_near_the_end_of_its_answers_frees_its_slot(
        redis_url, monkeypatch, connection):
    """A client that stopped reading with the kernel buffers full and less than the 64 KiB
    high-water mark left in keygate's own buffer was never timed out: the write-stall timer
    runs only while that buffer is over its high-water mark. The connection's close (idle
    timeout, Connection: close) then waited for the tail to be taken for ever, holding its
    place under server.max_connections: a few such clients shut everyone out. A tail not
    taken within server.timeouts.body of the close has its connection aborted."""
    answer_body = b"x" * (16 << 10)
    served = []

    async def answer(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.Response(body=answer_body, content_type="application/octet-stream")

    async with serving(answer) as url:
        config = edge_config(url, max_connections=1)
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            sock, sent = await _pipeline_until_a_tail_is_stuck(
                g.proxy_server.port, g.gw.proxy_server,
                b"GET /public/big HTTP/1.1\r\nHost: g\r\n\r\n")
            try:
                if connection == "close":  # one more, answered, then the connection closes
                    await asyncio.get_running_loop().sock_sendall(sock, b"GET /public/big "
                        b"HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
                    sent += 1
                # closed at once (close) or after idle (2 s); then aborted after body (1 s)
                gone = await eventually(lambda: not g.gw.proxy_server.connections, 6.0)
                assert gone, "a client that stopped reading near its answers' end holds " \
                             "its connection slot for ever"
                assert len(served) == sent
                async with g.proxy.get("/public/ok") as r:
                    assert r.status == 200
                    assert await r.read() == answer_body
                assert await _cut_short(sock, sent)
            finally:
                sock.close()


async def test_a_client_that_stops_reading_near_the_end_of_its_answers_is_cut_off_at_a_stop(
        redis_url, upstream, monkeypatch):
    """Stopping the listener closes every connection and forgets them: one whose client had
    stopped reading near the end of its answers stayed open (its socket held) for as long as
    the process ran, as keygate embedded in an application does after a stop."""
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        sock, sent = await _pipeline_until_a_tail_is_stuck(
            g.proxy_server.port, g.gw.proxy_server,
            b"GET /public/x HTTP/1.1\r\nHost: g\r\nX-Pad: %s\r\n\r\n" % (b"p" * 8000))
        try:
            await g.proxy_server.close()  # the listener stops
            await asyncio.sleep(2.0)  # past server.timeouts.body (1 s), the client not reading
            assert await _cut_short(sock, sent), "kept open past server.timeouts.body"
        finally:
            sock.close()


async def test_a_client_that_stops_reading_near_the_end_of_admin_answers_frees_its_slot(
        redis_url, upstream, monkeypatch):
    """The admin listener (aiohttp's own start()) closes an idle connection the same way, and
    its close waited for ever on a client that stopped reading near the end too."""
    async with admin_listener(redis_url, upstream, monkeypatch, header_timeout=1.0,
                              write_timeout=1.0, keepalive_timeout=2.0) as runner:
        port, server = runner.addresses[0][1], runner.server
        async with ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                assert len(await r.read()) < 64 * 1024  # a tail of one is under 64 KiB
        sock, sent = await _pipeline_until_a_tail_is_stuck(
            port, server, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            gone = await eventually(lambda: not server.connections, 6.0)  # idle, then body
            assert gone, "a client that stopped reading near its answers' end keeps its " \
                         "admin connection for ever"
            assert await _cut_short(sock, sent)
        finally:
            sock.close()


# --- what one request can cost the event loop ---------------------------------------------------

async def test_queries_and_headers_of_percent_signs_cost_the_loop_what_ordinary_ones_do(
        redis_url, upstream, monkeypatch):
    """The key-in-URL screen, the access log's masking and the ``_method`` parameter read
    percent-decode the query (and a public route's ``Authorization``) with urllib, which
    raises and catches an exception for every '%' not followed by two hex digits: an 8 KiB
    query of '%' signs (or of '%25', a '%' once decoded) held the event loop for ~25 ms, a
    few hundred times an ordinary request, without a key, on any path. Now such a request
    costs the loop about what one of the same size without escapes does (CPU time of the
    loop's thread, both measured here, the best of three runs)."""
    async with gateway_under_test(edge_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        hostile = [("%" * 8000 + "&_method=GET", ""), ("%25" * 2660 + "&_method=GET", ""),
                   ("%%%%%%%%=%&" * 700 + "_method=GET", ""),
                   ("a=b", "Authorization: Token " + "%" * 7000 + "\r\n"),
                   ("a=b", "Authorization: Basic " + "%25" * 2300 + "\r\n")]
        ordinary = [(("a" * len(q) if "%" in q else q), h.replace("%", "a"))
                    for q, h in hostile]

        async def cost(requests) -> float:
            best = float("inf")
            for _ in range(3):
                started = time.thread_time()
                for _ in range(4):
                    for query, headers in requests:
                        reader, writer = await g.raw_connection()
                        writer.write(f"GET /public/x?{query} HTTP/1.1\r\nHost: g\r\n"
                                     f"Connection: close\r\n{headers}\r\n".encode())
                        answer = await asyncio.wait_for(reader.read(), 5)
                        writer.close()
                        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
                best = min(best, time.thread_time() - started)
            return best
        plain = await cost(ordinary)
        spent = await cost(hostile)
        assert spent < 2 * plain + 0.02, (spent, plain)


@pytest.mark.parametrize("line", [b"POST /public/x", b"GET /public/x"],
                         ids=["public POST", "public GET"])
async def test_chunked_trailers_are_bounded_as_a_head_is(redis_url, monkeypatch, line):
    """aiohttp applies its bound on one header field to a chunked body's trailer fields too,
    which HEAD_MAX (counted on heads only) does not cover: raised to 32 KiB (for a verify
    call's long X-Forwarded-Uri), 127 trailer fields of 32 KiB (~4 MiB, twice over once
    parsed) were taken and held per connection while the body was under way. A field keeps
    8 KiB: the first one over it is refused. A head is bounded at 32 KiB precisely so that
    max_connections clients cannot hold tens of GB."""
    got = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        got.set()
        await request.read()
        return web.Response(text="ok")

    async with serving(slow) as url:
        config = make_config(url, routes=ROUTES, server=ServerConfig(
            host="127.0.0.1", timeouts=Timeouts(header=5.0, body=30.0, idle=5.0)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            reader, writer = await g.raw_connection()
            writer.write(line + b" HTTP/1.1\r\nHost: g\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
            await writer.drain()
            await asyncio.wait_for(got.wait(), 5)  # forwarded: the body is under way
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            field = b"X-T%d: " + b"a" * (30 * 1024) + b"\r\n"
            for i in range(120):
                writer.write(field % i)
                await writer.drain()
            await asyncio.sleep(1.0)
            held = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            answer = b""
            try:
                answer = await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                pass
            writer.close()
            # each field was refused at once (400) while the bound was 8 KiB; a head's bound
            # is 32 KiB in all
            assert held < 256 * 1024 or answer.startswith(b"HTTP/1.1 400"), \
                f"{held / 2**20:.1f} MiB of trailer fields held for one connection; answer {answer[:40]!r}"
