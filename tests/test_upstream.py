"""The lean upstream client against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway.upstream import (UpstreamConnectError, UpstreamPool, UpstreamProtocolError,
                              UpstreamTimeout)


def head(method: str, target: str, host: str = "upstream") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}".encode()


async def read_all(resp) -> bytes:
    return b"".join([c async for c in resp.chunks()])


@pytest.fixture
async def server(aiohttp_server):
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(body=body, headers={"X-Method": request.method,
                                                "X-Path": request.raw_path,
                                                "Set-Cookie": "a=1"})

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(int(request.query["mb"])):
            await resp.write(b"x" * (1024 * 1024))
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    return await aiohttp_server(app)


async def test_get_reuses_one_keep_alive_connection(server):
    pool = UpstreamPool(str(server.make_url("")))
    for i in range(5):
        resp = await pool.request(head("GET", f"/echo/{i}?q=%2F"))
        assert resp.status == 200
        assert (b"X-Path", f"/echo/{i}?q=%2F".encode()) in resp.headers
        assert resp.body_if_complete() == b""
    assert len(pool.idle) == 1
    await pool.close()


async def test_streams_a_large_upload_with_and_without_length(server):
    pool = UpstreamPool(str(server.make_url("")))
    payload = b"y" * (5 * 1024 * 1024)
    for length in (len(payload), None):
        chunks = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]

        async def source() -> bytes:
            return chunks.pop(0) if chunks else b""
        resp = await pool.request(head("POST", "/echo/up"), body=source, content_length=length)
        assert resp.status == 200
        assert len(await read_all(resp)) == len(payload)
    await pool.close()


async def test_streams_a_large_download(server):
    pool = UpstreamPool(str(server.make_url("")))
    resp = await pool.request(head("GET", "/big?mb=20"))
    total = 0
    async for chunk in resp.chunks():
        total += len(chunk)
    assert total == 20 * 1024 * 1024
    await pool.close()


async def test_head_request_has_no_body(server):
    pool = UpstreamPool(str(server.make_url("")))
    resp = await pool.request(head("HEAD", "/echo/h"), is_head=True)
    assert resp.status == 200
    assert await read_all(resp) == b""
    await pool.close()


async def test_timeout_and_refused(server):
    pool = UpstreamPool(str(server.make_url("")))
    with pytest.raises(UpstreamTimeout):
        await pool.request(head("GET", "/slow"), timeout=0.3)
    dead = UpstreamPool("http://127.0.0.1:1")
    with pytest.raises(UpstreamConnectError):
        await dead.request(head("GET", "/"))
    await pool.close()


async def test_a_failing_body_source_fails_the_request_with_its_error(server):
    pool = UpstreamPool(str(server.make_url("")))

    class TooBig(Exception):
        pass
    sent = [b"a" * 1000]

    async def source() -> bytes:
        if sent:
            return sent.pop()
        raise TooBig()
    with pytest.raises(TooBig):
        await pool.request(head("POST", "/echo/x"), body=source, content_length=None)
    await pool.close()


async def test_malformed_response_is_an_error(aiohttp_raw_server):
    async def garbage_server(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
        await writer.drain()
        writer.close()
    srv = await asyncio.start_server(garbage_server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamProtocolError):
        resp = await pool.request(head("GET", "/"))
        await read_all(resp)
    srv.close()
    await pool.close()
