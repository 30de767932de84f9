"""docs/verify/nginx.conf, as shipped, in a real nginx in front of a real keygate (verify-only
mode) and a real upstream. Skipped when no nginx binary is installed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port
from gateway.config import Route
from harness import gateway_under_test, make_config

SNIPPET = Path(__file__).resolve().parent.parent / "docs" / "verify" / "nginx.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def nginx_config(tmp: Path, port: int, keygate: str, api: str,
                 edits: tuple[tuple[str, str], ...] = (), http_extra: str = "") -> Path:
    """The shipped snippet with our addresses, and ``edits`` (shipped text, ours) applied,
    included in an ``http {}`` that carries ``http_extra`` (an operator's own directives)."""
    snippet = SNIPPET.read_text()
    for shipped, ours in (("127.0.0.1:8080", keygate), ("127.0.0.1:9000", api),
                          ("listen 8000;", f"listen 127.0.0.1:{port};")) + edits:
        assert shipped in snippet
        snippet = snippet.replace(shipped, ours)
    (tmp / "keygate.conf").write_text(snippet)
    conf = nginx_main(tmp, f"""{http_extra}
    include {tmp}/keygate.conf;""")
    return conf


def nginx_main(tmp: Path, http: str, worker_connections: int = 256) -> Path:
    """``tmp``/nginx.conf: a foreground nginx whose files all live under ``tmp``, with
    ``http`` inside its ``http {}`` block."""
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {http}
}}
""")
    return conf


@contextlib.asynccontextmanager
async def running_nginx(conf: Path, port: int, nginx: str | None = None):
    """``nginx -t`` on ``conf``, then nginx running it (its prefix the file's directory) from
    when ``port`` accepts connections until the block ends."""
    prefix = conf.parent
    nginx = nginx or NGINX
    check = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(prefix)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (prefix / "error.log").read_text()
                await asyncio.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def nginx_stack(tmp_path: Path, api_port: int, redis_url: str, monkeypatch,
                      edits: tuple[tuple[str, str], ...] = (), http_extra: str = ""):
    """nginx → (auth_request) keygate; nginx → the API on ``api_port``. Yields (gw, nginx
    base URL)."""
    config = make_config("http://127.0.0.1:9", store=dataclasses.replace(
        make_config("http://x").store, timeout=0.5))
    config = dataclasses.replace(config, upstreams={}, routes=(
        Route("/health", None, ("GET",), (), True),
        Route("/people/**", None, ("GET",), ("people:read",)),
        Route("/people/**", None, ("POST",), ("people:write",)),
    ), server=dataclasses.replace(config.server, trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        port = free_port()
        conf = nginx_config(tmp_path, port, f"127.0.0.1:{gw.proxy_server.port}",
                            f"127.0.0.1:{api_port}", edits, http_extra)
        async with running_nginx(conf, port):
            yield gw, f"http://127.0.0.1:{port}"


@pytest.fixture
async def stack(request, tmp_path, upstream, own_redis, monkeypatch):
    """``nginx_stack`` in front of the echo ``upstream``. Parametrised indirectly, its param is
    ``nginx_config``'s ``edits``."""
    async with nginx_stack(tmp_path, upstream.port, own_redis.url, monkeypatch,
                           getattr(request, "param", ())) as s:
        yield s


async def get(url: str, **kw) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers, await r.text()


async def test_allowed_request_reaches_the_api_with_identity_and_without_the_key(stack,
                                                                                 upstream):
    gw, base = stack
    await gw.workspace("acme")
    token, key = await gw.key(scopes=["people:read"])
    status, headers, body = await get(base + "/people/7?q=1", headers={
        "Authorization": f"Bearer {token}", "X-Workspace-Id": "evil", "X-Api-Scopes": "ALL"})
    assert status == 200, body
    seen = dict(upstream.requests[-1]["headers"])
    assert upstream.requests[-1]["raw_path"] == "/people/7?q=1"
    assert seen["X-Workspace-Id"] == "acme"
    assert seen["X-Api-Key-Id"] == key["id"]
    assert seen["X-Api-Scopes"] == "people:read"
    assert seen["X-Workspace-Plan"] == "starter"
    assert "Authorization" not in seen and token not in str(seen)
    assert {k.lower(): v for k, v in seen.items()}["x-request-id"] == headers["X-Request-Id"]
    assert seen["Host"] == "127.0.0.1" or seen["Host"].startswith("127.0.0.1:")
    assert headers["RateLimit"].startswith('"monthly";r=999;')
    assert headers["RateLimit-Policy"].startswith('"monthly";q=1000;')


async def test_refusals_keep_keygates_status_and_headers(stack, upstream):
    gw, base = stack
    await gw.workspace("acme", plan="tiny")  # 3 a month
    token, _ = await gw.key(scopes=["people:read"])
    auth = {"Authorization": f"Bearer {token}"}

    status, headers, body = await get(base + "/people/1")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="keygate"'
    assert headers.getall("WWW-Authenticate") == ['Bearer realm="keygate"']
    assert headers["Content-Type"] == "application/json"

    status, headers, body = await get(base + "/people/1", headers={
        "Authorization": "Bearer kg_live_" + "A" * 50})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]

    status, headers, _ = await get(base + "/people/1", method="POST", headers=auth)
    assert status == 403 and 'scope="people:write"' in headers["WWW-Authenticate"]

    status, _, _ = await get(base + "/nowhere", headers=auth)
    assert status == 404
    status, _, body = await get(base + f"/people/1?k={token}", headers=auth)
    assert status == 400 and token not in body

    for _ in range(3):
        status, _, _ = await get(base + "/people/1", headers=auth)
        assert status == 200
    status, headers, body = await get(base + "/people/1", headers=auth)
    assert status == 429, body
    assert int(headers["Retry-After"]) > 0
    assert headers["RateLimit"].startswith('"monthly";r=0;')
    assert headers["X-Request-Id"] in body
    assert len(upstream.requests) == 3
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 3


async def test_a_client_cannot_have_another_request_checked(stack, upstream):
    """Forged X-Forwarded-Uri / X-Original-URI naming a public route do not reach keygate."""
    _, base = stack
    status, _, _ = await get(base + "/people/1", headers={
        "X-Forwarded-Uri": "/health", "X-Forwarded-Method": "GET",
        "X-Original-URI": "/health", "X-Original-Method": "GET"})
    assert status == 401
    assert upstream.requests == []


async def test_a_public_route_passes_without_a_key_and_without_identity(stack, upstream):
    _, base = stack
    status, _, _ = await get(base + "/health", headers={"X-Workspace-Id": "evil",
                                                        "X_Workspace_Id": "evil"})
    assert status == 200
    seen = {k.lower() for k, _ in upstream.requests[-1]["headers"]}
    assert not seen & {"x-workspace-id", "x_workspace_id"}


async def test_store_down_is_503_with_retry_after_through_nginx(stack, own_redis, upstream):
    gw, base = stack
    await gw.workspace("acme")
    token, _ = await gw.key(scopes=["people:read"])
    own_redis.stop()
    status, headers, body = await get(base + "/people/1",
                                      headers={"Authorization": f"Bearer {token}"})
    assert status == 503, body
    assert headers["Retry-After"] == "1"
    assert upstream.requests == []


async def test_keygate_down_fails_closed(tmp_path, upstream):
    port = free_port()
    conf = nginx_config(tmp_path, port, f"127.0.0.1:{free_port()}", f"127.0.0.1:{upstream.port}")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                status, _, body = await get(f"http://127.0.0.1:{port}/people/1")
                break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert status == 503 and "auth_unavailable" in body
        assert upstream.requests == []
    finally:
        proc.terminate()
        proc.wait(10)


# nginx's own auth_request example sets X-Original-URI and nothing else; its auth subrequest is
# always a GET, whatever the client's method
NGINX_DOCS_STYLE = (("        proxy_set_header X-Forwarded-Method $request_method;\n", ""),
                    ("        proxy_set_header X-Forwarded-Uri    $request_uri;\n", ""),
                    ("        proxy_set_header X-Original-Method  $request_method;\n", ""))


@pytest.mark.parametrize("stack", [NGINX_DOCS_STYLE], indirect=True)
async def test_an_original_uri_without_its_method_fails_closed(stack, upstream):
    """An nginx that sets X-Original-URI but not X-Original-Method (nginx's own auth_request
    example) asked keygate about its subrequest's method, always GET: a key holding only
    people:read had POST /people/1 allowed and forwarded. Every request is refused instead
    (400), so the missing header shows at once, and nothing reaches the API."""
    gw, base = stack
    await gw.workspace("acme")
    token, _ = await gw.key(scopes=["people:read"])
    for method in ("POST", "GET"):
        status, _, body = await get(base + "/people/1", method=method,
                                    headers={"Authorization": f"Bearer {token}"})
        assert status == 400, (method, body)
    assert upstream.requests == []
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_a_client_url_override_header_never_reaches_the_api(stack, upstream):
    """keygate checks the request line nginx forwards; an API that routes by ``X-Original-URL``
    or ``X-Rewrite-URL`` (IIS URL Rewrite, older Symfony and Zend) would serve the path a
    client names there instead: ``GET /health`` (public) naming ``/people/1`` reached it
    without a key. nginx passes a client's headers on unless told otherwise; the shipped
    snippet clears these two, as keygate's own proxy drops them."""
    _, base = stack
    status, _, _ = await get(base + "/health", headers={
        "X-Original-URL": "/people/1", "x-rewrite-url": "/people/1",
        "X-Original-URI": "/people/1",
        "X-Script-Name": "/health", "SCRIPT_NAME": "/health"})
    assert status == 200
    seen = {k.lower() for k, _ in upstream.requests[-1]["headers"]}
    assert not seen & {"x-original-url", "x-rewrite-url", "x-original-uri", "x-script-name",
                       "script_name"}, \
        upstream.requests[-1]["headers"]


async def test_a_clients_auth_proxy_user_headers_never_reach_the_api(stack, upstream):
    """An API set up behind an authenticating proxy takes ``X-WEBAUTH-USER`` (Grafana's
    auth.proxy), ``X-Remote-User``, ``X-Auth-Request-User`` (oauth2-proxy) and the like as
    the signed-in user: nginx passed a client's copies on, on a public route as on a keyed
    one, and the API signed the client in as whoever they named. The shipped snippet clears
    every name keygate's own proxy drops (``AUTH_USER``), in real nginx; an API client's own
    ``X-Auth-Token`` still passes."""
    from gateway.proxying.headers import AUTH_USER
    gw, base = stack
    await gw.workspace("acme")
    token, _ = await gw.key(scopes=["people:read"])
    spoofs = {name: f"mallory-{i}" for i, name in enumerate(sorted(AUTH_USER))}
    spoofs["X-WEBAUTH-USER"] = spoofs.pop("x-webauth-user")   # as Grafana spells it
    for path, credential in (("/health", {}), ("/people/1", {"Authorization": f"Bearer {token}"})):
        status, _, _ = await get(base + path, headers={**credential, **spoofs,
                                                       "X-Auth-Token": "own"})
        assert status == 200
        seen = upstream.requests[-1]["headers"]
        assert not any(v.startswith("mallory-") for _, v in seen), seen
        assert ["X-Auth-Token", "own"] in seen


async def test_a_clients_host_override_headers_never_reach_the_api(stack, upstream):
    """keygate's own proxy drops a client's ``X-Original-Host``, ``X-Host``,
    ``X-HTTP-Host-Override`` and ``X-Forwarded-Server`` (``HOST_OVERRIDE``: host header
    injection, a password-reset link mailed to the client's host), but the shipped snippet did
    not clear them: behind nginx in verify mode a client's ``X-Host`` reached the API, on a
    public route as on a keyed one. Now cleared (in real nginx), the Host nginx sends kept."""
    from gateway.proxying.headers import HOST_OVERRIDE
    gw, base = stack
    await gw.workspace("acme")
    token, _ = await gw.key(scopes=["people:read"])
    spoofs = {name: f"evil-{i}.example" for i, name in enumerate(sorted(HOST_OVERRIDE))}
    for path, credential in (("/health", {}), ("/people/1", {"Authorization": f"Bearer {token}"})):
        status, _, _ = await get(base + path, headers={**credential, **spoofs})
        assert status == 200
        seen = upstream.requests[-1]["headers"]
        assert not any(v.startswith("evil-") for _, v in seen), seen
        assert any(k.lower() == "host" for k, _ in seen), seen



async def test_a_clients_forwarded_host_and_address_never_reach_the_api(stack, upstream):
    """keygate's own proxy never lets a client's ``X-Forwarded-Host`` / ``X-Forwarded-For`` /
    ``Forwarded`` / ``X-Real-IP`` reach the upstream from an untrusted peer (SPEC: client
    ``X-Forwarded-*`` are replaced). The shipped snippet cleared ``X-Host``,
    ``X-Original-Host`` and ``X-Forwarded-Server`` ("so a client cannot have the upstream mail
    a reset link to its own host") but passed the client's own ``X-Forwarded-Host`` (the one
    Django, Rails and Express read), ``Forwarded`` ``host=``, and a forged ``X-Forwarded-For``
    / ``X-Real-IP`` to the API as sent. Now nginx sets the ones it knows from the connection
    (the client's address, nginx's scheme, host and port) and clears the rest."""
    gw, base = stack
    await gw.workspace("acme")
    token, _ = await gw.key(scopes=["people:read"])
    spoofs = {"X-Forwarded-Host": "evil-host.example", "Forwarded": "for=6.6.6.6;host=evil-fwd.example",
              "X-Real-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6",
              "X-Forwarded-Proto": "evil-proto", "X-Forwarded-Port": "6666",
              "X-Forwarded-Prefix": "/evil-prefix", "X-Forwarded-Scheme": "evil-scheme",
              "X-Forwarded-Ssl": "evil-on"}
    for path, credential in (("/health", {}), ("/people/1", {"Authorization": f"Bearer {token}"})):
        status, _, _ = await get(base + path, headers={**credential, **spoofs})
        assert status == 200
        seen = upstream.requests[-1]["headers"]
        # X-Forwarded-For may keep the client's hops if nginx appends its peer (the usual
        # $proxy_add_x_forwarded_for); its last hop must not be the client's word
        leaked = [(k, v) for k, v in seen if "evil" in v or "6666" in v or (
            k.lower() == "x-forwarded-for" and v.split(",")[-1].strip() == "6.6.6.6") or (
            k.lower() != "x-forwarded-for" and "6.6.6.6" in v)]
        assert not leaked, leaked
        # what nginx knows from the connection, once each: the client is 127.0.0.1 here
        sent = {}
        for k, v in seen:
            sent.setdefault(k.lower(), []).append(v)
        assert sent.get("x-forwarded-for") == ["127.0.0.1"], seen
        assert sent.get("x-real-ip") == ["127.0.0.1"], seen
        assert sent.get("x-forwarded-proto") == ["http"], seen
        assert sent.get("x-forwarded-host") == ["127.0.0.1"], seen
        assert sent.get("x-forwarded-port") == [base.rsplit(":", 1)[1]], seen
        assert not {"forwarded", "x-forwarded-prefix", "x-forwarded-scheme",
                    "x-forwarded-ssl"} & sent.keys(), seen


@contextlib.asynccontextmanager
async def raw_api():
    """An API on loopback that keeps the raw head of every request it gets (``heads``) and
    answers each 200, closing the connection."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
                asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0, limit=1 << 20)
    try:
        yield srv.sockets[0].getsockname()[1], heads
    finally:
        srv.close()
        await srv.wait_closed()


async def raw_get(base: str, path: str, header_lines: list[tuple[str, str]]) -> bytes:
    """GET ``path`` from nginx with exactly these header lines (names as written, "_" and "."
    spellings included, which aiohttp would not send as they are); the whole answer."""
    host, port = base.rsplit("/", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in header_lines) + "\r\n"
    writer.write(head.encode("latin-1"))
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


# An operator's http {} that lets names with "_" and other punctuation through (nginx drops
# them by default: underscores_in_headers off, ignore_invalid_headers on)
LENIENT_HTTP = "underscores_in_headers on; ignore_invalid_headers off;"


@pytest.mark.parametrize("http_extra", ["", LENIENT_HTTP])
async def test_no_header_keygates_proxy_drops_from_a_client_reaches_the_api(
        http_extra, tmp_path, own_redis, monkeypatch):
    """keygate's own proxy drops a client's True-Client-IP, CF-Connecting-IP, X-Client-IP,
    Fastly-Client-IP, X-Cluster-Client-IP and the rest of its client-address list, and its
    X-Forwarded-Uri/-Method; the shipped snippet passed them all to the API as sent, so behind
    it a client named the address the API logs, limits and allows by, and the original request
    an API reads from X-Forwarded-Uri. A request carrying every name keygate drops from clients
    (gateway's own list, test_verify_docs.FROM_CLIENTS), in its "-", "_" and "." spellings,
    reaches the API without one of the client's values: on a public route and a keyed one,
    and in an http {} that lets "_" and "." names through, which the snippet's server {} turns
    back off."""
    from test_verify_docs import FROM_CLIENTS
    spellings = []
    for i, name in enumerate(sorted(FROM_CLIENTS)):
        title = "-".join(part.capitalize() for part in name.split("-"))
        spellings += [(title, f"spoof{i}a"), (name.upper().replace("-", "_"), f"spoof{i}b"),
                      (title.replace("-", "."), f"spoof{i}c")]
    spellings.append(("SCRIPT_NAME", "spoof-script"))
    async with raw_api() as (api_port, heads):
        async with nginx_stack(tmp_path, api_port, own_redis.url, monkeypatch,
                               http_extra=http_extra) as (gw, base):
            await gw.workspace("acme")
            token, _ = await gw.key(scopes=["people:read"])
            for path, credential in (("/health", []),
                                     ("/people/1", [("Authorization", f"Bearer {token}")])):
                answer = await raw_get(base, path, credential + spellings)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
                head = heads[-1]
                assert b"spoof" not in head.lower(), head.decode("latin-1")
                lines = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if line]
                sent: dict[bytes, list[bytes]] = {}
                for k, v in lines:
                    sent.setdefault(k.strip().lower(), []).append(v.strip())
                # what nginx knows from the connection, once each
                assert sent[b"x-forwarded-for"] == [b"127.0.0.1"]
                assert sent[b"x-real-ip"] == [b"127.0.0.1"]
                assert sent[b"x-forwarded-proto"] == [b"http"]
            assert len(heads) == 2
