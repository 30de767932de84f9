"""The upstream examples in docs/signed-identity.md run as written, behind a real keygate."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
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


async def test_the_wsgi_middleware_runs_in_a_real_wsgi_server_behind_keygate(redis_url,
                                                                             monkeypatch):
    """The WSGI block as written, wrapped around an application in werkzeug's server (Flask's
    development server: it sets ``RAW_URI``), behind a real keygate; then a caller going
    around keygate: a replay of keygate's own headers for another path or method, or with
    a second workspace header (the server joins repeats into one variable), is refused."""
    import threading

    pytest.importorskip("werkzeug")
    from werkzeug.serving import make_server
    monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret-" + "w" * 32)
    require_keygate = load(doc_blocks()[1])["require_keygate"]
    seen: list[dict] = []

    def app(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ.get("HTTP_X_WORKSPACE_ID", "public").encode()]
    server = make_server("127.0.0.1", 0, require_keygate(app), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        config = make_config(base, identity_signature=IdentitySignature(
            "KEYGATE_SIGNING_SECRET"))
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme")
            for path in ("/people/1", "/people/1?x=%20y&b=%2F", "/people/a%20b"):
                async with gw.proxy.get(path, headers={"Authorization": f"Bearer {token}"}) \
                        as r:
                    assert (r.status, await r.text()) == (200, "acme"), path
            async with gw.proxy.get("/health") as r:
                assert (r.status, await r.text()) == (200, "public")
        signed = [(k[5:].replace("_", "-"), v) for k, v in seen[0].items()]
        async with ClientSession() as direct:
            async with direct.get(base + "/people/1", headers=signed) as r:
                assert r.status == 200  # a replay as sent, within max_age: documented
            async with direct.get(base + "/people/2", headers=signed) as r:
                assert r.status == 401
            async with direct.delete(base + "/people/1", headers=signed) as r:
                assert r.status == 401
            async with direct.get(base + "/people/1",
                                  headers=[*signed, ("X-Workspace-Id", "evil")]) as r:
                assert r.status == 401
    finally:
        server.shutdown()
        thread.join(10)


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


def node_block() -> str:
    return re.search(r"```js\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)


async def test_the_nodejs_check_accepts_keygate_and_never_an_empty_secret(
        redis_url, monkeypatch, tmp_path):
    """The Node.js check, as written, in a real Node HTTP server behind a real keygate.
    Its secret list ``"new,old,"`` (a comma left over from a rotation) held an empty secret,
    which the check accepted: anyone could sign with the empty key. ``gateway.signature``
    ignores blank entries; so must the Node.js check."""
    import asyncio
    import hashlib
    import hmac
    import shutil
    import time

    import pytest
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "upstream.js"
    script.write_text(node_block() + """
const http = require("node:http");
const server = http.createServer((req, res) => {
  const ok = verifyKeygate(req, process.env.KEYGATE_SIGNING_SECRET);
  res.writeHead(ok ? 200 : 401);
  res.end(ok ? (req.headers["x-workspace-id"] ?? "public") : "refused");
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
""")
    proc = await asyncio.create_subprocess_exec(
        node, str(script), stdout=asyncio.subprocess.PIPE,
        env={"KEYGATE_SIGNING_SECRET": "doc-secret,older-secret,", "PATH": "/usr/bin:/bin"})
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        base = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret")
        config = make_config(base, identity_signature=IdentitySignature(
            "KEYGATE_SIGNING_SECRET"))
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme")
            async with gw.proxy.get("/people/1?x=%20y",
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                assert (r.status, await r.text()) == (200, "acme")
        t = str(int(time.time()))
        forged = {"X-Request-Id": "r1", "X-Workspace-Id": "acme", "X-Api-Key-Id": "k",
                  "X-Api-Scopes": "ALL", "X-Workspace-Plan": "p"}
        message = "\n".join((t, "GET", "/people/1", *forged.values())).encode()
        forged["X-Keygate-Signature"] = \
            f"t={t},v1={hmac.new(b'', message, hashlib.sha256).hexdigest()}"
        async with ClientSession() as direct:
            async with direct.get(base + "/people/1", headers=forged) as r:
                assert r.status == 401, await r.text()
    finally:
        proc.kill()
        await proc.wait()



async def test_the_nodejs_check_refuses_a_repeated_signature_header(tmp_path):
    """``gateway.signature.verify`` refuses a request whose signature header (or any signed
    header) is repeated. The Node.js check read ``req.headers``, where Node joins repeats with
    ", ": a valid signature followed by a second copy (``x=y``, a stale one) still verified,
    so the two checks disagreed on the same request. It now counts the copies in
    ``req.rawHeaders`` and refuses a repeat, as the Python one does."""
    import asyncio
    import hashlib
    import hmac
    import shutil
    import time

    from multidict import CIMultiDict

    from gateway.signature import verify

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "upstream.js"
    script.write_text(node_block() + """
const http = require("node:http");
const server = http.createServer((req, res) => {
  res.writeHead(verifyKeygate(req, process.env.KEYGATE_SIGNING_SECRET) ? 200 : 401);
  res.end();
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
""")
    proc = await asyncio.create_subprocess_exec(
        node, str(script), stdout=asyncio.subprocess.PIPE,
        env={"KEYGATE_SIGNING_SECRET": "doc-secret", "PATH": "/usr/bin:/bin"})
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        t = str(int(time.time()))
        signed = [("X-Request-Id", "r1"), ("X-Workspace-Id", "acme"), ("X-Api-Key-Id", "k"),
                  ("X-Api-Scopes", "people:read"), ("X-Workspace-Plan", "p")]
        message = "\n".join((t, "GET", "/people/1", *(v for _, v in signed))).encode()
        signature = f"t={t},v1={hmac.new(b'doc-secret', message, hashlib.sha256).hexdigest()}"
        url = f"http://127.0.0.1:{port}/people/1"
        async with ClientSession() as direct:
            for extra, expected in (([], 200), ([("X-Keygate-Signature", "x=y")], 401),
                                    ([("X-Keygate-Signature", signature)], 401),
                                    ([("x-keygate-signature", "t=1,v1=00")], 401)):
                headers = [*signed, ("X-Keygate-Signature", signature), *extra]
                async with direct.get(url, headers=headers) as r:
                    assert r.status == expected, extra
                # the same answer as the Python check
                assert verify(CIMultiDict(headers), "GET", "/people/1", "doc-secret") == \
                    (expected == 200), extra
    finally:
        proc.kill()
        await proc.wait()

async def test_the_flask_target_the_verify_docstring_names_verifies(redis_url, monkeypatch):
    """``gateway.signature.verify``'s docstring tells a Flask upstream which expression gives
    the target. It named ``request.full_path``, which is percent-decoded and ends every path
    without a query in ``?``: each request keygate signed was refused. The expression it names
    now is evaluated, as written, in a real werkzeug server (Flask's) behind keygate."""
    import threading

    import pytest
    pytest.importorskip("werkzeug")
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    from gateway import signature
    expression = re.search(r"``([^`]+)`` in Flask", signature.verify.__doc__).group(1)

    def app(environ, start_response):
        request = Request(environ)
        target = eval(expression, {"request": request})
        ok = signature.verify(request.headers, request.method, target, "doc-secret")
        return Response("ok" if ok else "refused", status=200 if ok else 401)(
            environ, start_response)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("KEYGATE_SIGNING_SECRET", "doc-secret")
        config = make_config(f"http://127.0.0.1:{server.port}",
                             identity_signature=IdentitySignature("KEYGATE_SIGNING_SECRET"))
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme")
            for path in ("/people/1", "/people/1?x=%20y&b=2", "/people/a%20b"):
                async with gw.proxy.get(path, headers={"Authorization": f"Bearer {token}"}) \
                        as r:
                    assert (r.status, await r.text()) == (200, "ok"), (path, expression)
    finally:
        server.shutdown()
        thread.join(10)


def test_the_rotation_steps_say_keygate_must_be_restarted_to_sign_with_the_new_secret():
    """A running process never sees its environment change, and ``identity_signature`` is
    kept until a restart (``gateway.reload.RESTART_ONLY_SECTIONS``): an operator who followed
    "give keygate new,old" with a reload kept signing with ``old``, and step 3 (drop ``old``
    at the upstreams) then refused every request. The steps say so."""
    from gateway.reload import RESTART_ONLY_SECTIONS
    assert "identity_signature" in RESTART_ONLY_SECTIONS
    steps = DOC.read_text().split("## Rotating the secret without downtime", 1)[1]
    steps = steps.split("\n## ", 1)[0]
    step2 = re.search(r"^2\. (.*?)(?=^3\. )", steps, re.M | re.S).group(1)
    assert "restart" in step2 and "reload" in step2, step2
