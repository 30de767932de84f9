"""The suite's free_port(): a port handed out stays this test's until it ends. Released at
once, it was free for anyone for the seconds until the test's server bound it: on a busy
machine another xdist worker's upstream (bind(0)) or an outgoing connection took it, and
``keygate serve`` died with "address already in use"."""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import time

import pytest
import redis

from conftest import free_port, redis_server_binary


def test_a_port_handed_out_is_bound_by_no_one_else_until_the_test_ends():
    port = free_port()
    with socket.socket() as other:  # a program that does not share (no SO_REUSEADDR)
        with pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
    given: set[int] = set()
    for _ in range(2000):  # nor does the kernel offer it to anyone asking for a free port
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            given.add(s.getsockname()[1])
    assert port not in given
    with socket.socket() as caller:  # and nobody answers there yet
        assert caller.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


async def test_servers_listen_on_a_port_handed_out_and_callers_reach_them():
    port = free_port()

    async def hello(reader, writer):
        writer.write(b"hello")
        await writer.drain()
        writer.close()
    servers = [await asyncio.start_server(hello, "127.0.0.1", port, reuse_port=True)
               for _ in range(2)]  # as `keygate serve --workers 2` does
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b"hello"
    writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def test_a_redis_server_listens_on_a_port_handed_out(tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as r:
                    assert r.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server could not listen there"
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
