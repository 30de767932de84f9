"""HTTPS upstreams signed by a private CA: ``upstreams.NAME.ca_file``, end to end.

The upstream is a real aiohttp HTTPS server on loopback whose certificate (SAN DNS:localhost,
IP:127.0.0.1) is signed by a throwaway CA made with the openssl CLI (skipped without it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.config import Config, Route, Upstream, load_config
from gateway.errors import GatewayError
from gateway.models import Principal
from gateway.proxying.forward import Forwarder
from harness import gateway_under_test, make_config, openssl


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory) -> dict[str, Path]:
    """A test CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=keygate test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    openssl("req", "-new", *ec, "-subj", "/CN=localhost",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid:always\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
             "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.pem"))
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "dir": d}


@pytest.fixture
async def tls_upstream(aiohttp_server, private_ca):
    """An HTTPS echo upstream on 127.0.0.1 presenting the CA-signed certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(private_ca["cert"], private_ca["key"])

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"path": request.raw_path, "tls": request.secure,
                                  "workspace": request.headers.get("X-Workspace-Id")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app, ssl=context)


async def test_gateway_forwards_to_an_https_upstream_trusting_its_ca_file(
        tls_upstream, private_ca, redis_url, monkeypatch, tmp_path) -> None:
    # The upstream comes from a YAML file, as an operator writes it (ca_file via ${ENV}).
    monkeypatch.setenv("KG_TEST_PKI", str(private_ca["dir"]))
    path = tmp_path / "config.yaml"
    path.write_text("upstreams:\n  api:\n"
                    f"    url: https://localhost:{tls_upstream.port}\n"
                    "    timeout: 2\n"
                    "    ca_file: ${KG_TEST_PKI}/ca.pem\n")
    loaded = load_config(path).upstreams["api"]
    assert loaded == Upstream("api", f"https://localhost:{tls_upstream.port}", 2.0,
                              ca_file=str(private_ca["ca"]))
    config = make_config("http://unused", upstreams={"api": loaded})
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace()
        token, _ = await gw.key()
        async with gw.proxy.get("/people/7?x=1", headers={"X-Api-Key": token}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body == {"path": "/people/7?x=1", "tls": True, "workspace": "acme"}


async def test_without_ca_file_the_private_ca_is_not_trusted(
        tls_upstream, redis_url, monkeypatch) -> None:
    upstream = Upstream("api", f"https://localhost:{tls_upstream.port}", 2.0)
    config = make_config("http://unused", upstreams={"api": upstream})
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace()
        token, _ = await gw.key()
        async with gw.proxy.get("/people/7", headers={"X-Api-Key": token}) as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("trusted", [True, False])
async def test_the_upstream_client_uses_the_ca_file(
        aiohttp_raw_server, tls_upstream, private_ca, trusted) -> None:
    upstream = Upstream("api", f"https://127.0.0.1:{tls_upstream.port}", 2.0,
                        ca_file=str(private_ca["ca"]) if trusted else None)
    forwarder = Forwarder(Config(upstreams={"api": upstream}))
    await forwarder.start()
    principal = Principal("acme", "abc123def456", frozenset({"people:read"}), "pro")

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await forwarder.forward(request, upstream, principal, "rid-1", {})
        except GatewayError as exc:
            return exc.response("rid-1")
    front = await aiohttp_raw_server(handler)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(front.make_url("/people/1")) as resp:
                status, body = resp.status, await resp.json()
    finally:
        await forwarder.close()
    if trusted:
        assert (status, body["tls"], body["workspace"]) == (200, True, "acme")
    else:
        assert (status, body["error"]["code"]) == (502, "upstream_unavailable")


# --- a body that ends at the close ends, over TLS, only at close_notify ---------------------------

def _close_delimited_upstream(private_ca, ending: str) -> tuple[str, threading.Thread, socket.socket]:
    """An upstream on 127.0.0.1 (https, or http for ``ending="tcp"``) answering one request
    200 with neither Content-Length nor chunks: the body ends at the close (RFC 9112 6.3). It
    sends part of a body, then ends the connection: with TLS's ``close_notify``
    (``"close_notify"``), with a TCP FIN alone (``"fin"``: the upstream process died, or
    something on the path cut the connection), or over plain TCP with a FIN (``"tcp"``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(private_ca["cert"], private_ca["key"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(5)
        try:
            peer = conn if ending == "tcp" else context.wrap_socket(conn, server_side=True)
            got = b""
            while b"\r\n\r\n" not in got:
                got += peer.recv(65536)
            peer.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nrows 1-100 of 1000 ")
            time.sleep(0.3)  # the head and these rows are passed on before the end comes
            if ending == "close_notify":
                peer.unwrap()  # a clean TLS close: the body's end
            else:
                peer.shutdown(socket.SHUT_RDWR)  # TCP's FIN only
        except OSError:
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    scheme = "http" if ending == "tcp" else "https"
    return f"{scheme}://127.0.0.1:{listener.getsockname()[1]}", thread, listener


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("ending", ["close_notify", "fin", "tcp"])
def test_a_tls_upstreams_close_delimited_body_cut_without_close_notify_is_no_whole_answer(
        redis_url, monkeypatch, private_ca, caplog, ending, loop):
    """RFC 9112 9.8: "A response that has neither chunked transfer coding nor Content-Length
    is complete only if a valid close_notify alert has been received." An https upstream's
    body read to the close, cut by a TCP FIN without close_notify, was re-framed as a whole
    one: the client got the terminating chunk (``0\\r\\n\\r\\n``) and nothing (not the access
    log, which said 200, nor a warning) said it was cut. It is now a failure mid-response, as
    a reset is: the client connection aborted, no last chunk, the upstream's failure logged.
    With close_notify (or over plain TCP, where the FIN is the end) the body ends whole.
    Run on both loops: asyncio's TLS transport tells the protocol of a bare FIN as of a
    close_notify, uvloop's (what ``serve`` runs) not at all."""
    if loop == "uvloop":
        new_loop = pytest.importorskip("uvloop").new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    url, thread, listener = _close_delimited_upstream(private_ca, ending)
    config = make_config(url, routes=(Route("/public/**", "api", (), (), True),),
                         upstreams={"api": Upstream("api", url, 2.0,
                                                    ca_file=str(private_ca["ca"]))})

    async def main() -> bytes:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            reader, writer = await g.raw_connection()
            writer.write(b"GET /public/export HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            try:  # to the last chunk (the connection is kept after it) or to the abort
                async with asyncio.timeout(5):
                    while not got.endswith(b"\r\n0\r\n\r\n") and \
                            (chunk := await reader.read(65536)):
                        got += chunk
            except ConnectionError:
                pass
            writer.close()
            return got

    caplog.set_level(logging.WARNING, "keygate.proxy")
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            got = runner.run(main())
    finally:
        listener.close()
        thread.join(5)
    assert got.startswith(b"HTTP/1.1 200 ") and b"rows 1-100 of 1000 " in got, got
    whole = ending != "fin"
    assert got.endswith(b"\r\n0\r\n\r\n") == whole, got
    failed = [r.getMessage() for r in caplog.records if "failed mid-response" in r.getMessage()]
    assert failed == ([] if whole else ["upstream api failed mid-response: "
                                        "UpstreamProtocolError"]), failed
