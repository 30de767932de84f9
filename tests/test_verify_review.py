"""Review rv-verify: verify-only mode and the shipped front-proxy configs.

Each test fails on the current code for the reason in its docstring and passes once fixed.
Real parts only: a real redis-server, real keygate listeners on loopback, a real nginx running
docs/verify/nginx.conf as shipped, and a raw loopback API that records the bytes it got."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

import pytest

from conftest import free_port
from gateway.config import Route
from gateway.models import MAX_SCOPE_LEN, MAX_SCOPES
from harness import (VERIFY, bearer, gateway_under_test, make_config, target_parser,
                     verify_config)
from test_nginx_verify import NGINX, nginx_config, nginx_stack, running_nginx

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


async def test_verify_judges_every_host_of_an_original_host_list(gw, upstream):
    """Behind a chain of proxies X-Forwarded-Host is a list: Apache and HAProxy append
    ", host", another proxy adds a second line, Traefik with trustForwardHeader passes the one
    it got. keygate's own proxy forwards a trusted peer's list as it came; verify answered 400
    to it (the list judged as one Host: a space), so every request of such a deployment was
    refused. Each entry is judged now: a list of hosts passes, one bad entry anywhere is a 400
    that names the header; a good host with a port passes."""
    port = gw.proxy_server.port
    head = ("GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate:8080\r\nConnection: close\r\n"
            "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /health\r\n")
    for hosts in (["api.example.com, lb.internal"], ["api.example", "lb.internal:8443"],
                  ["api.example:8443"]):
        lines = "".join(f"X-Forwarded-Host: {h}\r\n" for h in hosts)
        good = await _exchange(port, (head + lines + "\r\n").encode())
        assert _status_code(good)[0] == 200, (hosts, good)
    for hosts in (["api.example, good.example@evil.example"],
                  ["api.example", "good.example@evil.example"]):
        lines = "".join(f"X-Forwarded-Host: {h}\r\n" for h in hosts)
        bad = await _exchange(port, (head + lines + "\r\n").encode())
        assert _status_code(bad) == (400, "bad_request"), (hosts, bad)
        assert b"X-Forwarded-Host" in bad, bad


@pytest.mark.parametrize("xfh", ["api.example.com, lb.internal"])  # Apache mod_proxy appends
async def test_verify_allows_what_the_proxy_forwards_behind_a_trusted_appending_proxy(
        redis_url, upstream, monkeypatch, xfh):
    """Behind a chain of proxies, X-Forwarded-Host is a list: Apache mod_proxy (and HAProxy,
    Envoy with append_x_forwarded_host) append ", <host>" to one already there, and Traefik
    with ``trustForwardHeader`` hands the incoming one to forwardAuth unchanged. keygate's own
    proxy, with the peer in ``server.trusted_proxies``, forwards that header as it came
    (proxying/headers.py passed_on_by_rule: a trusted X-Forwarded-Host is kept, never judged)
    and answers 200. verify judged the whole list as one Host (no space allowed) and answered
    400 ``bad_request`` to every request of such a deployment (nginx/Traefik turn it into
    500). SPEC (Deployment modes): "Refused: the same status ... the proxy would answer"; here
    the proxy forwards."""
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        port = g.proxy_server.port
        proxied = await _exchange(port, (
            "GET /health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n"
            f"X-Forwarded-Host: {xfh}\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n").encode())
        assert _status_code(proxied)[0] == 200, proxied
        assert dict(upstream.requests[-1]["headers"])["X-Forwarded-Host"] == xfh
        verified = await _exchange(port, (
            "GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate:8080\r\nConnection: close\r\n"
            "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /health\r\n"
            f"X-Forwarded-Host: {xfh}\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n").encode())
        assert _status_code(verified)[0] == 200, verified


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


# ------------------------------------------------------------------------------------------
# 3. A key with many scopes: its verify answer is over nginx's proxy_buffer_size


@needs_nginx
async def test_nginx_lets_a_key_with_many_scopes_through_and_does_not_count_a_503(
        tmp_path, raw_api, own_redis, monkeypatch):
    """The admin API takes up to 100 scopes of up to 128 characters per key (MAX_SCOPES,
    MAX_SCOPE_LEN), and verify's 200 carries them all in ``X-Api-Scopes``. From about 4 KiB of
    answer head on, nginx's auth subrequest fails ("upstream sent too big header": the
    snippet's ``location = /_keygate_verify`` keeps nginx's default ``proxy_buffer_size``, one
    memory page), so every request of such a key gets 503 ``auth_unavailable`` ("keygate
    itself did not answer"), while keygate answered 200 and counted it: the key is unusable
    through the shipped config and each attempt spends the workspace's quota. keygate's own
    proxy forwards the same request. Expected: 200 through nginx with the identity reaching
    the API (a ``proxy_buffer_size`` in the auth location that fits the largest answer
    keygate can give)."""
    scopes = ["people:read"] + [f"s{i:02d}:" + "x" * 96 for i in range(40)]
    async with nginx_stack(tmp_path, raw_api.port, own_redis.url, monkeypatch) as (gw, base):
        await gw.workspace("acme")
        token, _ = await gw.key(scopes=scopes)
        port = int(base.rsplit(":", 1)[1])
        answer = await _exchange(port, b"GET /people/1 HTTP/1.1\r\nHost: api.example\r\n"
                                 b"Connection: close\r\nAuthorization: Bearer " +
                                 token.encode() + b"\r\n\r\n")
        used = (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"]
        assert _status_code(answer)[0] == 200, (answer, used)
        assert raw_api.targets == [b"/people/1"]
        assert b"X-Api-Scopes: " + " ".join(sorted(scopes)).encode() in raw_api.received()
        assert used == 1


@contextlib.asynccontextmanager
async def _nginx_in_front(tmp_path, api_port, redis_url, monkeypatch, routes=(), **server):
    """tests/test_nginx_verify.nginx_stack, with ``server`` settings of keygate's own and
    ``routes`` of its own (besides the stack's)."""
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(config, upstreams={}, routes=(
        Route("/health", None, ("GET",), (), True),
        Route("/people/**", None, ("GET",), ("people:read",)),
        Route("/people/**", None, ("POST",), ("people:write",)),
    ) + tuple(routes), server=dataclasses.replace(config.server, trusted_proxies=("127.0.0.1",), **server))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        port = free_port()
        conf = nginx_config(tmp_path, port, f"127.0.0.1:{gw.proxy_server.port}",
                            f"127.0.0.1:{api_port}")
        async with running_nginx(conf, port):
            yield gw, port


@needs_nginx
async def test_nginx_lets_the_largest_identity_keygate_gives_through(
        tmp_path, raw_api, own_redis, monkeypatch):
    """The largest verify answer a key from the admin API can get: MAX_SCOPES scopes of
    MAX_SCOPE_LEN characters (a 12,899-byte X-Api-Scopes), a workspace id of 63 characters
    and an adopted X-Request-Id of 128. Through nginx.conf it is allowed once, counted once,
    and the API gets the whole identity."""
    scopes = sorted(f"s{i:02d}:" + "x" * (MAX_SCOPE_LEN - 4) for i in range(MAX_SCOPES))
    assert len(" ".join(scopes)) == MAX_SCOPES * (MAX_SCOPE_LEN + 1) - 1
    ws = "w" * 63
    rid = "a" * 128
    routes = (Route("/big/**", None, ("GET",), (scopes[0],)),)
    async with _nginx_in_front(tmp_path, raw_api.port, own_redis.url, monkeypatch,
                               routes=routes) as (gw, port):
        await gw.workspace(ws)
        token, _ = await gw.key(ws, scopes=scopes)
        answer = await _exchange(port, b"GET /big/1 HTTP/1.1\r\nHost: api.example\r\n"
                                 b"Connection: close\r\nX-Request-Id: " + rid.encode() +
                                 b"\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
        used = (await gw.admin_json("GET", f"/workspaces/{ws}/usage"))[1]["used"]
        assert _status_code(answer)[0] == 200, (answer, used)
        got = raw_api.received()
        assert raw_api.targets == [b"/big/1"]
        assert b"\r\nX-Api-Scopes: " + " ".join(scopes).encode() + b"\r\n" in got
        assert b"\r\nX-Workspace-Id: " + ws.encode() + b"\r\n" in got
        assert b"\r\nX-Request-Id: " + rid.encode() + b"\r\n" in got
        assert used == 1
        # keygate's own answer head, as nginx got it: inside the shipped buffer
        head = (await _exchange(gw.proxy_server.port, (
            "GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n"
            f"X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /big/1\r\nX-Request-Id: {rid}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode())).split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        print("largest verify answer head:", len(head) + 4, "bytes")
        assert 12_899 < len(head) + 4 <= 16 * 1024 - 2048, len(head)


def test_the_shipped_nginx_buffers_hold_the_largest_identity():
    """nginx.conf's auth location and the ingress-nginx annotation size the buffer keygate's
    answer head must fit in from the admin API's limits, not nginx's 4k default."""
    import re

    import yaml

    from test_nginx_verify import SNIPPET

    def size(text: str) -> int:
        number, unit = re.fullmatch(r"(\d+)([kK]?)", text).groups()
        return int(number) * (1024 if unit else 1)

    auth = SNIPPET.read_text().split("location = /_keygate_verify {", 1)[1].split("}", 1)[0]
    shipped = [size(v) for v in re.findall(r"^\s*proxy_buffer_size\s+(\S+);", auth, re.M)]
    _, ingress = yaml.safe_load_all((SNIPPET.parent / "ingress-nginx.yaml").read_text())
    shipped.append(size(ingress["metadata"]["annotations"]
                        ["nginx.ingress.kubernetes.io/proxy-buffer-size"]))
    scopes = MAX_SCOPES * (MAX_SCOPE_LEN + 1) - 1   # X-Api-Scopes' value at the maximum
    assert len(shipped) == 2 and all(s >= scopes + 2048 for s in shipped), shipped


@needs_nginx
async def test_nginx_refuses_a_body_over_max_body_bytes_as_keygates_proxy_does(
        tmp_path, raw_api, own_redis, monkeypatch):
    """keygate's proxy refuses a declared body over ``server.max_body_bytes`` with 413
    ``body_too_large`` and counts nothing; verify refuses it too when it is told the length
    (gateway/reserved.py verify: "A declared body over the limit ... is refused as the proxy
    refuses it"), and docs/deployment-modes.md says nginx.conf "maps keygate's
    400/404/413/429/503 to the client". But the snippet's auth location clears the length
    (``proxy_set_header Content-Length ""``, needed since no body follows) and passes it in
    no other header keygate reads: keygate never answers 413 there, so a 5000-byte POST under
    ``max_body_bytes: 1000`` is allowed, forwarded whole to the API and counted. Expected:
    413 as keygate's proxy answers, nothing forwarded, nothing counted (the original length
    handed to verify in a header it reads, or the limit stated as nginx's
    ``client_max_body_size`` in the snippet and docs)."""
    async with _nginx_in_front(tmp_path, raw_api.port, own_redis.url, monkeypatch,
                               max_body_bytes=1000) as (gw, port):
        await gw.workspace("acme")
        token, _ = await gw.key(scopes=["people:read", "people:write"])
        answer = await _exchange(port, b"POST /people/1 HTTP/1.1\r\nHost: api.example\r\n"
                                 b"Connection: close\r\nContent-Length: 5000\r\n"
                                 b"Authorization: Bearer " + token.encode() + b"\r\n\r\n" +
                                 b"x" * 5000)
        used = (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"]
        assert (_status_code(answer)[0], raw_api.targets, used) == (413, [], 0), answer[:300]


async def test_verify_refuses_a_declared_length_over_max_body_bytes_uncounted(
        redis_url, upstream, monkeypatch):
    """X-Forwarded-Content-Length over ``server.max_body_bytes``: 413 ``body_too_large`` as the
    proxy answers, nothing counted; at the limit, allowed and counted; not one length in
    digits (a sign, two of them, a space inside): 400, as the proxy's parser refuses such a
    Content-Length."""
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_body_bytes=1000))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key(scopes=["people:read"])
        port = gw.proxy_server.port

        async def verify(*lengths: str) -> tuple[int, str | None]:
            extra = "".join(f"X-Forwarded-Content-Length: {n}\r\n" for n in lengths)
            return _status_code(await _exchange(port, (
                "GET /_keygate/v1/verify HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n"
                "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /people/1\r\n"
                f"Authorization: Bearer {token}\r\n{extra}\r\n").encode()))

        assert await verify("1001") == (413, "body_too_large")
        assert await verify("9" * 5000) == (413, "body_too_large")
        assert await gw.used() == 0
        for bad in (("-1",), ("1 0",), ("+5",), ("10", "10"), ("\u0661",)):
            assert await verify(*bad) == (400, "bad_request"), bad
        assert await gw.used() == 0
        assert await verify("1000") == (200, None)
        assert await gw.used() == 1


# ------------------------------------------------------------------------------------------
# ingress-nginx: the directives the controller writes for docs/verify/ingress-nginx.yaml


def _ingress_server(port: int, keygate: str, api: str) -> str:
    """The nginx directives ingress-nginx's template writes for the shipped Ingress and
    ConfigMap (rootfs/etc/nginx/template/nginx.tmpl, buildAuthResponseHeaders and
    buildAuthProxySetHeaders): the auth location with the ConfigMap's headers, the API's
    location with the controller's own X-Request-ID ($req_id) and one proxy_set_header per
    auth-response-headers entry."""
    import yaml

    from test_nginx_verify import SNIPPET
    configmap, ingress = yaml.safe_load_all((SNIPPET.parent / "ingress-nginx.yaml").read_text())
    notes = ingress["metadata"]["annotations"]
    auth_headers = "\n".join(f"        proxy_set_header '{k}' '{v}';"
                             for k, v in sorted(configmap["data"].items()))
    response = notes["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")
    copied = "\n".join(
        f"        auth_request_set $authHeader{i} $upstream_http_"
        f"{h.lower().replace('-', '_')};\n        proxy_set_header '{h}' $authHeader{i};"
        for i, h in enumerate(response))
    size = notes["nginx.ingress.kubernetes.io/proxy-buffer-size"]
    return f"""
map $http_x_request_id $req_id {{ default $http_x_request_id; "" $request_id; }}
map $http_host $best_http_host {{ default $http_host; "" $host; }}
server {{
    listen 127.0.0.1:{port};
    location = /_external-auth {{
        internal;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header Host keygate;
        proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
        proxy_set_header X-Original-Method $request_method;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_buffer_size {size};
        proxy_buffers 4 {size};
        proxy_http_version 1.1;
{auth_headers}
        proxy_pass http://{keygate}/_keygate/v1/verify;
    }}
    location / {{
        auth_request /_external-auth;
{copied}
        proxy_set_header Host $best_http_host;
        proxy_set_header X-Request-ID $req_id;
        proxy_set_header X-Forwarded-Host $best_http_host;
        proxy_buffer_size {size};
        proxy_buffers 4 {size};
        proxy_http_version 1.1;
        proxy_pass http://{api};
    }}
}}
"""


@needs_nginx
async def test_ingress_nginx_gives_the_api_one_request_id_and_keygate_the_host(
        tmp_path, raw_api, own_redis, monkeypatch):
    """ingress-nginx sets X-Request-ID ($req_id) on the request to the API itself; an
    auth-response-headers entry X-Request-Id added a second proxy_set_header of the same
    name, and the API got two request ids. keygate now adopts the controller's ($req_id, in
    the ConfigMap), so the one the API gets is the one in keygate's log. And the ConfigMap's
    X-Forwarded-Host has keygate refuse a Host its proxy refuses."""
    async with _nginx_in_front(tmp_path, raw_api.port, own_redis.url, monkeypatch) as (gw, _):
        port = free_port()
        (tmp_path / "ingress").mkdir()
        conf = nginx_config(tmp_path / "ingress", port, "127.0.0.1:1", "127.0.0.1:1")
        (tmp_path / "ingress" / "keygate.conf").write_text(_ingress_server(
            port, f"127.0.0.1:{gw.proxy_server.port}", f"127.0.0.1:{raw_api.port}"))
        async with running_nginx(conf, port):
            answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: api.example\r\n"
                                           b"Connection: close\r\n\r\n")
            assert _status_code(answer)[0] == 200, answer
            head = raw_api.received().split(b"\r\n\r\n")[0].split(b"\r\n")
            ids = [line.split(b":", 1)[1].strip() for line in head
                   if line.lower().startswith(b"x-request-id:")]
            assert len(ids) == 1, head
            assert answer.split(b"\r\n\r\n")[0].lower().count(b"\r\nx-request-id") <= 1
            raw_api.raw.clear()
            evil = await _exchange(port, b"GET /health HTTP/1.1\r\n"
                                         b"Host: good.example@evil.example\r\n"
                                         b"Connection: close\r\n\r\n")
            assert b"evil.example" not in raw_api.received()
            assert _status_code(evil)[0] in (400, 500), evil  # 500: ingress-nginx's mapping


# ------------------------------------------------------------------------------------------
# envoy.yaml: the ext_authz timeout must be above keygate's own longest check


def _envoy_authz_timeout() -> float:
    import yaml

    from test_nginx_verify import SNIPPET
    hcm = yaml.safe_load((SNIPPET.parent / "envoy.yaml").read_text())["static_resources"][
        "listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    timeout = authz["typed_config"]["http_service"]["server_uri"]["timeout"]
    assert timeout.endswith("s")
    return float(timeout[:-1])


async def test_envoys_check_timeout_outlasts_a_counted_verify(own_redis, upstream, monkeypatch):
    """A verify is counted at its end: with Redis slow just under store.timeout (the shipped
    2 s) for a cold key's reads, keygate answers 200, counted, after 2 s, where the example's
    ext_authz timeout of 2 s had Envoy answer 503 (status_on_error) for a request keygate
    counted. Every 200 must come within Envoy's timeout; the timeout must cover the bound in
    its comment (two store calls, the count's 0.8 x store.timeout, and room for the hash)."""
    import redis as sync_redis
    config = make_config(str(upstream.make_url("")))
    store_timeout = config.store.timeout
    envoy = _envoy_authz_timeout()
    assert envoy >= 3 * store_timeout + 4, envoy
    async with gateway_under_test(config, own_redis.url, monkeypatch) as gw:
        await gw.workspace("acme", plan="unlimited")
        tokens = [(await gw.key(scopes=["people:read"]))[0] for _ in range(3)]
        sync_redis.Redis.from_url(own_redis.url).execute_command(
            "CLIENT", "PAUSE", str(int(store_timeout * 1000) - 10))
        started = time.monotonic()

        async def check(token: str) -> tuple[int, float]:
            answer = await _exchange(gw.proxy_server.port, (
                "GET /_keygate/v1/verify/people/1 HTTP/1.1\r\nHost: api.example\r\n"
                f"Connection: close\r\nAuthorization: Bearer {token}\r\n\r\n").encode(), wait=15)
            return _status_code(answer)[0], time.monotonic() - started

        answers = await asyncio.gather(*(check(t) for t in tokens))
        allowed = [took for status, took in answers if status == 200]
        assert all(status in (200, 503) for status, _ in answers), answers
        assert await gw.used() == len(allowed), answers
        assert all(took < envoy for took in allowed), (answers, envoy)


@pytest.mark.parametrize("method_header", ["X-Original-Method", "X-Forwarded-Method"])
async def test_a_method_header_without_its_uri_is_not_silently_replaced_by_the_calls_own(
        redis_url, upstream, monkeypatch, method_header):
    """A verify call that names the original method (``X-Original-Method: DELETE``) but no
    original URI was judged as the call's *own* method and the path after the prefix: with the
    auth URL written with a trailing slash (``.../_keygate/v1/verify/``, as ingress-nginx's
    ``auth-url`` is often written; its subrequest sends ``X-Original-Method`` and
    ``X-Original-URL``, never ``X-Original-URI``), every request is judged as ``GET /``: where
    ``/`` is a public route, ``DELETE /people/1`` without any key is answered 200 and the
    front proxy forwards it. keygate already refuses the mirror case (a URI header without
    its method: ``test_an_original_uri_without_its_method_is_refused``) and a bare call
    (``test_a_call_that_names_no_original_request_is_refused``) for exactly this reason; a
    method header without its URI is the same half-configured proxy and must be a 400 too,
    never a 200 for another request than the one named."""
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, routes=(Route("/", "api", ("GET",), (), True),)
                                 + config.routes)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        async with g.proxy.get(VERIFY + "/", headers={
                method_header: "DELETE",
                "X-Original-URL": "http://api.example/people/1"}) as r:
            body = await r.read()
            assert r.status == 400, (r.status, body)
        assert upstream.requests == []


async def test_nginx_with_an_auth_url_naming_the_method_but_no_uri_forwards_nothing_unkeyed(
        tmp_path, own_redis, monkeypatch):
    """The same, in a real nginx: ingress-nginx's auth subrequest (reproduced here) sends
    ``X-Original-Method`` and ``X-Original-URL`` only; with its ``auth-url`` ending in ``/``
    and no ``auth-proxy-set-headers`` ConfigMap yet, keygate judged every request as
    ``GET /``. A client's ``DELETE /people/1`` without any key reached the API, where ``/`` is
    a public route. It must be refused (nginx turns keygate's 400 into a 500), never
    forwarded."""
    from test_nginx_verify import NGINX, nginx_main, raw_api, running_nginx
    if NGINX is None:
        pytest.skip("nginx is not installed")
    from conftest import free_port
    from harness import make_config
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(config, upstreams={}, routes=(
        Route("/", None, ("GET",), (), True),
        Route("/people/**", None, ("GET", "DELETE"), ("people:write",)),
    ))
    async with raw_api() as (api_port, heads):
        async with gateway_under_test(config, own_redis.url, monkeypatch) as gw:
            port = free_port()
            conf = nginx_main(tmp_path, f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{
            auth_request /_external-auth;
            proxy_pass http://127.0.0.1:{api_port};
        }}
        location = /_external-auth {{
            internal;
            proxy_pass http://127.0.0.1:{gw.proxy_server.port}/_keygate/v1/verify/;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
    }}""")
            async with running_nginx(conf, port):
                base = f"http://127.0.0.1:{port}"
                host, p = base.rsplit("/", 1)[1].rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(p))
                writer.write(b"DELETE /people/1 HTTP/1.1\r\nHost: api\r\n"
                             b"Connection: close\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
    assert heads == [], (answer[:200], heads)
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("uri_headers", [("X-Forwarded-Method", "X-Forwarded-Uri"),
                                         ("X-Original-Method", "X-Original-URI")])
async def test_an_original_uri_over_a_header_fields_bound_is_refused_saying_so_and_verifies_by_prefix(
        redis_url, monkeypatch, uri_headers):
    """keygate's own proxy forwards a request line of up to 32 KiB (``HEAD_MAX``: a search or
    GraphQL GET with a long query), and verify in Envoy's path_prefix mode takes it too. The
    same URI named in ``X-Forwarded-Uri`` or ``X-Original-URI`` is one header field, and a
    field keeps its 8 KiB bound (nginx's own bound on a request line and on most upstreams'
    fields; a larger one let trailer fields, which the head's 32 KiB does not count, hold
    megabytes a connection): refused 400 ``bad_request``, the message naming the bound."""
    from harness import raw_upstream
    heads: list[bytes] = []

    async def answer(reader, writer):
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
    srv, url = await raw_upstream(answer)
    method_header, uri_header = uri_headers
    try:
        async with gateway_under_test(verify_config(url), redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key(scopes=["people:read"])
            port = gw.proxy_server.port
            uri = "/people/1?q=" + "a" * 12000
            forwarded = await _exchange(port, (
                f"GET {uri} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                "Connection: close\r\n\r\n").encode())
            assert forwarded.startswith(b"HTTP/1.1 200 "), forwarded[:200]
            assert len(heads) == 1  # the proxy forwards it
            by_prefix = await _exchange(port, (
                f"GET {VERIFY}{uri} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                "Connection: close\r\n\r\n").encode())
            assert by_prefix.startswith(b"HTTP/1.1 200 "), by_prefix[:200]
            by_header = await _exchange(port, (
                f"GET {VERIFY} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                f"{method_header}: GET\r\n{uri_header}: {uri}\r\n"
                "Connection: close\r\n\r\n").encode())
            assert by_header.startswith(b"HTTP/1.1 400 "), by_header[:300]
            message = json.loads(by_header.partition(b"\r\n\r\n")[2])["error"]["message"]
            assert "8 KiB" in message, message
            assert len(heads) == 1  # nothing more was forwarded
    finally:
        srv.close()
