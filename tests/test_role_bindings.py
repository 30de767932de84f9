"""Workspace role deletes against the bindings made while they count, with real concurrency on a
real redis-server: a delete counts the role's keys in bounded steps, then goes ahead only if no
key was bound to *that role* meanwhile. Bindings to other roles, and PATCHes that leave a key's
role as it is, must not hold it up; a binding to the role must always make it refuse."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.admin import create_admin_app
from gateway.config import Argon2Config, Config, Plan
from gateway.store import Store
from gateway.store.keyspace import (key_index_key, key_key, undone_key, ws_active_key,
                                    ws_audit_key, ws_bindings_key, ws_key, ws_keys_key,
                                    ws_roles_key)
from harness import Clock

OPERATOR_TOKEN = "operator-secret-for-tests"
AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
KEYS = "/admin/v1/workspaces/acme/keys"
ROLES = "/admin/v1/workspaces/acme/roles"
FILLED = 1500  # keys of the workspace besides the test's own: a count of ~8 steps of 200


def cheap_config() -> Config:
    base = Config()
    keys = dataclasses.replace(base.keys, argon2=Argon2Config(time_cost=1, memory_cost=8,
                                                                parallelism=1))
    return dataclasses.replace(base, keys=keys, plans={"default": Plan("default")},
                               roles={"reader": ("people:read",)})


@pytest.fixture
async def admin(aiohttp_client, redis_url, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", OPERATOR_TOKEN)
    clock = Clock()
    clock.now = time.time()  # the filled keys' expiries are judged by Redis-side scripts too
    store = await Store.connect(redis_url, cheap_config(), clock=clock)
    client = await aiohttp_client(create_admin_app(cheap_config(), store), headers=AUTH)
    client.store, client.clock = store, clock
    client.redis = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.redis.close()
    await store.close()


async def ok(resp, status: int = 200) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    return body


async def setup(admin) -> None:
    await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "Acme"}), 201)
    for role in ("ops", "dev"):
        await ok(await admin.put(f"{ROLES}/{role}", json={"scopes": [f"{role}:run"]}))
    filler = (await ok(await admin.post(KEYS, json={"name": "filler", "scopes": ["a:b"]}),
                       201))["key"]
    template = admin.redis.hgetall(key_key("acme", filler["id"]))
    pipe = admin.redis.pipeline(transaction=False)
    for i in range(FILLED):  # copies of a key the API made, written as the create script does
        key_id = f"f{i:011d}"
        pipe.hset(key_key("acme", key_id), mapping=dict(template, id=key_id, name=f"k{i}"))
        pipe.sadd(ws_keys_key("acme"), key_id)
        pipe.zadd(ws_active_key("acme"), {key_id: float("inf")})
        pipe.set(key_index_key(key_id), "acme")
    pipe.execute()


def set_role_replies(admin, monkeypatch, before: list | None = None) -> list:
    """The replies of the role delete's script, as they come (the store's calls unchanged).
    ``before``: coroutine functions, each awaited (and removed) just before the next run of
    that script, after the delete counted the role's keys."""
    replies: list = []
    run = admin.store._run

    async def watched(name, keys, args, **kw):
        if name == "set_role" and before:
            await before.pop(0)()
        reply = await run(name, keys, args, **kw)
        if name == "set_role":
            replies.append(reply)
        return reply
    monkeypatch.setattr(admin.store, "_run", watched)
    return replies


async def test_a_delete_is_not_starved_by_bindings_to_other_roles_or_to_the_same_role(
        admin, monkeypatch):
    """A reviewer's tenant had its keys:admin key re-PATCH its keys ~20 times a second: every
    PATCH that named a role bumped the workspace's one 'bindings' counter, whatever the role
    and even when the key already had it, so `DELETE roles/ops` found it changed after every
    count and gave up with 409 after 8 tries, though no key was ever bound to `ops`. Only a
    binding to `ops` itself now makes its delete count again."""
    await setup(admin)
    same = (await ok(await admin.post(KEYS, json={"name": "same", "role": "dev"}), 201))["key"]
    other = (await ok(await admin.post(KEYS, json={"name": "other", "role": "dev"}), 201))["key"]
    named = (await ok(await admin.post(KEYS, json={"name": "named", "role": "dev"}), 201))["key"]
    replies = set_role_replies(admin, monkeypatch)
    stop, patches = asyncio.Event(), [0]

    async def patching(key_id: str, bodies: list[dict]) -> None:
        i = 0
        while not stop.is_set():
            await ok(await admin.patch(f"{KEYS}/{key_id}", json=bodies[i % len(bodies)]))
            patches[0] += 1
            i += 1

    patchers = [asyncio.create_task(patching(same["id"], [{"role": "dev"}])),  # the role it has
                asyncio.create_task(patching(other["id"], [{"role": "reader"},  # other roles
                                                           {"role": "dev"}])),
                asyncio.create_task(patching(named["id"], [{"name": "n1", "role": "dev"},
                                                           {"name": "n2", "role": "dev"}]))]
    store, count = admin.store, admin.store._role_users
    in_counts = []  # PATCHes answered while a delete's count ran (the store's count unchanged)

    async def counting(ws, name):
        before = patches[0]
        found = await count(ws, name)
        in_counts.append(patches[0] - before)
        return found
    monkeypatch.setattr(store, "_role_users", counting)
    try:
        await asyncio.sleep(0.05)  # under way
        for _ in range(5):
            replies.clear()
            deleted = await admin.delete(f"{ROLES}/ops")
            body = await deleted.json()
            assert deleted.status == 200, (body, replies, in_counts)
            assert replies == ["ok"], replies  # no try was made stale by them
            await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
    finally:
        stop.set()
        await asyncio.gather(*patchers)
    assert sum(in_counts) >= 3, in_counts  # the re-PATCHes really ran while the deletes counted


async def test_a_patch_keeping_a_keys_role_bumps_no_counter(admin):
    """The starvation test above re-PATCHes keys on `dev` and deletes `ops`, so a PATCH that
    bumped its own role's counter on every call would pass it. The property itself: a PATCH
    that leaves a key on `ops` (naming `ops` again, or changing other fields) leaves `ops`'
    counter as it is; moving the key to `dev` bumps `dev` only; moving it back bumps `ops`."""
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops"}), 201))["key"]
    counters = ws_bindings_key("acme")

    def counter(role: str) -> int:
        return int(admin.redis.hget(counters, role) or 0)
    ops, dev = counter("ops"), counter("dev")
    assert ops >= 1
    for body in ({"role": "ops"}, {"name": "n1", "role": "ops"}, {"name": "n2"},
                 {"enabled": False}, {"enabled": True, "role": "ops"}, {"rate_limit": "5/s"}):
        await ok(await admin.patch(f"{KEYS}/{key['id']}", json=body))
    assert (counter("ops"), counter("dev")) == (ops, dev)
    await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"role": "dev"}))
    assert (counter("ops"), counter("dev")) == (ops, dev + 1)
    await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"role": "ops"}))
    assert (counter("ops"), counter("dev")) == (ops + 1, dev + 1)


async def test_same_role_re_patches_of_a_key_on_the_role_do_not_starve_its_delete(
        admin, monkeypatch):
    """The same through a delete: the last key on `ops` has expired (it holds no delete up)
    and a tenant's loop re-PATCHes it, naming `ops` each time, between every count of the
    delete and its script. None of them binds the key to `ops` anew, so the delete's first
    try goes through."""
    from gateway.models import rfc3339
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops",
                                                 "expires_at": rfc3339(admin.clock.now + 5)}),
                    201))["key"]
    admin.clock.now += 10  # expired
    replies = set_role_replies(admin, monkeypatch)
    store, count = admin.store, admin.store._role_users
    patched = [0]

    async def counting(ws, name):
        found = await count(ws, name)
        for body in ({"role": "ops"}, {"name": f"n{patched[0]}", "role": "ops"}):
            await ok(await admin.patch(f"{KEYS}/{key['id']}", json=body))
            patched[0] += 1
        return found
    monkeypatch.setattr(store, "_role_users", counting)
    deleted = await admin.delete(f"{ROLES}/ops")
    assert deleted.status == 200, (await deleted.json(), replies)
    assert replies == ["ok"] and patched[0] == 2, (replies, patched)


async def test_role_flips_of_an_expired_key_do_not_starve_a_delete(admin, monkeypatch):
    """A key that expired long ago holds no delete up, yet a tenant's loop moving it between
    `ops` and `dev` bumped ops' counter on every move to `ops`: `DELETE roles/ops` counted again
    after each and gave up with 409 after 8 tries, though no live key was ever bound to `ops`.
    Only a key that is live (not revoked, not expired: within a minute past its expiry still
    counts as live, for replicas' clocks differ) binds its role now."""
    from gateway.models import rfc3339
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "dev",
                                                 "expires_at": rfc3339(admin.clock.now + 5)}),
                    201))["key"]
    admin.clock.now += 3600  # long expired
    replies = set_role_replies(admin, monkeypatch)
    store, count = admin.store, admin.store._role_users

    async def counting(ws, name):
        found = await count(ws, name)
        for role in ("ops", "dev"):  # the tenant's loop, between every count and its script
            await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"role": role}))
        return found
    monkeypatch.setattr(store, "_role_users", counting)
    deleted = await admin.delete(f"{ROLES}/ops")
    assert deleted.status == 200, (await deleted.json(), replies)
    assert replies == ["ok"], replies
    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert (read["status"], read["role"]) == ("expired", "dev")
    # a key expired only seconds ago may still be live by a deleting replica's clock: it binds
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
    just = (await ok(await admin.post(KEYS, json={
        "name": "j", "role": "dev", "expires_at": rfc3339(admin.clock.now + 5)}), 201))["key"]
    admin.clock.now += 10
    before = int(admin.redis.hget(ws_bindings_key("acme"), "ops") or 0)
    await ok(await admin.patch(f"{KEYS}/{just['id']}", json={"role": "ops"}))
    assert int(admin.redis.hget(ws_bindings_key("acme"), "ops") or 0) == before + 1


@pytest.mark.parametrize("binding", ["patch", "create"])
async def test_a_key_bound_to_the_role_while_its_delete_counts_always_holds_it_up(
        admin, monkeypatch, binding):
    """The other side of the per-role counter: a key bound to the role at any moment of its
    delete (before, during or after the count) either makes the delete refuse (409, the role
    stays, the key keeps it) or is refused itself (the role is gone) -- never both through, a
    live key bound to a role nothing defines (no scopes). Run at random moments over the
    delete, with bindings to another role going on all along; at least one binding lands after
    the count read the key's place, where only the counter catches it."""
    await setup(admin)
    target = (await ok(await admin.post(KEYS, json={"name": "t", "scopes": ["a:b"]}),
                       201))["key"]
    noise = (await ok(await admin.post(KEYS, json={"name": "noise", "role": "dev"}),
                      201))["key"]
    before: list = []
    replies = set_role_replies(admin, monkeypatch, before)
    stop = asyncio.Event()

    async def noisy() -> None:
        while not stop.is_set():
            await ok(await admin.patch(f"{KEYS}/{noise['id']}", json={"role": "dev"}))

    # a delete's span, to spread the bindings over it
    t0 = time.monotonic()
    await ok(await admin.delete(f"{ROLES}/ops"))
    span = time.monotonic() - t0
    rng = random.Random(1234)
    outcomes = []
    noise_task = asyncio.create_task(noisy())
    try:
        for i in range(24):
            await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
            replies.clear()

            async def bind(delay: float):
                await asyncio.sleep(delay)
                if binding == "patch":
                    return await admin.patch(f"{KEYS}/{target['id']}", json={"role": "ops"})
                return await admin.post(KEYS, json={"name": f"new{i}", "role": "ops"})

            deleting = asyncio.create_task(admin.delete(f"{ROLES}/ops"))
            bound = await bind(rng.uniform(0, 1.2 * span))
            deleted = await deleting
            outcome = (deleted.status, 200 if bound.status == 201 else bound.status)
            outcomes.append((outcome, list(replies)))
            assert outcome in ((409, 200), (200, 400)), (outcome, await deleted.json(),
                                                         await bound.json())
            # undo the binding for the next round
            if outcome[1] == 200:
                made = (await bound.json())
                made = made.get("key", made)
                if binding == "patch":
                    await ok(await admin.patch(f"{KEYS}/{made['id']}", json={"scopes": ["a:b"]}))
                else:
                    await ok(await admin.post(f"{KEYS}/{made['id']}/revoke"))
                await ok(await admin.delete(f"{ROLES}/ops"))
            else:
                read = await ok(await admin.get(f"{KEYS}/{target['id']}"))
                assert read["role"] is None
        # and one binding made for certain between the count and the delete's script (the
        # random moments above may miss that window on a loaded machine): the counter
        # catches it, the delete counts again and refuses
        await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
        replies.clear()
        bound: list = []

        async def bind_in_the_window() -> None:
            if binding == "patch":
                bound.append(await admin.patch(f"{KEYS}/{target['id']}", json={"role": "ops"}))
            else:
                bound.append(await admin.post(KEYS, json={"name": "last", "role": "ops"}))
        before.append(bind_in_the_window)
        deleted = await admin.delete(f"{ROLES}/ops")
        assert (deleted.status, bound[0].status in (200, 201)) == (409, True), \
            (deleted.status, await deleted.json(), bound[0].status)
        outcomes.append(((409, 200), list(replies)))
    finally:
        stop.set()
        await noise_task
    # the bindings that landed between the count and the delete's script were caught by it
    assert any("stale" in r for _, r in outcomes), outcomes
    assert any(o == (409, 200) for o, _ in outcomes) and any(o == (200, 400)
                                                            for o, _ in outcomes), outcomes


# --- replicas of an earlier build on the same Redis (a rolling deploy) --------------------------

PREV = Path(__file__).parent / "compat" / "build-7877948"  # one 'bindings' per workspace


def prev_script(name: str) -> str:
    return (PREV / f"{name}.lua").read_text()


def _entry(action: str, target: str) -> str:
    return json.dumps({"at": "2026-12-06T00:00:00Z", "actor": "operator", "action": action,
                       "target": target, "details": {}})


def prev_patch_role(r: redis.Redis, key_id: str, role: str):
    """``PATCH .../keys/{key_id} {"role": role}`` as a replica of build 7877948 runs it."""
    keys = (key_key("acme", key_id), ws_active_key("acme"), ws_audit_key("acme"),
            ws_roles_key("acme"), ws_key("acme"))
    return r.eval(prev_script("admin_update_key"), len(keys), *keys, key_id, "",
                  f"{time.time():.3f}", -1, _entry("key.update", key_id), 10000, "", role, "",
                  "", "role", role, "scopes", "[]")


def prev_create(r: redis.Redis, like: str, new_id: str, role: str):
    """``POST .../keys {"role": role}`` as a replica of build 7877948 runs it: a copy of key
    ``like``'s fields (its hash too: nobody uses the token), bound to ``role``."""
    fields = dict(r.hgetall(key_key("acme", like)), id=new_id, role=role, scopes="[]")
    for drop in ("rev", "rotated_to", "budget"):
        fields.pop(drop, None)
    ws = r.hgetall(ws_key("acme"))
    keys = (ws_key("acme"), ws_keys_key("acme"), ws_active_key("acme"), key_key("acme", new_id),
            ws_audit_key("acme"), ws_roles_key("acme"), key_key("acme", new_id),
            key_key("acme", new_id), undone_key("acme", new_id))
    r.set(key_index_key(new_id), "acme")
    return r.eval(prev_script("admin_add_key"), len(keys), *keys, f"{time.time():.3f}", -1,
                  "+inf", new_id, _entry("key.create", new_id), 10000, "", "", "", role,
                  f"{ws.get('plan', '')}\n{ws.get('limits', '')}", "", "[]",
                  *[x for kv in fields.items() for x in kv])


def prev_take_back(r: redis.Redis, new_id: str, old_id: str):
    """The take-back of the rotation of ``old_id`` into ``new_id`` (answered 503) as a replica of
    build 7877948 runs it: it gives the old key back whatever its role."""
    keys = (key_key("acme", new_id), ws_keys_key("acme"), ws_active_key("acme"),
            ws_audit_key("acme"), undone_key("acme", new_id), key_key("acme", old_id),
            ws_key("acme"))
    return r.eval(prev_script("admin_take_back"), len(keys), *keys, new_id,
                  _entry("key.rotate.undone", old_id), 10000, old_id, 86400, "")


def prev_delete_role(r: redis.Redis, name: str, seen: str):
    """The script of a role delete by a replica of build 7877948, its count having found no key
    using the role after it read the workspace's 'bindings' as ``seen``."""
    keys = (ws_key("acme"), ws_roles_key("acme"), ws_audit_key("acme"))
    return r.eval(prev_script("admin_set_role"), len(keys), *keys, "delete", name, "[]",
                  _entry("role.delete", name), 10000, seen)


@pytest.mark.parametrize("binding", ["patch", "create", "take-back"])
async def test_a_key_bound_by_a_replica_of_the_previous_build_holds_a_delete_up(
        admin, monkeypatch, binding):
    """Mid rolling deploy, a replica of the previous build binds a key to the role while a
    replica of this build counts the role's keys for its delete. The old scripts bump only the
    workspace's one 'bindings', never the role's own counter: a delete checking only that went
    ahead and left a live key bound to a role nothing defines (no scopes, 403 everywhere, the
    old replica having answered 200). Its bump of 'bindings' now makes the delete count again,
    and it finds the key: 409, the role stays."""
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "scopes": ["a:b"]}), 201))["key"]
    store, count = admin.store, admin.store._role_users
    if binding == "take-back":  # a rotation (answered 503 on an old replica), its key revoked
        await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"role": "ops"}))
        new = (await ok(await admin.post(f"{KEYS}/{key['id']}/rotate"), 201))["key"]
        await ok(await admin.post(f"{KEYS}/{new['id']}/revoke"))

    async def counted_then_old_replica_binds(ws, name):
        found = await count(ws, name)
        monkeypatch.setattr(store, "_role_users", count)
        if binding == "patch":
            assert "ops" in prev_patch_role(admin.redis, key["id"], "ops")
        elif binding == "create":
            assert prev_create(admin.redis, key["id"], "old000000001", "ops") == "ok"
        else:
            assert prev_take_back(admin.redis, new["id"], key["id"]) == "restored"
        return found

    monkeypatch.setattr(store, "_role_users", counted_then_old_replica_binds)
    refused = await admin.delete(f"{ROLES}/ops")
    assert refused.status == 409, await refused.json()
    assert "still used by 1 key " in (await refused.json())["error"]["message"]
    roles = await ok(await admin.get(ROLES))
    assert "ops" in [r["name"] for r in roles["items"]]
    bound = "old000000001" if binding == "create" else key["id"]
    read = await ok(await admin.get(f"{KEYS}/{bound}"))
    assert (read["role"], read["scopes"], read["status"]) == ("ops", ["ops:run"], "active")


async def test_a_delete_by_a_replica_of_the_previous_build_sees_this_builds_bindings(admin):
    """The other way round: a replica of the previous build deletes the role, having counted
    no key using it, while a replica of this build binds one to it: its script must find the
    workspace's 'bindings' moved ('stale': it counts again). And this build's PATCHes that
    leave a key's role as it is, or bind another role, bump nothing, so they no longer starve
    the old replica's delete either."""
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "scopes": ["a:b"]}), 201))["key"]
    dev = (await ok(await admin.post(KEYS, json={"name": "d", "role": "dev"}), 201))["key"]
    seen = admin.redis.hget(ws_key("acme"), "bindings") or "0"
    await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"role": "ops"}))  # this build
    assert prev_delete_role(admin.redis, "ops", seen) == "stale"
    await ok(await admin.patch(f"{KEYS}/{key['id']}", json={"scopes": ["a:b"]}))
    seen = admin.redis.hget(ws_key("acme"), "bindings") or "0"
    for _ in range(3):
        await ok(await admin.patch(f"{KEYS}/{dev['id']}", json={"role": "dev"}))
    assert prev_delete_role(admin.redis, "ops", seen) == "ok"
    roles = await ok(await admin.get(ROLES))
    assert "ops" not in [r["name"] for r in roles["items"]]


# --- a take-back (a rotation answered 503) and a role deleted meanwhile -------------------------

async def test_a_take_back_during_a_delete_count_holds_the_delete_up(admin, monkeypatch):
    """The take-back's own binding: a rotation answered 503 whose stray new key was revoked
    leaves no live key on the role, so a delete's count finds none; the take-back then gives
    the old key back, live and bound to the role, between the count and the delete's script.
    Its bump of the role's counter makes the delete count again, and it finds the key: 409,
    the role stays and the key acts with it."""
    await setup(admin)
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops"}), 201))["key"]
    old = await admin.store.get_key("acme", key["id"])
    new = (await ok(await admin.post(f"{KEYS}/{key['id']}/rotate"), 201))["key"]
    await ok(await admin.post(f"{KEYS}/{new['id']}/revoke"))
    store, count = admin.store, admin.store._role_users

    async def counted_then_taken_back(ws, name):
        found = await count(ws, name)
        monkeypatch.setattr(store, "_role_users", count)
        assert found == 0
        await store._taking_back_until_done("acme", new["id"], old, "operator", "test")
        return found
    monkeypatch.setattr(store, "_role_users", counted_then_taken_back)
    refused = await admin.delete(f"{ROLES}/ops")
    assert refused.status == 409, await refused.json()
    assert "still used by 1 key " in (await refused.json())["error"]["message"]
    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert (read["status"], read["role"], read["scopes"]) == ("active", "ops", ["ops:run"])


async def a_key_on_ops_rotated(admin, grace: int) -> tuple[dict, Any, dict]:
    """Workspace acme with role ops, a key on it and that key rotated with ``grace``: (the
    key as created, its record before the rotation, the key the rotation made)."""
    await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "Acme"}), 201)
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops"}), 201))["key"]
    old = await admin.store.get_key("acme", key["id"])
    rotated = (await ok(await admin.post(f"{KEYS}/{key['id']}/rotate",
                                         json={"grace_seconds": grace}), 201))["key"]
    return key, old, rotated


@pytest.mark.parametrize("grace", [0, 60])
async def test_a_take_back_does_not_give_back_a_key_bound_to_a_role_deleted_meanwhile(
        admin, caplog, grace):
    """A rotation answered 503 is taken back once the store answers: the new key (whose token
    nobody got) goes and the old key is given back as it was. Meanwhile an operator may have
    revoked the stray new key and deleted the role (nothing live held it up: the old key was
    revoked, or past its grace). The take-back then made the old key active again bound to a
    role nothing defines: a live key the delete never counted, with no scopes, that a later
    `PUT roles/ops` would silently arm with whatever scopes it gets. Now the old key is left
    as the rotation left it (revoked, or expired at the grace's end), the new key still goes,
    and the log says why."""
    key, old, rotated = await a_key_on_ops_rotated(admin, grace)
    # (its answer, say, was lost: the caller saw 503.) An operator revokes the stray key...
    await ok(await admin.post(f"{KEYS}/{rotated['id']}/revoke"))
    admin.clock.now += grace + 1  # (past the grace: the old key no longer holds the role)
    await ok(await admin.delete(f"{ROLES}/ops"))  # ... and deletes the role
    await admin.store._taking_back_until_done("acme", rotated["id"], old, "operator", "test")

    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert read["status"] == ("revoked" if grace == 0 else "expired"), read
    assert read["role"] == "ops" and read["scopes"] == []
    gone = await admin.get(f"{KEYS}/{rotated['id']}")
    assert gone.status == 404  # the new key is taken back all the same
    assert "was not given back" in caplog.text and "'ops'" in caplog.text
    audit = (await ok(await admin.get("/admin/v1/workspaces/acme/audit")))["items"][0]
    assert audit["action"] == "key.rotate.undone"
    assert audit["details"]["old_key"].startswith("not given back: its role was deleted")
    # the role defined again: the old key gains nothing
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ALL"]}))
    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert read["status"] != "active"


@pytest.mark.parametrize("grace", [0, 60])
async def test_a_take_back_does_not_give_back_a_key_whose_role_was_deleted_and_defined_again(
        admin, caplog, grace):
    """As above, but the role's name is defined again before the take-back runs, now as an
    admin role: `DELETE roles/ops` (200: the old key revoked or past its grace, the new one
    revoked) then `PUT roles/ops {"scopes": ["ALL"]}`. The take-back checked only that a role
    of that name existed: it gave the old key back active with scopes ALL, a key nobody had
    bound to that role and no delete had counted. A delete of the role now bumps its delete
    generation, the rotation records the generation it saw on the old key, and the take-back
    gives the key back only while it is unchanged."""
    key, old, rotated = await a_key_on_ops_rotated(admin, grace)
    await ok(await admin.post(f"{KEYS}/{rotated['id']}/revoke"))  # the stray key revoked
    admin.clock.now += grace + 1
    await ok(await admin.delete(f"{ROLES}/ops"))
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ALL"]}))  # the name re-used
    await admin.store._taking_back_until_done("acme", rotated["id"], old, "operator", "test")

    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert read["status"] == ("revoked" if grace == 0 else "expired"), read
    assert (await admin.get(f"{KEYS}/{rotated['id']}")).status == 404
    assert "was not given back" in caplog.text
    audit = (await ok(await admin.get("/admin/v1/workspaces/acme/audit")))["items"][0]
    assert audit["details"]["old_key"].startswith("not given back: its role was deleted")


async def test_a_take_back_gives_back_a_key_whose_role_was_only_edited_meanwhile(admin):
    """The delete generation moves only on a delete: a role edited (PUT) between the rotation
    and its take-back, or another role deleted, leaves the old key to be given back."""
    await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "Acme"}), 201)
    for role in ("ops", "dev"):
        await ok(await admin.put(f"{ROLES}/{role}", json={"scopes": [f"{role}:run"]}))
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops"}), 201))["key"]
    old = await admin.store.get_key("acme", key["id"])
    rotated = (await ok(await admin.post(f"{KEYS}/{key['id']}/rotate"), 201))["key"]
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run", "ops:read"]}))
    await ok(await admin.delete(f"{ROLES}/dev"))
    await admin.store._taking_back_until_done("acme", rotated["id"], old, "operator", "test")
    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert (read["status"], read["scopes"]) == ("active", ["ops:run", "ops:read"]), read


async def test_a_take_back_gives_back_a_key_whose_deleted_role_a_configured_one_takes_over(
        admin):
    """A workspace role that shadows a configured one may be deleted with keys on it (they
    fall back to the configured role's scopes): a take-back gives such a key back as before."""
    await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "Acme"}), 201)
    await ok(await admin.put(f"{ROLES}/reader", json={"scopes": ["notes:read"]}))
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "reader"}), 201))["key"]
    old = await admin.store.get_key("acme", key["id"])
    rotated = (await ok(await admin.post(f"{KEYS}/{key['id']}/rotate"), 201))["key"]
    await ok(await admin.delete(f"{ROLES}/reader"))
    await admin.store._taking_back_until_done("acme", rotated["id"], old, "operator", "test")
    read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
    assert (read["status"], read["scopes"]) == ("active", ["people:read"]), read
    assert (await admin.get(f"{KEYS}/{rotated['id']}")).status == 404


# --- a key listing read in steps, and rotations meanwhile -----------------------------------------

async def test_a_listing_during_rotations_never_shows_a_rotated_key_revoked_without_its_successor(
        admin, monkeypatch):
    """A listing reads the workspace's keys a step at a time (SSCAN), so it is no one snapshot:
    a key rotated while it ran could be read revoked (its step came after the rotation) while
    the new key, added behind the scan's cursor, was never read -- the listing showed the
    integration's key revoked and no replacement. Likewise a key rotated between the steps and
    the read of the page's records. A rotated key shown revoked now always comes with the key
    that replaced it."""
    await setup(admin)
    store, run = admin.store, admin.store._run
    olds = [(await ok(await admin.post(KEYS, json={"name": f"r{i}", "scopes": ["a:b"]}),
                      201))["key"]["id"] for i in range(12)]
    successors: dict[str, str] = {}
    steps: list[set] = []
    when = {"at": 1}  # rotate after this many steps (0: after the last one)

    async def rotate_pending(seen: set) -> None:
        for old in olds:
            if old not in seen and old not in successors:
                made = await store.rotate_key("acme", old)
                successors[old] = made[1].key.id

    async def stepping(name, keys, args, **kw):
        reply = await run(name, keys, args, **kw)
        if name == "list_keys":
            steps.append({row[0] for row in json.loads(reply[1])})
            last = str(reply[0]) == "0"
            if (when["at"] and len(steps) == when["at"] and not last) or (
                    not when["at"] and last):
                await rotate_pending(set().union(*steps) if when["at"] else set())
        return reply
    monkeypatch.setattr(store, "_run", stepping)

    for at in (1, 0):  # mid-scan, then between the scan and the page's records
        when["at"], successors = at, {}
        steps.clear()
        listed = {k["id"]: k for k in (await ok(await admin.get(KEYS)))["items"]}
        assert successors, "no rotation ran during the listing"
        for old, new in successors.items():
            if old in listed and listed[old]["status"] == "revoked":
                assert new in listed, (at, old, new)
        olds = list(successors.values())  # the next round rotates these
    monkeypatch.setattr(store, "_run", run)


async def key_on_ops_expiring_and_a_replica_behind(admin, redis_url) -> tuple[dict, float, Any]:
    """A key on role ops expiring in 60 s (the admin client's clock), that moment, and another
    replica's store on the same Redis whose clock reads 1 s before it (close it when done)."""
    from gateway.models import rfc3339
    expires = admin.clock.now + 60
    key = (await ok(await admin.post(KEYS, json={"name": "k", "role": "ops",
                                                 "expires_at": rfc3339(expires)}), 201))["key"]
    behind = Clock()
    behind.now = expires - 1
    return key, expires, await Store.connect(redis_url, cheap_config(), clock=behind)


async def test_a_key_re_dated_by_a_replica_whose_clock_is_behind_still_holds_a_delete_up(
        admin, monkeypatch, redis_url):
    """Replicas' clocks differ a little. A key bound to the role expires at T; the replica
    deleting the role counts at T+1 (expired: not counted), and another replica, its clock at
    T-1, gives the key a new expiry meanwhile. Judged by its own clock the key was still
    active, so the re-dating bumped nothing, the delete went ahead, and the key lived on bound
    to a role nothing defines. Re-dating a key bound to a role now always bumps that role's
    counter (it is never a binding to another role, so it starves no other delete)."""
    await setup(admin)
    key, expires, other = await key_on_ops_expiring_and_a_replica_behind(admin, redis_url)
    try:
        admin.clock.now = expires + 1
        store, count = admin.store, admin.store._role_users

        async def counted_then_re_dated(ws, name):
            found = await count(ws, name)
            monkeypatch.setattr(store, "_role_users", count)
            await other.update_key("acme", key["id"], expires_at=expires + 3600)
            return found
        monkeypatch.setattr(store, "_role_users", counted_then_re_dated)
        refused = await admin.delete(f"{ROLES}/ops")
        assert refused.status == 409, await refused.json()
        read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
        assert (read["status"], read["scopes"]) == ("active", ["ops:run"])
    finally:
        await other.close()


async def test_a_key_re_dated_after_its_roles_delete_by_a_replica_whose_clock_is_behind_is_refused(
        admin, redis_url):
    """The same skew the other way round: the deleting replica, its clock at T+1, counts the
    key (expiring at T) as expired and deletes the role (200); then the replica whose clock is
    at T-1 gives the key a new expiry. Judged by its own clock the key was still active, and
    the 'no such role' check ran only for a key it found expired: the PATCH was accepted and
    the key lived on bound to a role nothing defines (no scopes; a later `PUT roles/ops` armed
    it with whatever scopes that got). A new expiry for a key whose role neither the
    workspace nor the config defines is now refused whatever the replica's clock says."""
    from gateway.errors import Conflict
    from gateway.models import rfc3339
    await ok(await admin.post("/admin/v1/workspaces", json={"id": "acme", "name": "Acme"}), 201)
    await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ops:run"]}))
    key, expires, other = await key_on_ops_expiring_and_a_replica_behind(admin, redis_url)
    try:
        admin.clock.now = expires + 1
        await ok(await admin.delete(f"{ROLES}/ops"))  # expired by this replica's clock
        with pytest.raises(Conflict, match="'ops'"):
            await other.update_key("acme", key["id"], expires_at=expires + 3600)
        with pytest.raises(Conflict, match="'ops'"):
            await other.update_key("acme", key["id"], expires_at=None)
        await ok(await admin.put(f"{ROLES}/ops", json={"scopes": ["ALL"]}))
        read = await ok(await admin.get(f"{KEYS}/{key['id']}"))
        assert read["status"] == "expired", read
        assert read["expires_at"] == rfc3339(expires)
        # re-roled in the same change, it is re-dated
        await other.update_key("acme", key["id"], expires_at=expires + 3600, role="reader")
    finally:
        await other.close()


def summary_scans(admin, monkeypatch) -> list:
    """The sizes of the listing's reads of a few keys' summaries (``_summaries_of``) and, in
    [0], how many full scans (``list_key_summaries``) ran, as they come."""
    store = admin.store
    scans, reads = [0], []
    scan, read = store.list_key_summaries, store._summaries_of

    async def scanning(ws):
        scans[0] += 1
        return await scan(ws)

    async def reading(ws, key_ids):
        reads.append(len(key_ids))
        return await read(ws, key_ids)
    monkeypatch.setattr(store, "list_key_summaries", scanning)
    monkeypatch.setattr(store, "_summaries_of", reading)
    return [scans, reads]


async def test_a_status_listing_under_a_stream_of_revokes_shows_only_keys_of_that_status(
        admin, monkeypatch):
    """A tenant's cleanup revokes keys one by one (one every ~2 ms) while `?status=active`
    lists 1,500 keys: a page key revoked between the scan and its record's read made the
    listing scan the whole workspace again, up to 3 times, and the last try was answered as it
    was, revoked keys and all. The page is now judged again on the records it read (a changed
    key's summary and a rotation's successor re-read, not the whole workspace), and filtered
    on those records: one scan per listing, and no revoked key in an active listing."""
    await setup(admin)
    ids = [f"f{i:011d}" for i in range(FILLED)]
    scans, reads = summary_scans(admin, monkeypatch)
    stop, revoked = asyncio.Event(), [0]

    async def revoker() -> None:
        for key_id in ids:
            if stop.is_set():
                return
            await admin.store.revoke_key("acme", key_id)
            revoked[0] += 1
            await asyncio.sleep(0.002)
    task = asyncio.create_task(revoker())
    during = []
    try:
        await asyncio.sleep(0.01)
        for _ in range(3):
            scans[0], before = 0, revoked[0]
            body = await ok(await admin.get(KEYS + "?status=active"))
            during.append(revoked[0] - before)
            bad = [k["id"] for k in body["items"] if k["status"] != "active"]
            assert not bad, (len(bad), len(body["items"]))
            assert scans[0] == 1, scans
    finally:
        stop.set()
        await task
    assert min(during) >= 3, during  # the revokes really ran while each listing was read


async def test_a_rotated_key_whose_successor_was_deleted_costs_a_listing_nothing(
        admin, monkeypatch):
    """300 keys rotated long ago whose new keys were then revoked and deleted (a cleanup): each
    old key keeps its 'rotated_to' mark naming a key that no longer exists, and every listing,
    `?limit=10` too, read those 300 ids again in one unchunked pipeline, forever. A listing now
    looks for the successor only of a key revoked since shortly before the listing began (a
    rotation during its read), and reads them in chunks."""
    await setup(admin)
    store = admin.store
    news = []
    for i in range(300):
        news.append((await store.rotate_key("acme", f"f{i:011d}"))[1].key.id)
    for new in news:
        await store.revoke_key("acme", new)
        await store.delete_key("acme", new)
    assert admin.redis.hget(key_key("acme", "f00000000000"), "rotated_to") == news[0]
    admin.clock.now += 3600  # later
    scans, reads = summary_scans(admin, monkeypatch)
    for query in ("?limit=10", "?status=active&limit=10", ""):
        reads.clear()
        await ok(await admin.get(KEYS + query))
        assert sum(reads) == 0, (query, reads)
