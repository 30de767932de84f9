"""Bodies that stream both ways while they are being written: a live request body (NDJSON,
log shipping) reaches the upstream before it ends, an answer that pauses between chunks is cut
only past the upstream's ``timeout``, and an answer the upstream cuts mid-body is said in the
access log and ``keygate_upstream_errors_total``.

Real gateway, real redis-server, raw loopback upstreams and raw client sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from gateway.config import Route, ServerConfig, Timeouts, Upstream
from gateway.proxying import forward

from harness import gateway_under_test, make_config, raw_upstream

ROUTES = (Route("/public/**", "api", (), (), True),)
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _config(url: str, *, timeout: float = 2.0, body: float = 5.0):
    config = make_config(url, routes=ROUTES, server=ServerConfig(
        host="127.0.0.1", access_log="json", timeouts=Timeouts(header=5.0, body=body,
                                                                idle=10.0)))
    return dataclasses.replace(config, upstreams={"api": Upstream("api", url, timeout)})


# --- a live request body reaches the upstream before it ends -------------------------------------

async def test_a_live_chunked_body_reaches_the_upstream_line_by_line(redis_url, monkeypatch):
    """A client streams NDJSON lines and waits for the upstream's answer to each before it
    sends the next (full duplex). keygate read ahead up to 64 KiB of a body, however long that
    took, before it took an upstream connection: the upstream got nothing, and after
    ``server.timeouts.body`` the client got 408. The read-ahead now also ends
    ``forward.PREFETCH_WAIT`` (1 s) after it began: the head and the first line go upstream
    then, and each later line as it comes."""
    received = bytearray()
    first_line_at: list[float] = []

    async def answer(reader, writer):
        try:
            received.extend(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                size = await reader.readuntil(b"\r\n")
                received.extend(size)
                n = int(size, 16)
                data = await reader.readexactly(n + 2)
                received.extend(data)
                if n == 0:
                    break
                first_line_at.append(time.monotonic())
                reply = b"seen " + data[:-2]
                writer.write(b"%x\r\n%s\r\n" % (len(reply), reply))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server, url = await raw_upstream(answer)
    try:
        async with gateway_under_test(_config(url), redis_url, monkeypatch) as g:
            reader, writer = await asyncio.open_connection("127.0.0.1", g.proxy_server.port)
            sent_at = time.monotonic()
            writer.write(b"POST /public/live HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" b"9\r\n{\"n\": 1}\n\r\n")
            async with asyncio.timeout(4.0):  # within the body timeout (5 s)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                got = b""
                while b"seen {\"n\": 1}" not in got:
                    got += await reader.read(65536)
                writer.write(b"9\r\n{\"n\": 2}\n\r\n")
                while b"seen {\"n\": 2}" not in got:
                    got += await reader.read(65536)
                writer.write(b"0\r\n\r\n")
                while not got.endswith(b"0\r\n\r\n"):
                    chunk = await reader.read(65536)
                    assert chunk, got
                    got += chunk
            writer.close()
    finally:
        server.close()
    # the upstream got the head and each line as sent, the first one within the read-ahead's
    # pause (1 s) and the loop's slack, not after the body timeout
    assert first_line_at and first_line_at[0] - sent_at < forward.PREFETCH_WAIT + 1.0
    assert received.endswith(b"\r\n\r\n9\r\n{\"n\": 1}\n\r\n9\r\n{\"n\": 2}\n\r\n0\r\n\r\n"), \
        bytes(received)
    assert received.startswith(b"POST /public/live HTTP/1.1\r\n")


async def test_a_small_body_sent_at_once_still_goes_upstream_whole(redis_url, monkeypatch):
    """The pause that ends the read-ahead changes nothing for a body that is all here at
    once: it goes upstream whole with its ``Content-Length``, taking no upload slot."""
    seen: list[bytes] = []

    async def answer(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            seen.append(head + await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            pass
        finally:
            writer.close()

    server, url = await raw_upstream(answer)
    try:
        async with gateway_under_test(_config(url), redis_url, monkeypatch) as g:
            pool = g.gw.pipeline.forwarder._pools["api"][0]
            took: list[int] = []
            real = pool.request

            async def request(*args, **kwargs):
                took.append(kwargs.get("streaming", False))
                return await real(*args, **kwargs)
            monkeypatch.setattr(pool, "request", request)
            reader, writer = await asyncio.open_connection("127.0.0.1", g.proxy_server.port)
            writer.write(b"POST /public/whole HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                         b"\r\n" + b"z" * 5000)
            async with asyncio.timeout(4.0):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
    finally:
        server.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert took == [False]
    assert len(seen) == 1 and seen[0].endswith(b"\r\n\r\n" + b"z" * 5000)
    assert b"\r\nContent-Length: 5000\r\n" in seen[0]


# --- an answer that pauses mid-body: the upstream's timeout is the longest gap -----------------

def _timeout_row() -> str:
    """The ``timeout`` row of the upstreams table in docs/configuration.md."""
    text = (DOCS / "configuration.md").read_text()
    section = text[text.index("## `upstreams`"):text.index("## `routes`")]
    return next(line for line in section.splitlines() if line.startswith("| `timeout` |"))


def test_the_upstream_timeout_row_says_it_cuts_an_answer_that_pauses_mid_body():
    """docs/configuration.md said the upstream ``timeout`` was the wait for the response
    headers only; an answer whose body pauses longer than it between two chunks is cut too
    (tested below), which an event stream's heartbeats must stay under."""
    row = _timeout_row()
    assert "between two chunks of the response body" in row, row
    assert "heartbeat" in row and "no cap on the whole answer" in row, row
    assert "upstream_timeout" in row, row


def _sse_upstream(gaps: list[float], *, cut: str | None = None, status: bytes = b"200 OK"):
    """A raw upstream answering an event stream (with ``status``): one event, then one more
    after each gap in ``gaps``, then the end of the body; or, with ``cut``, after the gaps:
    ``"hang"`` (no more bytes, the connection open) or ``"reset"`` (a TCP RST mid-body)."""
    import socket
    import struct

    async def answer(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" b"b\r\ndata: 0\r\n\r\n\r\n")
            await writer.drain()
            for n, gap in enumerate(gaps, 1):
                await asyncio.sleep(gap)
                writer.write(b"b\r\ndata: %d\r\n\r\n\r\n" % n)
                await writer.drain()
            if cut == "hang":
                await asyncio.sleep(10)
            elif cut == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    return answer


async def _streamed(g, seconds: float = 6.0) -> bytes:
    """What a raw client of ``GET /public/events`` got, to the connection's end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", g.proxy_server.port)
    writer.write(b"GET /public/events HTTP/1.1\r\nHost: x\r\nX-Request-Id: rid-events\r\n"
                 b"Connection: close\r\n\r\n")
    got = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                got += chunk
    except ConnectionError:
        pass
    writer.close()
    return got


def _access_line(g, capfd) -> dict:
    _, err = g.logs(capfd)
    lines = [json.loads(line) for line in err.splitlines()
             if line.startswith("{") and '"request_id":"rid-events"' in line]
    assert len(lines) == 1, err
    return lines[0]


async def test_an_event_stream_whose_gaps_stay_under_the_timeout_is_never_cut(
        redis_url, monkeypatch, capfd):
    """Heartbeats more frequent than the upstream's ``timeout`` keep a stream open well past
    it: the timeout bounds each gap, not the whole answer."""
    server, url = await raw_upstream(_sse_upstream([0.3] * 5))
    try:
        async with gateway_under_test(_config(url, timeout=0.6), redis_url, monkeypatch) as g:
            got = await _streamed(g)
            line = _access_line(g, capfd)
    finally:
        server.close()
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"data: 5\r\n\r\n\r\n0\r\n\r\n"), got
    assert (line["status"], line["error"]) == (200, None), line


@pytest.mark.parametrize("cut,code", [("hang", "upstream_timeout"),
                                      ("reset", "upstream_unavailable")])
async def test_an_answer_the_upstream_cuts_mid_body_is_logged_and_counted(
        redis_url, monkeypatch, capfd, cut, code):
    """An upstream that stops mid-body for longer than its ``timeout``, or resets the
    connection mid-body: the client's connection is aborted (no last chunk: the body never
    looks complete). The access line said status 200 with ``error`` null, and
    ``keygate_upstream_errors_total`` did not move: an operator saw a warning line at most.
    Now the line's ``error`` says ``upstream_timeout`` or ``upstream_unavailable`` (the status
    stays the 200 the client got) and the counter counts it."""
    server, url = await raw_upstream(_sse_upstream([0.2], cut=cut))
    try:
        async with gateway_under_test(_config(url, timeout=0.6), redis_url, monkeypatch) as g:
            started = time.monotonic()
            got = await _streamed(g)
            took = time.monotonic() - started
            line = _access_line(g, capfd)
            counted = g.counter("keygate_upstream_errors_total", upstream="api", code=code)
            others = g.counter("keygate_upstream_errors_total", upstream="api",
                               code={"upstream_timeout": "upstream_unavailable",
                                     "upstream_unavailable": "upstream_timeout"}[code])
    finally:
        server.close()
    assert got.startswith(b"HTTP/1.1 200 ") and b"data: 1\r\n\r\n" in got, got
    assert not got.endswith(b"0\r\n\r\n"), got
    if cut == "hang":
        assert 0.7 < took < 3.0, took  # the gap (0.6 s) after the second event
    assert (line["status"], line["error"]) == (200, code), line
    assert line["bytes_out"] == 2 * len(b"data: 0\r\n\r\n"), line
    assert (counted, others) == (1, 0)


@pytest.mark.parametrize("status", [b"401 Unauthorized", b"403 Forbidden",
                                    b"429 Too Many Requests"])
async def test_an_upstream_401_403_429_cut_mid_body_is_an_upstream_error_not_an_auth_failure(
        redis_url, monkeypatch, capfd, status):
    """The upstream's own 401/403/429 cut mid-body by a reset. ``observe`` tested ``status in
    (401, 403, 429)`` before the upstream codes: the cut was counted in
    ``keygate_auth_failures_total{reason="upstream_unavailable"}`` (a reason that is no auth
    failure) and never in ``keygate_upstream_errors_total``. Now it is an upstream error like
    any other cut answer."""
    server, url = await raw_upstream(_sse_upstream([], cut="reset", status=status))
    try:
        async with gateway_under_test(_config(url), redis_url, monkeypatch) as g:
            got = await _streamed(g)
            line = _access_line(g, capfd)
            upstream_errors = g.counter("keygate_upstream_errors_total", upstream="api",
                                        code="upstream_unavailable")
            auth_failures = g.counter("keygate_auth_failures_total",
                                      reason="upstream_unavailable")
    finally:
        server.close()
    assert got.startswith(b"HTTP/1.1 " + status) and not got.endswith(b"0\r\n\r\n"), got
    assert (line["status"], line["error"]) == (int(status[:3]), "upstream_unavailable"), line
    assert (upstream_errors, auth_failures) == (1, 0)
