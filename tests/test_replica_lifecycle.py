"""A key's lifecycle seen from several gateway replicas on one real Redis, and across time
boundaries: every change made through one replica's admin API acts on the very next request at
another replica that has the key verified and cached; expiry, rotation grace and deletion act
at the instant they should, whichever replica answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime

from harness import Clock, bearer, gateway_under_test, make_config


async def call(g, token: str, method: str = "GET", path: str = "/people/1"
               ) -> tuple[int, str | None]:
    async with g.proxy.request(method, path, headers=bearer(token), json=None) as r:
        body = await r.read()
        return r.status, json.loads(body)["error"]["code"] if r.status >= 400 else None


@contextlib.asynccontextmanager
async def replicas(redis_url, upstream, monkeypatch, n: int = 2, clock=None,
                   plan: str = "starter", **config):
    """``n`` gateways on one Redis, each with its own caches; one workspace ``acme``."""
    cfg = make_config(str(upstream.make_url("")), **config)
    kw = {"clock": clock} if clock is not None else {}
    async with contextlib.AsyncExitStack() as stack:
        gs = [await stack.enter_async_context(gateway_under_test(cfg, redis_url, monkeypatch,
                                                                 **kw)) for _ in range(n)]
        await gs[0].workspace(plan=plan)
        yield gs


async def cached_at(gs, token: str) -> None:
    for g in gs:
        assert await call(g, token) == (200, None)


# --- deletion ------------------------------------------------------------------------------

async def test_a_deleted_keys_token_is_answered_alike_where_it_was_cached_as_revoked_or_not(
        redis_url, upstream, monkeypatch):
    """SPEC: DELETE removes a revoked or expired key from listings; its token is answered as
    before (``revoked_key``), never as an unknown key's failed guess, and alike at every
    replica: one that had seen it revoked (its entry re-read, not answered from the cache
    alone) and one that never verified it (its cache dropped here)."""
    async with replicas(redis_url, upstream, monkeypatch) as (a, b):
        token, key = await a.key()
        await cached_at((a, b), token)
        await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        for g in (a, b):
            assert await call(g, token) == (401, "revoked_key")
        async with a.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
            assert r.status == 200
        b.gw.pipeline.auth.cache.clear()
        for g in (a, b, a, b):
            assert await call(g, token) == (401, "revoked_key")



async def test_a_key_cached_as_revoked_is_503_while_the_store_is_down_never_401(
        own_redis, upstream, monkeypatch):
    """The store cannot confirm the key still exists (it may have been deleted: invalid_key),
    so its state is not confirmed: 503, as SPEC's fail-closed rule says. (The store comes back
    empty, no persistence in this test: the key is gone, and the cache does not hold on to it.)"""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace()
        token, key = await g.key()
        await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert await call(g, token) == (401, "revoked_key")
        own_redis.stop()
        try:
            assert await call(g, token) == (503, "store_unavailable")
        finally:
            own_redis.start()
        assert await call(g, token) == (401, "invalid_key")

async def test_a_change_made_after_the_store_is_restored_from_a_backup_acts_where_it_was_cached(
        own_redis, upstream, monkeypatch):
    """Redis restored from a backup (a snapshot, then a restart on it) loses the changes made
    after the snapshot, revs included. The next change wrote the rev a replica had cached for
    a lost one: the replica took its cache as current and admitted a key revoked after the
    restore, until ``cache_ttl`` ran out."""
    import redis
    async with replicas(own_redis.url, upstream, monkeypatch) as (a, b):
        token, key = await a.key(scopes=["people:read", "companies:read"])
        kid = f"/workspaces/acme/keys/{key['id']}"
        redis.Redis.from_url(own_redis.url).save()  # the backup
        status, _ = await a.admin_json("PATCH", kid, {"scopes": ["people:read"]})
        assert status == 200
        await cached_at((a, b), token)  # cached as the patched key
        own_redis.stop()
        own_redis.start()  # restored: the patch is lost
        status, _ = await a.admin_json("POST", f"{kid}/revoke")
        assert status == 200
        for g in (a, b):
            assert await call(g, token) == (401, "revoked_key")


# --- every change made at one replica, seen at the next request at another ------------------

async def test_each_key_workspace_and_role_change_at_one_replica_acts_at_the_next_request_at_another(
        redis_url, upstream, monkeypatch):
    async with replicas(redis_url, upstream, monkeypatch) as (a, b):
        token, key = await a.key(scopes=["people:read"])
        kid = f"/workspaces/acme/keys/{key['id']}"
        await cached_at((a, b), token)

        async def change(method, path, body=None, ok=(200, 201, 204)):
            status, got = await a.admin_json(method, path, body)
            assert status in ok, got

        # re-scope, both ways
        await change("PATCH", kid, {"scopes": ["companies:read"]})
        assert await call(b, token) == (403, "insufficient_scope")
        await change("PATCH", kid, {"scopes": ["people:read"]})
        assert await call(b, token) == (200, None)
        # re-role: bound to the configured "editor" role
        assert await call(b, token, "POST", "/people") == (403, "insufficient_scope")
        await change("PATCH", kid, {"role": "editor"})
        assert await call(b, token, "POST", "/people") == (200, None)
        # a workspace role shadowing the configured one, then deleted: the configured again
        await change("PUT", "/workspaces/acme/roles/editor", {"scopes": ["people:read"]})
        assert await call(b, token, "POST", "/people") == (403, "insufficient_scope")
        await change("DELETE", "/workspaces/acme/roles/editor")
        assert await call(b, token, "POST", "/people") == (200, None)
        # IP allow-list
        await change("PATCH", kid, {"allowed_ips": ["10.0.0.0/8"]})
        assert await call(b, token) == (403, "ip_not_allowed")
        await change("PATCH", kid, {"allowed_ips": None})
        assert await call(b, token) == (200, None)
        # the key's own monthly cap, at exactly what it used
        _, read = await a.admin_json("GET", kid)
        await change("PATCH", kid, {"monthly_requests": read["used_this_month"]})
        assert await call(b, token) == (429, "key_quota_exceeded")
        await change("PATCH", kid, {"monthly_requests": None})
        assert await call(b, token) == (200, None)
        # the workspace's plan, and its own limits over the plan
        used = await a.used()
        await change("PATCH", "/workspaces/acme", {"plan": "tiny"})  # 3 a month
        assert used >= 3 and await call(b, token) == (429, "quota_exceeded")
        await change("PATCH", "/workspaces/acme", {"limits": {"monthly_requests": used + 1}})
        assert await call(b, token) == (200, None)
        assert await call(b, token) == (429, "quota_exceeded")
        await change("PATCH", "/workspaces/acme", {"limits": None, "plan": "starter"})
        assert await call(b, token) == (200, None)
        # rate limit on the key
        await change("PATCH", kid, {"rate_limit": "1/m"})
        assert await call(b, token) == (200, None)
        assert await call(b, token) == (429, "rate_limited")
        await change("PATCH", kid, {"rate_limit": None})
        assert await call(b, token) == (200, None)
        # rotation without a grace revokes the old key at once; the new one works everywhere
        status, rotated = await a.admin_json("POST", f"{kid}/rotate")
        assert status == 201
        assert await call(b, token) == (401, "revoked_key")
        assert await call(b, rotated["token"]) == (200, None)


# --- time ----------------------------------------------------------------------------------

async def test_a_cached_key_expires_at_its_instant_at_every_replica(redis_url, upstream,
                                                                   monkeypatch):
    clock = Clock("2026-06-30T12:00:00")
    async with replicas(redis_url, upstream, monkeypatch, clock=clock) as (a, b):
        token, key = await a.key(expires_in=60)
        assert key["expires_at"] == "2026-06-30T12:01:00Z"
        await cached_at((a, b), token)
        clock.now += 59.999
        await cached_at((a, b), token)
        _, read = await a.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert read["status"] == "active"
        clock.now += 0.001
        for g in (a, b):
            assert await call(g, token) == (401, "expired_key")
        _, read = await b.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert read["status"] == "expired"


async def test_a_rotations_grace_ends_at_its_instant_at_every_replica(redis_url, upstream,
                                                                     monkeypatch):
    clock = Clock("2026-06-30T12:00:00")
    async with replicas(redis_url, upstream, monkeypatch, clock=clock) as (a, b):
        token, key = await a.key()
        await cached_at((a, b), token)
        status, rotated = await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                             {"grace_seconds": 30})
        assert status == 201, rotated
        await cached_at((a, b), token)
        await cached_at((a, b), rotated["token"])
        clock.now += 29.999
        await cached_at((b, a), token)
        clock.now += 0.001
        for g in (b, a):
            assert await call(g, token) == (401, "expired_key")
            assert await call(g, rotated["token"]) == (200, None)


async def test_the_month_turns_over_at_the_same_instant_at_every_replica(redis_url, upstream,
                                                                        monkeypatch):
    """The last second of a leap February, then the first of March: the quota starts over
    at both replicas at midnight UTC, and the RateLimit fields give each month's own length."""
    clock = Clock("2028-02-29T23:59:59")
    async with replicas(redis_url, upstream, monkeypatch, clock=clock) as (a, b):
        await a.admin_json("PATCH", "/workspaces/acme", {"plan": "tiny"})
        token, _ = await a.key()
        for g, want in ((a, 200), (b, 200), (a, 200), (b, 429), (a, 429)):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == want
                assert r.headers["RateLimit-Policy"] == f'"monthly";q=3;w={29 * 86400}'
                assert r.headers["RateLimit"].endswith(";t=1")
        clock.now += 0.999
        assert await call(b, token) == (429, "quota_exceeded")
        clock.now += 0.001  # 2028-03-01T00:00:00Z
        for g, left in ((b, 2), (a, 1), (b, 0)):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200
                assert r.headers["RateLimit-Policy"] == f'"monthly";q=3;w={31 * 86400}'
                assert r.headers["RateLimit"] == f'"monthly";r={left};t={31 * 86400}'
        assert await call(a, token) == (429, "quota_exceeded")
        _, usage = await a.admin_json("GET", "/workspaces/acme/usage")
        assert (usage["period"], usage["used"], usage["resets_at"]) == \
            ("2028-03", 3, "2028-04-01T00:00:00Z")


# --- concurrency -----------------------------------------------------------------------------

async def test_a_keys_rate_limit_is_shared_exactly_by_three_replicas(redis_url, upstream,
                                                                    monkeypatch):
    async with replicas(redis_url, upstream, monkeypatch, n=3) as gs:
        token, _ = await gs[0].key(rate_limit="4/m")
        results = await asyncio.gather(*(call(g, token) for g in gs for _ in range(5)))
        assert results.count((200, None)) == 4, results
        assert results.count((429, "rate_limited")) == 11
        assert len(upstream.requests) == 4


async def test_no_request_that_arrives_after_a_revocation_answered_is_admitted_anywhere(
        redis_url, upstream, monkeypatch):
    async with replicas(redis_url, upstream, monkeypatch, plan="unlimited") as (a, b):
        token, key = await a.key()
        await cached_at((a, b), token)
        revoked = asyncio.Event()
        late: list[tuple[int, str | None]] = []

        async def hammer(g) -> None:
            while True:
                after = revoked.is_set()
                got = await call(g, token)
                if after:
                    late.append(got)
                    if len(late) >= 20:
                        return

        load = [asyncio.ensure_future(hammer(g)) for g in (a, b, a, b)]
        await asyncio.sleep(0.1)
        status, _ = await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200
        revoked.set()
        await asyncio.gather(*load)
        assert set(late) == {(401, "revoked_key")}


async def test_a_key_expires_at_the_instant_its_expires_at_shows(redis_url, upstream,
                                                                monkeypatch):
    """Timestamps are shown to the second. An expiry set from a clock between two seconds
    (``expires_in``, a rotation's grace, an ``expires_at`` with a fraction) was kept with its
    fraction: shown as 12:01:00Z, the key still worked, and read ``active``, until 12:01:00.7."""
    clock = Clock("2026-06-30T12:00:00")
    clock.now += 0.7
    async with replicas(redis_url, upstream, monkeypatch, clock=clock) as (a, b):
        token, key = await a.key(expires_in=60)
        rotating, old = await a.key(name="rotating")
        fraction, frac = await a.key(name="fraction", expires_at="2026-06-30T12:01:00.5Z")
        status, rotated = await a.admin_json("POST", f"/workspaces/acme/keys/{old['id']}/rotate",
                                             {"grace_seconds": 60})
        assert status == 201, rotated
        for t in (token, rotating, fraction):
            await cached_at((a, b), t)
        kids = (key["id"], old["id"], frac["id"])
        shown = set()
        for kid in kids:
            _, read = await a.admin_json("GET", f"/workspaces/acme/keys/{kid}")
            shown.add(read["expires_at"])
        assert shown == {"2026-06-30T12:01:00Z"}
        clock.set("2026-06-30T12:01:00")  # the instant every one of them shows
        for g in (a, b):
            for t in (token, rotating, fraction):
                assert await call(g, t) == (401, "expired_key")
        for kid in kids:
            _, read = await b.admin_json("GET", f"/workspaces/acme/keys/{kid}")
            assert read["status"] == "expired"


async def test_rotating_again_and_again_keeps_a_keys_lifetime_to_the_second(redis_url, upstream,
                                                                           monkeypatch):
    clock = Clock("2026-06-30T12:00:00")
    clock.now += 0.7
    async with replicas(redis_url, upstream, monkeypatch, n=1, clock=clock) as (a,):
        _, key = await a.key(expires_in=3600)
        for _ in range(5):
            clock.now += 10.6
            status, body = await a.admin_json(
                "POST", f"/workspaces/acme/keys/{key['id']}/rotate")
            assert status == 201, body
            key = body["key"]
            made = datetime.fromisoformat(key["created_at"].replace("Z", "+00:00"))
            ends = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
            assert (ends - made).total_seconds() == 3600
