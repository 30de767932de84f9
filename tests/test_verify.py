"""Verify-only mode: ``/_keygate/v1/verify`` runs the pipeline on the original request, counts
it as a forwarded request would be counted, and forwards nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from yarl import URL

from gateway.config import Route
from harness import VERIFY, bearer, gateway_under_test, verify_config


@pytest.fixture
async def gw(redis_url, upstream, monkeypatch):
    async with gateway_under_test(verify_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme", plan="tiny")  # 3 requests a month
        yield g


async def test_allowed_answers_200_empty_with_identity_and_ratelimit_headers(gw, upstream):
    token, key = await gw.key(scopes=["people:read"])
    async with gw.proxy.get(VERIFY, headers={**bearer(token), "X-Original-Method": "GET",
                                             "X-Original-URI": "/people/7?x=1"}) as r:
        assert r.status == 200
        assert await r.read() == b""
        assert r.headers["X-Workspace-Id"] == "acme"
        assert r.headers["X-Api-Key-Id"] == key["id"]
        assert r.headers["X-Api-Scopes"] == "people:read"
        assert r.headers["X-Workspace-Plan"] == "tiny"
        assert r.headers["RateLimit"] == '"monthly";r=2;t=' + r.headers["RateLimit"].split("t=")[1]
        assert "RateLimit-Policy" in r.headers and "X-Request-Id" in r.headers
        assert token not in str(r.headers)
    assert upstream.requests == []  # nothing forwarded


async def test_verify_counts_exactly_like_forwarding_and_refuses_the_same_way(gw, upstream):
    token, _ = await gw.key(scopes=["people:read"])
    h = {**bearer(token), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/people/1"}
    for _ in range(2):
        async with gw.proxy.get(VERIFY, headers=h) as r:
            assert r.status == 200
    async with gw.proxy.get("/people/1", headers=bearer(token)) as r:
        assert r.status == 200  # the third request of the month, forwarded
    async with gw.proxy.get(VERIFY, headers=h) as r:
        refused_by_verify = (r.status, await r.json(), r.headers.get("Retry-After"))
    async with gw.proxy.get("/people/1", headers=bearer(token)) as r:
        refused_by_proxy = (r.status, await r.json(), r.headers.get("Retry-After"))
    assert refused_by_verify[0] == refused_by_proxy[0] == 429
    assert refused_by_verify[1]["error"]["code"] == refused_by_proxy[1]["error"]["code"] \
        == "quota_exceeded"
    assert refused_by_verify[2] == refused_by_proxy[2]
    status, usage = await gw.admin_json("GET", "/workspaces/acme/usage")
    assert usage["used"] == 3
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("headers, code, status", [
    ({}, "missing_key", 401),
    ({"Authorization": "Basic abc"}, "malformed_key", 401),
    ({"X-Original-URI": "/people/../admin"}, "bad_path", 400),
    ({"X-Original-URI": "/people/%2e%2e/admin"}, "bad_path", 400),
    ({"X-Original-URI": "people/1"}, "bad_path", 400),
    ({"X-Original-URI": "/nowhere"}, "no_route", 404),
    ({"X-Original-URI": "/_keygate/v1/usage"}, "no_route", 404),
    ({"X-Original-URI": "/_keygate/v1/verify"}, "no_route", 404),
    ({"X-Original-URI": "/_KEYGATE/v1/usage"}, "bad_path", 400),  # keygate's own, case-folded
])
async def test_refusals_carry_the_proxy_status_and_json(gw, headers, code, status):
    h = {"X-Original-Method": "GET", "X-Original-URI": "/people/1", **headers}
    async with gw.proxy.get(VERIFY, headers=h) as r:
        assert r.status == status
        body = await r.json()
        assert body["error"]["code"] == code
        assert body["error"]["request_id"] == r.headers["X-Request-Id"]
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith('Bearer realm="keygate"')


async def test_a_key_in_the_original_query_is_refused_and_not_counted(gw):
    token, _ = await gw.key(scopes=["people:read"])
    h = {**bearer(token), "X-Original-Method": "GET",
         "X-Original-URI": f"/people/1?api_key={token}"}
    async with gw.proxy.get(VERIFY, headers=h) as r:
        assert r.status == 400
        body = await r.text()
        assert "key_in_url" in body and token not in body
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_scopes_are_checked_against_the_original_method(gw):
    token, _ = await gw.key(scopes=["people:read"])
    h = {**bearer(token), "X-Forwarded-Method": "DELETE", "X-Forwarded-Uri": "/people/1"}
    async with gw.proxy.get(VERIFY, headers=h) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "insufficient_scope"
        assert 'scope="people:write"' in r.headers["WWW-Authenticate"]


async def test_forwarded_headers_win_over_original_ones(gw):
    token, _ = await gw.key(scopes=["people:read"])
    h = {**bearer(token), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/people/1",
         "X-Original-Method": "DELETE", "X-Original-URI": "/nowhere"}
    async with gw.proxy.post(VERIFY, headers=h) as r:
        assert r.status == 200


async def test_without_headers_the_path_after_the_prefix_is_the_original(gw):
    """Envoy ext_authz with path_prefix: own method, path after the prefix, its query."""
    token, _ = await gw.key(scopes=["people:read"])
    async with gw.proxy.get(VERIFY + "/people/1?page=2", headers=bearer(token)) as r:
        assert r.status == 200
        assert r.headers["X-Workspace-Id"] == "acme"
    async with gw.proxy.delete(VERIFY + "/people/1", headers=bearer(token)) as r:
        assert r.status == 403
    url = URL(str(gw.proxy_server.make_url(VERIFY + "/people/x")).replace("/x", "/%2e%2e/x"),
              encoded=True)
    async with gw.proxy.get(url, headers=bearer(token)) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "bad_path"


async def test_a_repeated_original_uri_or_a_bad_method_is_refused(gw):
    token, _ = await gw.key(scopes=["people:read"])
    h = [("Authorization", f"Bearer {token}"), ("X-Original-URI", "/people/1"),
         ("X-Original-URI", "/admin")]
    async with gw.proxy.get(VERIFY, headers=h) as r:
        assert r.status == 400
    h = {**bearer(token), "X-Original-URI": "/people/1", "X-Original-Method": "GET /x"}
    async with gw.proxy.get(VERIFY, headers=h) as r:
        assert r.status == 400


async def test_verify_only_routes_verify_but_never_forward(gw, upstream):
    token, _ = await gw.key(scopes=["orders:read"])
    async with gw.proxy.get(VERIFY, headers={**bearer(token), "X-Original-Method": "GET",
                                             "X-Original-URI": "/orders/9"}) as r:
        assert r.status == 200
        assert r.headers["X-Api-Scopes"] == "orders:read"
    async with gw.proxy.get("/orders/9", headers=bearer(token)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "no_route"
    assert upstream.requests == []
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 1


async def test_a_public_route_verifies_without_a_key_and_sets_no_identity(gw):
    async with gw.proxy.get(VERIFY, headers={"X-Original-URI": "/open/x",
                                             "X-Original-Method": "GET",
                                             "X-Workspace-Id": "evil"}) as r:
        assert r.status == 200
        assert "X-Workspace-Id" not in r.headers


async def test_a_burst_of_verifications_counts_each_once(gw):
    await gw.admin_json("PATCH", "/workspaces/acme", {"plan": "starter"})  # 1000 a month
    token, _ = await gw.key(scopes=["people:read"])
    h = {**bearer(token), "X-Original-Method": "GET", "X-Original-URI": "/people/1"}

    async def one() -> int:
        async with gw.proxy.get(VERIFY, headers=h) as r:
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 200


async def test_verify_requests_are_observed_under_the_original_route(gw):
    token, _ = await gw.key(scopes=["people:read"])
    async with gw.proxy.get(VERIFY, headers={**bearer(token), "X-Original-Method": "GET",
                                             "X-Original-URI": "/people/1"}):
        pass
    assert gw.counter("keygate_requests_total", route="/people/**", method="GET",
                      status_class="2xx") == 1


async def _raw_verify(gw, headers: bytes) -> tuple[bytes, bytes]:
    """One verify call with header bytes an HTTP client library would not send; returns the
    status line and the body."""
    reader, writer = await gw.raw_connection()
    try:
        writer.write(b"GET " + VERIFY.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + headers
                     + b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("name", [b"X-Original-URI", b"X-Forwarded-Uri"])
@pytest.mark.parametrize("uri", [b"/people/1\xc2\xa0", b"/people/1\xc2\x85",
                                 b"/open/x\xe2\x80\x83"])
async def test_the_original_uri_is_judged_as_sent_not_trimmed(gw, name, uri):
    """Path sanity applies to the original URI byte for byte: a trailing no-break space, NEL
    or em space is not whitespace to trim (HTTP trims only SP and HTAB
    around a field value). The proxy itself refuses such a request line, so verify must not
    answer 200 for it, let alone for a public route (/open/**) without a key."""
    token, _ = await gw.key(scopes=["people:read"])
    method = name.replace(b"URI", b"Method").replace(b"Uri", b"Method")
    status, body = await _raw_verify(gw, b"Authorization: Bearer " + token.encode() + b"\r\n"
                                     + name + b": " + uri + b"\r\n" + method + b": GET\r\n")
    assert status.split()[1] == b"400", status
    assert json.loads(body)["error"]["code"] == "bad_path"
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_the_original_method_is_judged_as_sent(gw):
    """A method with a trailing no-break space, or one that only upper-cases to an HTTP method
    through Unicode case mapping (the long s of 'poſt'), is not that method."""
    token, _ = await gw.key(scopes=["people:read", "people:write"])
    for method in ("GET\u00a0", "po\u017ft"):
        status, body = await _raw_verify(
            gw, b"Authorization: Bearer " + token.encode() + b"\r\nX-Original-URI: /people/1"
            b"\r\nX-Original-Method: " + method.encode() + b"\r\n")
        assert status.split()[1] == b"400", (method, status)
        assert json.loads(body)["error"]["code"] == "bad_request"
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_a_declared_body_over_the_limit_is_refused_as_the_proxy_refuses_it(
        redis_url, upstream, monkeypatch):
    """Envoy's ext_authz with ``with_request_body`` (path_prefix mode) sends keygate the
    original body: a declared body over ``server.max_body_bytes`` is answered 413
    ``body_too_large`` and counted nowhere, as the proxy answers it; it was answered 200 and
    counted, so the front proxy forwarded a body keygate refuses."""
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_body_bytes=100))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="starter")
        token, _ = await g.key(scopes=["people:read", "people:write"])
        async with g.proxy.post("/people/1", headers=bearer(token), data=b"x" * 500) as r:
            by_proxy = r.status, (await r.json())["error"]["code"]
        async with g.proxy.post(VERIFY + "/people/1", headers=bearer(token),
                                data=b"x" * 500) as r:
            by_verify = r.status, (await r.json())["error"]["code"]
            assert "X-Workspace-Id" not in r.headers
        async with g.proxy.post(VERIFY, data=b"x" * 500, headers={
                **bearer(token), "X-Forwarded-Method": "POST",
                "X-Forwarded-Uri": "/people/1"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == by_verify
        assert by_verify == by_proxy == (413, "body_too_large")
        async with g.proxy.post(VERIFY + "/people/1", headers=bearer(token),
                                data=b"x" * 100) as r:
            assert r.status == 200  # at the limit: allowed
        assert (await g.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 1
        assert upstream.requests == []



@pytest.mark.parametrize("method", [b"get", b"Get", b"delete"])
async def test_a_method_the_proxy_refuses_is_refused_not_upper_cased(gw, method):
    """The proxy answers a lower-case method (``get /people/1``) 400 ``bad_request``: HTTP
    methods are case-sensitive (RFC 9110 9.1), and an upstream may read ``get`` as another
    method than ``GET``. Verify upper-cased the original method and answered 200 for it."""
    token, _ = await gw.key(scopes=["people:read", "people:write"])
    reader, writer = await gw.raw_connection()
    try:
        writer.write(method + b" /people/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    by_proxy = head.split()[1], json.loads(body)["error"]["code"]
    for name, uri in ((b"X-Forwarded-Method", b"X-Forwarded-Uri"),
                      (b"X-Original-Method", b"X-Original-URI")):
        status, body = await _raw_verify(gw, b"Authorization: Bearer " + token.encode()
                                         + b"\r\n" + uri + b": /people/1\r\n" + name + b": "
                                         + method + b"\r\n")
        assert (status.split()[1], json.loads(body)["error"]["code"]) == by_proxy \
            == (b"400", "bad_request"), name
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_the_longest_path_the_proxy_takes_verifies_in_path_prefix_mode(gw):
    """Envoy's path_prefix mode puts /_keygate/v1/verify before the original path: a path the
    proxy accepts (at most 2048 bytes) was refused ``bad_path`` as over-long once the prefix
    was counted in, and one byte over the limit must still be refused."""
    from gateway.routes import MAX_PATH_BYTES
    token, _ = await gw.key(scopes=["people:read"])
    longest = "/people/" + "a" * (MAX_PATH_BYTES - len("/people/"))
    for path, status in ((longest, 200), (longest + "a", 400)):
        async with gw.proxy.get(path, headers=bearer(token)) as r:
            by_proxy = r.status
        async with gw.proxy.get(VERIFY + path, headers=bearer(token)) as r:
            assert (r.status, by_proxy) == (status, status), await r.text()
            if status == 400:
                assert (await r.json())["error"]["code"] == "bad_path"


@pytest.mark.parametrize("query", [b"a=\xff", b"a=\xc3\xa9", b"a=b c", b"a=\x7f"])
async def test_a_query_the_proxy_refuses_is_refused(gw, query):
    """The proxy's HTTP parser refuses a request line whose query holds a raw non-ASCII byte,
    a space or DEL (400 ``bad_request``); nginx and Traefik pass such a URI on in
    ``X-Forwarded-Uri``, and verify answered 200 (counted) for it because only the path is
    screened byte by byte."""
    token, _ = await gw.key(scopes=["people:read"])
    reader, writer = await gw.raw_connection()
    try:
        writer.write(b"GET /people/1?" + query + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: "
                     b"Bearer " + token.encode() + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    if b" " not in query:  # a space ends the request target: the proxy reads another one
        assert (head.split()[1], json.loads(body)["error"]["code"]) == (b"400", "bad_request")
    status, body = await _raw_verify(gw, b"Authorization: Bearer " + token.encode()
                                     + b"\r\nX-Forwarded-Uri: /people/1?" + query + b"\r\n")
    assert (status.split()[1], json.loads(body)["error"]["code"]) == (b"400", "bad_request")
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_a_trailing_slash_cannot_take_a_path_to_a_weaker_route(redis_url, upstream,
                                                                     monkeypatch):
    """Most upstream routers read '/people/1/' as '/people/1' (Express and Spring MVC 5 by
    default). With DELETE on '/people/*' needing people:delete and '/people/**' taking every
    write under people:write, a key without people:delete had 'DELETE /people/1/' verified
    (counted, 200) under '/people/**', and the upstream behind the edge deleted person 1. It is
    refused 400 ``bad_path`` and not counted, by verify and by the proxy alike."""
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, routes=(
        Route("/people/*", "api", ("DELETE",), ("people:delete",)),
        Route("/people/**", "api", ("POST", "PUT", "DELETE"), ("people:write",)),
    ))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="starter")
        token, _ = await g.key(scopes=["people:write"])
        for uri in ("/people/1/", "/people/1/?x=1"):
            async with g.proxy.get(VERIFY, headers={**bearer(token), "X-Forwarded-Method":
                                                    "DELETE", "X-Forwarded-Uri": uri}) as r:
                assert r.status == 400, uri
                assert (await r.json())["error"]["code"] == "bad_path"
                assert "X-Workspace-Id" not in r.headers
        async with g.proxy.delete(VERIFY + "/people/1/", headers=bearer(token)) as r:
            assert r.status == 400  # Envoy's path_prefix mode
        async with g.proxy.get(VERIFY, headers={**bearer(token), "X-Forwarded-Method":
                                                "DELETE", "X-Forwarded-Uri": "/people/1"}) as r:
            assert r.status == 403  # the route the upstream serves: people:delete
        async with g.proxy.get(VERIFY, headers={**bearer(token), "X-Forwarded-Method":
                                                "DELETE", "X-Forwarded-Uri": "/people/1/x/"}) as r:
            assert r.status == 200  # '/people/1/x' is '/people/**' too
        async with g.proxy.delete("/people/1/", headers=bearer(token)) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "bad_path")
        assert upstream.requests == []
        assert (await g.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 1


@pytest.mark.parametrize("uri_header, method_header", [
    ("X-Original-URI", "X-Original-Method"), ("X-Forwarded-Uri", "X-Forwarded-Method")])
async def test_an_original_uri_without_its_method_is_refused(gw, upstream, uri_header,
                                                              method_header):
    """nginx's auth_request subrequest is always a GET, and nginx's own example sets
    X-Original-URI alone: keygate judged every original request as the call's own method, so
    a POST was allowed for a key holding only people:read. A URI header without its method
    header is a 400 naming the missing one, counted nowhere."""
    token, _ = await gw.key(scopes=["people:read"])
    for call in (gw.proxy.get, gw.proxy.post):
        async with call(VERIFY, headers={**bearer(token), uri_header: "/people/1"}) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["code"] == "bad_request" and method_header in error["message"]
            assert "X-Workspace-Id" not in r.headers
    # the other pair's method is no stand-in: a client may have sent it
    async with gw.proxy.get(VERIFY, headers={**bearer(token), "X-Forwarded-Uri": "/people/1",
                                             "X-Original-Method": "GET"}) as r:
        assert r.status == 400
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_a_call_that_names_no_original_request_is_refused(redis_url, upstream,
                                                                monkeypatch):
    """A bare ``/_keygate/v1/verify`` with neither header pair (a proxy set up without them:
    nginx's auth subrequest then asks about nothing) was judged as ``GET /``: with a public
    ``/`` route, every request the proxy asked about was allowed. Envoy's path_prefix mode
    always sends a path after the prefix (``/_keygate/v1/verify/`` for ``/``), so nothing
    legitimate is bare: 400 ``bad_request``, counted nowhere."""
    config = verify_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, routes=(Route("/", "api", ("GET",), (), True),)
                                 + config.routes)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        for target in (VERIFY, VERIFY + "?page=2"):
            async with g.proxy.get(target, headers=bearer(token)) as r:
                assert r.status == 400, target
                error = (await r.json())["error"]
                assert error["code"] == "bad_request" and "X-Forwarded-Uri" in error["message"]
        async with g.proxy.get(VERIFY + "/") as r:
            assert r.status == 200  # Envoy asking about GET /: the public route
        async with g.proxy.get(VERIFY + "/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        assert upstream.requests == []
        assert (await g.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 1


async def test_an_original_connect_is_refused_as_the_proxy_refuses_it(gw, upstream):
    """The proxy answers CONNECT 501 ``not_implemented`` on any route (keygate opens no
    tunnels); verify answered 200 for it on a route taking every method (``/companies/**``),
    so a front proxy that tunnels would have opened one on keygate's say-so."""
    token, _ = await gw.key(scopes=["companies:read"])
    reader, writer = await gw.raw_connection()
    writer.write(b"CONNECT /companies/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                 + token.encode() + b"\r\nConnection: close\r\n\r\n")
    by_proxy = int((await asyncio.wait_for(reader.read(), 5)).split()[1])
    writer.close()
    async with gw.proxy.get(VERIFY, headers={**bearer(token), "X-Forwarded-Method": "CONNECT",
                                             "X-Forwarded-Uri": "/companies/1"}) as r:
        assert (r.status, by_proxy) == (501, 501)
        assert (await r.json())["error"]["code"] == "not_implemented"
        assert "X-Workspace-Id" not in r.headers
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0


async def test_no_answer_of_verify_may_be_kept_by_a_cache(gw):
    """A verify answer is an identity (who the key is, its workspace, its remaining quota) or a
    refusal of one request: an intermediary that kept either would answer a later request
    with it. Every answer says ``Cache-Control: no-store``, as the usage endpoint's does: the
    200, keygate's refusals (before and after the key is read, a key in the query included),
    and one in Envoy's path-prefix mode. Nor may any other answer of keygate's own."""
    token, _ = await gw.key(scopes=["people:read"])
    h = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/people/1"}
    cases = [(VERIFY, {**bearer(token), **h}, 200),
             (VERIFY + "/people/1", bearer(token), 200),
             (VERIFY, h, 401),
             (VERIFY, {**bearer(token), **h, "X-Forwarded-Uri": "/nowhere"}, 404),
             (VERIFY, {**bearer(token), **h, "X-Forwarded-Uri": "/people/../x"}, 400),
             (VERIFY + "?k=" + token, {**bearer(token), **h}, 400),
             (VERIFY, {**bearer(token), "X-Forwarded-Uri": "/people/1"}, 400),
             ("/_keygate/v1/usage", {}, 401),
             ("/_keygate/v1/keys", bearer(token), 403)]
    for target, headers, status in cases:
        async with gw.proxy.get(URL(target, encoded=True), headers=headers) as r:
            assert r.status == status, (target, r.status, await r.text())
            assert r.headers.getall("Cache-Control", []) == ["no-store"], (target, r.headers)


@pytest.fixture
async def roomy(redis_url, upstream, monkeypatch):
    """``gw`` on a plan with room for more than three requests."""
    async with gateway_under_test(verify_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme", plan="starter")
        yield g


async def _raw_answer(gw, data: bytes) -> tuple[int, dict]:
    """The status and JSON body (``{}`` if none) of one request sent as ``data``."""
    reader, writer = await gw.raw_connection()
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b"\r\n")[0].split()[1]), (json.loads(body) if body else {})


@pytest.mark.parametrize("name", [b"X.HTTP.Method.Override", b"X+HTTP+Method",
                                  b"X.Method.Override", b"x~http.method-override"])
async def test_a_punctuated_method_override_is_judged_as_the_method_it_names(roomy, upstream,
                                                                            name):
    """lighttpd's CGI, FastCGI and SCGI hand ``X.HTTP.Method.Override`` to the application as
    ``HTTP_X_HTTP_METHOD_OVERRIDE``; keygate's own proxy drops such a spelling, but in
    verify-only mode the front proxy forwards (Traefik and Envoy pass names with '.' or '+'
    on, and Traefik copies them onto the verify call). Verify ignored it: a ``people:read``
    key was answered 200 for ``GET /people/1`` naming ``DELETE``, and the API deleted. It is
    judged as the ``-`` spelling is: the method's scopes are required, a value that is no
    method is refused, and one the key may use is allowed."""
    gw = roomy
    token, _ = await gw.key(scopes=["people:read"])
    base = (b"GET " + VERIFY.encode() + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + token.encode() + b"\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Uri: /people/1\r\n")
    dash = name.replace(b".", b"-").replace(b"+", b"-").replace(b"~", b"-")
    for spelling in (dash, name):
        status, body = await _raw_answer(gw, base + spelling + b": DELETE\r\n"
                                         b"Connection: close\r\n\r\n")
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), (spelling, body)
        status, body = await _raw_answer(gw, base + spelling + b": GET, DELETE\r\n"
                                         b"Connection: close\r\n\r\n")
        assert (status, body["error"]["code"]) == (403, "insufficient_scope"), (spelling, body)
        status, body = await _raw_answer(gw, base + spelling + b": @\r\n"
                                         b"Connection: close\r\n\r\n")
        assert (status, body["error"]["code"]) == (400, "bad_request"), (spelling, body)
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 0
    status, body = await _raw_answer(gw, base + name + b": GET\r\nConnection: close\r\n\r\n")
    assert status == 200, body
    assert (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"] == 1
    assert upstream.requests == []


# Every method in llhttp's table (HTTP, ICE and RTSP: the proxy's parser knows them all, and
# takes only some on an HTTP/1.x request line), and tokens it knows none of
CANDIDATE_METHODS = (
    "GET HEAD POST PUT PATCH DELETE OPTIONS TRACE CONNECT QUERY ACL BIND CHECKOUT COPY LINK "
    "LOCK MERGE MKACTIVITY MKCALENDAR MKCOL MOVE M-SEARCH NOTIFY PROPFIND PROPPATCH PURGE "
    "REBIND REPORT SEARCH SOURCE SUBSCRIBE UNBIND UNLINK UNLOCK UNSUBSCRIBE PRI ANNOUNCE "
    "DESCRIBE FLUSH GET_PARAMETER PAUSE PLAY RECORD REDIRECT SETUP SET_PARAMETER TEARDOWN "
    "FOO GETS X-DELETE GE POSTS M-SEARCHES SOURCES get Get").split()


async def test_verify_accepts_exactly_the_methods_the_proxy_accepts(roomy, upstream):
    """SPEC, Deployment modes: a refusal is "the same status, headers and JSON body the proxy
    would answer". The proxy's HTTP parser (llhttp) refuses a method it does not know
    (``FOO /companies/1`` is 400 ``bad_request``), and RTSP's ``PLAY`` or ``SETUP`` on an
    HTTP request line; verify took any upper-case token, so on a route open to any method
    (``/companies/**``) it answered 200, and counted, a method keygate would never forward,
    which nginx then forwards. Each method is sent to the proxy and to verify, under both
    pairs of original-request headers: same status and error code, and verify counts exactly
    when the proxy forwarded."""
    gw = roomy
    token, _ = await gw.key(scopes=["companies:read"])
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"

    async def used() -> int:
        return (await gw.admin_json("GET", "/workspaces/acme/usage"))[1]["used"]

    forwarded = refused = 0
    for method in CANDIDATE_METHODS:
        m = method.encode()
        before = await used()
        status, body = await _raw_answer(gw, m + b" /companies/1 HTTP/1.1\r\nHost: gw\r\n" + auth
                                         + b"Connection: close\r\n\r\n")
        by_proxy = status, body.get("error", {}).get("code")
        counted = await used() - before
        if status == 400:
            refused += 1
        elif status == 200:
            forwarded += 1
        for names in ((b"X-Forwarded-Method", b"X-Forwarded-Uri"),
                      (b"X-Original-Method", b"X-Original-URI")):
            before = await used()
            status, body = await _raw_answer(
                gw, b"GET " + VERIFY.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + auth + names[0]
                + b": " + m + b"\r\n" + names[1] + b": /companies/1\r\nConnection: close\r\n\r\n")
            by_verify = status, body.get("error", {}).get("code")
            assert by_verify == by_proxy, (method, names[0], by_verify, by_proxy)
            assert await used() - before == counted, (method, names[0])
    # the candidates hold both kinds (and CONNECT, 501 from both)
    assert forwarded >= 30 and refused >= 15, (forwarded, refused)
    assert {r["method"] for r in upstream.requests} <= set(CANDIDATE_METHODS)
