"""Header names a CGI-style upstream reads as keygate's own: what reaches the upstream.

CGI, FastCGI and SCGI hand a request header to the application as an environment variable
``HTTP_<NAME>``. lighttpd (``http_cgi_encode_varname``, all three gateways) makes NAME by
upper-casing the header name and turning every character that is not an ASCII letter or digit
into ``_``: ``X.Workspace.Id``, ``X+Workspace+Id`` and ``X_Workspace_Id`` are all
``HTTP_X_WORKSPACE_ID``, the variable a PHP or Python application reads for
``X-Workspace-Id``. keygate removed the client's ``_`` spelling only: any other punctuation
(all of it valid in a header name, RFC 9110 ``tchar``) carried a client's identity, forwarded
address, request id or signature to the application as keygate's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys

import pytest

from gateway.config import IdentitySignature, Route
from conftest import free_port
from harness import eventually, gateway_under_test, make_config
from test_edge_framing import RawUpstream, exchange

# every character RFC 9110 allows in a header name besides letters, digits and "-"
PUNCTUATION = "!#$%&'*+.^_`|~"
KEYGATES = ("X-Workspace-Id", "X-Api-Key-Id", "X-Api-Scopes", "X-Workspace-Plan",
            "X-Keygate-Signature", "X-Request-Id", "X-Forwarded-For", "X-Forwarded-Proto",
            "X-Forwarded-Host", "X-Real-IP", "traceparent")
ROUTES = (Route("/public/**", "api", ("GET",), (), True),
          Route("/people/**", "api", ("GET",), ("people:read",)))


def cgi_variable(name: bytes) -> str:
    """The environment variable lighttpd hands a header to a CGI/FastCGI/SCGI application as."""
    return "HTTP_" + re.sub(r"[^A-Za-z0-9]", "_", name.decode("latin-1")).upper()


def spoofed_head(target: str, token: str | None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gw"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for i, name in enumerate(KEYGATES):
        mark = PUNCTUATION[i % len(PUNCTUATION)]
        lines.append(f"{name.replace('-', mark)}: evil")
        lines.append(f"{name.replace('-', PUNCTUATION[(i + 7) % len(PUNCTUATION)])}: evil")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("keyed", [False, True])
async def test_no_punctuated_spelling_of_keygates_headers_reaches_the_upstream(
        redis_url, monkeypatch, keyed):
    """On a public route (no identity of keygate's to stand beside) and on a keyed one, every
    variable the application reads for keygate's headers holds keygate's one value."""
    up = await RawUpstream().start()
    monkeypatch.setenv("KG_SIGNING", "k" * 40)
    config = make_config(f"http://127.0.0.1:{up.port}", routes=ROUTES,
                         identity_signature=IdentitySignature("KG_SIGNING"))
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme")
            answer = await exchange(gw, spoofed_head("/people/1" if keyed else "/public/1",
                                                     token if keyed else None), wait=1.0)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        up.close()
    [request] = up.requests
    by_variable: dict[str, list[bytes]] = {}
    for name, value in request.headers:
        by_variable.setdefault(cgi_variable(name), []).append(value)
    for name in KEYGATES:
        values = by_variable.get(cgi_variable(name.encode()), [])
        assert b"evil" not in values, (name, request.headers)
        assert len(values) <= 1, (name, values)


LIGHTTPD = shutil.which("lighttpd") or next(
    (p for p in ("/usr/sbin/lighttpd", "/usr/local/sbin/lighttpd") if os.path.exists(p)), None)


@pytest.mark.skipif(LIGHTTPD is None, reason="lighttpd is not installed (.ci/run installs it)")
async def test_a_cgi_application_behind_lighttpd_reads_keygates_identity(
        redis_url, monkeypatch, tmp_path):
    """The same, as a real lighttpd hands the headers to a real CGI script."""
    port = free_port()  # lighttpd binds it with SO_REUSEADDR
    script = tmp_path / "env.cgi"
    script.write_text(f"#!{sys.executable}\nimport os\nprint('Content-Type: text/plain')\n"
                      "print()\nfor k in ('HTTP_X_WORKSPACE_ID', 'HTTP_X_API_SCOPES', "
                      "'HTTP_X_FORWARDED_FOR'):\n    print(k, os.environ.get(k, '-'))\n")
    script.chmod(0o755)
    conf = tmp_path / "lighttpd.conf"
    conf.write_text(f'server.document-root = "{tmp_path}"\nserver.port = {port}\n'
                    f'server.bind = "127.0.0.1"\nserver.errorlog = "{tmp_path}/error.log"\n'
                    'server.modules += ("mod_cgi")\ncgi.assign = (".cgi" => "")\n'
                    'server.error-handler = "/env.cgi"\n')
    proc = subprocess.Popen([LIGHTTPD, "-D", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True
    try:
        assert await eventually(listening, timeout=10)
        config = make_config(f"http://127.0.0.1:{port}", routes=ROUTES)
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme")
            spoof = [("X.Workspace.Id", "evil"), ("X+Api+Scopes", "ALL"),
                     ("X.Forwarded.For", "6.6.6.6")]
            async with gw.proxy.get("/public/1", headers=spoof) as r:
                assert (r.status, await r.text()) == (200, "HTTP_X_WORKSPACE_ID -\n"
                                                           "HTTP_X_API_SCOPES -\n"
                                                           "HTTP_X_FORWARDED_FOR 127.0.0.1\n")
            async with gw.proxy.get("/people/1", headers=[
                    *spoof, ("Authorization", f"Bearer {token}")]) as r:
                text = await r.text()
                assert r.status == 200 and "evil" not in text and "ALL" not in text, text
                assert "HTTP_X_WORKSPACE_ID acme\n" in text
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("name", ["X.HTTP.Method.Override", "X+Http+Method", "x~method.override",
                                  "X-HTTP.Method-Override"])
async def test_a_punctuated_method_override_never_reaches_the_upstream(redis_url, monkeypatch,
                                                                       name):
    """keygate authorises a request as the method its ``X-HTTP-Method-Override`` names
    (``gateway.overrides``: ``-`` and ``_`` spellings). ``X.HTTP.Method.Override: DELETE``
    was neither judged nor dropped, and lighttpd hands it to a PHP application (Symfony) as
    ``HTTP_X_HTTP_METHOD_OVERRIDE``: a key allowed GET could have the upstream delete. Such a
    spelling is no client's honest header: it is dropped."""
    up = await RawUpstream().start()
    config = make_config(f"http://127.0.0.1:{up.port}", routes=ROUTES)
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as gw:
            await gw.workspace("acme")
            token, _ = await gw.key("acme", scopes=["people:read"])
            answer = await exchange(gw, (f"GET /people/1 HTTP/1.1\r\nHost: gw\r\n"
                                         f"Authorization: Bearer {token}\r\n"
                                         f"{name}: DELETE\r\n\r\n").encode(), wait=1.0)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        up.close()
    [request] = up.requests
    variables = {cgi_variable(n) for n, _ in request.headers}
    assert not variables & {"HTTP_X_HTTP_METHOD_OVERRIDE", "HTTP_X_HTTP_METHOD",
                            "HTTP_X_METHOD_OVERRIDE"}, request.headers
