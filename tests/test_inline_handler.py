"""The proxy listener runs each request's handler in its connection's task (no task per
request, gateway.proxying.server._InlineRequestHandler). What must not change with it: the
timeouts of one request on a kept-alive connection do not leak into the next, requests on
one connection are answered in order, a caller that vanishes mid-request does not stop the
listener, and an aiohttp whose ``start()`` differs from the copied one gets aiohttp's own.

Real gateway, real Redis, real upstreams on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

from aiohttp import web

from gateway.config import Route, ServerConfig, Timeouts, Upstream
from gateway.proxying import server as proxy_server

from harness import (bearer, eventually, gateway_under_test, make_config, raw_upstream,
                     serving)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


def _handler_tasks() -> list[asyncio.Task]:
    """The gateway's per-request tasks (aiohttp's kind); the upstream's, in this same process,
    are not counted."""
    found = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if getattr(coro, "__name__", "") == "_handle_request" and frame is not None and \
                isinstance(frame.f_locals.get("self"), proxy_server._JsonErrorRequestHandler):
            found.append(task)
    return found


def closing_answer(handle):
    """A raw upstream's connection handler: ``handle(reader, writer)``, then the connection
    closed; a gateway that goes away early is not an error."""
    async def answer(reader, writer):
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
    return answer


class Holding:
    """A gateway (``g``, with workspace acme and a key, ``token``) in front of an upstream that
    holds every request but ``/people/after`` until ``release`` is set; ``arrived`` counts the
    requests it has seen."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0

    async def upstream(self, request: web.Request) -> web.Response:
        self.arrived += 1
        if request.path != "/people/after":
            await self.release.wait()
        return web.json_response({"ok": True})

    async def until_arrived(self, n: int) -> bool:
        return await eventually(lambda: self.arrived >= n)


@contextlib.asynccontextmanager
async def holding(redis_url, monkeypatch):
    held = Holding()
    async with serving(held.upstream) as url:
        async with gateway_under_test(make_config(url), redis_url, monkeypatch) as g:
            await g.workspace()
            held.g = g
            held.token, _ = await g.key()
            try:
                yield held
            finally:
                held.release.set()


async def test_the_installed_aiohttp_still_has_the_start_the_proxy_listener_copies():
    # An aiohttp upgrade that changes RequestHandler.start, or the methods whose timing the
    # copy relies on, turns the copy off (the listener still works, slower); this says so
    # here, so the copy is checked against the new release and brought up to date.
    assert proxy_server.INLINE_START, (
        "aiohttp's RequestHandler changed in one of server._RELIED_ON: re-check and re-copy "
        "_InlineRequestHandler.start, then update _COPIED_FROM")


async def test_requests_held_at_the_upstream_run_in_their_connections_tasks(
        redis_url, monkeypatch):
    async with holding(redis_url, monkeypatch) as held:
        connections = [await held.g.raw_connection() for _ in range(4)]
        for i, (_, writer) in enumerate(connections):
            writer.write(f"GET /people/{i} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {held.token}\r\n\r\n".encode())
        assert await held.until_arrived(4)
        # four requests in flight, and not one task of aiohttp's per-request kind
        assert _handler_tasks() == []
        held.release.set()
        for reader, writer in connections:
            status, body = await _read_response(reader)
            assert status == 200 and json.loads(body) == {"ok": True}
            writer.close()


async def test_the_stock_handler_is_used_when_aiohttp_start_is_not_the_copied_one(
        redis_url, monkeypatch):
    monkeypatch.setattr(proxy_server, "INLINE_START", False)
    async with holding(redis_url, monkeypatch) as held:
        pending = asyncio.ensure_future(
            held.g.proxy.get("/people/1", headers=bearer(held.token)))
        assert await eventually(_handler_tasks)
        assert len(_handler_tasks()) == 1  # aiohttp's own start(): a task per request
        held.release.set()
        async with await pending as r:
            assert r.status == 200


async def test_timeouts_on_a_kept_alive_connection_each_fire_on_time(redis_url, monkeypatch):
    """A timeout that fired in one request cancels the task it runs in, now the connection's
    own. The next request on that connection must find the task intact: its own timeout
    neither fires early nor never, and a quick request is not cut short.

    Here the timeout is the wait for the upstream pool's one connection (``asyncio.timeout``
    on the running task, answered 504, the client connection kept alive), held by another
    request whose answer has begun but not ended."""
    release = asyncio.Event()

    async def holding(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while request.path == "/people/hold" and not release.is_set():
            await response.write(b".")  # a byte now and then: its own timeout never fires
            await asyncio.sleep(0.05)
        await response.write(b"x")
        return response

    async with serving(holding) as url:
        config = make_config(url)
        config = dataclasses.replace(config, upstreams={
            "api": Upstream("api", url, 0.4, max_connections=1)})
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace()
            token, _ = await g.key()
            reader, writer = await g.raw_connection()

            async def ask(path: str) -> tuple[int, float]:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                             f"Authorization: Bearer {token}\r\n\r\n".encode())
                started = time.monotonic()
                status, body = await _read_response(reader)
                assert status == 504 or body == b"x", (status, body)
                return status, time.monotonic() - started

            for _ in range(3):
                async with g.proxy.get("/people/hold", headers=bearer(token)) as holder:
                    assert holder.status == 200           # the pool's one connection is held
                    status, took = await ask("/people/1")
                    assert status == 504 and 0.35 <= took < 2, (status, took)
                    release.set()
                    assert (await holder.read()).endswith(b"x")
                release.clear()
                status, took = await ask("/people/1")
                assert status == 200 and took < 0.35, (status, took)
            writer.close()


async def test_requests_sent_back_to_back_on_one_connection_are_answered_in_order(
        redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        reader, writer = await g.raw_connection()
        writer.write(b"".join(f"GET /people/{i} HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {token}\r\n\r\n".encode()
                              for i in range(20)))
        for i in range(20):
            status, body = await _read_response(reader)
            assert status == 200 and json.loads(body)["raw_path"] == f"/people/{i}"
        writer.close()


async def test_callers_vanishing_mid_request_leave_the_listener_serving(
        redis_url, monkeypatch):
    async with holding(redis_url, monkeypatch) as held:
        g = held.g
        for i in range(10):
            _, writer = await g.raw_connection()
            writer.write(f"GET /people/{i} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {held.token}\r\n\r\n".encode())
            await writer.drain()
            # gone once its request is at the upstream (one gone before is never sent)
            assert await held.until_arrived(i + 1)
            writer.transport.abort()
        held.release.set()
        async with g.proxy.get("/people/after", headers=bearer(held.token)) as r:
            assert r.status == 200
        # the vanished callers' connections are gone; at most the session's own remains
        server = g.gw.proxy_server
        assert await eventually(lambda: len(server.connections) <= 1)


async def test_a_connection_closed_with_its_408_stops_holding_a_connection_slot(
        redis_url, monkeypatch):
    """A stalled body is answered 408 and the connection closed without the lingering read
    (proxying.server.answer_and_close). Run in the connection's task, the rest of start() follows
    before the loop has told the handler its transport is gone, so it started aiohttp's
    lingering read (10 s) on the closed connection: the connection kept its place in
    server.max_connections for those 10 s, and a caller after it was refused."""
    @closing_answer
    async def answer(reader, writer):   # a GET answered; a POST's body read and never answered
        if (await reader.readuntil(b"\r\n\r\n")).startswith(b"GET"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        while await reader.read(65536):
            pass

    srv, url = await raw_upstream(answer)
    try:
        config = make_config(url, routes=(Route("/public/**", "api", ("GET", "POST"), (),
                                                True),),
                             server=ServerConfig(host="127.0.0.1", max_connections=1,
                                                 timeouts=Timeouts(header=5, body=0.5,
                                                                   idle=30)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            reader, writer = await g.raw_connection()
            writer.write(b"POST /public/x HTTP/1.1\r\nHost: g\r\n"
                         b"Content-Length: 100\r\n\r\n0123456789")
            answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: answered, closed
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            server = g.gw.proxy_server
            assert await eventually(lambda: len(server.connections) == 0, timeout=2), \
                "a connection closed after its 408 still counts against max_connections"
            reader, writer = await g.raw_connection()   # the one slot is free again
            writer.write(b"GET /public/ok HTTP/1.1\r\nHost: g\r\n\r\n")
            status, _ = await asyncio.wait_for(_read_response(reader), 5)
            assert status == 200
            writer.close()
    finally:
        srv.close()


async def test_a_request_pipelined_behind_an_aborted_answer_is_neither_forwarded_nor_counted(
        redis_url, monkeypatch):
    """The upstream fails mid-response: keygate aborts the client connection (a truncated body
    must not look complete). A request the client pipelined behind it is never answered, so
    it must not be forwarded nor billed. Run in the connection's task, start() went on to it
    before the loop had told the handler its transport was gone."""
    seen: list[bytes] = []

    @closing_answer
    async def answer(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b" ", 2)[1])
            if head.startswith(b"GET /people/first "):  # 10 bytes of 100,000, then gone
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789")
                await writer.drain()
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv, url = await raw_upstream(answer)
    try:
        async with gateway_under_test(make_config(url), redis_url, monkeypatch) as g:
            await g.workspace()
            token, _ = await g.key()
            reader, writer = await g.raw_connection()
            writer.write(b"".join(f"GET /people/{name} HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {token}\r\n\r\n".encode()
                                  for name in ("first", "second")))
            try:
                got = await asyncio.wait_for(reader.read(), 5)  # to EOF (or a reset)
            except ConnectionError:
                got = b""
            writer.close()
            assert b"ok" not in got
            await asyncio.sleep(0.3)
            assert seen == [b"/people/first"]
            assert await g.used() == 1  # the first reached the upstream; not the second
    finally:
        srv.close()
