"""Adversarial review (rlimits): per-key rate limits, monthly quotas, their headers, and the
reload path, through the whole gateway on a real Redis and real loopback upstreams."""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web

from gateway.config import load_config
from gateway.store.request import READ_KEY
from harness import (Clock, HeldReplies, bearer, eventually, gateway_under_test, make_config,
                     serving)


def _doc(upstream_url: str, **changes: Any) -> dict[str, Any]:
    doc = {
        "server": {"host": "127.0.0.1", "port": 18080},
        "admin": {"host": "127.0.0.1", "port": 18081},
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}},
        "plans": {"starter": {"monthly_requests": 1000, "max_keys": 5, "rate_limit": "100/s"}},
        "default_plan": "starter",
        "roles": {"reader": ["people:read"]},
        "upstreams": {"api": {"url": upstream_url, "timeout": 5}},
        "routes": [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]}],
    }
    doc.update(changes)
    return doc


@pytest.fixture
def clock() -> Clock:
    return Clock("2026-11-10T12:00:00")


@pytest.fixture
async def gut(redis_url, upstream, monkeypatch, clock):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        g.upstream = upstream
        yield g


async def _call(g, token: str) -> tuple[int, str | None, dict]:
    async with g.proxy.get("/people/1", headers=bearer(token)) as r:
        code = (await r.json())["error"]["code"] if r.status >= 400 else None
        return r.status, code, dict(r.headers)


async def test_a_rate_lowered_from_per_second_to_per_minute_forgets_the_minute_it_admitted(
        gut, clock):
    """A key's rate is lowered (PATCH: 'takes effect on the next request') while its log holds
    more than the new limit. For a lowering within one period (10/m → 2/m) the log's history
    counts against the new limit (tests/test_limits.py, lua/authorize.lua: 'a log can hold more
    than a lowered limit'). Lowered from 5/s to 8/m, a key that was just admitted 15 requests
    in 3 s is admitted 3 more at once: 18 in one minute under an 8/m limit. Every call of the
    5/s log trimmed it to the last second (and PEXPIREd it to 1 s), so the minute the new limit
    looks at was thrown away."""
    await gut.workspace("acme", plan="unlimited")
    token, key = await gut.key(rate_limit="5/s")
    for _ in range(3):  # 5 a second for 3 seconds: all admitted
        for _ in range(5):
            status, code, _ = await _call(gut, token)
            assert status == 200, code
        clock.now += 1
    status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                        {"rate_limit": "8/m"})
    assert status == 200, body
    clock.now -= 0.5  # 2.5 s after the first: 15 admitted in the last minute, 8 allowed
    admitted = []
    for _ in range(3):
        status, code, headers = await _call(gut, token)
        admitted.append(status)
    assert admitted == [429, 429, 429], (
        f"{15 + admitted.count(200)} requests admitted within one minute under an 8/m limit "
        f"(after the PATCH: {admitted})")
