"""The upstream examples in docs/signed-identity.md run as written, behind a real keygate."""

from __future__ import annotations

import io
import re
from pathlib import Path

from aiohttp import ClientSession, web

from gateway.config import IdentitySignature
from tests.harness import gateway_under_test, make_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "signed-identity.md"


def doc_blocks() -> list[str]:
    text = DOC.read_text()
    return re.findall(r"<!-- tested: [^>]*-->\n```python\n(.*?)```", text, re.DOTALL)


def load(block: str) -> dict:
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


async def test_the_aiohttp_middleware_accepts_keygate_and_refuses_a_direct_caller(
        aiohttp_server, redis_url, monkeypatch):
    monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret,older-secret")
    middleware = load(doc_blocks()[0])["keygate_signature"]

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("X-Workspace-Id", "public"))
    app = web.Application(middlewares=[middleware])
    app.router.add_route("*", "/{tail:.*}", hello)
    server = await aiohttp_server(app)
    config = make_config(str(server.make_url("")),
                         identity_signature=IdentitySignature("KEYGATE_SIGNING_SECRET"))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key("acme")
        auth = {"Authorization": f"Bearer {token}"}
        async with gw.proxy.get("/people/1?x=%20y", headers=auth) as r:
            assert (r.status, await r.text()) == (200, "acme")
        async with gw.proxy.get("/health") as r:
            assert (r.status, await r.text()) == (200, "public")
    async with ClientSession() as direct:  # around keygate, with forged identity headers
        async with direct.get(server.make_url("/people/1"), headers={
                "X-Workspace-Id": "acme", "X-Keygate-Signature": "t=1,v1=00"}) as r:
            assert r.status == 401


async def test_the_wsgi_middleware_accepts_keygate_and_refuses_a_direct_caller(
        upstream, redis_url, monkeypatch):
    monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret")
    require_keygate = load(doc_blocks()[1])["require_keygate"]
    config = make_config(str(upstream.make_url("")),
                         identity_signature=IdentitySignature("KEYGATE_SIGNING_SECRET"))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key("acme")
        auth = {"Authorization": f"Bearer {token}"}
        async with gw.proxy.get("/people/1?a=%2F", headers=auth) as r:
            assert r.status == 200
    received = upstream.requests[-1]

    def app(environ, start_response):
        start_response("200 OK", [])
        return [environ["HTTP_X_WORKSPACE_ID"].encode()]

    def call(headers, target):
        environ = {"REQUEST_METHOD": "GET", "RAW_URI": target, "wsgi.input": io.BytesIO()}
        for name, value in headers:  # as a WSGI server builds it
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        status = []
        body = require_keygate(app)(environ, lambda s, h: status.append(s))
        return status[0], b"".join(body)
    assert call(received["headers"], received["raw_path"]) == ("200 OK", b"acme")
    forged = [(k, "evil" if k == "X-Workspace-Id" else v) for k, v in received["headers"]]
    assert call(forged, received["raw_path"])[0] == "401 Unauthorized"
    assert call(received["headers"], "/people/2?a=%2F")[0] == "401 Unauthorized"


async def test_a_direct_caller_with_a_malformed_signature_gets_401_not_500(aiohttp_server,
                                                                           monkeypatch):
    """What the documented middleware answers a caller that goes around keygate with a
    garbled header: 401, never an exception from ``verify`` (a 500, a traceback in the
    upstream's log). ``t=²`` or Arabic-Indic digits pass ``str.isdigit``; a WSGI server hands
    header bytes over as Latin-1, so ``\\xb2`` is '²'."""
    monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret")
    middleware = load(doc_blocks()[0])["keygate_signature"]

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="reached")
    app = web.Application(middlewares=[middleware])
    app.router.add_route("*", "/{tail:.*}", hello)
    server = await aiohttp_server(app)
    async with ClientSession() as direct:
        for value in ("t=\u00b2,v1=00", "t=\u0661\u0662,v1=00", "t=1,v1=\u00e9"):
            async with direct.get(server.make_url("/people/1"),
                                  headers={"X-Keygate-Signature": value}) as r:
                assert r.status == 401, (value, r.status)
