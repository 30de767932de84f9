"""Request smuggling and framing, as an attacker sends them, against a whole gateway.

The client side is a raw socket; the upstream is a raw-socket server that logs every byte it
receives and parses it with llhttp on its own. Each case asserts on what reached the upstream,
byte for byte: exactly one request per request the gateway allowed, carrying exactly the body
bytes the client sent (a ``Content-Encoding`` body is never decoded), and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import zlib
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Route, ServerConfig, Timeouts
from gateway.proxying.server import HEAD_MAX

from harness import gateway_under_test, make_config

SMUGGLED = (b"GET /admin-only/PWNED HTTP/1.1\r\nHost: upstream\r\n"
            b"X-Workspace-Id: acme\r\nX-Api-Key-Id: FORGEDKEYID1\r\nX-Api-Scopes: ALL\r\n\r\n")


@dataclass
class Seen:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RawUpstream:
    """Logs the raw bytes of every connection and the requests llhttp finds in them."""
    raw: list[bytearray] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    ended: int = 0  # connections whose handler is done (the gateway closed them, or it did)

    async def start(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def reset(self) -> None:
        self.raw.clear()
        self.requests.clear()
        self.errors.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.raw.append(buf)
        done: list[Seen] = []
        upstream = self

        class Callbacks:
            current: Seen | None = None

            def on_message_begin(self) -> None:
                self.current = Seen("", b"", [])

            def on_url(self, url: bytes) -> None:
                self.current.target += url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.current.headers.append((name, value))

            def on_body(self, body: bytes) -> None:
                self.current.body += body

            def on_message_complete(self) -> None:
                self.current.method = parser.get_method().decode()
                upstream.requests.append(self.current)
                done.append(self.current)

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    self.errors.append(f"upstream could not parse what it got: {exc}")
                    break
                while done:
                    if b"/slow" in done.pop(0).target:  # a handler still running meanwhile
                        await asyncio.sleep(0.8)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.ended += 1

    def close(self) -> None:
        self.server.close()


@pytest.fixture
async def raw_upstream():
    up = await RawUpstream().start()
    yield up
    up.close()


ROUTES = (Route("/public/**", "api", ("POST", "PUT", "GET"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)),
          Route("/any/**", "api", (), (), True))   # every method, CONNECT included


@pytest.fixture
async def edge(redis_url, raw_upstream, monkeypatch):
    config = make_config(f"http://127.0.0.1:{raw_upstream.port}", routes=ROUTES)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        g.token, _ = await g.key(scopes=["people:read"])
        g.up = raw_upstream
        yield g


async def exchange_to_close(port: int, payload: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send raw bytes; what came back, and whether the listener closed the connection (not
    just went quiet) within ``wait`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()
    try:
        writer.write(payload)
        await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except asyncio.TimeoutError:
                return bytes(out), False
            except ConnectionError:
                return bytes(out), True
            if not chunk:
                return bytes(out), True
            out += chunk
    finally:
        writer.close()


async def exchange(g, payload: bytes, *, wait: float = 3.0) -> bytes:
    """Send raw bytes, read until the gateway closes or goes quiet; return what came back."""
    return (await exchange_to_close(g.proxy_server.port, payload, wait))[0]


async def exchange_in_turn(g, first: bytes, then: bytes, *, wait: float = 3.0) -> bytes:
    """Send ``first``, wait for its whole answer (the test upstream's ``ok``), then send
    ``then`` on the same connection; return everything that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", g.proxy_server.port)
    try:
        writer.write(first)
        out = await asyncio.wait_for(reader.readuntil(b"ok"), wait)
        writer.write(then)
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            out += chunk
    finally:
        writer.close()
    return out


def statuses(answer: bytes) -> list[int]:
    """The status codes of the responses in ``answer``, in order."""
    found: list[int] = []

    class Callbacks:
        def on_headers_complete(self) -> None:
            found.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(Callbacks())
    try:
        parser.feed_data(answer)
    except httptools.HttpParserError:
        pass
    return found


def request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
            *, close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway"]
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bomb(encoding: str) -> bytes:
    """A compressed body that inflates to filler + a second, forged request."""
    plain = b"A" * 100_000 + SMUGGLED
    if encoding.lower() == "deflate":
        return zlib.compress(plain)
    return gzip.compress(plain)


def assert_forwarded_exactly(g, body: bytes, n: int = 1) -> Seen:
    up = g.up
    assert up.errors == [], up.errors
    assert len(up.requests) == n, [r.target for r in up.requests]
    seen = up.requests[-1]
    assert seen.body == body
    assert b"PWNED" not in b"".join(up.raw)
    return seen


# --- compressed bodies are forwarded as sent --------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "deflate", "Deflate", "br", "gzip, deflate",
                                      "x-gzip"])
@pytest.mark.parametrize("keyed", [False, True])
async def test_a_compressed_body_reaches_the_upstream_byte_for_byte(edge, encoding, keyed):
    body = bomb(encoding)
    headers = [("Content-Encoding", encoding), ("Content-Length", str(len(body)))]
    target = "/public/upload"
    if keyed:
        headers.append(("Authorization", f"Bearer {edge.token}"))
        target = "/people/upload"
    answer = await exchange(edge, request("POST", target, headers, body))
    assert statuses(answer) == [200], answer[:200]
    seen = assert_forwarded_exactly(edge, body)
    assert seen.header(b"Content-Encoding") == [encoding.encode()]
    assert seen.header(b"Content-Length") == [str(len(body)).encode()]


async def test_a_chunked_compressed_body_reaches_the_upstream_byte_for_byte(edge):
    body = bomb("gzip")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7000]), body[i:i + 7000])
                       for i in range(0, len(body), 7000)) + b"0\r\n\r\n"
    headers = [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]
    answer = await exchange(edge, request("POST", "/public/upload", headers, chunked))
    assert statuses(answer) == [200], answer[:200]
    assert_forwarded_exactly(edge, body)


async def test_body_limit_is_judged_on_the_bytes_sent_not_the_inflated_size(
        redis_url, raw_upstream, monkeypatch):
    from gateway.config import ServerConfig
    config = make_config(f"http://127.0.0.1:{raw_upstream.port}", routes=ROUTES,
                         server=ServerConfig(host="127.0.0.1", max_body_bytes=64 * 1024))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        g.up = raw_upstream
        small = gzip.compress(b"\0" * (20 * 1024 * 1024))   # 20 MiB inflated, ~20 KB sent
        answer = await exchange(g, request("POST", "/public/up", [
            ("Content-Encoding", "gzip"), ("Content-Length", str(len(small)))], small))
        assert statuses(answer) == [200]
        assert_forwarded_exactly(g, small)
        raw_upstream.reset()
        big = bytes(range(256)) * 400                        # 100 KiB sent
        answer = await exchange(g, request("POST", "/public/up", [
            ("Content-Length", str(len(big)))], big))
        assert statuses(answer) == [413]
        assert raw_upstream.requests == []


# --- ambiguous framing: refused, nothing reaches the upstream ----------------------------------

AMBIGUOUS = {
    "cl+te": [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
    "te+cl": [("Transfer-Encoding", "chunked"), ("Content-Length", "40")],
    "duplicate cl": [("Content-Length", "5"), ("Content-Length", "6")],
    "cl list": [("Content-Length", "5, 6")],
    "cl plus sign": [("Content-Length", "+5")],
    "cl negative": [("Content-Length", "-5")],
    "cl hex": [("Content-Length", "0x5")],
    "te chunked identity": [("Transfer-Encoding", "chunked, identity")],
    "te xchunked": [("Transfer-Encoding", "xchunked")],
    "te identity": [("Transfer-Encoding", "identity")],
    "te twice": [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
async def test_ambiguous_framing_is_refused_and_never_reaches_the_upstream(edge, case):
    body = b"0\r\n\r\n" + SMUGGLED
    answer = await exchange(edge, request("POST", "/public/x", AMBIGUOUS[case], body,
                                          close=False))
    codes = statuses(answer)
    assert codes[:1] == [400], answer[:200]
    assert len(codes) == 1, "the gateway must not read past a request it could not frame"
    assert edge.up.requests == [] and edge.up.errors == []


RAW_TRICKS = {
    "space before colon": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding : chunked\r\n"
                          b"Content-Length: 3\r\n\r\n0\r\n\r\n",
    "obs-fold te": b"POST /public/x HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nX-A: a\r\n"
                   b" Transfer-Encoding: chunked\r\n\r\nabc",
    "obs-fold value": b"POST /public/x HTTP/1.1\r\nHost: g\r\nX-A: a\r\n b\r\n"
                      b"Content-Length: 3\r\n\r\nabc",
    "bare lf": b"POST /public/x HTTP/1.1\nHost: g\nContent-Length: 3\n\nabc",
    "bare cr": b"POST /public/x HTTP/1.1\rHost: g\r\nContent-Length: 3\r\n\r\nabc",
    "bare cr in value": b"POST /public/x HTTP/1.1\r\nHost: g\r\nX-A: a\rContent-Length: 40\r\n"
                        b"Content-Length: 3\r\n\r\nabc",
    "nul in header": b"POST /public/x HTTP/1.1\r\nHost: g\r\nX-A: a\x00b\r\n"
                     b"Content-Length: 3\r\n\r\nabc",
    "chunk size overflow": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\nfffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "chunk size negative": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n-3\r\nabc\r\n0\r\n\r\n",
    "chunk size 0x": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk longer than its size": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: "
                                  b"chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    "chunk lf only": b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n3\nabc\n0\n\n",
    "http/1.0 chunked": b"POST /public/x HTTP/1.0\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\n3\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(RAW_TRICKS))
async def test_framing_tricks_are_refused_or_forwarded_exactly_once(edge, case):
    """Each is either refused (400, nothing upstream) or, where the gateway's parser reads it
    one way unambiguously, forwarded as exactly one request with exactly that body."""
    answer = await exchange(edge, RAW_TRICKS[case] + SMUGGLED, wait=1.5)
    codes = statuses(answer)
    assert edge.up.errors == []
    assert b"PWNED" not in b"".join(edge.up.raw)
    if codes[:1] == [400]:
        assert edge.up.requests == []
        assert not any(edge.up.raw), "a refused request's head or body went upstream"
    else:
        assert codes[:1] == [200], answer[:200]
        assert len(edge.up.requests) == 1
        assert edge.up.requests[0].body == b"abc"


@pytest.mark.parametrize("chunk", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\nzz\r\n0\r\n\r\n",
                                   b"3;\x01\r\nabc\r\n0\r\n\r\n", b"3 \r\nabc\r\n0\r\n\r\n"])
@pytest.mark.parametrize("keyed", [False, True])
async def test_a_bad_chunk_size_line_in_the_heads_read_is_a_json_400_and_nothing_goes_upstream(
        edge, chunk, keyed):
    """A chunked request whose body breaks its framing in the very read that brought its
    head (and a request smuggled behind it): aiohttp's parser fails the whole read, so the
    request is never handled: one JSON 400, the connection closed, not a byte upstream, and
    nothing counted."""
    path = "/people/x" if keyed else "/public/x"
    headers = [("Transfer-Encoding", "chunked")]
    if keyed:
        headers.append(("Authorization", f"Bearer {edge.token}"))
    answer = await exchange(edge, request("POST", path, headers, chunk, close=False) + SMUGGLED)
    assert statuses(answer) == [400], answer[:200]
    assert b'"code": "bad_request"' in answer
    assert not any(edge.up.raw) and edge.up.errors == []
    assert await edge.used() == 0


async def test_chunk_extensions_are_not_forwarded_as_data(edge):
    payload = (b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n3;name=\"v\"\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n")
    answer = await exchange(edge, payload)
    assert statuses(answer) == [200]
    assert_forwarded_exactly(edge, b"abcde")


# --- CONNECT: no tunnel, and nothing after its head read as a request ------------------------

@pytest.mark.parametrize("target", ["/any/x", "/public/x", "/people/x"])
@pytest.mark.parametrize("framing", ["content-length", "none"])
async def test_a_connect_request_is_refused_and_nothing_after_it_is_read(edge, target,
                                                                          framing):
    """aiohttp's parser takes a CONNECT's head as the end of the request (whatever its
    Content-Length says: the rest is tunnel data) and, once it is answered, parses those bytes
    as the next request: a body sent with CONNECT was judged, and on a public route forwarded,
    as a request of its own. A front proxy that frames the body by its Content-Length and
    pools client connections then has the next client's request appended to the attacker's
    (the 0.CL desync). On a route open to every method the CONNECT itself was sent upstream
    declaring a body that never followed, and answered 502. keygate tunnels nothing: 501,
    closed, nothing upstream."""
    smuggled = b"GET /public/smuggled HTTP/1.1\r\nHost: g\r\nX-Workspace-Id: acme\r\n\r\n"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: g\r\n".encode()
    if framing == "content-length":
        head += b"Content-Length: %d\r\n" % len(smuggled)
    answer = await exchange(edge, head + b"\r\n" + smuggled, wait=1.5)
    assert statuses(answer) == [501], answer[:300]
    assert b'"code": "not_implemented"' in answer
    assert edge.up.raw == [] and edge.up.requests == []


# --- Host: a client's is passed on as X-Forwarded-Host only when it is a host ---------------

@pytest.mark.parametrize("host", [b"good.example:@evil.example", b"user:pw@evil.example",
                                  b"good.example@evil.example", b"evil.example/path",
                                  b"evil.example?x", b"evil.example#x", b"good example",
                                  b"[::1", b"evil.example:80x", b"a\\b"])
async def test_a_host_header_that_is_not_a_host_is_refused_not_passed_on(edge, host):
    """RFC 9112 3.2: a Host with an invalid value is a 400. keygate passed the client's Host
    on as X-Forwarded-Host, which upstreams build absolute URLs from (password-reset links,
    redirects): 'good.example:@evil.example' passes a check that takes the host before the ':'
    and makes a link to evil.example."""
    payload = (b"GET /public/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    answer = await exchange(edge, payload)
    assert statuses(answer) == [400], answer[:300]
    assert b'"code": "bad_request"' in answer
    assert edge.up.raw == []


async def test_an_http11_request_without_a_host_is_refused(edge):
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request that lacks Host (the
    parser refuses it before keygate sees it); an HTTP/1.0 one has none to send."""
    answer = await exchange(edge, b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [400], answer[:300]
    assert b'"code": "bad_request"' in answer
    assert edge.up.raw == []
    answer = await exchange(edge, b"GET /public/x HTTP/1.0\r\n\r\n")
    assert statuses(answer) == [200], answer[:300]


@pytest.mark.parametrize("host", [b"gateway.example", b"gateway.example:8080", b"127.0.0.1:80",
                                  b"[::1]:8080", b"[fe80::1%25eth0]", b"xn--bcher-kva.example",
                                  b"a_b.example", b"Gateway.Example", b""])
async def test_a_host_header_that_is_a_host_is_passed_on_as_sent(edge, host):
    payload = (b"GET /public/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    answer = await exchange(edge, payload)
    assert statuses(answer) == [200], answer[:300]
    assert assert_forwarded_exactly(edge, b"").header(b"X-Forwarded-Host") == [host]


# --- pipelining: a refused request never lets the next one ride along -----------------------

async def test_pipelined_keyless_requests_are_each_judged_alone(edge):
    payload = (request("GET", "/people/1", [], close=False)                  # no key: 401
               + request("POST", "/people/1", [("Content-Length", str(len(SMUGGLED)))],
                         SMUGGLED, close=False)                            # no key: 401
               + request("GET", "/public/ok", []))                         # public: forwarded
    answer = await exchange(edge, payload)
    assert statuses(answer) == [401, 401, 200]
    seen = assert_forwarded_exactly(edge, b"")
    assert seen.target == b"/public/ok"


async def test_pipelined_allowed_requests_each_reach_the_upstream_once(edge):
    auth = [("Authorization", f"Bearer {edge.token}")]
    payload = (request("POST", "/people/a", auth + [("Content-Length", "3")], b"one", close=False)
               + request("POST", "/public/b", [("Content-Length", "3")], b"two", close=False)
               + request("GET", "/people/c", auth))
    answer = await exchange(edge, payload)
    assert statuses(answer) == [200, 200, 200]
    assert [(r.target, r.body) for r in edge.up.requests] == \
        [(b"/people/a", b"one"), (b"/public/b", b"two"), (b"/people/c", b"")]


# --- a read holding a request and then bytes the parser refuses ------------------------------
#
# aiohttp's C parser raises for a whole read when llhttp stops with an error anywhere in it, and
# the requests it completed earlier in that read went with it: a valid request was answered
# 400 or served depending on how TCP happened to segment the client's bytes.


async def test_a_request_saying_connection_close_is_answered_though_bytes_follow_it(edge):
    """RFC 9112 9.6: a server that receives ``Connection: close`` sends the final answer to
    that request, then closes (and processes nothing after it), as nginx does. llhttp stops at
    the bytes behind such a request ("Data after Connection: close"), and the valid, keyed
    request was answered 400 ``bad_request``, never forwarded."""
    auth = [("Authorization", f"Bearer {edge.token}")]
    payload = request("GET", "/people/1", auth) + request("GET", "/people/2", auth, close=False)
    answer, closed = await exchange_to_close(edge.proxy_server.port, payload)
    assert statuses(answer) == [200], answer[:300]
    assert closed and [r.target for r in edge.up.requests] == [b"/people/1"]
    assert await edge.used() == 1


async def test_an_http_1_0_request_is_answered_though_bytes_follow_it(edge):
    """The same for an HTTP/1.0 request without keep-alive: its connection closes after it."""
    payload = (b"GET /public/a HTTP/1.0\r\nHost: gateway\r\n\r\n"
               + request("GET", "/public/b", [], close=False))
    answer, closed = await exchange_to_close(edge.proxy_server.port, payload)
    assert statuses(answer) == [200], answer[:300]
    assert closed and [r.target for r in edge.up.requests] == [b"/public/a"]


async def test_a_valid_pipelined_request_is_answered_before_a_malformed_one_behind_it(edge):
    """A valid request and a malformed one behind it (two Content-Length values) in one
    read: the valid one is answered (forwarded once), then the 400, then the connection
    closes. Both were answered with one 400, and behind a front proxy pipelining several
    clients' requests one client's bad request answered another's good one."""
    payload = (request("GET", "/public/a", [], close=False)
               + request("POST", "/public/b", [("Content-Length", "1"), ("Content-Length", "2")],
                         b"xx", close=False))
    answer, closed = await exchange_to_close(edge.proxy_server.port, payload)
    assert statuses(answer) == [200, 400], answer[:400]
    assert b'"code": "bad_request"' in answer
    assert closed and [r.target for r in edge.up.requests] == [b"/public/a"]


async def test_requests_served_ahead_of_a_parse_error_are_judged_as_any(edge):
    """The requests served ahead of bytes the parser refuses are held to every edge rule,
    as in a read of their own: a trailer never reaches the upstream as the next request's
    header, an HTTP/1.0 request with Transfer-Encoding is refused, a head over 32 KiB is
    refused; each behind one valid request, then garbage."""
    junk = b"GET /public/z HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    lead = request("GET", "/public/a", [], close=False)
    chunked = (b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-Smuggled: first\r\nX-Smuggled-Last: evil\r\n\r\n")
    answer, closed = await exchange_to_close(
        edge.proxy_server.port, chunked + request("GET", "/public/y", [], close=False) + junk)
    assert statuses(answer) == [200] and closed, answer[:400]
    assert b"Smuggled" not in b"".join(edge.up.raw)
    assert [(r.target, r.body) for r in edge.up.requests] == [(b"/public/x", b"abc")]
    edge.up.reset()
    framed = (b"POST /public/x HTTP/1.0\r\nHost: g\r\nConnection: keep-alive\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    big = request("GET", "/public/big", [(f"X-Pad-{i}", "p" * 4000) for i in range(9)],
                  close=False)
    for refused, why in ((framed, b"Transfer-Encoding"), (big, b"32 KiB")):
        # refused as in a read of its own: first, a 400 with the reason, then closed...
        answer, closed = await exchange_to_close(edge.proxy_server.port, refused + junk)
        assert statuses(answer) == [400] and closed and why in answer, answer[:400]
        # ...behind a request, that one is answered 'Connection: close' (the client sends
        # what followed again), and the refused one is never forwarded
        answer, closed = await exchange_to_close(edge.proxy_server.port, lead + refused + junk)
        assert statuses(answer) == [200] and closed, answer[:400]
        assert [r.target for r in edge.up.requests] == [b"/public/a"]
        edge.up.reset()


JUNK = b"GET /public/z HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"


def padded_head(path: str, size: int, *, trailing: bool = False, close: bool = False) -> bytes:
    """A GET request whose head is ``size`` bytes as sent, nearly all of them blanks of
    optional whitespace (RFC 9110 5.6.3's OWS), which llhttp strips: before one header
    field's value (aiohttp's 8 KiB field bound counts only the value), or after the values
    of five (``trailing``: that bound counts those, each field stays under it)."""
    fields = 5 if trailing else 1

    def head(pad: int) -> bytes:
        blanks = [" " * (pad // fields + (i < pad % fields)) for i in range(fields)]
        lines = [f"X-Pad-{i}: v{b}" if trailing else f"X-Pad-{i}:{b}v"
                 for i, b in enumerate(blanks)]
        if close:
            lines.append("Connection: close")
        return "\r\n".join([f"GET {path} HTTP/1.1", "Host: g", *lines, "", ""]).encode()
    return head(size - len(head(0)))


async def sent_in_reads(port: int, pieces: list[bytes], wait: float = 3.0) -> tuple[bytes, bool]:
    """``pieces`` written on one connection 0.1 s apart (a read each); what came back, and
    whether the listener closed the connection within ``wait`` seconds of the last."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.1)
            writer.write(piece)
            await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except asyncio.TimeoutError:
                return bytes(out), False
            except ConnectionError:
                return bytes(out), True
            if not chunk:
                return bytes(out), True
            out += chunk
    finally:
        writer.close()


@pytest.mark.parametrize("behind", [False, True], ids=["alone", "ahead-of-a-parse-error"])
async def test_a_head_over_32_kib_of_optional_whitespace_is_refused(edge, behind):
    """docs/errors.md (400 bad_request): a head (request line and header fields) over
    32 KiB is refused; README: "A request head over 32 KiB is refused (400)". A 33.5 KB head
    made of blanks before a header value, in one read, was forwarded and answered 200: a
    head not on the usual path (one head ending its read within 32 KiB) was sized from its
    parsed fields, which leave out the optional whitespace llhttp strips, not by the bytes
    sent. Alone, the blanks were then counted towards a next head, and the connection closed
    only after the oversized request had been served; ahead of a parse error (the requests
    rescued from before it) they were not counted at all. It is refused as a head over
    32 KiB of field content is (test_requests_served_ahead_of_a_parse_error_are_judged_as_any):
    400 bad_request, nothing of it forwarded."""
    big = padded_head("/public/big", 33_546)  # over 32 KiB (32,768)
    payload = request("GET", "/public/a", [], close=False) + big + JUNK if behind else big
    answer, closed = await exchange_to_close(edge.proxy_server.port, payload)
    forwarded = [r.target for r in edge.up.requests]
    assert b"/public/big" not in forwarded, \
        f"a {len(big)}-byte head was forwarded (answers {statuses(answer)})"
    assert statuses(answer) in (([200, 400], [200]) if behind else ([400],)), answer[:300]
    assert closed and forwarded == ([b"/public/a"] if behind else [])


SMALL = b"GET /public/small HTTP/1.1\r\nHost: g\r\n"


@pytest.mark.parametrize("arrival", [
    "one-read", "trailing-blanks", "reads-under-32-kib", "split-in-its-empty-line",
    "behind-a-request", "ahead-of-a-parse-error-over-reads"])
@pytest.mark.parametrize("size", [HEAD_MAX, HEAD_MAX + 1], ids=["at-the-bound", "over-it"])
async def test_a_head_is_bounded_by_its_bytes_as_sent_however_it_arrives(edge, arrival, size):
    """The 32 KiB head bound counts the bytes sent, the optional blanks llhttp strips among
    them, whatever reads the head comes in and whatever shares them: a head of exactly
    32 KiB as sent is served, one byte more is refused (400, never forwarded). Reads that
    hold more than one head, end a head begun in earlier reads, or end within its empty
    line are measured from the bytes received (a head sized from its parsed fields went
    through at any size)."""
    last = arrival in ("one-read", "trailing-blanks", "reads-under-32-kib",
                       "behind-a-request")  # the big request is the last one sent
    big = padded_head("/public/big", size, trailing=arrival == "trailing-blanks", close=last)
    small = SMALL + b"Connection: close\r\n\r\n"
    pieces = {
        "one-read": [big],
        "trailing-blanks": [big],
        "reads-under-32-kib": [big[:12_000], big[12_000:24_000], big[24_000:]],
        "split-in-its-empty-line": [big[:-2], big[-2:] + small],  # "\r\n" | "\r\n" + next
        "behind-a-request": [SMALL + b"\r\n" + big],
        "ahead-of-a-parse-error-over-reads": [big[:20_000], big[20_000:] + JUNK],
    }[arrival]
    assert len(big) == size and (arrival != "reads-under-32-kib" or
                                 all(len(piece) < HEAD_MAX for piece in pieces))
    answer, closed = await sent_in_reads(edge.proxy_server.port, pieces)
    forwarded = [r.target for r in edge.up.requests]
    assert edge.up.errors == [], edge.up.errors
    served = size <= HEAD_MAX
    expected = {  # (answers, forwarded) if served, else if refused
        "split-in-its-empty-line": (([200, 200], [b"/public/big", b"/public/small"]),
                                    ([400], [])),
        "behind-a-request": (([200, 200], [b"/public/small", b"/public/big"]),
                             ([200], [b"/public/small"])),  # that one closing the connection
        "ahead-of-a-parse-error-over-reads": (([200, 400], [b"/public/big"]), ([400], [])),
    }.get(arrival, (([200], [b"/public/big"]), ([400], [])))[0 if served else 1]
    assert (statuses(answer), forwarded) == expected, answer[-300:]
    assert closed
    if not served:
        if arrival == "behind-a-request":  # the client sends the refused one again
            assert b"Connection: close" in answer
        else:
            assert b"32 KiB" in answer and b'"code": "bad_request"' in answer
    else:
        [seen] = [r for r in edge.up.requests if r.target == b"/public/big"]
        assert [v for k, v in seen.headers if k.startswith(b"X-Pad")] == \
            [b"v"] * (5 if arrival == "trailing-blanks" else 1)


# --- property: any framing the gateway accepts reaches the upstream once, body intact ---------

framings = st.fixed_dictionaries({
    "body": st.binary(max_size=3000),
    "chunked": st.booleans(),
    "splits": st.lists(st.integers(1, 600), max_size=8),
    "extension": st.sampled_from([b"", b";a=b", b";x"]),
    "encoding": st.sampled_from([None, "gzip", "deflate", "br", "GzIp", "identity"]),
    "compress": st.booleans(),
    "keyed": st.booleans(),
    "follow": st.booleans(),
})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=framings)
async def test_property_one_request_upstream_per_allowed_request_with_its_exact_body(edge, f):
    edge.up.reset()
    body = f["body"]
    if f["compress"]:
        body = gzip.compress(body + SMUGGLED)
    headers: list[tuple[str, str]] = []
    if f["encoding"]:
        headers.append(("Content-Encoding", f["encoding"]))
    target = "/public/p"
    if f["keyed"]:
        headers.append(("Authorization", f"Bearer {edge.token}"))
        target = "/people/p"
    if f["chunked"]:
        headers.append(("Transfer-Encoding", "chunked"))
        wire, rest = bytearray(), body
        for size in f["splits"]:
            if not rest:
                break
            piece, rest = rest[:size], rest[size:]
            wire += b"%x%s\r\n%s\r\n" % (len(piece), f["extension"], piece)
        if rest:
            wire += b"%x\r\n%s\r\n" % (len(rest), rest)
        wire += b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        wire = body
    payload = request("POST", target, headers, bytes(wire), close=not f["follow"])
    after = request("GET", "/public/after", []) if f["follow"] else b""
    if f["chunked"] and after:
        # sent once the first answer is in: a request pipelined behind a chunked body is not
        # served (test_a_trailer_never_reaches_the_upstream_as_a_header_of_the_next_request)
        answer = await exchange_in_turn(edge, payload, after)
    else:
        answer = await exchange(edge, payload + after, wait=2.0)
    expected = [(target.encode(), body)] + ([(b"/public/after", b"")] if f["follow"] else [])
    assert statuses(answer) == [200] * len(expected), answer[:300]
    assert edge.up.errors == []
    assert [(r.target, r.body) for r in edge.up.requests] == expected


# --- the upstream writer never writes other than what it declared -----------------------------

@pytest.mark.parametrize("sizes, declared", [([5, 5], 5), ([3], 10), ([4, 4, 4], 8)])
async def test_upstream_writer_writes_exactly_the_declared_length_or_fails(raw_upstream, sizes,
                                                                           declared):
    from gateway.proxying.connection import UpstreamProtocolError
    from gateway.proxying.upstream import UpstreamPool
    pool = UpstreamPool(f"http://127.0.0.1:{raw_upstream.port}")
    chunks = [bytes([65 + i]) * n for i, n in enumerate(sizes)]

    async def source() -> bytes:
        return chunks.pop(0) if chunks else b""

    head = b"POST /x HTTP/1.1\r\nHost: upstream"
    try:
        with pytest.raises(UpstreamProtocolError):
            await pool.request(head, body=source, content_length=declared, timeout=2)
        await asyncio.sleep(0.2)
        sent = bytes(raw_upstream.raw[0])
        _, _, body_bytes = sent.partition(b"\r\n\r\n")
        assert len(body_bytes) <= declared           # never a byte past the framing
        assert raw_upstream.requests == []           # and never a complete request from it
    finally:
        await pool.close()


async def test_inflating_server_cannot_smuggle_past_the_writer(edge):
    """Even with the server inflating bodies again (the original bug's first half), the
    writer's length check stops the inflated bytes at the declared length."""
    from aiohttp.test_utils import BaseTestServer
    from gateway.proxying.server import ProxyServer

    inflating = ProxyServer(edge.gw.pipeline.handle, access_log=None, auto_decompress=True)

    class Front(BaseTestServer):
        async def _make_runner(self, **kwargs):
            from aiohttp import web
            return web.ServerRunner(inflating)

    front = Front(host="127.0.0.1")
    await front.start_server()
    try:
        body = bomb("gzip")
        payload = request("POST", "/public/upload", [("Content-Encoding", "gzip"),
                                                     ("Content-Length", str(len(body)))], body)
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        writer.write(payload)
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert statuses(answer) == [502]
        await asyncio.sleep(0.2)
        assert b"PWNED" not in b"".join(edge.up.raw)
        assert edge.up.requests == []
    finally:
        await front.close()


# --- trailers: a chunked body's trailer section never becomes a header of another request ----

async def test_a_trailer_never_reaches_the_upstream_as_a_header_of_the_next_request(edge):
    """aiohttp's C parser leaves the last trailer field of a chunked body pending and hands it
    to the next request on the connection as its first header. Behind a load balancer that
    pools client connections (and forwards trailers) that is one client's header in another
    client's request; from any client it is a header no hop before keygate ever saw as one."""
    chunked = (b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-Smuggled: first\r\nX-Smuggled-Last: evil\r\n\r\n")
    follow = b"GET /public/y HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    # pipelined in the same write ...
    answer = await exchange(edge, chunked + follow, wait=1.5)
    assert b"Smuggled" not in b"".join(edge.up.raw)
    assert statuses(answer) == [200] and b"Connection: close" in answer
    assert [r.body for r in edge.up.requests if r.target == b"/public/x"] == [b"abc"]
    # ... and sent once the first answer is in
    edge.up.reset()
    first, rest = await _answered_then(edge, [chunked], follow)
    assert statuses(first) == [200]
    assert b"Smuggled" not in b"".join(edge.up.raw)
    assert statuses(rest) in ([], [200])  # closed after the trailer, or served without it
    assert all(not r.header(b"X-Smuggled-Last") for r in edge.up.requests)


async def _answered_then(edge, parts: list[bytes], follow: bytes) -> tuple[bytes, bytes]:
    """``parts`` written on one connection, 0.3 s apart (a read each), and the first answer
    read; then ``follow`` on the same connection: (that answer, what came after it; b"" when
    the connection was closed)."""
    reader, writer = await edge.raw_connection()
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.3)
            writer.write(part)
            await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 3)
        try:
            writer.write(follow)
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(65536), 3)
        except ConnectionError:
            rest = b""
    finally:
        writer.close()
    return first, rest


async def test_a_connection_stays_usable_after_a_chunked_body_without_trailers(edge):
    reader, writer = await edge.raw_connection()
    try:
        for i in range(3):
            writer.write(b"POST /public/%d HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n%s" % (i, b"\r\n" * i))
            answer = await asyncio.wait_for(reader.readuntil(b"ok"), 3)
            assert statuses(answer) == [200]
    finally:
        writer.close()
    assert [(r.target, r.body) for r in edge.up.requests] == \
        [(b"/public/%d" % i, b"abc") for i in range(3)]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_upstreams_trailers_never_become_response_headers(redis_url, monkeypatch,
                                                                   method):
    """keygate re-frames an upstream's chunked answer, so its trailer section is dropped; it
    must never be merged into the header section the client gets (RFC 9110 6.5.1): a trailer
    such as Set-Cookie or Content-Type would then act as a header the upstream never sent."""
    from harness import raw_upstream as raw_answering

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: "
                     b"chunked\r\n\r\n2\r\nok\r\n0\r\nSet-Cookie: session=forged\r\n"
                     b"Content-Type: text/html\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server, url = await raw_answering(answer)
    try:
        config = make_config(url, routes=ROUTES)
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            answer_bytes = await exchange(g, request(method, "/public/t", []), wait=2.0)
    finally:
        server.close()
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert statuses(answer_bytes) == [200], answer_bytes
    assert b"session=forged" not in head and b"X-Trailer" not in head, head
    assert head.count(b"Content-Type") == 1 and b"Content-Type: text/plain" in head, head
    assert body == (b"ok" if method == "GET" else b"")


async def test_a_trailer_after_a_long_read_is_not_judged_an_end_without_trailers(edge):
    """The end of a chunked body is judged on the connection's last bytes, which must be
    contiguous: the tails of the last two reads joined are not, once the latest read is
    longer than the tail kept of it. A last chunk ``0;e`` ending one read and a trailer
    section of more than that tail in the next read joined as ``\\r\\n0;e`` + ``aaa…\\r\\n\\r\\n``,
    which reads as an end without trailers: the connection went on, and the pending trailer
    field became the first header of the next request."""
    head = b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0;e"
    trailer = b"xt\r\nX-Smuggled-Last: v" + b"a" * 700 + b"\r\n\r\n"
    follow = b"GET /public/y HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    first, rest = await _answered_then(edge, [head, trailer], follow)  # a read each
    assert statuses(first) == [200]
    assert statuses(rest) in ([], [200])
    assert all(not r.header(b"X-Smuggled-Last") for r in edge.up.requests), \
        [r.headers for r in edge.up.requests]
    assert b"Smuggled" not in b"".join(edge.up.raw)


# --- paths an upstream reads as another route -------------------------------------------------

@pytest.mark.parametrize("path", ["/admin./users", "/admin%20/users", "/admin.json", "/admin/...",
                                  "/admin/%E2%80%A6"])
async def test_a_path_windows_or_a_format_suffix_reads_as_a_scoped_route_never_goes_upstream(
        redis_url, raw_upstream, monkeypatch, path):
    """IIS and Windows strip a segment's trailing dots and spaces; Rails (and Spring MVC before
    5.3) take '/admin.json' for '/admin'. In front of such an upstream, with '/admin/**'
    scoped and a public catch-all, these reached the admin endpoint with no key."""
    routes = (Route("/admin/**", "api", ("GET",), ("admin:read",)),
              Route("/**", "api", (), (), True))
    config = make_config(f"http://127.0.0.1:{raw_upstream.port}", routes=routes)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        answer = await exchange(g, request("GET", path, []))
        assert statuses(answer) == [400], answer[:200]
        assert b'"bad_path"' in answer
        async with g.proxy.get("/people.json") as r:  # its own route either way: forwarded
            assert r.status == 200
    assert [s.target for s in raw_upstream.requests] == [b"/people.json"]
    assert raw_upstream.errors == []


@pytest.mark.parametrize("chunk", [b"c\nMK58f03497-0\r\n0\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n",
                                   b"3\r\nabc\r\nzz\r\n0\r\n\r\n"])
@pytest.mark.parametrize("token", ["", "kg_live_notakeyatall", None])
async def test_a_refusal_answered_from_the_head_whose_body_then_breaks_closes_without_a_traceback(
        edge, chunk, token, caplog):
    """A keyed request refused from its head (no key, a malformed one, a wrong one) is answered
    at once; its chunked body arrives in a later read and breaks its framing (a bare LF after
    the chunk size, which RFC 9112 does not allow there, or a size that is no number). keygate
    read the rest of that body to keep the connection and the body's failure escaped as
    aiohttp's "Unhandled exception" traceback at ERROR: anyone reaching the listener could
    write one into the log per request. The connection now just closes: the one answer,
    nothing upstream, nothing behind it served, nothing logged at ERROR."""
    import logging
    caplog.set_level(logging.WARNING)
    if token is None:  # the key's own token with its last character changed: a wrong one
        token = edge.token[:-1] + ("y" if edge.token.endswith("x") else "x")
    auth = [] if token == "" else [("Authorization", f"Bearer {token}")]
    head = request("POST", "/people/x", [("Transfer-Encoding", "chunked"), *auth], close=False)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.proxy_server.port)
    try:
        writer.write(head)
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"}}"), 3)  # the refusal, whole
        writer.write(chunk + SMUGGLED)
        rest = await asyncio.wait_for(reader.read(), 3)  # the connection closes
    finally:
        writer.close()
    assert statuses(first) == [401] and statuses(first + rest) == [401], first + rest
    assert not any(edge.up.raw) and edge.up.errors == []
    assert [(r.name, r.getMessage()) for r in caplog.records
            if r.levelno >= logging.ERROR] == []


# --- the request line's HTTP version: HTTP/1.0 and HTTP/1.1 only ------------------------------



NOT_HTTP1 = [b"GET {path}\r\n\r\n",                       # no version: HTTP/0.9
             b"GET {path}\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/0.9\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/2.0\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/2.0\r\nHost: g\r\nConnection: keep-alive\r\n\r\n",
             b"GET {path} HTTP/3.0\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/9.9\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/1.2\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/1.10\r\nHost: g\r\n\r\n",
             b"GET {path} HTTP/01.1\r\nHost: g\r\n\r\n",
             b"GET {path} http/1.1\r\nHost: g\r\n\r\n",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",        # the HTTP/2 connection preface
             b"GET {path} HTTP/1.1\r\nHost: g\r\n\r\nGET {path} HTTP/2.0\r\nHost: g\r\n\r\n"]


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize("payload", NOT_HTTP1)
async def test_a_request_line_that_is_not_http_1_0_or_1_1_is_refused_never_forwarded(
        edge, listener, payload):
    """keygate speaks HTTP/1.1 (and 1.0) only. A request line without a version (HTTP/0.9), or
    one saying HTTP/0.9 or HTTP/2.0 (versions llhttp parses), was served: forwarded upstream as
    HTTP/1.1 and answered with the client's version echoed ("HTTP/0.9 200 OK" with headers,
    "HTTP/2.0 200 OK" in HTTP/1.1 syntax), on both listeners. It is a 400 bad_request now,
    nothing reaches the upstream, and the connection closes (what follows it is not read as
    a request); other versions llhttp refuses itself, the same way."""
    path = b"/public/x" if listener == "proxy" else b"/healthz"
    port = edge.proxy_server.port if listener == "proxy" else edge.admin_server.port
    answer, closed = await exchange_to_close(port, payload.replace(b"{path}", path))
    behind = b"\r\n\r\nGET" in payload
    if behind:  # pipelined behind a request: that one is answered, with Connection: close,
        # and the client sends the rest again (RFC 9112 9.3.2), as for a head over 32 KiB
        assert statuses(answer) == [200], answer[:300]
        assert b"Connection: close\r\n" in answer
    else:
        assert statuses(answer) == [400], answer[:300]
        assert answer.count(b'"code": "bad_request"') == 1, answer[:300]
    assert b"HTTP/2.0" not in answer and b"HTTP/0.9" not in answer
    assert closed
    assert len(edge.up.requests) == (1 if behind and listener == "proxy" else 0)
    assert all(b"HTTP/1.1\r\n" in raw and b"HTTP/2.0" not in raw for raw in edge.up.raw)


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize("payload", [b"GET {path} HTTP/2.0\r\nHost: g\r\n\r\n",
                                     b"GET {path}\r\n\r\n",
                                     b"GET {path} HTTP/1.2\r\nHost: g\r\n\r\n",
                                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                     b"GET {path} HTTP/1.1\r\nHost: g\r\nBad\x01: x\r\n\r\n",
                                     b"GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
async def test_a_request_refused_unread_is_answered_with_an_http_1_1_status_line(
        edge, listener, payload):
    """A request the listeners cannot read as HTTP/1.x (a version, a header line, the
    framing) was answered 'HTTP/1.0 400' (aiohttp's stand-in for a request it could not parse
    says HTTP/1.0); keygate speaks HTTP/1.1, and a server answers with the highest version it
    speaks of the request's major (RFC 9110 2.5), as nginx does: 'HTTP/1.1 400', saying
    'Connection: close' as the connection then closes."""
    path = b"/public/x" if listener == "proxy" else b"/healthz"
    port = edge.proxy_server.port if listener == "proxy" else edge.admin_server.port
    answer, closed = await exchange_to_close(port, payload.replace(b"{path}", path))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:300]
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nConnection: close" in head and b'"code": "bad_request"' in answer
    assert closed and edge.up.raw == []


@pytest.mark.parametrize("target, code", [
    (b"http://evil.example/public/x", b"bad_path"),   # absolute-form, another host than Host
    (b"http://g/public/x", b"bad_path"),              # absolute-form, the same host
    (b"*", b"bad_request"),                           # asterisk-form, not OPTIONS
    (b"g:80", b"bad_request"),                        # authority-form, not CONNECT
    (b"/public/x#frag", b"bad_path"),                 # a fragment
    (b"/public/x?a=b#frag", b"bad_request"),          # ... in the query: it was forwarded
    (b"/public/x?#", b"bad_request"),
    (b"/public/x?a=b#&_method=DELETE", b"bad_request")])
async def test_a_request_target_that_is_not_an_origin_form_path_is_refused_never_forwarded(
        edge, target, code):
    """The proxy listener forwards origin-form targets (a path and a query) only: keygate is
    no forward proxy, so an absolute-form target is refused rather than routed by its path
    with its host dropped (or its host trusted over Host), and a fragment, which no client
    sends in a request target, is refused rather than cut off: in the path it was, but one
    in the query went upstream as sent, where a server that cuts the fragment off (nginx,
    Node.js) reads another query than one that keeps it in the query (Go) and than keygate
    judged and logged. docs/errors.md says so."""
    answer = await exchange(edge, b"GET " + target + b" HTTP/1.1\r\nHost: g\r\n"
                            b"Connection: close\r\n\r\n", wait=1.5)
    assert statuses(answer) == [400], answer[:300]
    assert b'"code": "' + code + b'"' in answer
    assert edge.up.raw == []


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_an_http_1_0_request_with_transfer_encoding_is_refused_and_the_connection_closed(
        edge, listener):
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be treated as faulty
    framing and its connection closed after it (an HTTP/1.0 front reads no chunked body: it
    takes the rest of the connection for the body, which keygate read as the next request).
    keygate forwarded it, answered it keep-alive and served what the client sent next on the
    connection as a request of its own. As nginx, it is a 400 bad_request, then closed."""
    path = b"/any/x" if listener == "proxy" else b"/healthz"
    port = edge.proxy_server.port if listener == "proxy" else edge.admin_server.port
    first = (b"POST " + path + b" HTTP/1.0\r\nHost: g\r\nConnection: keep-alive\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    answer, closed = await exchange_to_close(port, first)
    assert statuses(answer) == [400], answer[:300]
    assert b'"code": "bad_request"' in answer and closed
    # and what follows it in the same read is never read as a request
    then = b"GET " + path + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    answer, closed = await exchange_to_close(port, first + then)
    assert statuses(answer) == [400], answer[:300]
    assert closed and edge.up.requests == []


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_a_streamed_answer_to_an_http_1_0_keep_alive_request_ends_with_the_connection(
        redis_url, monkeypatch, framing):
    """An answer streamed without a length (the upstream's was chunked, or ended with its
    connection) reaches an HTTP/1.0 client close-delimited: its body ends when the connection
    does. keygate answered a 'Connection: keep-alive' request so and kept the connection: the
    client waited for the end of that body until the idle timeout, and the answer to what it
    sent next on the connection was written into it (behind an HTTP/1.0 front that pools its
    connections, another client's answer). Now the connection closes after that body, and
    nothing sent behind it is served; an answer of known length keeps the connection."""
    from harness import raw_upstream
    body = b"x" * 100_000

    async def answer(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if head.startswith(b"GET /any/sized "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # not the whole answer in the first read
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(body)
                await writer.drain()
                writer.close()
                return
            await writer.drain()

    srv, url = await raw_upstream(answer)
    config = make_config(url, routes=ROUTES)
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            first = b"GET /any/stream HTTP/1.0\r\nHost: g\r\nConnection: keep-alive\r\n\r\n"
            then = b"GET /any/sized HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            answer, closed = await exchange_to_close(g.proxy_server.port, first + then)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200 OK\r\n"), head
            assert b"content-length" not in head.lower() and closed
            assert b"keep-alive" not in head.lower(), head
            assert rest == body, (len(rest), rest[-200:])
            # a sized answer keeps an HTTP/1.0 keep-alive connection, as before
            sized = b"GET /any/sized HTTP/1.0\r\nHost: g\r\nConnection: keep-alive\r\n\r\n"
            answer, closed = await exchange_to_close(g.proxy_server.port, sized + then)
            assert statuses(answer) == [200, 200] and closed, answer
    finally:
        srv.close()


# --- what follows an upgrade that did not become a tunnel ---------------------------------------

_LEAD = b"GET /public/lead HTTP/1.1\r\nHost: g\r\n\r\n"
_UPGRADES = {  # Upgrade: websocket requests that never become a tunnel, none needing a key
    "keyless-handshake": b"GET /people/ws HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n",                      # keygate's 401
    "route-not-opted-in": b"GET /public/up HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\n\r\n",               # forwarded, no upgrade
    "no-route": b"GET /nowhere HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"}                                     # keygate's 404
_BEHIND = {  # what the edge refuses anywhere else, and the marker it never lets upstream
    "trailer": (b"POST /public/chunked HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Smuggled: 1\r\n\r\nGET /public/next HTTP/1.1\r\nHost: g"
                b"\r\n\r\n", b"smuggled"),
    "head-over-32k": (b"GET /public/big HTTP/1.1\r\nHost: g\r\n" +
                      b"X-Pad: %s\r\n" % (b"p" * 8000) * 5 + b"\r\n", b"/public/big"),
    "http10-chunked": (b"POST /public/ten HTTP/1.0\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n5\r\nhello\r\n0\r\n\r\n", b"/public/ten")}
_ORDERINGS = {  # the reads sent: (leads before the upgrade in its read, a slow one a read before)
    "upgrade-first-in-its-read": (0, False), "upgrade-second": (1, False),
    "upgrade-third": (2, False), "upgrade-in-a-later-read-while-a-handler-runs": (0, True)}
_CASES = ([(o, u, "trailer", "copied-start") for o in _ORDERINGS for u in _UPGRADES] +
          [(o, "keyless-handshake", "trailer", "stock-start") for o in _ORDERINGS] +
          [(o, "keyless-handshake", b, s) for o in _ORDERINGS for b in ("head-over-32k",
           "http10-chunked") for s in ("copied-start", "stock-start")])


@pytest.mark.parametrize("ordering,upgrade,behind,start", _CASES)
async def test_bytes_behind_an_upgrade_that_is_no_tunnel_are_judged_whatever_came_before_it(
        redis_url, raw_upstream, monkeypatch, ordering, upgrade, behind, start):
    """The bytes a client sends behind an ``Upgrade: websocket`` request wait unparsed until it
    is answered; answered without a tunnel (keygate's own 401 or 404, a route that did not opt
    in, an upstream declining), they are the client's next requests, each judged at the edge
    like any: no trailer of a chunked body reaching the upstream as a header of the next
    request, no head over 32 KiB, no HTTP/1.0 request with Transfer-Encoding. That held only
    when the upgrade was the first request of its read: with an earlier request on the
    connection still unanswered, its answer dropped keygate's override of finish_response,
    and aiohttp's own re-parsed the held bytes out of sight of every judgement. Under
    aiohttp's stock start() too (what runs when the copied one no longer matches)."""
    from gateway.proxying import server as proxy_server
    if start == "stock-start":
        monkeypatch.setattr(proxy_server, "INLINE_START", False)
    leads, slow_before = _ORDERINGS[ordering]
    sent, marker = _BEHIND[behind]
    config = make_config(f"http://127.0.0.1:{raw_upstream.port}", routes=ROUTES)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        reader, writer = await g.raw_connection()
        try:
            if slow_before:
                writer.write(b"GET /public/slow HTTP/1.1\r\nHost: g\r\n\r\n")
                await asyncio.sleep(0.3)  # its handler waits for the upstream (0.8 s)
            writer.write(_LEAD * leads + _UPGRADES[upgrade] + sent)
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                while await asyncio.wait_for(reader.read(65536), 3):
                    pass
        finally:
            writer.close()
    upstream_got = b"".join(raw_upstream.raw)
    assert marker not in upstream_got.lower(), upstream_got[-600:]
    targets = [r.target for r in raw_upstream.requests]
    assert targets.count(b"/public/lead") == leads and \
        targets.count(b"/public/slow") == slow_before, targets


async def test_a_chunked_request_pipelined_behind_one_under_way_is_answered_then_closed(edge):
    """A chunked request parsed while an earlier one is still under way, with a request
    behind it (dropped by design: what follows a chunked body may be its trailer), is kept
    to be answered: it is forwarded and answered after the one under way, and its answer
    closes the connection. (Keeping it, then closing the connection as soon as the one under
    way was answered, left it never forwarded nor answered.)"""
    reader, writer = await edge.raw_connection()
    try:
        writer.write(b"GET /public/slow HTTP/1.1\r\nHost: g\r\n\r\n")
        await asyncio.sleep(0.3)  # its handler waits for the upstream (0.8 s)
        writer.write(b"POST /public/chunked HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /public/next HTTP/1.1\r\nHost: g\r\n\r\n")
        got = bytearray()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 3):
                got += chunk
    finally:
        writer.close()
    assert statuses(bytes(got)) == [200, 200], bytes(got)
    assert b"Connection: close" in got.split(b"HTTP/1.1 200 ")[2]
    assert [(r.target, r.body) for r in edge.up.requests] == [(b"/public/slow", b""),
                                                             (b"/public/chunked", b"hello")]


# --- a next head begun behind a whole request is held to timeouts.header --------------------------

_HANDSHAKE = (b"GET /people/ws HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_BEGUN = b"GET /public/b HTTP/1.1\r\nHost: g\r\nX-Slow: "  # and nothing more, ever


@pytest.mark.parametrize("first, pause", [
    (b"GET /public/a HTTP/1.1\r\nHost: g\r\n\r\n", None),
    (_HANDSHAKE + b"GET /public/a HTTP/1.1\r\nHost: g\r\n\r\n", None),
    (b"GET /public/slow HTTP/1.1\r\nHost: g\r\n\r\n", 0.3),
], ids=["pipelined-in-one-write", "behind-a-declined-upgrade", "sent-while-the-request-is-answered"])
async def test_a_head_begun_behind_a_whole_request_is_held_to_the_header_timeout(
        redis_url, raw_upstream, monkeypatch, first, pause):
    """docs/configuration.md, timeouts.header: "a connection that has not sent a whole request
    head within this is closed". A client that sends a whole request and then the beginning
    of a next head that never ends (a slow-loris needing no key), in the same write, behind
    a declined WebSocket handshake, or while the first is still answered (the upstream takes
    0.8 s over /slow), was closed only by timeouts.idle: the head's start came in behind a
    request, and nothing timed it once that request was answered. Header 1 s, idle 8 s: it
    stayed 8 s (with the defaults, 75 s instead of 10 s)."""
    config = make_config(f"http://127.0.0.1:{raw_upstream.port}", routes=ROUTES,
                         server=ServerConfig(host="127.0.0.1",
                                             timeouts=Timeouts(header=1.0, body=5.0, idle=8.0)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        reader, writer = await g.raw_connection()
        if pause is None:
            writer.write(first + _BEGUN)
        else:
            writer.write(first)
            await asyncio.sleep(pause)
            writer.write(_BEGUN)
        started = time.monotonic()
        got, held = bytearray(), None
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 12):
                got += chunk
            held = time.monotonic() - started
        writer.close()
    assert statuses(bytes(got))[-1] == 200, bytes(got)  # the whole request was answered
    assert held is not None and held < 4.0, f"the begun head held the connection {held} s"


# --- blank lines before a request line are no part of its head ----------------------------------

_DECLINED_HANDSHAKE = (b"GET /public/u HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\n"
             b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


@pytest.mark.parametrize("split", ["one-read", "blanks-then-head",
                                   "behind-a-declined-handshake-over-two-reads"])
async def test_blank_lines_before_a_request_line_do_not_count_towards_its_head(edge, split):
    """A head of exactly 32 KiB as sent (HEAD_MAX, served: README "A request head over 32 KiB
    is refused") preceded by one empty line (RFC 9112 2.2: a server SHOULD ignore at least one
    empty line received before the request-line). Sent in one read it is served: the blank
    line is no part of the head (_heads_as_sent skips _BLANK_LINES). Sent as "\\r\\n" in one
    read, then the head in the next, it is refused 400: _count_head adds the blank line's bytes
    to _head_bytes (``received`` counts from ``start`` before the blanks are skipped) and
    _heads_as_sent then counts them as ``earlier`` bytes of the head: the same bytes served or
    refused by how they were split into reads. Likewise behind a WebSocket handshake on a
    route that did not opt in (docs/websocket.md: what follows is read as the next requests,
    "held to the same 32 KiB head bound"), the head's end in a second read."""
    big = padded_head("/public/big", HEAD_MAX, close=True)
    pieces = {"one-read": [b"\r\n" + big],
              "blanks-then-head": [b"\r\n", big],
              "behind-a-declined-handshake-over-two-reads":
                  [_DECLINED_HANDSHAKE + b"\r\n" + big[:-20000], big[-20000:]]}[split]
    answer, _ = await sent_in_reads(edge.proxy_server.port, pieces)
    forwarded = [r.target for r in edge.up.requests]
    expected = [b"/public/big"]
    if split.startswith("behind"):
        expected = [b"/public/u", b"/public/big"]
    assert (statuses(answer), forwarded) == ([200] * len(expected), expected), answer[-300:]


async def test_an_extra_crlf_after_a_post_body_does_not_count_towards_the_next_head(edge):
    """RFC 9112 2.2: some clients send an extra CRLF after a POST body; a server SHOULD
    ignore it. Behind a POST whose body ends with that CRLF in one read, the next request's
    head (exactly 32 KiB as sent, README: over 32 KiB is refused) in the next read was
    refused 400: _judge_heads hands the read's rest ("\\r\\n") to _count_head, which adds it
    to _head_bytes, and _heads_as_sent counts those 2 bytes as the head's ``earlier`` part."""
    post = (b"POST /public/p HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\nhi\r\n")
    big = padded_head("/public/big", HEAD_MAX, close=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.proxy_server.port)
    try:
        writer.write(post)
        out = await asyncio.wait_for(reader.readuntil(b"ok"), 3)
        writer.write(big)
        while chunk := await asyncio.wait_for(reader.read(65536), 3):
            out += chunk
    finally:
        writer.close()
    forwarded = [r.target for r in edge.up.requests]
    assert (statuses(out), forwarded) == ([200, 200], [b"/public/p", b"/public/big"]), \
        out[-300:]
