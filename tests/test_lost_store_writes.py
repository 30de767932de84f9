"""Writes keygate defers until Redis answers again, landing on a Redis that lost keygate's data
(restarted without persistence, FLUSHDB, an older backup restored): the fail-open ledger's
counts and take-backs, refunds, rate take-backs, and the Sentinel recount.

They must not create counters for a workspace (or key) the store no longer holds: a workspace
created again with the same id would start its month with another's usage, and the stray
counters would stay behind. Real redis-server processes and the real gateway, loopback only."""

from __future__ import annotations

import asyncio
import logging

import redis

from gateway.config import StoreConfig
from gateway.store.keyspace import key_key, rate_key, write_key, ws_key
from gateway.store.request import (ALREADY, DAILY_TTL, NO_KEY, NO_WORKSPACE, RECOUNT,
                                   WRITTEN, RequestStore, Slot)

from harness import bearer, eventually, gateway_under_test, make_config


def _stored(url: str, ws: str) -> list[bytes]:
    """Every key of workspace ``ws`` in the store (its hash tag)."""
    client = redis.Redis.from_url(url)
    try:
        return sorted(client.scan_iter(f"*{{{ws}}}*"))
    finally:
        client.close()


async def _all_200(g, token: str, n: int) -> None:
    for _ in range(n):
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200, await r.text()


async def test_counts_held_while_redis_was_down_are_not_written_for_a_workspace_it_lost(
        upstream, own_redis, monkeypatch, caplog):
    """Served under on_store_error: open while Redis is down, then Redis comes back from an
    older backup that holds 'beta' but not 'acme'. The ledger wrote acme's held counts all the
    same: its month, day and key counters appeared for a workspace that no longer existed, and
    acme created again started its month 3 requests in. Now acme's counts are dropped (one
    error line with their number), beta's are written exactly once, and acme created again
    starts at 0."""
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.5, on_store_error="open"))
    async with gateway_under_test(config, own_redis.url, monkeypatch, ledger_retry=0.05) as g:
        await g.workspace("beta", plan="unlimited")
        beta, _ = await g.key("beta")
        await _all_200(g, beta, 1)
        redis.Redis.from_url(own_redis.url).save()  # the backup: beta, not yet acme
        await g.workspace("acme", plan="unlimited")
        acme, _ = await g.key("acme")
        await _all_200(g, acme, 1)
        own_redis.stop()
        with caplog.at_level(logging.INFO, logger="keygate"):
            await _all_200(g, acme, 3)  # fail-open: counted in this process's ledger
            await _all_200(g, beta, 2)
            assert g.gw.pipeline.ledger
            own_redis.start()  # the backup restored: acme is gone
            assert await eventually(lambda: not g.gw.pipeline.ledger)
            await asyncio.sleep(0.3)  # the ledger's next attempts write nothing more
        assert _stored(own_redis.url, "acme") == []
        assert await g.used("beta") == 3  # 1 before the outage, 2 held: each once
        dropped = [r.getMessage() for r in caplog.records
                   if r.levelno >= logging.ERROR and "written to the usage" in r.getMessage()]
        assert len(dropped) == 1, caplog.text
        assert "3 requests" in dropped[0] and "acme" in dropped[0] and "lost" in dropped[0]
        await g.workspace("acme", plan="unlimited")  # created again, same id
        assert await g.used("acme") == 0
        acme, _ = await g.key("acme")
        await _all_200(g, acme, 1)
        assert await g.used("acme") == 1 and await g.used("beta") == 3


LONG_AGO = 1_700_000_000.0  # (2023) when the workspaces of these tests were created


def _make(r: redis.Redis, ws: str, key_id: str | None = None, *,
          created: float = LONG_AGO) -> None:
    """A workspace and a key of it, as the stored hashes the scripts look at (created_at as
    the admin API writes it, lua/_held_for.lua reads it)."""
    r.hset(ws_key(ws), mapping={"id": ws, "rev": "1", "created_at": f"{created:.3f}"})
    if key_id is not None:
        r.hset(key_key(ws, key_id), mapping={"id": key_id, "workspace": ws, "rev": "1",
                                              "created_at": f"{created:.3f}"})


async def test_deferred_writes_create_nothing_for_a_workspace_or_key_the_store_lost(
        redis_url) -> None:
    """Each deferred write run on a store that lost the workspace: nothing is created. A refund
    or a ledger take-back made a counter of 0 (never below) with a TTL, a ledger count made all
    four counters. With only the key gone (deleted meanwhile), the workspace's month and day
    get the count (the requests were forwarded), and no counter of the key is made."""
    r = redis.Redis.from_url(redis_url)
    store = RequestStore(redis_url, timeout=1.0)
    try:
        lost = Slot("gone", "k1", "2026-11", "2026-11-18", "k1")
        await store.refund(lost, 60, "m1")
        await store.take_back_rate(lost, "m1")
        assert await store.add_usage(lost, 4, 60, "w-1") == NO_WORKSPACE
        assert await store.add_usage(lost, -2, 60, "w-2") == NO_WORKSPACE  # takes nothing
        assert _stored(redis_url, "gone") == []

        _make(r, "half")  # the key alone is gone
        half = Slot("half", "k1", "2026-11", "2026-11-18", "k1")
        assert await store.add_usage(half, 4, 60, "w-3") == NO_KEY
        month, _, day, _ = half.counters()
        assert _stored(redis_url, "half") == sorted(
            k.encode() for k in (ws_key("half"), month, day, write_key("half", "w-3")))
        assert (int(r.get(month)), int(r.get(day))) == (4, 4)

        _make(r, "here", "k1")  # both there: counted once, taken back once, never below 0
        here = Slot("here", "k1", "2026-11", "2026-11-18", "k1")
        assert await store.add_usage(here, 4, 60, "w-4") == WRITTEN
        assert await store.add_usage(here, 4, 60, "w-4") == ALREADY  # a copy
        await store.refund(here, 60)
        assert [int(r.get(c)) for c in here.counters()] == [3, 3, 3, 3]
        assert await store.add_usage(here, -5, 60, "w-5") == WRITTEN
        assert [int(r.get(c)) for c in here.counters()] == [0, 0, 0, 0]
        assert 0 < r.ttl(write_key("here", "w-4"))
    finally:
        await store.close()
        r.close()


def test_a_recount_on_a_new_master_that_lost_the_workspace_counts_nothing(redis_url) -> None:
    """Sentinel: the requests counted on the old master whose markers the new one lacks are
    counted there again. A new master that lost the workspace got its counters made all the
    same; now it gets nothing, and the recount says how many it dropped."""
    r = redis.Redis.from_url(redis_url)
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    markers = [f"kg:once:{{acme}}:recount:{i}" for i in range(3)]
    keys = [*slot.counters(), ws_key("acme"), key_key("acme", "k1"), key_key("acme", "k1"),
            *markers]
    args = [5000, 3600, 3600, DAILY_TTL, DAILY_TTL, f"{LONG_AGO + 60:.3f}"]
    try:
        assert r.eval(RECOUNT.text, len(keys), *keys, *args) == -3  # dropped, nothing made
        assert _stored(redis_url, "acme") == []
        _make(r, "acme", "k1")
        r.set(markers[0], "1,-1,0,0,1", px=5000)  # this one reached the new master
        assert r.eval(RECOUNT.text, len(keys), *keys, *args) == 2
        assert [int(r.get(c)) for c in slot.counters()] == [2, 2, 2, 2]
        assert r.eval(RECOUNT.text, len(keys), *keys, *args) == 0  # sent again: nothing
        assert rate_key("acme", "k1").encode() not in _stored(redis_url, "acme")
    finally:
        r.close()


async def test_counts_dropped_for_a_lost_store_are_said_once_a_minute_and_at_the_stop(
        redis_url, caplog) -> None:
    """Dropped counts are said as the data-loss line is: one line for a write pass (however
    many slots), then at most once a minute, with the requests dropped meanwhile; the stop
    says what a line is still owed, rather than leaving it unsaid. Requests of a key gone
    (deleted meanwhile) are counted for their workspace: said apart, as information, with no
    word of a workspace created again."""
    from gateway.ledger import LocalLedger
    from gateway.usage import MonthCache
    r = redis.Redis.from_url(redis_url)
    _make(r, "kept")  # its key is gone
    store = RequestStore(redis_url, timeout=1.0)
    ledger = LocalLedger(store, MonthCache(), lambda: 1_795_000_000.0, retry_every=3600)
    slots = [Slot(ws, key_id, "2026-11", "2026-11-18", key_id)
             for ws, key_id in (("gone", "k1"), ("gone", "k2"), ("lost", "k3"), ("kept", "k4"))]

    def said() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if "served while the store was down" in
                rec.getMessage()]

    try:
        with caplog.at_level(logging.INFO, logger="keygate"):
            for slot, n in zip(slots, (2, 1, 1, 1)):
                for _ in range(n):
                    ledger.add(slot)
            ledger.flush()
            await ledger._writer
            lines = said()
            assert [rec.levelno for rec in lines] == [logging.ERROR, logging.INFO], caplog.text
            assert lines[0].getMessage().startswith("4 requests"), lines[0].getMessage()
            assert "not written to the usage" in lines[0].getMessage()
            assert "(and 1 more)" in lines[0].getMessage()  # lost, besides gone
            assert "'kept'" not in lines[0].getMessage()
            assert lines[1].getMessage().startswith("1 request served"), lines[1].getMessage()
            assert "counted for workspace 'kept'" in lines[1].getMessage()
            assert "created again" not in lines[1].getMessage()
            ledger.add(slots[3])  # within the minute: held back ...
            ledger.flush()
            await ledger._writer
            assert len(said()) == 2
            await ledger.close()  # ... and said at the stop
            lines = said()
            assert len(lines) == 3 and lines[2].levelno == logging.INFO, caplog.text
            assert lines[2].getMessage().startswith("1 request served")
            assert "'kept'" in lines[2].getMessage()
        assert _stored(redis_url, "gone") == [] and _stored(redis_url, "lost") == []
        month, _, day, _ = slots[3].counters()
        assert (int(r.get(month)), int(r.get(day))) == (2, 2)
    finally:
        await store.close()
        r.close()


async def test_requests_served_by_a_key_deleted_before_the_flush_still_count_for_its_workspace(
        upstream, own_redis, monkeypatch):
    """SPEC: the monthly counter counts requests that were forwarded. A leaked key's requests
    are served fail-open while this replica cannot reach Redis; the admin rotates it (grace 0:
    revoked now) and deletes the revoked key; the replica's ledger then flushes. The workspace
    still exists, the requests were forwarded, yet the workspace's month usage (and the
    budget counter the rotated key's successor shares) never got them: ledger_write.lua
    dropped the whole write when only the key hash was gone (NO_KEY), and the workspace got
    more than its quota. Now only the deleted key's own day counter is left out."""
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.5, on_store_error="open"))
    async with gateway_under_test(config, own_redis.url, monkeypatch, ledger_retry=3600) as g:
        await g.workspace("acme", plan="unlimited")
        token, key = await g.key("acme")
        await _all_200(g, token, 1)
        redis.Redis.from_url(own_redis.url).save()  # Redis keeps its data across the restart
        own_redis.stop()
        await _all_200(g, token, 3)  # served, counted in this process's ledger
        own_redis.start()
        assert await eventually(redis_up(own_redis.url))
        status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                          {})
        assert status == 201, body
        status, body = await g.admin_json("DELETE", f"/workspaces/acme/keys/{key['id']}")
        assert status in (200, 204), body
        g.gw.pipeline.ledger.flush()
        await g.gw.pipeline.ledger._writer
        assert not g.gw.pipeline.ledger
        assert await g.used("acme") == 4  # 1 before the outage + 3 served during it
        client = redis.Redis.from_url(own_redis.url)
        (budget,) = client.keys(f"kg:kusage:{{acme}}:{key['id']}:*")  # the successor's too
        assert int(client.get(budget)) == 4
        assert client.keys(f"kg:kdaily:{{acme}}:{key['id']}:*") != []  # made before
        client.close()


def redis_up(url: str):
    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.RedisError:
            return False
    return up


async def test_a_take_back_of_a_deleted_keys_request_takes_from_what_its_workspace_got(
        redis_url) -> None:
    """With only the key gone (deleted meanwhile) its +3 were dropped (NO_KEY) and its -1 then
    taken from the workspace's month and day counters, which the other keys' requests made:
    the workspace lost a request it had. Now the +3 go to the workspace's counters and the -1
    comes from there; the gone key's own counters are never made."""
    r = redis.Redis.from_url(redis_url)
    store = RequestStore(redis_url, timeout=1.0)
    try:
        _make(r, "acme", "k2")
        other = Slot("acme", "k2", "2026-11", "2026-11-18", "k2")
        assert await store.add_usage(other, 5, 60, "w-1") == WRITTEN
        gone = Slot("acme", "k1", "2026-11", "2026-11-18", "k1")
        assert await store.add_usage(gone, 3, 60, "w-2") == NO_KEY
        await store.add_usage(gone, -1, 60, "w-3")
        month, _, day, _ = other.counters()
        assert (int(r.get(month)), int(r.get(day))) == (7, 7)
        _, key_month, _, key_day = gone.counters()
        assert not r.exists(key_month, key_day)
    finally:
        await store.close()
        r.close()


def test_a_recount_counts_for_the_workspace_of_a_deleted_key_not_for_one_created_again(
        redis_url) -> None:
    """The recount's requests were forwarded: a key deleted meanwhile leaves them to its
    workspace's month and day (it dropped them all before); a workspace created after they
    were served (the new master lost the old one, and it was created again) gets none."""
    r = redis.Redis.from_url(redis_url)
    slot = Slot("acme", "k1", "2026-01", "2026-01-15", "k1")
    markers = [f"kg:once:{{acme}}:recount:{i}" for i in range(2)]
    keys = [*slot.counters(), ws_key("acme"), key_key("acme", "k1"), key_key("acme", "k1"),
            *markers]
    args = [5000, 3600, 3600, DAILY_TTL, DAILY_TTL]
    try:
        _make(r, "acme", created=LONG_AGO + 3600)  # created an hour after they were served
        assert r.eval(RECOUNT.text, len(keys), *keys, *args, f"{LONG_AGO:.3f}") == -2
        assert _stored(redis_url, "acme") == [ws_key("acme").encode()]
        assert r.eval(RECOUNT.text, len(keys), *keys, *args,
                      f"{LONG_AGO + 7200:.3f}") == 2  # existed before: the key alone is gone
        month, key_month, day, key_day = slot.counters()
        assert (int(r.get(month)), int(r.get(day))) == (2, 2)
        assert not r.exists(key_month, key_day)
    finally:
        r.close()


async def test_a_take_back_after_its_count_was_dropped_leaves_a_recreated_workspace_alone(
        redis_url) -> None:
    """The merge's own motivation: a workspace created again with the same id must not be
    touched by what a replica held for the lost one. The count was dropped (NO_WORKSPACE) but
    a later take-back of one of those requests (counted during the outage, refused after the
    flush: an upload past the body timeout, an unreachable upstream) was written: n < 0 only
    checked that *some* counter existed, and the new workspace's month and day counters did,
    so its usage went down for a request it never had. A take-back now follows the rule of
    the count it takes back (lua/_held_for.lua): nothing for a workspace created after."""
    r = redis.Redis.from_url(redis_url)
    store = RequestStore(redis_url, timeout=1.0)
    try:
        old = Slot("acme", "k1", "2026-11", "2026-11-18", "k1")
        served = LONG_AGO  # when the lost workspace's requests were served
        assert await store.add_usage(old, 3, 60, "w-1", served) == NO_WORKSPACE  # dropped
        # acme created again an hour later; its new key k9 has served 5 requests this month
        _make(r, "acme", "k9", created=served + 3600)
        new = Slot("acme", "k9", "2026-11", "2026-11-18", "k9")
        assert await store.add_usage(new, 5, 60, "w-2", served + 3700) == WRITTEN
        # one of the old workspace's in-flight requests is refused: the ledger takes it back
        assert await store.add_usage(old, -1, 60, "w-3", served) == NO_WORKSPACE
        month, _, day, _ = new.counters()
        assert (int(r.get(month)), int(r.get(day))) == (5, 5)
        assert not r.exists(write_key("acme", "w-3"))
    finally:
        await store.close()
        r.close()


async def test_the_ledger_takes_back_as_of_when_it_counted_not_when_it_takes_back(
        redis_url) -> None:
    """The same through the ledger: its take-back comes after the workspace was created again,
    but carries when the ledger counted in that slot, so it finds the workspace newer and
    takes nothing from it. A count of the new workspace's key goes through meanwhile."""
    from gateway.ledger import LocalLedger
    from gateway.usage import MonthCache
    r = redis.Redis.from_url(redis_url)
    store = RequestStore(redis_url, timeout=1.0)
    now = [1_795_000_000.0]  # 2026-11-18
    ledger = LocalLedger(store, MonthCache(), lambda: now[0], retry_every=3600)
    old = Slot("acme", "k1", "2026-11", "2026-11-18", "k1")
    new = Slot("acme", "k9", "2026-11", "2026-11-18", "k9")
    try:
        for _ in range(3):
            ledger.add(old)  # served fail-open; the store then comes back without acme
        ledger.flush()
        await ledger._writer
        assert _stored(redis_url, "acme") == []
        now[0] += 600
        _make(r, "acme", "k9", created=now[0])  # created again, with a new key
        now[0] += 60
        for _ in range(5):
            ledger.add(new)
        ledger.take_back(old)  # one of the lost workspace's requests is refused
        ledger.flush()
        await ledger._writer
        assert not ledger
        month, _, day, _ = new.counters()
        assert (int(r.get(month)), int(r.get(day))) == (5, 5)
    finally:
        await ledger.close()
        await store.close()
        r.close()


async def test_a_resent_write_that_had_run_answers_already_though_the_workspace_went_since(
        redis_url) -> None:
    """A ledger write whose first run counted (its reply lost: Redis stalled, the connection
    died) is sent again after the workspace's data went (or its key was deleted): the copy was
    judged on what is there now and answered NO_WORKSPACE (NO_KEY), so the ledger said "not
    written to the usage" of requests that were. The write's id is looked at first: ALREADY."""
    r = redis.Redis.from_url(redis_url)
    store = RequestStore(redis_url, timeout=1.0)
    try:
        _make(r, "acme", "k1")
        slot = Slot("acme", "k1", "2026-11", "2026-11-18", "k1")
        assert await store.add_usage(slot, 3, 60, "w-1") == WRITTEN
        r.delete(key_key("acme", "k1"))  # the key deleted meanwhile
        assert await store.add_usage(slot, 3, 60, "w-1") == ALREADY
        r.delete(ws_key("acme"))  # then the workspace's data lost
        assert await store.add_usage(slot, 3, 60, "w-1") == ALREADY
        assert [int(r.get(c)) for c in slot.counters()] == [3, 3, 3, 3]
    finally:
        await store.close()
        r.close()
