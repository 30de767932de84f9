"""The admin plane of a workspace with tens of thousands of keys, on the Redis that every gateway
replica's per-request call shares: no admin call may run one Redis command (a script, a whole
set's read) whose time grows with the workspace, since the per-request calls of every replica
wait behind it. Real redis-server, real gateway; the workspace is filled by pipelined copies of
a key the admin API made (a hash per key would take minutes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from typing import Iterator

import redis

from harness import bearer, gateway_under_test, make_config
from gateway.store.keyspace import key_index_key, key_key, ws_active_key, ws_keys_key

MANY = 20_000
BOUND = 1000  # the most keys or members any one command of an admin read may name or return
WHOLE = {"SMEMBERS", "SINTER", "SUNION", "SDIFF", "KEYS", "SORT", "HGETALL", "ZRANGE",
         "ZRANGEBYSCORE", "ZREVRANGE", "LRANGE", "XRANGE", "XREVRANGE"}


def fill(r: redis.Redis, ws: str, template: dict[str, str], n: int, *,
         revoked_every: int = 10, expires_at: float | None = None) -> list[str]:
    """``n`` copies of the key hash ``template`` in ``ws`` (every ``revoked_every``-th revoked),
    written as the create script writes them (hash, key set, active set, global index)."""
    if expires_at is not None:
        template = dict(template, expires_at=str(expires_at))
    ids = []
    for start in range(0, n, 2000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 2000)):
            key_id = f"f{i:011d}"
            ids.append(key_id)
            h = dict(template, id=key_id, name=f"key {i}", created_at=str(1_700_000_000 + i))
            if revoked_every and i % revoked_every == 0:
                h["revoked_at"] = str(1_700_000_000 + i)
            else:
                pipe.zadd(ws_active_key(ws), {key_id: float("inf") if expires_at is None
                                               else expires_at})
            pipe.hset(key_key(ws, key_id), mapping=h)
            pipe.sadd(ws_keys_key(ws), key_id)
            pipe.set(key_index_key(key_id), ws)
        pipe.execute()
    return ids


@contextlib.asynccontextmanager
async def big_workspace(upstream, own_redis, monkeypatch, *, plan: str = "unlimited"):
    """A real gateway on ``own_redis`` with workspace ``acme`` on ``plan``, its access log off
    (these tests read Redis, not 20,000 keys' worth of lines), and a client of that Redis."""
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    access_log="off"))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace("acme", plan=plan)
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        try:
            yield g, r
        finally:
            r.close()


def fill_like(r: redis.Redis, key: dict, n: int = MANY, **kw) -> None:
    """``n`` (``MANY``) keys of ``acme`` copied from ``key`` (a key the admin API made)."""
    fill(r, "acme", r.hgetall(key_key("acme", key["id"])), n, **kw)


async def longest_loop_stretch(awaitable):
    """(what ``awaitable`` gives, the longest CPU time the event loop spent between two turns
    of a 1 ms ticker while it ran): CPU, not wall clock, or a loaded machine's descheduling
    would count. Less the cyclic garbage collector's runs: a full collection of this test
    process's heap (the whole suite's modules, tens of thousands of key records) takes tens of
    milliseconds wherever it falls, and once fell in a chunk's stretch (84 ms against 50)."""
    import gc
    gaps, done = [], asyncio.Event()
    in_gc = [0.0, 0.0]  # CPU time in collections since the last tick, the current one's start

    def collecting(phase: str, info: dict) -> None:
        if phase == "start":
            in_gc[1] = time.thread_time()
        else:
            in_gc[0] += time.thread_time() - in_gc[1]

    async def ticks() -> None:
        last = time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.thread_time()
            gaps.append(now - last - in_gc[0])
            last, in_gc[0] = now, 0.0

    gc.callbacks.append(collecting)
    ticking = asyncio.create_task(ticks())
    try:
        result = await awaitable
    finally:
        done.set()
        await ticking
        gc.callbacks.remove(collecting)
    return result, max(gaps, default=0.0)


@contextlib.contextmanager
def monitored(url: str) -> Iterator[list[list[str]]]:
    """Every command Redis runs in the block, as (client type, name, args...): ``MONITOR`` on
    a connection of its own, ended by an ``ECHO`` of a marker once the block is done."""
    seen: list[list[str]] = []
    started, marker = threading.Event(), "kg-test-monitor-end"
    client = redis.Redis.from_url(url, decode_responses=True)

    def watch() -> None:
        with client.monitor() as m:
            started.set()
            while True:
                c = m.next_command()
                args = c["command"].split(" ")
                if args[:2] == ["ECHO", marker]:
                    return
                seen.append([c["client_type"], args[0].upper(), *args[1:]])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield seen
    finally:
        with redis.Redis.from_url(url) as r:
            r.echo(marker)
        thread.join(10)
        client.close()


def unbounded(commands: list[list[str]], ws: str) -> list[str]:
    """The commands whose cost grows with the workspace: a script that runs more than
    ``BOUND`` commands (it runs as one step), a whole read of a workspace-wide structure, a
    multi-key read or a scan step over ``BOUND``."""
    bad = []
    workspace_wide = (ws_keys_key(ws), ws_active_key(ws))
    in_script = 0  # commands of the script running (MONITOR shows them next to one another)
    for client_type, name, *args in commands:
        shown = " ".join([client_type, name, *args])[:120]
        in_script = in_script + 1 if client_type == "lua" else 0
        if in_script > BOUND:
            bad.append(f"a script of over {BOUND} commands: {shown}")
            in_script = -10 ** 9  # said once per script
        upper = [a.upper().strip('"') for a in args]
        if name in WHOLE and args and args[0].strip('"') in workspace_wide:
            bad.append(shown)
        elif name == "ZREMRANGEBYSCORE" and args[0].strip('"') in workspace_wide:
            bad.append(shown)  # removes every member in the range, however many
        elif name == "ZREMRANGEBYRANK" and args[0].strip('"') in workspace_wide and (
                int(args[2].strip('"')) - int(args[1].strip('"')) >= BOUND):
            bad.append(shown)
        elif name in ("MGET", "HMGET", "SMISMEMBER") and len(args) > BOUND:
            bad.append(shown)
        elif name in ("SSCAN", "ZSCAN", "HSCAN", "SCAN") and (
                "COUNT" not in upper or int(upper[upper.index("COUNT") + 1]) > BOUND):
            bad.append(shown)
    return bad


async def test_listing_a_big_workspace_runs_no_command_that_grows_with_it(
        upstream, own_redis, monkeypatch):
    # 4 x BOUND keys: a command over every key (a script of an HMGET per key, one MGET of
    # every counter) is then over BOUND, and SMEMBERS is flagged at any size; MANY (20,000)
    # took ~15 s, most of it MONITOR's 80,000 lines parsed
    many = 4 * BOUND
    async with big_workspace(upstream, own_redis, monkeypatch) as (g, r):
        token, key = await g.key("acme")
        fill_like(r, key, many)
        async with g.proxy.get("/people", headers=bearer(token)) as resp:
            assert resp.status == 200

        with monitored(own_redis.url) as commands:
            status, page = await g.admin_json("GET", "/workspaces/acme/keys?limit=50")
            assert status == 200 and len(page["items"]) == 50 and page["next_cursor"]
            status, active = await g.admin_json(
                "GET", "/workspaces/acme/keys?status=active&sort=name&limit=1000")
            assert status == 200 and len(active["items"]) == 1000
            assert {k["status"] for k in active["items"]} == {"active"}
            status, every = await g.admin_json("GET", "/workspaces/acme/keys")
            assert status == 200 and len(every["items"]) == many + 1
            assert sum(k["status"] == "revoked" for k in every["items"]) == many // 10
            assert "next_cursor" not in every
        bad = unbounded(commands, "acme")
        assert not bad, (len(bad), bad[:5])


async def test_deleting_a_role_of_a_big_workspace_runs_no_command_that_grows_with_it(
        upstream, own_redis, monkeypatch):
    """A role delete counts the keys still bound to the role (it refuses while any is active
    or disabled): that count ran in the delete's script, an HMGET per key of the workspace
    in one step (0.4 s of Redis at 50,000 keys). It is now read in bounded steps, and the
    delete's script only checks that no key was bound to a role since the count began."""
    async with big_workspace(upstream, own_redis, monkeypatch) as (g, r):
        status, _ = await g.admin_json("PUT", "/workspaces/acme/roles/ops",
                                       {"scopes": ["people:read"]})
        assert status == 200
        _, key = await g.key("acme")
        _, bound = await g.key("acme", name="bound", role="ops")
        fill_like(r, key)

        with monitored(own_redis.url) as commands:
            status, body = await g.admin_json("DELETE", "/workspaces/acme/roles/ops")
            assert status == 409 and "still used by 1 key " in body["error"]["message"], body
            status, _ = await g.admin_json("POST", f"/workspaces/acme/keys/{bound['id']}/revoke")
            assert status == 200
            status, body = await g.admin_json("DELETE", "/workspaces/acme/roles/ops")
            assert status == 200, body
        bad = unbounded(commands, "acme")
        assert not bad, (len(bad), bad[:5])
        status, roles = await g.admin_json("GET", "/workspaces/acme/roles")
        assert "ops" not in [x["name"] for x in roles["items"]]


async def test_a_create_after_many_keys_expired_at_once_trims_them_a_little_at_a_time(
        upstream, own_redis, monkeypatch):
    """Keys that expire leave the workspace's active set (what the plan's cap counts) in the
    next create's or re-dating's script: all of them at once, so the first create after a
    batch of 20,000 keys expired together held Redis ~50 ms (~130 ms at 50,000). Each now
    removes a bounded number, and the cap counts only the keys whose expiry is ahead."""
    async with big_workspace(upstream, own_redis, monkeypatch, plan="starter") as (g, r):
        # starter: max_keys 5
        _, key = await g.key("acme", expires_in=3600)
        fill_like(r, key, revoked_every=0, expires_at=1_700_000_000)
        with monitored(own_redis.url) as commands:
            for i in range(4):  # 1 + 4 = the cap of 5, 20,000 expired ones besides
                status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                                  {"name": f"k{i}", "scopes": ["people:read"]})
                assert status == 201, body
            status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                              {"name": "over", "scopes": ["people:read"]})
            assert status == 409 and body["error"]["code"] == "key_limit_reached", body
            # re-dating an expired key brings it back: over the cap as well
            status, body = await g.admin_json(
                "PATCH", "/workspaces/acme/keys/f00000000007",
                {"expires_at": "2099-01-01T00:00:00Z"})
            assert status == 409 and body["error"]["code"] == "key_limit_reached", body
        bad = unbounded(commands, "acme")
        assert not bad, (len(bad), bad[:5])
        status, _ = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                          {"name": "room again", "scopes": ["people:read"]})
        assert status == 201, body


async def test_what_a_config_reload_asks_of_a_big_workspace_is_read_in_bounded_steps(
        upstream, own_redis, monkeypatch):
    """A reload that drops a configured role asks which keys are bound to it
    (``config_names_in_use``): that read each workspace's key set with one SMEMBERS (~5-15 ms
    of Redis at 50,000 ids, every replica's per-request call waiting). It reads it by SSCAN."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        await g.workspace("small")
        _, key = await g.key("acme", role="reader")
        await g.key("small", role="reader")
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        fill(r, "acme", r.hgetall(key_key("acme", key["id"])), MANY)
        with monitored(own_redis.url) as commands:
            (plans, roles), held = await longest_loop_stretch(
                g.gw.store.config_names_in_use(["reader"]))
        assert plans == {"unlimited": ["acme"], "starter": ["small"]}
        # and the loop every proxy request of this process waits on is not held for the
        # whole of it: the keys' fields were read in one pipeline, parsed in one stretch
        # (~150 ms of CPU at 20,000 keys, 468 ms at 60,000)
        assert held < 0.05, f"the event loop was held {held * 1000:.0f} ms of CPU"
        assert roles == {"reader": {"acme": MANY - MANY // 10 + 1, "small": 1}}
        bad = unbounded(commands, "acme")
        assert not bad, (len(bad), bad[:5])
        r.close()


async def test_listing_every_key_of_a_big_workspace_leaves_the_worker_serving_requests(
        upstream, own_redis, monkeypatch):
    """The admin listener runs in the proxy's own processes: a listing of every key (no
    ``limit``) of a 20,000-key workspace built all the key objects, then the whole body, each
    in one stretch of the event loop (~0.25 s and ~0.15 s here; 0.6 s and 0.35 s at 50,000),
    and the requests that worker was serving waited as long. The loop now gets a turn every
    few hundred keys. The body is the same bytes."""
    async with big_workspace(upstream, own_redis, monkeypatch) as (g, r):
        _, key = await g.key("acme")
        fill_like(r, key)
        async def listing() -> tuple[int, bytes]:
            async with g.admin.get("/admin/v1/workspaces/acme/keys") as resp:
                return resp.status, await resp.read()
        (status, raw), held = await longest_loop_stretch(listing())
        assert status == 200
        body = json.loads(raw)
        assert len(body["items"]) == MANY + 1 and "next_cursor" not in body
        assert raw == json.dumps(body).encode()  # as json.dumps writes it, byte for byte
        assert held < 0.1, f"the event loop was held {held * 1000:.0f} ms of CPU"


async def test_fifty_creates_at_once_for_the_last_slot_of_a_big_workspace_make_one_key(
        upstream, own_redis, monkeypatch):
    """The cap counts active keys only (18,001 here, beside 2,000 revoked ones), and 50 creates
    sent at once for its last slot make exactly one key: the others are key_limit_reached."""
    async with big_workspace(upstream, own_redis, monkeypatch) as (g, r):
        _, key = await g.key("acme")
        fill_like(r, key)
        active = MANY - MANY // 10 + 1
        status, body = await g.admin_json("PATCH", "/workspaces/acme",
                                          {"limits": {"max_keys": active + 1}})
        assert status == 200, body

        async def create(i: int) -> tuple[int, str | None]:
            status, body = await g.admin_json("POST", "/workspaces/acme/keys",
                                              {"name": f"race {i}", "scopes": ["people:read"]})
            return status, body.get("error", {}).get("code")

        answers = await asyncio.gather(*(create(i) for i in range(50)))
        assert sorted(answers) == [(201, None)] + [(409, "key_limit_reached")] * 49, answers
        assert r.zcount(ws_active_key("acme"), "-inf", "+inf") == active + 1
