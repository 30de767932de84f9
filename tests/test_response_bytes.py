"""Upstream response header values reach the client byte for byte, UTF-8 or not.

HTTP allows any byte from 0x80 up in a header value (obs-text: Latin-1 file names in
Content-Disposition, legacy systems). aiohttp's header serialiser writes str as UTF-8 and
silently drops what does not encode, so a value the gateway decoded with surrogateescape lost
those bytes (``a=\\xe9\\xff`` arrived as ``a=``). Real gateway, real Redis, a raw upstream on
loopback; the client reads the raw bytes off its socket.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp._http_writer import _serialize_headers
from hypothesis import given, settings, strategies as st
from multidict import CIMultiDict

from gateway.config import Route
from gateway.proxying.response import raw_header_block

from harness import gateway_under_test, make_config, raw_upstream

ROUTES = (Route("/public/**", "api", ("GET", "HEAD"), (), True),)

LATIN = b"X-Name: caf\xe9\r\nContent-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n" \
        b"X-Bytes: a=\xe9\xff\r\nX-Utf8: caf\xc3\xa9\r\n"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target.endswith(b"/chunked"):
                writer.write(b"HTTP/1.1 200 OK\r\n" + LATIN +
                             b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            elif target.endswith(b"/not-modified"):
                writer.write(b"HTTP/1.1 304 Not Modified\r\n" + LATIN + b"\r\n")
            else:
                body = b"" if head.startswith(b"HEAD ") else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\n" + LATIN + b"Content-Length: 2\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _head_of(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("method, path", [
    ("GET", "/public/whole"),          # a complete body: WholeResponse
    ("GET", "/public/chunked"),        # streamed back
    ("HEAD", "/public/whole"),         # no body
    ("GET", "/public/not-modified"),   # 304
])
async def test_upstream_header_bytes_reach_the_client_as_sent(redis_url, monkeypatch, method,
                                                              path):
    server, url = await raw_upstream(_answer)
    try:
        async with gateway_under_test(make_config(url, routes=ROUTES), redis_url,
                                      monkeypatch) as g:
            head = await _head_of(g.proxy_server.port,
                                  f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    finally:
        server.close()
    lines = head.split(b"\r\n")
    for line in LATIN.split(b"\r\n")[:-1]:
        assert line in lines, (line, head)


def test_the_raw_block_refuses_a_value_that_would_split_the_head():
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb", "\udce9\r\nX: 1"):
        with pytest.raises(ValueError):
            raw_header_block("HTTP/1.1 200 OK", CIMultiDict({"X-A": bad}))
        with pytest.raises(ValueError):
            raw_header_block("HTTP/1.1 200 OK", CIMultiDict({bad: "v"}))


_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters=":"),
                 min_size=1, max_size=20)
_values = st.text(st.characters(blacklist_categories=("Cs",)),
                  max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=12))
def test_the_raw_block_is_aiohttps_block_for_any_utf8_headers(pairs):
    """Control characters included: both refuse the same headers, and write the rest alike."""
    headers = CIMultiDict(pairs)
    try:
        expected = _serialize_headers("HTTP/1.1 200 OK", headers)
    except ValueError:
        with pytest.raises(ValueError):
            raw_header_block("HTTP/1.1 200 OK", headers)
    else:
        assert raw_header_block("HTTP/1.1 200 OK", headers) == expected


# --- a transfer coding keygate cannot pass on ---------------------------------------------------

@pytest.mark.parametrize("coding, chunked", [("identity", False), ("gzip", False),
                                             ("gzip, chunked", True)])
async def test_a_response_transfer_coding_is_never_silently_dropped_nor_cut_off(
        redis_url, monkeypatch, coding, chunked):
    """Transfer-Encoding is hop-by-hop: keygate re-frames the answer. An upstream answer with
    ``Transfer-Encoding: gzip`` (close-delimited, RFC 9112 6.3) was taken as framed: the body
    streamed out and the client connection was then aborted as if the upstream had failed;
    ``gzip, chunked`` reached the client as compressed bytes with no label saying so. Only
    ``chunked`` (and the no-op ``identity``) is re-framed; another coding is a 502, never
    passed on stripped of its name."""
    import gzip as gz
    from harness import raw_upstream
    plain = b"hello " * 100
    body = plain if coding == "identity" else gz.compress(plain)
    wire = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if chunked else body

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n" % coding.encode())
        writer.write(wire)
        await writer.drain()
        writer.close()           # the end of a close-delimited body

    srv, url = await raw_upstream(answer)
    from gateway.config import Route
    config = make_config(url, routes=(Route("/public/**", "api", ("GET",), (), True),))
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            async with g.proxy.get("/public/x") as r:
                got = await r.read()
                status = r.status
            if coding == "identity":
                assert (status, got) == (200, plain)
            else:
                assert status == 502 and b"upstream_unavailable" in got, (status, got[:80])
    finally:
        srv.close()


@pytest.mark.parametrize("te, plain_ok", [
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", False),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", False),
    (b"Transfer-Encoding: chunked, identity\r\n", False),
    (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", True),
    (b"Transfer-Encoding: Chunked \r\n", True),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", False),
    (b"Transfer-Encoding: chunked, CHUNKED\r\n", False)])
async def test_every_transfer_encoding_line_is_judged_and_chunked_must_be_the_last_coding(
        redis_url, monkeypatch, te, plain_ok):
    """Transfer-Encoding may come as several lines, which llhttp reads as one list: only the
    first line was judged, so ``chunked`` then ``gzip`` on a second line (the case a coding
    other than chunked is refused for) was taken as chunked framing while llhttp read the
    body to close: the answer was streamed out and then cut off. And ``chunked`` that is not
    the last coding (``chunked, identity``) was read to close with its chunk framing kept,
    so the client got the chunk-size lines as content, with a 200. And ``chunked`` twice
    (which a sender must never apply, RFC 9112 6.1) was read as chunked once: an upstream
    that did chunk twice had its inner chunk framing passed on as content. Either way a 502,
    never a cut or altered answer; ``chunked`` last is re-framed as before."""
    from harness import raw_upstream
    plain = b"hello " * 100
    wire = b"%x\r\n%s\r\n0\r\n\r\n" % (len(plain), plain)

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + te + b"\r\n" + wire)
        await writer.drain()
        writer.close()

    srv, url = await raw_upstream(answer)
    config = make_config(url, routes=ROUTES)
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            async with g.proxy.get("/public/x") as r:
                status, got = r.status, await r.read()
            if plain_ok:
                assert (status, got) == (200, plain)
            else:
                assert status == 502 and b"upstream_unavailable" in got, (status, got[:80])
    finally:
        srv.close()
