"""Wrong operator tokens on the admin listener are bounded per client IP, as wrong API keys are.

The admin listener compared the operator token and answered 401 as often as anyone asked: a
script could guess it without limit. Wrong operator tokens are now held to the failed-
verification throttle's limits (``keys.failures``: ``per_ip`` per ``window_seconds``), counted
in Redis (``kg:fail:operator:<ip>``) so that every worker shares one client's budget, apart
from wrong API keys (which must not lock out an operator who shares their address). Over it
the answer is 429 ``too_many_failures`` with ``Retry-After``, decided before the token is
compared: the right token is refused too (else the 429s would tell a guesser which guess was
right). The decision reads nothing from the store: with Redis down or stalled the operator
still gets in, and this process's own count still bounds guesses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import redis
from multidict import CIMultiDict

from gateway.config import FailureLimits, ServerConfig, StoreConfig

from harness import ADMIN_TOKEN, bearer, gateway_under_test, make_config

WORKSPACES = "/admin/v1/workspaces"


async def call(g, token: str, path: str = WORKSPACES, **headers: str
               ) -> tuple[int, str | None, CIMultiDict]:
    """(status, error code or None, headers) of a GET on the admin listener with ``token``."""
    async with g.admin.get(path, headers={**headers, "Authorization": f"Bearer {token}"}) as r:
        body = await r.json()
        code = body["error"]["code"] if "error" in body else None
        return r.status, code, r.headers.copy()


async def without_token(g, path: str = WORKSPACES) -> tuple[int, str]:
    """A GET with no Authorization (the harness session sends the operator token by default)."""
    from aiohttp import ClientSession
    async with ClientSession() as s:
        async with s.get(str(g.admin_server.make_url(path))) as r:
            return r.status, (await r.json())["error"]["code"]


def stored_failures(redis_url: str, ip: str = "127.0.0.1", kind: str = "operator") -> int:
    """The shared count of wrong operator tokens (``kind="ip"``: of wrong API keys)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(f"kg:fail:{kind}:{ip}") or 0)
    finally:
        client.close()


def with_failures(config, per_ip: int = 20, window: int = 60, **store):
    keys = dataclasses.replace(config.keys, failures=FailureLimits(per_ip, None, window))
    config = dataclasses.replace(config, keys=keys)
    if store:
        config = dataclasses.replace(config, store=StoreConfig(**store))
    return config


async def test_wrong_operator_tokens_past_the_limit_are_429_too_many_failures(gut, redis_url):
    for i in range(20):  # per_ip is 20 in the test config
        assert (await call(gut, f"wrong-operator-token-{i}"))[:2] == (401, "unauthorized")
    status, code, headers = await call(gut, "wrong-operator-token-20")
    assert (status, code) == (429, "too_many_failures")
    assert 1 <= int(headers["Retry-After"]) <= 60, headers
    assert headers["X-Request-Id"] and headers["Cache-Control"] == "no-store"
    assert stored_failures(redis_url) == 20  # a refusal counts nothing


async def test_over_the_limit_the_right_operator_token_is_refused_too(gut):
    """Decided before the comparison: were the right token let through, a guesser over the
    limit would still learn which guess was right (200 among 429s), and the bound would bound
    nothing."""
    for i in range(20):
        await call(gut, f"wrong-operator-token-{i}")
    status, code, headers = await call(gut, ADMIN_TOKEN)
    assert (status, code) == (429, "too_many_failures"), (status, code)
    assert int(headers["Retry-After"]) >= 1


async def test_requests_without_a_token_count_nothing(gut, redis_url):
    for _ in range(30):
        assert await without_token(gut) == (401, "unauthorized")
    assert stored_failures(redis_url) == 0
    assert (await call(gut, ADMIN_TOKEN))[0] == 200


async def test_wrong_api_keys_from_the_operators_address_do_not_lock_the_operator_out(
        gut, redis_url):
    """An integration with a stale key (or every key after a Redis restarted empty) on the
    operator's host spends its address's budget of failed verifications: that address's API
    calls are refused, its operator's are not, and the operator's wrong tokens have a budget
    of their own, which does not spend the keys'."""
    await gut.workspace("acme")
    token, _ = await gut.key("acme")
    for i in range(20):
        async with gut.proxy.get("/people", headers=bearer(unknown_key(i))) as r:
            assert r.status == 401
    async with gut.proxy.get("/people", headers=bearer(unknown_key(20))) as r:
        assert r.status == 429 and (await r.json())["error"]["code"] == "too_many_failures"
    assert (await call(gut, ADMIN_TOKEN))[0] == 200
    for i in range(20):
        assert (await call(gut, f"wrong-operator-token-{i}"))[:2] == (401, "unauthorized")
    assert (await call(gut, ADMIN_TOKEN))[:2] == (429, "too_many_failures")
    assert stored_failures(redis_url, kind="ip") == 20 and stored_failures(redis_url) == 20


def unknown_key(i: int) -> str:
    """A well-formed token of a key id nobody has (the per-key limit, 10 in the test config,
    stays out of it: each is another id)."""
    from gateway.tokens import checksum
    head = f"kg_live_{i:012d}" + "Z" * 32
    return head + checksum(head)


async def test_a_hundred_concurrent_wrong_guesses_are_compared_no_more_than_the_limit(
        gut, redis_url):
    """100 wrong tokens at once, all read the counter before any failure is written: the
    process also counts the failures it is still writing, so exactly 20 are compared (401)
    and the other 80 refused (429)."""
    answers = await asyncio.gather(*(call(gut, f"concurrent-wrong-{i}") for i in range(100)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses.count(401) == 20 and statuses.count(429) == 80, statuses
    assert stored_failures(redis_url) == 20


async def test_the_right_token_works_again_once_the_window_passed(redis_url, upstream,
                                                                   monkeypatch):
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=3, window=2)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        for i in range(3):
            assert (await call(g, f"wrong-{i}"))[0] == 401
        status, _, headers = await call(g, ADMIN_TOKEN)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 2, (status, headers)
        await asyncio.sleep(int(headers["Retry-After"]) + 0.3)
        assert (await call(g, ADMIN_TOKEN))[0] == 200
        assert (await call(g, "wrong-again"))[0] == 401  # a new window, a new budget


async def test_with_the_store_down_the_operator_gets_in_and_guesses_stay_bounded(
        own_redis, upstream, monkeypatch):
    """The throttle's counter is in the store; with the store down the operator token must
    still reach the admin API (the handler then answers 503 itself), and guesses are still
    bounded, by the count this process keeps."""
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=5,
                           timeout=0.5)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        own_redis.stop()
        status, code, _ = await call(g, ADMIN_TOKEN)
        assert (status, code) == (503, "store_unavailable"), (status, code)
        for i in range(5):
            assert (await call(g, f"wrong-{i}"))[:2] == (401, "unauthorized")
        status, code, headers = await call(g, "wrong-5")
        assert (status, code) == (429, "too_many_failures")
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert (await call(g, ADMIN_TOKEN))[:2] == (429, "too_many_failures")


async def test_more_clients_than_it_keeps_do_not_reset_each_others_counts(
        own_redis, upstream, monkeypatch):
    """With the store down each process's own count is the only bound, and it keeps at most
    CLIENTS_KEPT clients: past that it forgot the oldest, window or not, so a guesser cycling
    through one address more than it keeps started each at 0 again (a /48 of IPv6 is 65,536
    /64s). Clients past the ones still in their window now share one count. Real sockets
    from five loopback addresses, with room for four."""
    import aiohttp

    import gateway.admin.throttle as throttle
    monkeypatch.setattr(throttle, "CLIENTS_KEPT", 4)
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=2, timeout=0.5)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        own_redis.stop()
        url = str(g.admin_server.make_url(WORKSPACES))
        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(f"127.0.0.{n}", 0))) for n in range(2, 7)]
        compared = 0
        try:
            for round_ in range(6):
                for n, s in enumerate(sessions):
                    async with s.get(url, headers=bearer(f"wrong-{round_}-{n}")) as r:
                        assert r.status in (401, 429), r.status
                        compared += r.status == 401
        finally:
            for s in sessions:
                await s.close()
    assert compared <= 2 * 4 + 2, compared   # four kept clients, and the one count past them


async def test_an_x_forwarded_for_from_a_trusted_peer_does_not_escape_the_limit(
        redis_url, upstream, monkeypatch):
    """The admin throttle counted the client ``server.trusted_proxies`` reads, so a peer it
    trusts (127.0.0.1 for an nginx on the host, the default admin bind's own address) got a
    fresh budget per forged ``X-Forwarded-For``: anyone on the host connecting straight to the
    admin listener guessed without limit. The connection's peer is what is counted; the
    forwarded client is still what the log names."""
    config = make_config(str(upstream.make_url("")), server=ServerConfig(
        host="127.0.0.1", trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        for i in range(20):
            assert (await call(g, f"wrong-{i}", **{"X-Forwarded-For": f"203.0.113.{i}"}))[0] \
                == 401
        assert (await call(g, "wrong-20", **{"X-Forwarded-For": "203.0.113.99"}))[0] == 429
        assert (await call(g, ADMIN_TOKEN, **{"X-Forwarded-For": "203.0.113.98"}))[0] == 429
        assert stored_failures(redis_url, "127.0.0.1") == 20
        assert stored_failures(redis_url, "203.0.113.0") == 0


async def test_a_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit(gut):
    for i in range(20):
        assert (await call(gut, f"wrong-{i}", **{"X-Forwarded-For": f"198.51.100.{i}"}))[0] \
            == 401
    assert (await call(gut, "wrong-20", **{"X-Forwarded-For": "198.51.100.99"}))[0] == 429


async def test_a_client_over_the_limit_is_logged_once_per_window_and_no_guess_is(gut, caplog):
    caplog.set_level(logging.INFO, logger="keygate")
    guesses = [f"wrong-operator-token-{i}" for i in range(25)]
    for guess in guesses:
        await call(gut, guess)
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert not [g for g in guesses if g in text]
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "failed" in r.getMessage()
              and "127.0.0.1" in r.getMessage()]
    assert len(warned) == 1, warned
    refused = [r for r in caplog.records if r.name == "keygate.admin"
               and getattr(r, "status", None) == 429]
    assert len(refused) == 5  # every refused call has its access line too


async def test_an_operator_token_shaped_like_an_api_key_is_bounded_too(redis_url, upstream,
                                                                       monkeypatch):
    """A token shaped like an API key is checked as one (after the operator comparison, when
    the operator token has that shape itself): the key path counts only the guesses whose
    secret it verified, so a malformed one, the usual guess at such an operator token, is
    counted here."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from gateway.app import running_gateway
    operator = "ops_admin_" + "A1b2C3d4E5" * 5
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", operator)
    async with running_gateway(make_config(str(upstream.make_url(""))), redis_url) as gw:
        server = TestServer(gw.admin_app, host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession(str(server.make_url(""))) as s:
                async with s.get(WORKSPACES, headers=bearer(operator)) as r:
                    assert r.status == 200
                statuses = []
                for i in range(21):
                    async with s.get(WORKSPACES, headers=bearer(f"ops_admin_{i:050d}")) as r:
                        statuses.append(r.status)
                async with s.get(WORKSPACES, headers=bearer(operator)) as r:
                    last = r.status
        finally:
            await server.close()
    assert statuses == [401] * 20 + [429] and last == 429, (statuses, last)


async def test_an_operator_token_that_is_a_well_formed_key_is_bounded_too(redis_url, upstream,
                                                                         monkeypatch):
    """An operator token that is itself a well-formed key of the gateway's prefix: a guess of
    the same form went to the key path after the comparison, which answered invalid_key and
    counted it in the key path's own counter only; its throttle then answered 429 while the
    operator comparison still ran first, and the right token got 200 among the 429s. Every
    guess the key path refuses is now counted here as well."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from gateway.app import running_gateway
    from gateway.tokens import checksum

    def well_formed(i: int) -> str:
        head = f"kg_live_{i:012d}{'S' * 32}"
        return head + checksum(head)
    operator = well_formed(999_999)
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", operator)
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=3)
    async with running_gateway(config, redis_url) as gw:
        server = TestServer(gw.admin_app, host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession(str(server.make_url(""))) as s:
                statuses = []
                for i in range(3):
                    async with s.get(WORKSPACES, headers=bearer(well_formed(i))) as r:
                        statuses.append(r.status)
                async with s.get(WORKSPACES, headers=bearer(operator)) as r:
                    last = r.status
        finally:
            await server.close()
    assert statuses == [401] * 3 and last == 429, (statuses, last)


async def test_a_reload_that_shortens_the_window_shortens_a_refusal_under_way(
        own_redis, upstream, monkeypatch):
    """``keys.failures`` is reloadable. With the store down this process's own count decides,
    and its window was kept as long as it began: after a reload to 1 s the refusal still
    lasted the old 60 s while Retry-After said 1."""
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=2, timeout=0.5)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        own_redis.stop()
        for i in range(2):
            assert (await call(g, f"wrong-{i}"))[0] == 401
        status, _, headers = await call(g, ADMIN_TOKEN)
        assert status == 429 and int(headers["Retry-After"]) > 50, headers
        g.gw.pipeline.auth.reconfigure(with_failures(config, per_ip=2, window=1, timeout=0.5))
        status, _, headers = await call(g, ADMIN_TOKEN)
        assert status == 429 and headers["Retry-After"] == "1", headers
        await asyncio.sleep(1.2)
        assert (await call(g, ADMIN_TOKEN))[:2] == (503, "store_unavailable")


async def test_the_right_token_is_not_held_by_a_store_that_does_not_answer(
        tmp_path, upstream, redis_url, monkeypatch):
    """The throttle reads nothing from the store to let a token be compared: with Redis's
    replies held back (a stalled store), a reload, which needs no store, is answered at once,
    not after ``store.timeout`` (2 s here): the operator can still fix the config. A wrong
    token meanwhile is still answered 401 once its write gives up."""
    import yaml

    from gateway.config import load_config

    from harness import HeldReplies
    path = tmp_path / "keygate.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1"}, "store": {"timeout": 2},
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}},
        "plans": {"starter": {"monthly_requests": 1000}}, "default_plan": "starter",
        "upstreams": {"api": {"url": str(upstream.make_url(""))}},
        "routes": [{"path": "/people/**", "upstream": "api", "scopes": ["people:read"]}]}))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(load_config(path), relay.url, monkeypatch,
                               config_path=str(path)) as g:
        assert (await call(g, "wrong-before"))[0] == 401  # a failure known: not a fresh client
        relay.hold()
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with g.admin.post("/admin/v1/reload") as r:
            assert r.status == 200, await r.text()
        assert loop.time() - began < 1.0
        assert (await call(g, "wrong-while-held"))[:2] == (401, "unauthorized")
        relay.release()


async def test_refusals_while_the_store_stalls_read_its_reset_once(redis_url, upstream,
                                                                     monkeypatch):
    """A refusal reads once when the shared counter resets (for Retry-After). A read the store
    did not answer was tried again by every later refusal, so with Redis stalled each of a
    throttled guesser's requests held a store call for store.timeout. Now one read a window:
    when it fails, the bound from the last write's answer stands."""
    from harness import HeldReplies
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=3, timeout=0.5)
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        for i in range(3):
            assert (await call(g, f"wrong-{i}"))[0] == 401
        relay.hold()
        loop = asyncio.get_running_loop()
        began = loop.time()
        answers = [await call(g, f"wrong-again-{i}") for i in range(5)]
        took = loop.time() - began
        relay.release()
    assert [a[:2] for a in answers] == [(429, "too_many_failures")] * 5
    assert all(1 <= int(a[2]["Retry-After"]) <= 60 for a in answers)
    assert took < 1.5, took   # one read of 0.5 s, not five


async def test_failures_other_workers_counted_leave_this_one_one_more_comparison(
        gut, redis_url):
    """The design's allowance: a process learns the shared count from its own writes, so
    when other workers used the budget up (here written into the counter as they would), its
    first wrong token is still compared (401) and its write answers the count: from then on,
    the right token too, 429, for as long as the counter's window has left."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("kg:fail:operator:127.0.0.1", 20, ex=30)
    finally:
        client.close()
    assert (await call(gut, "wrong-operator-token"))[:2] == (401, "unauthorized")
    status, code, headers = await call(gut, ADMIN_TOKEN)
    assert (status, code) == (429, "too_many_failures")
    assert 25 <= int(headers["Retry-After"]) <= 30, headers  # the counter's, not a new 60 s
    assert stored_failures(redis_url) == 21


async def test_a_burst_of_refusals_reads_the_counters_reset_once(own_redis, upstream,
                                                                  monkeypatch):
    """Over the limit, a refusal reads when the shared counter resets (its Retry-After). The
    read was not shared: fifty wrong tokens at once from a client over the limit each sent it
    to Redis, until one had answered. Concurrent refusals of one client now wait on one read.
    Counted on the wire: every call that names the client's counter, as Redis's MONITOR
    reports it."""
    config = with_failures(make_config(str(upstream.make_url(""))), per_ip=3)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        for i in range(3):
            assert (await call(g, f"wrong-{i}"))[0] == 401
        reader, writer = await asyncio.open_connection("127.0.0.1", own_redis.port)
        try:
            writer.write(b"MONITOR\r\n")
            assert await reader.readline() == b"+OK\r\n"
            answers = await asyncio.gather(*(call(g, f"burst-{i}") for i in range(50)))
            # a marker after the burst: every command it sent is reported before this one
            marker = redis.Redis.from_url(own_redis.url)
            try:
                marker.get("kg:test:burst-done")
            finally:
                marker.close()
            lines = []
            while b"kg:test:burst-done" not in (line := await asyncio.wait_for(
                    reader.readline(), 10)):
                lines.append(line)
        finally:
            writer.close()
    assert [a[:2] for a in answers] == [(429, "too_many_failures")] * 50
    assert all(1 <= int(a[2]["Retry-After"]) <= 60 for a in answers)
    # the script's calls (its own commands are reported too, from "lua"; and the first
    # EVALSHA of a script Redis does not hold yet is sent again as EVAL: one read, still)
    reads = [line for line in lines if b"kg:fail:operator:127.0.0.1" in line
             and b'"EVALSHA"' in line]
    assert len(reads) == 1, reads
