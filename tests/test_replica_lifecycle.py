"""A key's lifecycle seen from several gateway replicas on one real Redis, and across time
boundaries: every change made through one replica's admin API acts on the very next request at
another replica that has the key verified and cached; expiry, rotation grace and deletion act
at the instant they should, whichever replica answers."""

from __future__ import annotations

import contextlib
import json

from harness import bearer, gateway_under_test, make_config


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

async def test_a_deleted_keys_token_is_invalid_key_even_where_it_was_cached_as_revoked(
        redis_url, upstream, monkeypatch):
    """SPEC: a deleted key's token reads as unknown. A replica that had already seen it
    revoked answered ``revoked_key`` from its cache for as long as the verification stayed
    cached, while every other replica answered ``invalid_key``."""
    async with replicas(redis_url, upstream, monkeypatch) as (a, b):
        token, key = await a.key()
        await cached_at((a, b), token)
        await a.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        for g in (a, b):
            assert await call(g, token) == (401, "revoked_key")
        async with a.admin.delete(f"/admin/v1/workspaces/acme/keys/{key['id']}") as r:
            assert r.status == 200
        for g in (a, b):
            assert await call(g, token) == (401, "invalid_key")

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
