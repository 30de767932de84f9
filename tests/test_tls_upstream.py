"""HTTPS upstreams signed by a private CA: ``upstreams.NAME.ca_file``, end to end.

The upstream is a real aiohttp HTTPS server on loopback whose certificate (SAN DNS:localhost,
IP:127.0.0.1) is signed by a throwaway CA made with the openssl CLI (skipped without it).
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.config import Config, Upstream, load_config
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
