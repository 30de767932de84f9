"""gateway.verify_queue: bounds, fairness across addresses, cancellation (pure asyncio)."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from gateway.config import StoreConfig
from gateway.errors import ServiceUnavailable
from gateway.verify_queue import VerifyQueue


async def _hold(queue: VerifyQueue, ip: str, order: list[str], release: asyncio.Event) -> None:
    async with queue.turn(ip):
        order.append(ip)
        await release.wait()


async def test_turns_are_bounded_and_the_rest_wait():
    queue, order, release = VerifyQueue(2, 10, 100), [], asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, "a", order, release)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert order == ["a", "a"] and queue.busy == 2 and queue.queued == 5
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a"] * 5 and queue.busy == 0 and queue.queued == 0


async def test_turns_follow_a_resize_more_at_once_fewer_as_turns_end():
    """The argon2 pool resized to a new CPU limit (a reload) resizes the turns: more are
    handed to those waiting at once, and fewer hold new ones back until enough have ended."""
    queue, order = VerifyQueue(1, 10, 100), []
    releases = [asyncio.Event() for _ in range(6)]

    async def hold(n: int) -> None:
        async with queue.turn("a"):
            order.append(n)
            await releases[n].wait()
    tasks = [asyncio.ensure_future(hold(n)) for n in range(6)]
    await asyncio.sleep(0.01)
    assert order == [0]
    queue.resize(3)
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2] and queue.busy == 3
    queue.resize(1)
    for n in (0, 1):
        releases[n].set()
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and queue.busy == 2 - n, (order, queue.busy)
    releases[2].set()
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2, 3] and queue.busy == 1
    for n in (3, 4, 5):
        releases[n].set()
    await asyncio.gather(*tasks)
    assert order == list(range(6)) and queue.busy == 0 and queue.queued == 0

async def test_a_full_queue_for_one_address_refuses_it_but_not_others():
    queue, order, release = VerifyQueue(1, 3, 100), [], asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, "a", order, release)) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable) as refused:
        async with queue.turn("a"):
            pass
    assert refused.value.code == "overloaded" and refused.value.headers == {"Retry-After": "1"}
    other = asyncio.ensure_future(_hold(queue, "b", order, release))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*tasks, other)
    assert sorted(order) == ["a", "a", "a", "b"]


async def test_the_total_bound_refuses_every_address():
    queue, release = VerifyQueue(1, 10, 4), asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, ip, [], release)) for ip in "abcd"]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable):
        async with queue.turn("e"):
            pass
    release.set()
    await asyncio.gather(*tasks)


async def test_turns_go_round_robin_across_addresses():
    """One address with a long queue does not make another wait behind all of it."""
    queue, order = VerifyQueue(1, 100, 1000), []

    async def quick(ip: str) -> None:
        async with queue.turn(ip):
            order.append(ip)
            await asyncio.sleep(0)
    tasks = [asyncio.ensure_future(quick("flood")) for _ in range(20)]
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(quick("other")))
    await asyncio.gather(*tasks)
    assert order.index("other") < 5, order  # FIFO would make it the 21st


async def test_a_cancelled_waiter_leaves_nothing_behind():
    queue, order, release = VerifyQueue(1, 10, 100), [], asyncio.Event()
    first = asyncio.ensure_future(_hold(queue, "a", order, release))
    waiting = asyncio.ensure_future(_hold(queue, "b", order, release))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert queue.queued == 1 and not queue._waiters and not queue._ring
    release.set()
    await first
    assert queue.busy == 0 and queue.queued == 0 and order == ["a"]


@pytest.mark.parametrize("hand_over", ["resize", "release"])
async def test_a_waiter_cancelled_as_turns_are_handed_out_ends_cancelled(hand_over):
    """A waiter whose task is cancelled (its future cancelled, the task not run yet) in the
    same turn of the loop as a hand-over: ``resize`` (the argon2 pool grown by a new CPU
    limit, at a reload or as a burst starts) or a turn ending (``_release``) pops the
    cancelled future and passes over it. The task then ran its cancel branch,
    ``waiters.remove(fut)`` of a future no longer there: ``ValueError`` instead of the
    ``CancelledError`` (a timeout around the verification answered 500, not as the timeout it
    was). The turn goes to the next waiter, and none is lost."""
    queue, order, release = VerifyQueue(1, 10, 100), [], asyncio.Event()
    holder = asyncio.ensure_future(_hold(queue, "a", order, release))
    waiter = asyncio.ensure_future(_hold(queue, "a", order, asyncio.Event()))
    behind = asyncio.ensure_future(_hold(queue, "a", order, release))
    await asyncio.sleep(0.01)
    assert queue.busy == 1 and queue.queued == 3
    if hand_over == "release":
        release.set()    # the holder's turn ends first: it is handed on as the cancel lands
    waiter.cancel()      # cancelled: its future is, its task has not run yet
    if hand_over == "resize":
        queue.resize(2)  # in the same turn of the loop (a reload's swap)
    try:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    finally:
        release.set()
        await asyncio.gather(holder, behind)
    assert order == ["a", "a"]  # the holder, then the one behind the cancelled waiter
    assert queue.busy == 0 and queue.queued == 0 and not queue._waiters and not queue._ring


def test_a_reload_moves_the_queue_bounds_and_the_per_key_limit():
    import dataclasses
    from gateway.auth import Authenticator
    from gateway.config import Config, FailureLimits, KeysConfig, VerifyQueueLimits
    auth = Authenticator(Config(), store=None, requests=None)
    try:
        assert (auth.queue.per_ip, auth.queue.total, auth._per_key_limit) == (256, 4096, None)
        keys = KeysConfig(failures=FailureLimits(per_key=7),
                          verify_queue=VerifyQueueLimits(per_ip=8, total=9))
        auth.reconfigure(dataclasses.replace(Config(), keys=keys))
        assert (auth.queue.per_ip, auth.queue.total, auth._per_key_limit) == (8, 9, 7)
    finally:
        auth.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_argon2_pool_has_a_thread_per_cpu_the_process_may_use_not_per_machine_cpu():
    """A gateway pinned to one CPU (taskset, a cpuset container) gets one argon2 thread: every
    extra thread would take its own share of the event loop's only CPU during a cold burst."""
    import subprocess
    import sys

    one = sorted(os.sched_getaffinity(0))[:1]
    probe = "from gateway.argon2_pool import argon2_threads; print(argon2_threads())"
    pinned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, one), check=True)
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert pinned.stdout.strip() == "1"
    assert free.stdout.strip() == str(max(1, min(4, len(os.sched_getaffinity(0)))))


# --- against a whole gateway (real Redis, real sockets) ----------------------------------------

async def _cold_tokens(config, redis_url: str, monkeypatch, n: int) -> list[str]:
    """``n`` keys' tokens, made by a gateway that is then stopped: a new one has them cold."""
    from harness import gateway_under_test
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        return [(await g.key(name=f"k{i}"))[0] for i in range(n)]


async def _send(g, token: str):
    """A raw connection with one request sent on it, its answer not read."""
    reader, writer = await g.raw_connection()
    writer.write(f"GET /people/1 HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {token}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_a_client_that_leaves_while_its_first_request_is_queued_frees_its_place(
        upstream, own_redis, monkeypatch):
    """First requests wait for a verification turn, bounded per client address
    (``keys.verify_queue.per_ip``). A client that closed its connection while waiting kept
    its place until its verification had run (for nobody): an address whose clients gave up
    and retried (a timeout, a browser navigating away) was answered 503 ``overloaded`` for
    places nobody held, and argon2 ran for every request gone. Leaving frees the place."""
    import signal

    from harness import bearer, gateway_under_test, make_config
    # the turns wait on the paused Redis: no store timeout must end them meanwhile
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=60.0))
    tokens = await _cold_tokens(config, own_redis.url, monkeypatch, 12)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        auth = g.gw.pipeline.auth
        per_ip = auth.queue.slots + 3  # some hold turns, three wait for one
        auth.queue.per_ip = per_ip
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # the turns' store reads hang meanwhile
        try:
            gone = [await _send(g, t) for t in tokens[:per_ip]]
            await asyncio.sleep(0.2)
            assert auth.queue.queued == per_ip and auth.queue.busy == auth.queue.slots
            for _, writer in gone:
                writer.close()
            await asyncio.sleep(0.2)
            # the three that only waited left the queue; those holding a turn keep it
            assert auth.queue.queued == auth.queue.slots, auth.queue.queued
            reader, writer = await _send(g, tokens[per_ip])
            await asyncio.sleep(0.1)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        # argon2 ran for the turns held and the request still there, never for those gone
        await asyncio.sleep(0.3)
        ran = g.counter("keygate_argon2_verifications_total", result="ok")
        assert ran == auth.queue.slots + 1, ran
        async with g.proxy.get("/people/1", headers=bearer(tokens[-1])) as r:
            assert r.status == 200


async def test_a_verification_others_still_wait_on_goes_on_when_one_client_leaves(
        upstream, own_redis, monkeypatch):
    """Requests with the same first token share one verification: one client leaving ends
    only its own request; the verification stays queued for the others (200), and a
    verification nobody waits on that is then asked for again is started anew."""
    import signal

    from harness import gateway_under_test, make_config
    # the turns wait on the paused Redis: no store timeout must end them meanwhile
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=60.0))
    tokens = await _cold_tokens(config, own_redis.url, monkeypatch, 8)
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        auth = g.gw.pipeline.auth
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            holders = [await _send(g, t) for t in tokens[:auth.queue.slots]]  # every turn
            shared = tokens[-1]
            leaving, staying = await _send(g, shared), await _send(g, shared)
            alone = await _send(g, tokens[-2])
            await asyncio.sleep(0.2)
            assert auth.queue.queued == auth.queue.slots + 2
            leaving[1].close()
            alone[1].close()
            await asyncio.sleep(0.2)
            assert auth.queue.queued == auth.queue.slots + 1  # the shared one stays
            again = await _send(g, tokens[-2])  # asked again after its only client left
            await asyncio.sleep(0.1)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        for reader, writer in (*holders, staying, again):
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


async def test_the_queue_bounds_hold_exactly_per_client_address_and_in_total(
        upstream, own_redis, monkeypatch):
    """End to end, behind a trusted proxy (the client address from X-Forwarded-For): with
    every verification held (Redis paused), the shipped ``per_ip`` (256) admits exactly 256
    first requests of one address and refuses the rest 503 ``overloaded`` with
    ``Retry-After: 1``; ``total`` (600 here) refuses every address past it; every admitted
    request is decided once Redis answers (401 for these unknown keys, never 503)."""
    import dataclasses
    import signal
    from collections import Counter

    from aiohttp import ClientSession, TCPConnector

    from gateway.config import FailureLimits, VerifyQueueLimits
    from gateway.tokens import make_token
    from harness import gateway_under_test, make_config
    # the turns wait on the paused Redis: no store timeout must end them meanwhile
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=60.0))
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, trusted_proxies=("127.0.0.1/32",)),
        keys=dataclasses.replace(config.keys, failures=FailureLimits(10_000, None, 60),
                                 verify_queue=VerifyQueueLimits(total=600)))
    assert config.keys.verify_queue.per_ip == 256
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        queue = g.gw.pipeline.auth.queue
        session = ClientSession(str(g.proxy_server.make_url("")),
                                connector=TCPConnector(limit=0))
        answers: list[tuple[str, int, str | None, str]] = []

        async def first(ip: str) -> None:
            headers = {"Authorization": f"Bearer {make_token('kg', 'live')[0]}",
                       "X-Forwarded-For": ip}
            async with session.get("/people/1", headers=headers) as r:
                code = (await r.json())["error"]["code"]
                answers.append((ip, r.status, r.headers.get("Retry-After"), code))

        async def arrived(n: int) -> None:  # every request sent is in the queue or refused
            for _ in range(1200):
                if queue.queued + len(answers) >= n:
                    return
                await asyncio.sleep(0.05)

        tasks: list[asyncio.Future] = []
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:  # two addresses first, past their own bound; then others, past the total
            tasks += [asyncio.ensure_future(first(ip))
                      for ip in ["10.0.0.1"] * 300 + ["10.0.0.2"] * 300]
            await arrived(600)
            assert queue.queued == 512, queue.queued
            tasks += [asyncio.ensure_future(first(f"10.0.1.{i}")) for i in range(150)]
            await arrived(750)
            assert queue.queued == 600, (queue.queued, len(answers))
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
            finally:
                await session.close()
    seen = Counter((ip if ip in ("10.0.0.1", "10.0.0.2") else "others", status, retry, code)
                   for ip, status, retry, code in answers)
    assert seen == Counter({("10.0.0.1", 401, None, "invalid_key"): 256,
                            ("10.0.0.1", 503, "1", "overloaded"): 44,
                            ("10.0.0.2", 401, None, "invalid_key"): 256,
                            ("10.0.0.2", 503, "1", "overloaded"): 44,
                            ("others", 401, None, "invalid_key"): 88,
                            ("others", 503, "1", "overloaded"): 62}), seen


async def test_an_admin_call_sharing_a_queued_verification_is_answered_when_the_proxy_client_leaves(
        upstream, own_redis, monkeypatch):
    """A ``keys:admin`` key's first use on the admin listener and on the proxy listener at
    once share one verification. The admin listener's wait for it was not counted as a
    waiter: the proxy client leaving while the verification was queued cancelled it under
    the admin call, whose connection was then dropped without an answer (no log line
    either). Every request waiting on a verification keeps it."""
    import signal

    from harness import gateway_under_test, make_config
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=60.0))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        holding = [(await g.key(name=f"k{i}"))[0] for i in range(8)]
        admin_token, _ = await g.key(name="admin", role="admin")
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        auth = g.gw.pipeline.auth
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            holders = [await _send(g, t) for t in holding[:auth.queue.slots]]  # every turn
            leaving = await _send(g, admin_token)  # its verification waits for a turn
            await asyncio.sleep(0.2)
            assert auth.queue.queued == auth.queue.slots + 1
            reader, writer = await asyncio.open_connection("127.0.0.1", g.admin_server.port)
            writer.write(f"GET /admin/v1/workspaces/acme HTTP/1.1\r\nHost: g\r\n"
                         f"Authorization: Bearer {admin_token}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            await asyncio.sleep(0.2)
            leaving[1].close()  # the proxy client goes; the admin call still waits
            await asyncio.sleep(0.2)
            assert auth.queue.queued == auth.queue.slots + 1, auth.queue.queued
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        for r, w in holders:
            assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 200")
            w.close()


async def test_a_key_verified_here_is_not_refused_overloaded_once_its_cache_ttl_ran_out(
        redis_url, upstream, monkeypatch):
    """docs/errors.md: 503 ``overloaded`` is a full verification queue, and "a key already
    verified is never refused this way"; docs/operations.md and security.md call a token that
    verified in this process and only outlived ``keys.cache_ttl`` already verified (it skips
    the failure throttle and is let through fail-open). SPEC: cached keys keep working during
    a cold burst. But its re-verification takes a place in the same bounded queue as strangers'
    guesses (``Authenticator._verify``: ``self.queue.turn`` before ``verified_before`` is
    looked at): while a flood of first requests or wrong guesses from other addresses fills
    ``verify_queue.total``, every working integration is refused 503 ``overloaded`` once per
    ``cache_ttl``. Here the queue (total 1) is held by one slow guess from another address."""
    from aiohttp import ClientSession, TCPConnector

    from gateway.config import Argon2Config, VerifyQueueLimits
    from gateway.tokens import make_token
    from harness import bearer, eventually, gateway_under_test, get_all, make_config
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, cache_ttl=0.5, verify_queue=VerifyQueueLimits(per_ip=1, total=1)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()  # its hash: the cheap test parameters
        assert (await get_all(g, token, 1))[0][0] == 200  # verified in this process
        auth = g.gw.pipeline.auth
        # new keys (and the decoy an unknown key id is verified against) at a slower cost:
        # one guess then holds its place in the queue for a while
        auth.reconfigure(dataclasses.replace(config, keys=dataclasses.replace(
            config.keys, argon2=Argon2Config(200, 8192, 1))))
        await asyncio.sleep(0.6)  # the key's cache_ttl runs out
        guess, _ = make_token("kg", "live")
        async with ClientSession(str(g.proxy_server.make_url("")), connector=TCPConnector(
                local_addr=("127.0.0.2", 0))) as stranger:
            pending = asyncio.ensure_future(stranger.get("/people/1", headers=bearer(guess)))
            try:
                assert await eventually(lambda: auth.queue.queued == 1), "no guess queued"
                async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                    got = r.status, await r.text()
            finally:
                (await pending).release()
        assert got[0] == 200, got  # was 503 overloaded

async def test_an_unbounded_turn_is_never_refused_nor_counted_but_waits_its_turn():
    """``turn(ip, bounded=False)`` (a token verified in this process whose ``cache_ttl`` ran
    out): past the per-address and total bounds it is not refused, and it takes no place
    within them; it still waits, round-robin, for one of the turns."""
    queue, order, release = VerifyQueue(1, 1, 1), [], asyncio.Event()
    held = asyncio.ensure_future(_hold(queue, "a", order, release))
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable):
        async with queue.turn("b"):
            pass

    async def verified_again(ip: str) -> None:
        async with queue.turn(ip, bounded=False):
            order.append("again " + ip)

    again = [asyncio.ensure_future(verified_again(ip)) for ip in ("a", "b")]
    await asyncio.sleep(0.01)
    assert order == ["a"] and queue.queued == 1 and queue.busy == 1  # waiting, not refused
    release.set()
    await asyncio.gather(held, *again)
    assert order == ["a", "again a", "again b"] and queue.busy == 0 and queue.queued == 0


async def test_fail_open_during_a_hung_store_does_not_serialise_verified_keys(
        redis_url, upstream, monkeypatch):
    """docs/operations.md (When Redis is down): with ``on_store_error: open``, keys already
    verified in this process keep working, "also once their keys.cache_ttl has run out". When
    Redis hangs (paused, stalled: the usual outage, not a refused connection), each such
    re-verification holds one of the verification queue's few turns (argon2 threads + 1)
    while its key read waits out ``store.timeout`` (``Authenticator._verify``: the turn is
    taken before anything else, a verified token's included), so they are let through
    ``slots`` at a time, one ``store.timeout`` after another: N keys whose TTL ran out wait
    up to N / slots timeouts, and past ``verify_queue.per_ip`` / ``total`` get 503
    ``overloaded``. With the shipped 2 s timeout and 300 s TTL a replica serving ~1000 keys
    falls behind within minutes of a hang. Each should wait one store timeout, not a queue."""
    import time

    import redis as sync_redis

    from gateway.config import StoreConfig
    from harness import (bearer, eventually, gateway_under_test, get_all, make_config,
                         redis_answers)
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    config = dataclasses.replace(config, keys=dataclasses.replace(config.keys, cache_ttl=0.5))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        tokens = [(await g.key(name=f"k{i}"))[0] for i in range(24)]
        for token in tokens:
            assert (await get_all(g, token, 1))[0][0] == 200  # each verified here
        await asyncio.sleep(0.6)  # their cache_ttl runs out
        sync_redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "6000")

        async def timed(token: str) -> tuple[int, float]:
            started = time.perf_counter()
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                return r.status, time.perf_counter() - started
        try:
            got = await asyncio.gather(*(timed(t) for t in tokens))
        finally:
            assert await eventually(redis_answers(redis_url), timeout=15)
        assert all(status == 200 for status, _ in got), got
        slowest = max(took for _, took in got)
        # two store calls time out (0.3 s each) for every one of them, at once: ~0.7 s; in
        # turns of argon2 threads + 1 (3 here) it was ~3 s
        assert slowest < 1.8, f"slowest {slowest:.2f} s of {len(got)} (queue slots: " \
                              f"{g.gw.pipeline.auth.queue.slots})"


async def test_a_client_known_to_be_over_its_failure_limit_takes_no_place_in_the_queue(
        redis_url, upstream, monkeypatch):
    """An address this process already refused 429 ``too_many_failures`` (its counter's reset
    is known) is refused again before it queues, not at its turn: queued, its guesses took
    places in ``verify_queue.total`` (16 throttled addresses x ``per_ip`` 256 fill the
    default 4096) and a legitimate first request from elsewhere got 503 ``overloaded``."""
    from aiohttp import ClientSession, TCPConnector

    from gateway.config import Argon2Config, FailureLimits, VerifyQueueLimits
    from gateway.tokens import make_token
    from harness import bearer, eventually, gateway_under_test, make_config
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, failures=FailureLimits(per_ip=1, per_key=None, window_seconds=60)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()  # never used yet: its first request is a cold one
        auth = g.gw.pipeline.auth
        base = str(g.proxy_server.make_url(""))
        sessions = []

        def session_at(address: str) -> ClientSession:
            sessions.append(ClientSession(base, connector=TCPConnector(
                local_addr=(address, 0))))
            return sessions[-1]

        async def status(session: ClientSession, sent: str) -> int:
            async with session.get("/people/1", headers=bearer(sent)) as r:
                return r.status

        pending = []
        try:
            attacker = session_at("127.0.0.2")
            assert await status(attacker, make_token("kg", "live")[0]) == 401
            assert await status(attacker, make_token("kg", "live")[0]) == 429  # known now
            slots = auth.queue.slots
            # guesses from other addresses at a slow cost hold every turn for a while, and
            # the queue has room for two more
            auth.reconfigure(dataclasses.replace(config, keys=dataclasses.replace(
                config.keys, argon2=Argon2Config(200, 8192, 1),
                verify_queue=VerifyQueueLimits(per_ip=8, total=slots + 2))))
            pending = [asyncio.ensure_future(status(session_at(f"127.0.0.{3 + i}"),
                                                    make_token("kg", "live")[0]))
                       for i in range(slots)]
            assert await eventually(lambda: auth.queue.busy == slots), "turns not held"
            again = [asyncio.ensure_future(status(attacker, make_token("kg", "live")[0]))
                     for _ in range(2)]
            pending += again
            await eventually(lambda: auth.queue.queued == slots + 2
                             or all(t.done() for t in again), timeout=5)
            got = await status(g.proxy, token)
            assert got == 200, (got, auth.queue.queued)  # was 503 overloaded
            assert [await t for t in again] == [429, 429]
        finally:
            await asyncio.gather(*pending, return_exceptions=True)
            for s in sessions:
                await s.close()
