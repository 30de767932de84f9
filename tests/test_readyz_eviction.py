"""Review (rev2): the eviction-policy look (INFO memory on every Cluster node, replicas
included) made from /readyz once a minute. A replica that does not answer (paused, a host
gone silent) plays no part in readiness -- keygate never reads from replicas, and /readyz's own
checks pass -- yet the probe that makes the INFO call waits the store timeout for it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from gateway.config import StoreConfig

from harness import gateway_under_test, make_config
from test_redis_topologies import (CLUSTER_PW, Servers, _cluster_port, _wait,  # noqa: F401
                                   start_cluster)


@pytest.fixture
def cluster_with_replica(tmp_path: Path) -> Iterator[dict]:
    servers = Servers(tmp_path)
    ports = [_cluster_port() for _ in range(3)]
    try:
        start_cluster(servers, ports, CLUSTER_PW)
        rport = _cluster_port()
        proc = servers.start(f"node{rport}", rport, "--cluster-enabled", "yes",
                             "--cluster-config-file", f"nodes-{rport}.conf",
                             "--cluster-node-timeout", "2000", "--requirepass", CLUSTER_PW,
                             "--masterauth", CLUSTER_PW, password=CLUSTER_PW)
        replica = redis.Redis(port=rport, password=CLUSTER_PW, decode_responses=True)
        replica.execute_command("CLUSTER", "MEET", "127.0.0.1", str(ports[0]))
        master = redis.Redis(port=ports[0], password=CLUSTER_PW, decode_responses=True)
        master_id = master.execute_command("CLUSTER", "MYID")
        _wait("the replica to know the master",
              lambda: master_id in str(replica.execute_command("CLUSTER", "NODES")))
        replica.execute_command("CLUSTER", "REPLICATE", master_id)
        for port in ports:  # every node lists it (keygate may read the slots from any)
            node = redis.Redis(port=port, password=CLUSTER_PW, decode_responses=True)
            _wait("the replica to be listed",
                  lambda: any(len(s) > 3 for s in node.execute_command("CLUSTER", "SLOTS")))
            node.close()
        _wait("the replica in sync",
              lambda: replica.info("replication").get("master_link_status") == "up")
        replica.close()
        master.close()
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports[:2])
        yield {"ports": ports, "replica": proc, "servers": servers,
               "all_ports": ports + [rport],
               "url": f"redis+cluster://:{CLUSTER_PW}@{seeds}"}
    finally:
        for proc in servers.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        servers.stop_all()


@pytest.mark.parametrize("how", ["paused"])
async def test_a_silent_replica_does_not_hold_readyz(cluster_with_replica, upstream,
                                                     monkeypatch, how) -> None:
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=2.0))
    async with gateway_under_test(config, cluster_with_replica["url"], monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:  # the first look, all nodes answering
            assert r.status == 200
        from gateway.admin import listener
        gut.gw.admin_app[listener.READINESS]._eviction_checked = -float("inf")  # a minute on
        replica = cluster_with_replica["replica"]
        os.kill(replica.pid, signal.SIGSTOP if how == "paused" else signal.SIGKILL)
        if how == "killed":
            replica.wait(5)
        try:
            took = []
            for _ in range(2):
                started = time.monotonic()
                async with gut.admin.get("/readyz") as r:
                    took.append((r.status, round(time.monotonic() - started, 2)))
        finally:
            if replica.poll() is None:
                os.kill(replica.pid, signal.SIGCONT)
        # both 200 (the replica is nothing to readiness); the first waited on the replica
        assert [s for s, _ in took] == [200, 200], took
        assert took[0][1] < 1.0, took


def _commands(port: int, name: str) -> int:
    """How many ``name`` commands the node at ``port`` has run (this call's INFO not yet)."""
    node = redis.Redis(port=port, password=CLUSTER_PW, decode_responses=True)
    try:
        return int(node.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))
    finally:
        node.close()


def _quiet_master(gut, ports: list[int]) -> int:
    """A primary that neither /readyz's PING (the admin client's default node) nor its
    per-request script (the slot of kg:ready) goes to: pausing it is the eviction look's
    business alone."""
    from test_redis_topologies import _owner_port
    busy = {gut.gw.store.redis.get_default_node().port, _owner_port(ports, "kg:ready")}
    return next(p for p in ports if p not in busy)


async def test_a_silent_master_neither_holds_the_look_nor_hides_another_nodes_eviction(
        cluster_with_replica, upstream, monkeypatch, caplog) -> None:
    """A primary paused (its host gone silent) while the policy is looked at: the look is
    started in the background and returned from at once (serve's start and the probes never
    wait for it), gives the silent node ``EVICTION_NODE_TIMEOUT``, not the store timeout, and a
    node that would evict is warned of though another said nothing. It used to be one INFO to
    every node under the store timeout: the caller waited it out, and its TimeoutError meant
    "nothing known, nothing said" -- after a warning, even "Redis no longer evicts keys"."""
    import logging

    from gateway.admin import listener
    from gateway.store import admin_base
    from harness import eventually
    caplog.set_level(logging.INFO, logger="keygate.admin")
    ports = cluster_with_replica["ports"]
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=4.0))
    async with gateway_under_test(config, cluster_with_replica["url"], monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200
        readiness = gut.gw.admin_app[listener.READINESS]
        assert await eventually(lambda: readiness._eviction_look.done(), timeout=5)
        silent = _quiet_master(gut, ports)
        evicting = next(p for p in ports if p != silent)
        node = redis.Redis(port=evicting, password=CLUSTER_PW)
        node.config_set("maxmemory", "64mb")
        node.config_set("maxmemory-policy", "volatile-lru")
        node.close()
        proc = cluster_with_replica["servers"].procs[f"node{silent}"]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            readiness.look_at_eviction()
            assert time.monotonic() - started < 0.2  # a task started, nothing awaited
            look = readiness._eviction_look
            assert not look.done()  # waiting on the paused node
            warned = await eventually(lambda: [m for m in caplog.messages
                                               if "volatile-lru" in m], timeout=10)
            assert warned, caplog.text
            assert await eventually(look.done, timeout=admin_base.EVICTION_NODE_TIMEOUT + 1.5)
            assert time.monotonic() - started < config.store.timeout
            node = redis.Redis(port=evicting, password=CLUSTER_PW)
            node.config_set("maxmemory-policy", "noeviction")
            node.close()
            readiness.look_at_eviction()  # the evicting node no longer does; one is silent
            assert await eventually(readiness._eviction_look.done, timeout=5)
            assert "no longer evicts" not in caplog.text  # not known: the warning stands
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        readiness.look_at_eviction()  # every node answers: now it is known
        assert await eventually(lambda: "no longer evicts" in caplog.text, timeout=10)


async def test_a_look_still_running_is_not_started_again_and_a_stop_ends_it(
        cluster_with_replica, upstream, monkeypatch) -> None:
    """A look that waits on a silent node is not started again by the probes (nor by serve)
    meanwhile; and the gateway's stop does not wait for it: it is cancelled, bounded by
    gateway.closing."""
    from gateway.admin import listener
    from gateway.store import admin_base
    monkeypatch.setattr(admin_base, "EVICTION_NODE_TIMEOUT", 30.0)  # the store timeout: 8 s
    ports = cluster_with_replica["ports"]
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=8.0))
    proc = None
    try:
        async with gateway_under_test(config, cluster_with_replica["url"], monkeypatch) as gut:
            async with gut.admin.get("/readyz") as r:
                assert r.status == 200
            readiness = gut.gw.admin_app[listener.READINESS]
            first = readiness._eviction_look
            assert first is not None  # the probe started one
            while not first.done():
                await asyncio.sleep(0.02)
            proc = cluster_with_replica["servers"].procs[f"node{_quiet_master(gut, ports)}"]
            os.kill(proc.pid, signal.SIGSTOP)
            readiness.look_at_eviction()
            look = readiness._eviction_look
            assert look is not first and not look.done()
            for _ in range(3):
                readiness.look_at_eviction()
                assert readiness._eviction_look is look
            await asyncio.sleep(0.2)
            assert not look.done()
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        assert look.cancelled(), look
        assert took < 3.0, took  # not the store timeout (8 s) the paused node would take
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGCONT)


async def test_the_look_asks_no_replica(cluster_with_replica, upstream, monkeypatch) -> None:
    """keygate writes to primaries only: a replica's policy says nothing of keygate's keys
    (the look after a promotion sees the new primary), and a replica's silence must not slow
    the look."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, cluster_with_replica["url"], monkeypatch) as gut:
        store = gut.gw.store
        assert await store.eviction_problem() is None
        before = {p: _commands(p, "info") for p in cluster_with_replica["all_ports"]}
        assert await store.eviction_problem() is None
        after = {p: _commands(p, "info") for p in cluster_with_replica["all_ports"]}
    # each node: the first commandstats read, plus the look's INFO on the primaries only
    assert {p: after[p] - before[p] for p in after} == {
        p: 2 if p in cluster_with_replica["ports"] else 1 for p in after}


async def test_serve_starts_without_waiting_on_a_silent_replica_and_still_warns(
        cluster_with_replica, upstream, tmp_path) -> None:
    """`keygate serve`'s look at the policy at start used to be awaited before listening,
    with INFO to every node: a paused replica held the start for the store timeout (here
    10 s). The look now runs beside the start, asks the primaries only, and its warning still
    comes (a moment after the "listening" line, docs/operations.md "Memory policy")."""

    from served import Served, write_config
    ports = cluster_with_replica["ports"]
    node = redis.Redis(port=ports[2], password=CLUSTER_PW)
    node.config_set("maxmemory", "64mb")
    node.config_set("maxmemory-policy", "allkeys-lru")
    node.close()
    path, proxy_port, admin_port = write_config(tmp_path, redis_url=cluster_with_replica["url"],
                                                upstream_url=str(upstream.make_url("")),
                                                store_timeout=10)
    replica = cluster_with_replica["replica"]
    os.kill(replica.pid, signal.SIGSTOP)
    started = time.monotonic()
    served = Served(path, proxy_port, admin_port)
    try:
        await served.ready(timeout=30)
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while "allkeys-lru" not in served.stderr() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        served.terminate()
        served.close()
    assert took < 8.0, (took, served.stderr())
    assert "allkeys-lru" in served.stderr(), served.stderr()
