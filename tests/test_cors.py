"""CORS on the proxy listener (the top-level ``cors`` section), for browser apps calling an
API through keygate with a key: preflights answered by keygate (never authenticated, counted
or forwarded), and every answer, keygate's own errors included, labelled for an allowed
origin so browser code can read a 429's JSON. Without ``cors`` nothing changes.

Real gateway, real redis-server, a real upstream on loopback that sets CORS headers of its
own; heads are read as raw bytes off the client's socket where their exact form matters.
The browser's side of it is ``test_console_browser.py``'s
``test_a_page_on_another_origin_reads_answers_through_keygate``.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway.config import Route
from gateway.settings import CorsConfig

from harness import gateway_under_test, make_config, raw_upstream, serving

APP = "https://app.example"
EVIL = "https://evil.example"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "authorization"}


async def _upstream(request: web.Request, seen: list[tuple[str, str]]) -> web.StreamResponse:
    """Answers as an upstream with CORS opinions of its own would; ``seen``: what reached it."""
    seen.append((request.method, request.path))
    own = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, DELETE",
           "access-control-max-age": "99999", "Vary": "Accept-Encoding", "X-Upstream": "yes"}
    if request.path.endswith("/streamed"):  # no Content-Length: streamed back chunk by chunk
        response = web.StreamResponse(headers=own)
        await response.prepare(request)
        await response.write(b'{"streamed": ')
        await response.write(b"true}")
        await response.write_eof()
        return response
    if request.path.endswith("/empty"):
        return web.Response(status=204, headers=own)
    return web.json_response({"method": request.method}, headers=own)


@pytest.fixture
async def upstream_url():
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _upstream(request, seen)
    async with serving(handler) as url:
        yield url, seen


ROUTES = (Route("/health", "api", ("GET",), (), True),
          Route("/people/**", "api", ("GET",), ("people:read",)),
          Route("/people/**", "api", ("POST", "DELETE"), ("people:write",)),
          Route("/options/**", "api", ("GET", "OPTIONS"), ("people:read",)))


def cors_config(url: str, **cors) -> object:
    cors.setdefault("allow_origins", (APP,))
    return make_config(url, routes=ROUTES, cors=CorsConfig(**cors))


@pytest.fixture
async def gw(upstream_url, redis_url, monkeypatch):
    url, seen = upstream_url
    async with gateway_under_test(cors_config(url, expose_headers=("X-Upstream",),
                                              allow_headers=("Idempotency-Key",)),
                                  redis_url, monkeypatch) as g:
        g.seen = seen
        await g.workspace("acme", plan="limited")  # 3 requests a second
        yield g


async def raw(g, request: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """(status line, headers by lower-cased name, body) of one request on a fresh socket."""
    reader, writer = await g.raw_connection()
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head[:-4].split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get(b"content-length", [b"0"])[0])
        if request.startswith(b"HEAD "):
            length = 0
        body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
        return lines[0], headers, body
    finally:
        writer.close()


def request(method: str, path: str, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.example", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def cors_headers(headers: dict[bytes, list[bytes]]) -> dict[bytes, list[bytes]]:
    return {k: v for k, v in headers.items() if k.startswith(b"access-control-")}


# --- without the section: exactly as before -----------------------------------------------------

async def test_without_cors_nothing_is_answered_or_labelled(upstream_url, redis_url,
                                                             monkeypatch):
    url, seen = upstream_url
    async with gateway_under_test(make_config(url, routes=ROUTES), redis_url, monkeypatch) as g:
        status, headers, body = await raw(g, request("OPTIONS", "/people/1", **{
            "Origin": APP, "Access-Control-Request-Method": "GET"}))
        assert status == b"HTTP/1.1 404 Not Found" and b'"no_route"' in body
        assert cors_headers(headers) == {} and b"vary" not in headers
        status, headers, _ = await raw(g, request("GET", "/health", Origin=APP))
        assert status == b"HTTP/1.1 200 OK"
        # the upstream's own CORS headers pass untouched, as any other header
        assert headers[b"access-control-allow-origin"] == [b"*"]
        assert headers[b"vary"] == [b"Accept-Encoding"]


# --- preflights -----------------------------------------------------------------------------

async def test_a_preflight_from_an_allowed_origin_is_answered_by_keygate(gw):
    status, headers, body = await raw(gw, request("OPTIONS", "/people/1", **PREFLIGHT))
    assert status == b"HTTP/1.1 204 No Content" and body == b""
    assert cors_headers(headers) == {
        b"access-control-allow-origin": [APP.encode()],
        b"access-control-allow-methods": [b"GET, HEAD, POST, DELETE"],
        b"access-control-allow-headers": [b"Authorization, X-Api-Key, Content-Type, "
                                          b"X-Request-Id, Idempotency-Key"],
        b"access-control-max-age": [b"600"]}
    assert headers[b"vary"] == [b"Origin"] and headers[b"x-request-id"]
    # no key was asked for, nothing reached the upstream, nothing was counted
    assert gw.seen == [] and await gw.used() == 0


async def test_a_preflight_names_the_requested_method_first(gw):
    _, headers, _ = await raw(gw, request("OPTIONS", "/people/1", **{
        **PREFLIGHT, "Access-Control-Request-Method": "DELETE"}))
    assert headers[b"access-control-allow-methods"] == [b"DELETE, GET, HEAD, POST"]


@pytest.mark.parametrize("headers", [
    {"Origin": EVIL, "Access-Control-Request-Method": "GET"},         # not an allowed origin
    {"Origin": "null", "Access-Control-Request-Method": "GET"},        # never allowed
    {"Origin": APP + "/", "Access-Control-Request-Method": "GET"},     # not as browsers send it
    {"Origin": APP, "Access-Control-Request-Method": "PATCH"},         # no route serves it
    {"Origin": APP, "Access-Control-Request-Method": "get"},           # methods are case-sensitive
    {"Origin": APP},                                                  # a plain OPTIONS
], ids=["other-origin", "null", "slash", "unserved-method", "lower-case", "plain-options"])
async def test_anything_but_an_allowed_preflight_is_handled_as_before(gw, headers):
    status, got, body = await raw(gw, request("OPTIONS", "/people/1", **headers))
    assert status == b"HTTP/1.1 404 Not Found" and b'"no_route"' in body
    assert b"access-control-allow-methods" not in got and gw.seen == []


async def test_a_route_listing_options_still_forwards_options_that_are_not_preflights(gw):
    token, _ = await gw.key(scopes=["people:read"])
    status, headers, _ = await raw(gw, request("OPTIONS", "/options/1", Origin=APP,
                                               Authorization=f"Bearer {token}"))
    assert status == b"HTTP/1.1 200 OK" and gw.seen == [("OPTIONS", "/options/1")]
    assert headers[b"access-control-allow-origin"] == [APP.encode()]
    assert b"access-control-allow-methods" not in headers  # the upstream's was dropped
    # a preflight for it (OPTIONS itself requested) is keygate's, without a key
    status, headers, _ = await raw(gw, request("OPTIONS", "/options/1", **{
        "Origin": APP, "Access-Control-Request-Method": "OPTIONS"}))
    assert status == b"HTTP/1.1 204 No Content"
    assert headers[b"access-control-allow-methods"] == [b"OPTIONS, GET, HEAD"]
    assert len(gw.seen) == 1


async def test_preflights_for_keygates_own_endpoints(gw):
    # no-store as every other answer under /_keygate/ (a forwarded route's preflight is the
    # route's own business: no Cache-Control there)
    _, headers, _ = await raw(gw, request("OPTIONS", "/_keygate/v1/usage", **PREFLIGHT))
    assert headers[b"access-control-allow-methods"] == [b"GET, HEAD"]
    assert headers[b"cache-control"] == [b"no-store"]
    _, headers, _ = await raw(gw, request("OPTIONS", "/_keygate/v1/keys/abc/revoke", **{
        **PREFLIGHT, "Access-Control-Request-Method": "POST"}))
    assert headers[b"access-control-allow-methods"] == [b"POST"]
    assert headers[b"cache-control"] == [b"no-store"]
    _, headers, _ = await raw(gw, request("OPTIONS", "/people/1", **PREFLIGHT))
    assert b"cache-control" not in headers
    status, headers, _ = await raw(gw, request("OPTIONS", "/_keygate/v1/verify", **PREFLIGHT))
    assert b"access-control-allow-methods" not in headers  # verify is the front proxy's call


async def test_a_bad_path_is_refused_before_any_preflight(gw):
    status, headers, body = await raw(gw, request("OPTIONS", "/people/../admin", **PREFLIGHT))
    assert status == b"HTTP/1.1 400 Bad Request" and b'"bad_path"' in body
    assert headers[b"access-control-allow-origin"] == [APP.encode()]  # readable, as any error


# --- actual answers ---------------------------------------------------------------------------

EXPOSED = [b"RateLimit, RateLimit-Policy, Retry-After, X-Request-Id, X-Upstream"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/people/1"),            # a whole body
    ("GET", "/people/streamed"),     # streamed back
    ("HEAD", "/people/1"),           # no body
    ("GET", "/people/empty"),        # 204
])
async def test_a_forwarded_answer_carries_keygates_cors_headers_not_the_upstreams(
        gw, method, path):
    token, _ = await gw.key(scopes=["people:read"])
    status, headers, _ = await raw(gw, request(method, path, Origin=APP,
                                               Authorization=f"Bearer {token}"))
    assert status in (b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content"), status
    assert cors_headers(headers) == {b"access-control-allow-origin": [APP.encode()],
                                     b"access-control-expose-headers": EXPOSED}
    assert headers[b"vary"] == [b"Accept-Encoding", b"Origin"]
    assert headers[b"x-upstream"] == [b"yes"] and b"ratelimit" in headers


async def test_an_answer_for_another_origin_or_none_carries_no_cors_header_but_vary(gw):
    for extra in ({"Origin": EVIL}, {}):
        status, headers, _ = await raw(gw, request("GET", "/health", **extra))
        assert status == b"HTTP/1.1 200 OK"
        assert cors_headers(headers) == {}
        assert headers[b"vary"] == [b"Accept-Encoding", b"Origin"]


@pytest.mark.parametrize("origins", [(APP, APP), (APP, EVIL), (EVIL, APP)],
                         ids=["same-twice", "allowed-first", "allowed-second"])
async def test_two_origin_headers_are_no_allowed_origin(gw, origins):
    """A browser sends one ``Origin``; a request with two was made by something else, and
    which one it means is anyone's guess. keygate labelled the answer for the first: now for
    neither, on every kind of answer (forwarded, streamed back, keygate's own refusal and own
    endpoint, an OPTIONS that is no preflight keygate answers), as Envoy and nginx (1.23 on),
    which read repeated headers as one comma-joined value no allowed origin equals, do."""
    token, _ = await gw.key(scopes=["people:read"])
    twice = "".join(f"Origin: {o}\r\n" for o in origins).encode()
    key = {"Authorization": f"Bearer {token}"}
    for method, path, extra in (
            ("GET", "/health", {}), ("GET", "/people/streamed", key), ("GET", "/people/1", {}),
            ("GET", "/_keygate/v1/usage", key), ("GET", "/_keygate/v1/usage", {}),
            ("OPTIONS", "/people/1", {"Access-Control-Request-Method": "GET"})):
        head = request(method, path, **extra)
        status, headers, _ = await raw(gw, head[:-2] + twice + b"\r\n")
        assert cors_headers(headers) == {}, (method, path, status, headers)
        assert b"Origin" in b",".join(headers[b"vary"]), (path, headers)


async def test_keygates_own_refusals_are_readable_by_an_allowed_origin(gw):
    token, _ = await gw.key(scopes=["people:read"])
    status, headers, body = await raw(gw, request("GET", "/people/1", Origin=APP))
    assert status == b"HTTP/1.1 401 Unauthorized" and b'"missing_key"' in body
    assert headers[b"access-control-allow-origin"] == [APP.encode()]
    assert headers[b"access-control-expose-headers"] == EXPOSED
    assert headers[b"vary"] == [b"Origin"]
    status, headers, body = await raw(gw, request("DELETE", "/people/1", Origin=APP,
                                                  Authorization=f"Bearer {token}"))
    assert status == b"HTTP/1.1 403 Forbidden" and b'"insufficient_scope"' in body
    assert headers[b"access-control-allow-origin"] == [APP.encode()]
    statuses = []
    for _ in range(5):  # the plan allows 3 a second
        status, headers, body = await raw(gw, request("GET", "/people/1", Origin=APP,
                                                      Authorization=f"Bearer {token}"))
        statuses.append(status)
    assert statuses[-1] == b"HTTP/1.1 429 Too Many Requests" and b'"rate_limited"' in body
    assert headers[b"access-control-allow-origin"] == [APP.encode()]
    assert headers[b"retry-after"] and headers[b"ratelimit"]
    # a key in the URL is refused as before, and the page is told why
    status, headers, body = await raw(gw, request("GET", f"/people/1?key={token}", Origin=APP))
    assert status == b"HTTP/1.1 400 Bad Request" and b'"key_in_url"' in body
    assert token.encode() not in body and headers[b"access-control-allow-origin"]


async def test_keygates_own_endpoints_are_labelled(gw):
    token, _ = await gw.key(scopes=["people:read"])
    status, headers, body = await raw(gw, request("GET", "/_keygate/v1/usage", Origin=APP,
                                                  Authorization=f"Bearer {token}"))
    assert status == b"HTTP/1.1 200 OK" and b'"workspace": "acme"' in body
    assert headers[b"access-control-allow-origin"] == [APP.encode()]
    assert headers[b"vary"] == [b"Origin"]


async def test_credentials_are_allowed_only_when_configured(upstream_url, redis_url,
                                                            monkeypatch):
    url, _ = upstream_url
    async with gateway_under_test(cors_config(url, allow_credentials=True, max_age=0),
                                  redis_url, monkeypatch) as g:
        _, headers, _ = await raw(g, request("OPTIONS", "/health", **PREFLIGHT))
        assert headers[b"access-control-allow-credentials"] == [b"true"]
        assert headers[b"access-control-max-age"] == [b"0"]
        _, headers, _ = await raw(g, request("GET", "/health", Origin=APP))
        assert headers[b"access-control-allow-origin"] == [APP.encode()]
        assert headers[b"access-control-allow-credentials"] == [b"true"]


async def test_any_origin_echoes_a_well_formed_origin_never_a_star(upstream_url, redis_url,
                                                                 monkeypatch):
    url, _ = upstream_url
    async with gateway_under_test(cors_config(url, allow_origins="*"), redis_url,
                                  monkeypatch) as g:
        for origin in (EVIL, "http://web_app:3000"):  # '_': Chromium sends such names as is
            _, headers, _ = await raw(g, request("GET", "/health", Origin=origin))
            assert headers[b"access-control-allow-origin"] == [origin.encode()]
        for odd in ("null", "https://a.example/x", "https://a.example, https://b.example"):
            _, headers, _ = await raw(g, request("GET", "/health", Origin=odd))
            assert cors_headers(headers) == {}, odd


async def test_a_catch_all_route_does_not_answer_preflights_under_keygates_prefix(
        upstream_url, redis_url, monkeypatch):
    # '/**' matches '/_keygate/...' too, but no route ever serves that prefix: a preflight
    # there must not be answered as the catch-all's (a 204 from verify reads as "allowed" to
    # a front proxy, which then forwards that OPTIONS without a key)
    url, seen = upstream_url
    config = make_config(url, routes=ROUTES + (Route("/**", "api", ("GET", "POST"), ()),),
                         cors=CorsConfig(allow_origins=(APP,)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        for path in ("/_keygate/v1/verify", "/_keygate/v1/verify/people/1",
                     "/_keygate/v1/other"):
            status, headers, _ = await raw(g, request("OPTIONS", path, **PREFLIGHT))
            assert status != b"HTTP/1.1 204 No Content", path
            assert b"access-control-allow-methods" not in headers, path
        # keygate's own endpoints still are, and a path outside the prefix is the catch-all's
        _, headers, _ = await raw(g, request("OPTIONS", "/_keygate/v1/usage", **PREFLIGHT))
        assert headers[b"access-control-allow-methods"] == [b"GET, HEAD"]
        status, headers, _ = await raw(g, request("OPTIONS", "/other", **PREFLIGHT))
        assert status == b"HTTP/1.1 204 No Content"
        assert headers[b"access-control-allow-methods"] == [b"GET, HEAD, POST"]
        assert seen == []


async def test_a_reload_moves_preflights_refusals_and_forwarded_answers_together(
        upstream_url, redis_url, monkeypatch):
    """One policy per config: a reload that turns ``cors`` on, or changes its origins, is
    followed alike by keygate's preflights, its own refusals and the upstream's answers."""
    url, _ = upstream_url
    async with gateway_under_test(make_config(url, routes=ROUTES), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])

        async def allowed_origin(origin: str) -> list[list[bytes] | None]:
            answers = [await raw(g, request("OPTIONS", "/people/1", Origin=origin, **{
                           "Access-Control-Request-Method": "GET"})),
                       await raw(g, request("GET", "/people/1", Origin=origin)),  # 401
                       await raw(g, request("GET", "/people/1", Origin=origin,
                                            Authorization=f"Bearer {token}"))]
            return [headers.get(b"access-control-allow-origin") for _, headers, _ in answers]

        assert await allowed_origin(APP) == [None, None, [b"*"]]  # the upstream's own
        g.gw.reloader.apply(cors_config(url))
        assert await allowed_origin(APP) == [[APP.encode()]] * 3
        g.gw.reloader.apply(cors_config(url, allow_origins=(EVIL,)))
        assert await allowed_origin(APP) == [None, None, None]
        assert await allowed_origin(EVIL) == [[EVIL.encode()]] * 3


async def test_a_preflight_keygate_answers_logs_its_routes_upstream(gw, capfd):
    """docs/operations.md, the access line's `upstream`: "the matched route's upstream name;
    null without a route, ... for /_keygate/v1/usage and /_keygate/v1/keys". A preflight
    keygate answers is logged under its route like any request: its line named the route
    (/people/**) but its upstream was null, so a pipeline grouping lines by upstream lost it."""
    import json
    gw.logs(capfd)
    for path, rid in (("/people/1", "rid-preflight"), ("/_keygate/v1/usage", "rid-own")):
        status, _, _ = await raw(gw, request("OPTIONS", path, **PREFLIGHT,
                                             **{"X-Request-Id": rid}))
        assert status == b"HTTP/1.1 204 No Content"
    _, err = gw.logs(capfd)
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    lines = {entry["request_id"]: entry for entry in entries  # the access lines
             if "logger" not in entry and entry["request_id"].startswith("rid-")}
    assert (lines["rid-preflight"]["route"], lines["rid-preflight"]["upstream"]) == \
        ("/people/**", "api"), lines["rid-preflight"]
    assert (lines["rid-own"]["route"], lines["rid-own"]["upstream"]) == \
        ("/_keygate/v1/usage", None), lines["rid-own"]
    assert gw.seen == []


# --- attacks on the browser-facing surface ----------------------------------------------------

async def test_preflights_spend_no_rate_limit_and_never_reach_the_upstream(gw):
    """Preflights need no key, so they must cost a key nothing: a burst of them before its
    requests leaves the key's whole rate (3 a second) to the requests."""
    token, _ = await gw.key(scopes=["people:read"])
    for method in ("GET", "DELETE", "POST") * 4:
        status, _, _ = await raw(gw, request("OPTIONS", "/people/1", **{
            **PREFLIGHT, "Access-Control-Request-Method": method}))
        assert status == b"HTTP/1.1 204 No Content"
    statuses = [(await raw(gw, request("GET", "/people/1", Origin=APP,
                                       Authorization=f"Bearer {token}")))[0] for _ in range(3)]
    assert statuses == [b"HTTP/1.1 200 OK"] * 3
    assert gw.seen == [("GET", "/people/1")] * 3 and await gw.used() == 3


async def test_keys_in_odd_places_are_refused_readably_on_keygates_own_endpoints(gw):
    """A page calling /_keygate/ with its key anywhere but a credential header is refused as
    the proxy refuses it, and can read why: a key in the query is never used (nor echoed), a
    cookie is no credential, two different keys are ambiguous."""
    token, _ = await gw.key(role="admin")
    other, _ = await gw.key(scopes=["people:read"])
    cases = ((f"/_keygate/v1/usage?key={token}", {}, b"400", b"key_in_url"),
             (f"/_keygate/v1/keys?api_key={token}", {}, b"400", b"key_in_url"),
             ("/_keygate/v1/usage", {"Cookie": f"api_key={token}"}, b"401", b"missing_key"),
             ("/_keygate/v1/keys", {"Authorization": f"Bearer {token}", "X-Api-Key": other},
              b"400", b"ambiguous_key"))
    for path, headers, status, code in cases:
        got, answer, body = await raw(gw, request("GET", path, Origin=APP, **headers))
        assert got.split()[1] == status and b'"%s"' % code in body, (path, got, body)
        assert token.encode() not in body
        assert answer[b"access-control-allow-origin"] == [APP.encode()]
    assert gw.seen == []


@pytest.mark.parametrize("target", [
    "/%5Fkeygate/v1/usage", "/%5fkeygate/v1/keys", "//_keygate/v1/usage",
    "/_keygate/./v1/usage", "/_keygate/v1/../v1/usage", "/_keygate%2Fv1/usage",
    "/_keygate/v1/usag%65", "/_keygate\\v1/usage", "/_keygate/v1/keys//x",
    "/_keygate/v1/usage;x", "/_keygate/%2e/v1/usage",
    # read as keygate's own by an upstream that compares paths case-insensitively, strips a
    # segment's trailing dots and spaces (Windows, IIS) or NFKC-normalises (a fullwidth '_')
    "/_KEYGATE/v1/usage", "/_Keygate/v1/keys", "/_kEyGaTe/v1/verify/people/1",
    "/_keygate./v1/usage", "/_keygate%20/v1/usage", "/_KEYGATE.%20./v1/keys",
    "/%EF%BC%BFkeygate/v1/usage", "/%ef%bc%bfKEYGATE/v1/usage", "/_keygate%EF%BC%8E/v1/usage",
    # or cuts a decoded ';' parameter, an NTFS stream name, or drops an invisible character
    "/_keygate%3Bx/v1/keys", "/_KEYGATE%3B/v1/usage", "/_keygate::$DATA/v1/usage",
    "/_keygate:x/v1/keys", "/_keygate%E2%80%8B/v1/keys", "/_key%C2%ADgate/v1/usage",
    "/%EF%BB%BF_keygate/v1/usage"])
async def test_spellings_of_keygates_prefix_reach_neither_keygate_nor_the_upstream(
        redis_url, monkeypatch, target):
    """Behind a catch-all route, a path that another server could read as keygate's own
    (``/%5Fkeygate/``, ``//_keygate``, a dot segment, ``/_KEYGATE/``, ``/_keygate./``) is
    refused ``bad_path`` before any route: never answered as keygate's own, never forwarded
    (the upstream receives not a byte)."""
    received = bytearray()

    async def answer(reader, writer):
        received.extend(await reader.read(65536))
        writer.close()
    srv, url = await raw_upstream(answer)
    try:
        config = make_config(url, routes=(Route("/**", "api", ("GET", "POST", "OPTIONS"), ()),),
                             cors=CorsConfig(allow_origins=(APP,)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(role="admin")
            for head in (request("GET", target, Origin=APP, Authorization=f"Bearer {token}"),
                         request("OPTIONS", target, **PREFLIGHT)):
                status, headers, body = await raw(g, head)
                assert status == b"HTTP/1.1 400 Bad Request" and b'"bad_path"' in body, body
                assert headers[b"access-control-allow-origin"] == [APP.encode()]
            assert bytes(received) == b""
    finally:
        srv.close()
        await srv.wait_closed()


async def test_an_upstreams_cors_headers_in_any_spelling_never_widen_keygates(redis_url,
                                                                              monkeypatch):
    """An upstream answering ``*`` and another origin, in any case, with credentials and
    Private Network Access allowed, next to a header that is not UTF-8 (whose answer keygate
    writes byte for byte): a browser reads only what the config says, whatever the Origin."""
    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Latin: caf\xe9\r\n"
                     b"Access-Control-Allow-Origin: *\r\n"
                     b"access-control-allow-origin: " + EVIL.encode() + b"\r\n"
                     b"ACCESS-CONTROL-ALLOW-CREDENTIALS: true\r\n"
                     b"Access-Control-Allow-Private-Network: true\r\n"
                     b"Access-Control-Expose-Headers: *\r\nVary: Accept\r\n\r\nok")
        await writer.drain()
        writer.close()
    srv, url = await raw_upstream(answer)
    try:
        config = make_config(url, routes=(Route("/x/**", "api", ("GET",), (), True),),
                             cors=CorsConfig(allow_origins=(APP,)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            own = {b"access-control-allow-origin": [APP.encode()],
                   b"access-control-expose-headers": [b"RateLimit, RateLimit-Policy, "
                                                      b"Retry-After, X-Request-Id"]}
            for origin, allowed in ((APP, own), (EVIL, {}), (None, {})):
                status, headers, body = await raw(g, request(
                    "GET", "/x/1", **({"Origin": origin} if origin else {})))
                assert status == b"HTTP/1.1 200 OK" and body == b"ok"
                assert cors_headers(headers) == allowed, origin
                assert headers[b"vary"] == [b"Accept", b"Origin"]
                assert headers[b"x-latin"] == [b"caf\xe9"]
    finally:
        srv.close()
        await srv.wait_closed()
