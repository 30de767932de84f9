"""What a listener's ``host`` takes: keygate's real listeners (``start_listeners``) bound to a
wildcard address, reached over IPv4 and IPv6 loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from conftest import free_port
from gateway.app import running_gateway, start_listeners, stop_listeners
from gateway.config import ServerConfig

from harness import ADMIN_TOKEN, make_config


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


async def _healthz(address: str, port: int) -> bytes | None:
    """The status line of ``GET /healthz`` over ``address`` (None: the connection is refused)."""
    try:
        reader, writer = await asyncio.open_connection(address, port)
    except OSError:
        return None
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
        return (await asyncio.wait_for(reader.readline(), 5)).strip()
    finally:
        writer.close()


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 on this host")
@pytest.mark.parametrize("host, ipv4, ipv6", [("::", False, True), ("0.0.0.0", True, False)])
async def test_a_wildcard_host_listens_on_its_own_address_family_only(
        redis_url, monkeypatch, host, ipv4, ipv6):
    """``host: "::"`` takes IPv6 clients only (asyncio sets IPV6_V6ONLY, as nginx's
    ``listen [::]`` has ipv6only=on), ``0.0.0.0`` IPv4 ones only, on both listeners; there is
    no dual-stack spelling (docs/configuration.md says so). A change to it shows here."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    config = make_config("http://127.0.0.1:9", server=ServerConfig(
        host=host, port=free_port(), access_log="off"))
    config = dataclasses.replace(config, admin=dataclasses.replace(
        config.admin, host=host, port=free_port()))
    async with running_gateway(config, redis_url) as gw:
        runners = await start_listeners(gw)
        try:
            for port in (config.server.port, config.admin.port):
                seen = [await _healthz(a, port) for a in ("127.0.0.1", "::1")]
                assert [s is not None for s in seen] == [ipv4, ipv6], (port, seen)
                if port == config.admin.port:
                    assert b"HTTP/1.1 200 OK" in seen, seen
        finally:
            await stop_listeners(runners)
