"""Review rv-verify: verify-only mode and the shipped front-proxy configs.

Each test fails on the current code for the reason in its docstring and passes once fixed.
Real parts only: a real redis-server, real keygate listeners on loopback, a real nginx running
docs/verify/nginx.conf as shipped, and a raw loopback API that records the bytes it got."""

from __future__ import annotations

import asyncio
import json

import pytest

from harness import gateway_under_test, make_config, target_parser
from test_nginx_verify import NGINX, nginx_stack

# ------------------------------------------------------------------------------------------
# helpers


async def _exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, read until the peer closes (or ``wait`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def _status_code(answer: bytes) -> tuple[int, str | None]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return status, code


class RawAPI:
    """A loopback API that records every byte it received (per connection) and answers each
    whole request 200 ``ok``: what nginx really sent, not what a framework made of it."""

    def __init__(self) -> None:
        self.raw: list[bytearray] = []
        self.targets: list[bytes] = []

    def received(self) -> bytes:
        return b"".join(bytes(b) for b in self.raw)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.raw.append(buf)
        done: list[bytes] = []
        parser = target_parser(done.append)
        try:
            while data := await reader.read(65536):
                buf += data
                parser.feed_data(data)
                while done:
                    self.targets.append(done.pop(0))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
        except Exception:  # a parse error: what was received is kept in raw
            pass
        writer.close()


@pytest.fixture
async def raw_api():
    api = RawAPI()
    server = await asyncio.start_server(api.handle, "127.0.0.1", 0)
    api.port = server.sockets[0].getsockname()[1]
    try:
        yield api
    finally:
        server.close()


@pytest.fixture
async def gw(redis_url, upstream, monkeypatch):
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        yield g


needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

# ------------------------------------------------------------------------------------------
# 1. The original request's Host is never judged in verify-only mode


@pytest.mark.parametrize("host", ["good.example@evil.example", 'good.example"><x', "[::1]x"])
async def test_verify_refuses_an_original_host_the_proxy_refuses(gw, upstream, host):
    """The proxy refuses a ``Host`` that is not ``host[:port]`` (400 ``bad_request``,
    gateway/pipeline.py check_host: "It goes upstream as X-Forwarded-Host, which upstreams
    build absolute URLs from: userinfo ... is an attacker's"). Traefik's forwardAuth hands
    keygate the original host as ``X-Forwarded-Host`` (with X-Forwarded-Method/-Uri), but
    verify never reads it: the same request is answered 200 and Traefik forwards it, with
    that host, to the API. SPEC (Deployment modes): verify runs the whole pipeline on the
    original request; "Refused: the same status, headers and JSON body the proxy would
    answer"."""
    port = gw.proxy_server.port
    proxied = await _exchange(port, f"GET /health HTTP/1.1\r\nHost: {host}\r\n"
                                    "Connection: close\r\n\r\n".encode())
    assert _status_code(proxied) == (400, "bad_request"), proxied  # the proxy's answer
    verified = await _exchange(port, (
        "GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate:8080\r\nConnection: close\r\n"
        "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /health\r\nX-Forwarded-Proto: http\r\n"
        f"X-Forwarded-Host: {host}\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n").encode())
    assert _status_code(verified) == (400, "bad_request"), verified


async def test_verify_judges_the_calls_own_host_in_envoys_path_mode(gw, upstream):
    """Envoy's ``path_prefix`` mode sends no X-Forwarded-Host: the check call carries the
    original request's own Host, judged as the proxy judges it."""
    verified = await _exchange(gw.proxy_server.port, (
        "GET /_keygate/v1/verify/health HTTP/1.1\r\nHost: good.example@evil.example\r\n"
        "Connection: close\r\n\r\n").encode())
    assert _status_code(verified) == (400, "bad_request"), verified


async def test_verify_refuses_two_original_hosts_and_takes_a_good_one(gw, upstream):
    """Two X-Forwarded-Host lines: which one the API reads is its own choice (400); one good
    host (with a port) passes, as the proxy takes it."""
    port = gw.proxy_server.port
    head = ("GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate:8080\r\nConnection: close\r\n"
            "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /health\r\n")
    twice = await _exchange(port, (head + "X-Forwarded-Host: api.example\r\n"
                                   "X-Forwarded-Host: evil.example\r\n\r\n").encode())
    assert _status_code(twice) == (400, "bad_request"), twice
    good = await _exchange(port, (head + "X-Forwarded-Host: api.example:8443\r\n\r\n").encode())
    assert _status_code(good)[0] == 200, good


@needs_nginx
@pytest.mark.parametrize("host", [b"good.example@evil.example", b'good.example"><x'])
async def test_nginx_never_hands_the_api_a_host_keygates_proxy_refuses(
        tmp_path, raw_api, own_redis, monkeypatch, host):
    """Through docs/verify/nginx.conf as shipped, ``Host: good.example@evil.example`` on a
    public route reaches the API as ``Host`` and ``X-Forwarded-Host`` (the snippet sets both
    from ``$host``): the userinfo host a password-reset link is built from, which keygate's own
    proxy refuses with 400 (security.md: "a client cannot have the upstream mail a reset link
    to its own host"). keygate never sees it: the auth subrequest carries neither the
    client's Host nor an X-Forwarded-Host. Expected: refused 400 as keygate's proxy refuses
    it, nothing reaching the API (the snippet passes the original host to keygate and verify
    checks it, or nginx refuses it itself)."""
    async with nginx_stack(tmp_path, raw_api.port, own_redis.url, monkeypatch) as (gw, base):
        port = int(base.rsplit(":", 1)[1])
        answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: " + host +
                                 b"\r\nConnection: close\r\n\r\n")
        got = raw_api.received()
        assert host not in got, got.decode(errors="replace")
        assert _status_code(answer)[0] == 400, answer


# ------------------------------------------------------------------------------------------
# 2. The shipped nginx.conf sends the API an HTTP/1.1 request without Host


@needs_nginx
async def test_nginx_gives_the_api_a_host_for_an_http10_request_without_one(
        tmp_path, raw_api, own_redis, monkeypatch):
    """An HTTP/1.0 client need not send ``Host``. nginx then has an empty ``$host`` (the
    snippet's server has no server_name), and ``proxy_set_header Host $host`` drops the header:
    the API gets an HTTP/1.1 request with no ``Host`` at all, which RFC 9112 3.2 says a server
    MUST answer 400 (Go's net/http, Node's llhttp in strict mode, Django's ALLOWED_HOSTS do).
    keygate's own proxy sends such a request on with the upstream's Host. Expected: the API
    receives a Host (e.g. ``proxy_set_header Host $proxy_host`` when ``$host`` is empty, or a
    server_name)."""
    async with nginx_stack(tmp_path, raw_api.port, own_redis.url, monkeypatch) as (gw, base):
        port = int(base.rsplit(":", 1)[1])
        answer = await _exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
        assert _status_code(answer)[0] == 200, answer
        got = raw_api.received()
        assert raw_api.targets == [b"/health"], got
        head = got.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"GET /health HTTP/1.1\r\n"), head
        names = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]]
        assert b"host" in names, head.decode(errors="replace")
