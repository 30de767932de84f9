"""``WholeResponse`` (gateway/proxying/response.py) puts on the wire exactly what aiohttp's
``web.Response`` does: the same status line, headers in the same order, the same body, and the
same keep-alive decision, for generated responses and requests, over a real socket."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web
from multidict import CIMultiDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aiohttp.http_writer import StreamWriter

from gateway.proxying import response as response_module
from gateway.proxying.response import SEND_AT_ONCE, WholeResponse
from gateway.proxying.server import INLINE_START, ProxyServer

_DATE = re.compile(rb"\r\nDate: [^\r]*")
_REQUEST_ID = re.compile(rb"[0-9a-f]{32}")  # the proxy listener's own 500s (a handler raised)
_NO_BODY = {204, 304}


class Served:
    """A real aiohttp low-level server answering each request with ``self.case``, built
    with ``self.cls``; a request for ``/next`` gets a plain 200."""

    def __init__(self) -> None:
        self.case: dict = {}
        self.cls: type | str = web.Response  # or "of": WholeResponse.of
        self.port = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/next":
            return web.Response(text="next")
        c = self.case
        if self.cls == "of":  # the hot path's constructor: headers as a CIMultiDict it keeps
            headers = CIMultiDict(c["headers"])
            if c["content_type"] is not None:
                if "Content-Type" in headers:  # web.Response refuses both, as a 500
                    raise ValueError("passing both Content-Type header and content_type")
                headers["Content-Type"] = c["content_type"]
            response = WholeResponse.of(c["status"], c["body"], headers)
            if c["force_close"]:
                response.force_close()
            return response
        kwargs = {"status": c["status"], "body": c["body"], "headers": list(c["headers"])}
        if c["content_type"] is not None:
            kwargs["content_type"] = c["content_type"]
        response = self.cls(**kwargs)
        if c["force_close"]:
            response.force_close()
        return response


@pytest.fixture(params=["aiohttp", "proxy"])
async def served(request):
    """aiohttp's own server, and the proxy listener's (whose connections write a usual
    ``WholeResponse`` with ``send_at_once``, without ``prepare`` and ``write_eof``)."""
    s = Served()
    s.kind = request.param
    if request.param == "proxy":
        assert SEND_AT_ONCE and INLINE_START  # else this compares aiohttp with itself
        server = ProxyServer(s.handle, access_log=None, inline=True)
    else:
        server = web.Server(s.handle, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    s.port = listener.sockets[0].getsockname()[1]
    yield s
    listener.close()
    await server.shutdown(1)
    await listener.wait_closed()


async def exchange(port: int, case: dict) -> tuple[bytes, str]:
    """The whole answer as read off the socket (Date masked), and whether the connection
    then served a second request or was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{case['method']} /case HTTP/{case['version']}\r\nHost: t\r\n"
        if case["connection"]:
            head += f"Connection: {case['connection']}\r\n"
        if case["method"] in ("POST", "PUT", "PATCH"):
            head += "Content-Length: 0\r\n"
        writer.write(head.encode() + b"\r\n")
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except asyncio.IncompleteReadError as exc:  # refused to write it (header injection)
            return exc.partial, "closed"
        status = int(answer.split(b" ", 2)[1])
        length = re.search(rb"\r\nContent-Length: (\d+)", answer, re.I)
        if case["method"] != "HEAD" and status not in _NO_BODY and length:
            answer += await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)
        try:
            writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
            nxt = await asyncio.wait_for(reader.read(7), 5)
        except ConnectionError:
            nxt = b""
        return _REQUEST_ID.sub(b"-", _DATE.sub(b"\r\nDate: -", answer)), ("served" if nxt.startswith(b"HTTP/") else
                                                    "closed" if nxt == b"" else repr(nxt))
    finally:
        writer.close()


header_names = st.sampled_from(["Content-Type", "Server", "Date", "Connection", "X-Upstream",
                                "Set-Cookie", "Cache-Control", "Vary", "ETag"])
header_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)
cases = st.fixed_dictionaries({
    "status": st.sampled_from([200, 201, 204, 206, 301, 304, 400, 401, 403, 404, 413, 429,
                               500, 502, 503, 504]) | st.integers(200, 599),
    "method": st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT", "OPTIONS", "PATCH"]),
    "version": st.sampled_from(["1.1", "1.0"]),
    "connection": st.sampled_from([None, "close", "keep-alive"]),
    "body": st.binary(max_size=600),
    "headers": st.lists(st.tuples(header_names, header_values), max_size=6),
    "content_type": st.sampled_from([None, "application/json"]),
    "force_close": st.booleans(),
})

TYPICAL = {"status": 200, "method": "GET", "version": "1.1", "connection": None,
           "body": b'{"id": 1}', "headers": [("Content-Type", "application/json"),
                                             ("X-Request-Id", "r1")],
           "content_type": None, "force_close": False}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
@example(case=TYPICAL)
@example(case={**TYPICAL, "version": "1.0", "connection": "keep-alive"})
@example(case={**TYPICAL, "body": b"", "headers": []})
@example(case={**TYPICAL, "headers": [("X-Injected", "a\r\nSet-Cookie: stolen=1")]})
async def test_whole_response_writes_what_web_response_writes(served, case):
    served.case = case
    served.cls = web.Response
    expected = await exchange(served.port, case)
    served.cls = WholeResponse
    assert await exchange(served.port, case) == expected
    served.cls = "of"
    assert await exchange(served.port, case) == expected


async def test_the_typical_answer_is_one_write_with_its_length(served):
    """The case every proxied answer takes: exact Content-Length, kept alive."""
    served.case, served.cls = TYPICAL, "of"
    answer, after = await exchange(served.port, TYPICAL)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"X-Request-Id: r1\r\nContent-Length: 9\r\n")
    assert answer.endswith(b'\r\n\r\n{"id": 1}')
    assert after == "served"


async def test_the_proxy_listener_writes_the_usual_answer_without_prepare(served, monkeypatch):
    """On the proxy listener the usual answer is written by ``send_at_once``, not through
    ``prepare`` and ``write_eof`` (aiohttp's own server still takes that way)."""
    calls = []
    real = WholeResponse.prepare

    async def counted(self, request):
        calls.append(request.path)
        return await real(self, request)
    monkeypatch.setattr(WholeResponse, "prepare", counted)
    served.case, served.cls = TYPICAL, "of"
    answer, after = await exchange(served.port, TYPICAL)
    assert answer.endswith(b'\r\n\r\n{"id": 1}') and after == "served"
    assert calls == ([] if served.kind == "proxy" else ["/case"])


@pytest.mark.parametrize("cls, name", [(web.StreamResponse, "write_eof"),
                                       (web.Response, "write_eof"),
                                       (StreamWriter, "drain")],
                         ids=["StreamResponse.write_eof", "Response.write_eof",
                              "StreamWriter.drain"])
def test_send_at_once_is_off_when_aiohttp_changes_what_it_stands_for(monkeypatch, cls, name):
    """``send_at_once`` does in one step what ``Response.write_eof`` and
    ``StreamResponse.write_eof`` do (the body written, ``_eof_sent``, ``_body_length``, the
    writer let go) and what ``StreamWriter.drain`` does (the wait for a paused transport):
    another aiohttp release with other code in any of them must turn it off, as one with
    another ``StreamWriter.write_eof`` does."""
    real = getattr(cls, name)

    async def another_release(self, *args, **kwargs):  # the same, but other code
        return await real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, another_release)
    assert response_module._send_digest() != response_module._SEND_READ_FROM
