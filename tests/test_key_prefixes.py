"""Every key prefix a keygate serves with is recorded in the store (kg:prefixes) and known to
every process: from its start, and within KEY_PREFIXES_EVERY s of another's. A key of an
earlier prefix is still a live secret (its id and secret under the new prefix open the key).
What someone else writes there never stops or slows keygate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp import ClientSession

from gateway.config import load_config
from gateway.tokens import make_token
from harness import bearer, gateway_under_test
from served import TIMEOUT, Served, write_config
from test_reload import config_doc, write

ARGON2 = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
ROUTES = [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
           "scopes": ["people:read"]},
          {"path": "/hooks/**", "methods": ["GET"], "upstream": "api", "public": True}]


def _doc(upstream_url: str, prefix: str, **changes: Any) -> dict[str, Any]:
    return config_doc(upstream_url, server={"host": "127.0.0.1", "port": 18080,
                                            "access_log": "json"},
                      routes=ROUTES, keys={"prefix": prefix, "argon2": ARGON2}, **changes)


def _with_prefix(path: Path, prefix: str) -> None:
    doc = yaml.safe_load(path.read_text())
    doc["keys"]["prefix"] = prefix
    path.write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_starts_when_kg_prefixes_holds_a_member_that_is_not_utf8(
        tmp_path, redis_url, workers):
    """Anyone who can write to the store (another app sharing the Redis, a stray script) puts
    one byte string that is not UTF-8 into kg:prefixes: the admin client decodes replies, the
    UnicodeDecodeError is no StoreError, and ``start_listeners`` raises it. ``keygate serve``
    (every worker, at every restart) dies at start with a traceback, where a member that is
    no prefix is meant to be skipped and a failing store said and gone past. Only what a
    config could write is read from the store (its script filters), never decoded else."""
    with redis.Redis.from_url(redis_url) as r:
        r.zadd("kg:prefixes", {b"old": 1, b"\xff\xfe": 2})
    path, proxy, admin = write_config(tmp_path, redis_url=redis_url)
    served = Served(path, proxy, admin, "--workers", workers)
    try:
        await served.ready()
        old, _ = make_token("old", "live")  # a prefix recorded there is still refused
        async with ClientSession(timeout=TIMEOUT) as s:
            async with s.get(f"{served.proxy}/health?token={old}") as r:
                assert r.status == 400, served.stderr()
    finally:
        served.close()
    assert "Traceback" not in served.stderr(), served.stderr()


async def test_a_reload_to_a_new_prefix_with_a_member_that_is_not_utf8_is_not_a_500(
        tmp_path, upstream, redis_url, monkeypatch):
    """The same member at a reload that changes keys.prefix: ``in_use`` raises the decoding
    error, which the Reloader did not take as a store failure: the reload failed as an
    unexpected error (500)."""
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    write(path, _doc(url, "kg"))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                  config_path=str(path)) as gw:
        with redis.Redis.from_url(redis_url) as r:
            r.zadd("kg:prefixes", {b"\xff\xfe": 1})
        write(path, _doc(url, "xy"))
        status, body = await gw.admin_json("POST", "/reload")
        assert status == 200, body


async def test_a_prefix_a_reload_took_while_the_store_was_down_is_known_after_a_rollback(
        tmp_path, upstream, own_redis, monkeypatch, caplog):
    """A reload from ``kg`` to ``xy`` while the store is down (a failover, a restart) is said
    in the log and goes ahead, and ``xy`` is never recorded: nothing records it once the
    store is back, while that process serves ``xy`` and issues ``xy`` keys. The config is
    then rolled back to ``kg`` with a restart: the new process knows only ``kg``, and a live
    ``xy`` token (its id and secret under ``kg`` open the key) was forwarded in a query and
    passed to a public upstream in Authorization. Each process records its prefix again
    every KEY_PREFIXES_EVERY s (here 0.2), so the store learns it once it answers."""
    from conftest import RedisServer
    from harness import eventually
    import gateway.app
    monkeypatch.setattr(gateway.app, "KEY_PREFIXES_EVERY", 0.2)
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    store = {"timeout": 0.5}
    write(path, _doc(url, "kg", store=store))
    server = own_redis
    try:
        async with gateway_under_test(load_config(path), server.url, monkeypatch,
                                      config_path=str(path)) as gw:
            write(path, _doc(url, "xy", store=store))
            server.stop()
            status, body = await gw.admin_json("POST", "/reload")
            assert status == 200, body
            assert [rec for rec in caplog.records  # (the store failed at the reload, as meant)
                    if "could not read the key prefixes" in rec.getMessage()], caplog.text
            server = RedisServer(server.data_dir, server.port).start()  # back (empty)

            def recorded_xy() -> bool:
                with redis.Redis.from_url(server.url) as r:
                    return r.zscore("kg:prefixes", "xy") is not None
            assert await eventually(recorded_xy, timeout=5)
            await gw.workspace("acme")
            token, _ = await gw.key("acme", scopes=["people:read"])
            assert token.startswith("xy_live_")
        write(path, _doc(url, "kg", store=store))  # the rollback, a restart
        async with gateway_under_test(load_config(path), server.url, monkeypatch,
                                      config_path=str(path)) as gw:
            with redis.Redis.from_url(server.url) as r:
                recorded = r.zrange("kg:prefixes", 0, -1)
            async with gw.proxy.get(f"/hooks/x?token={token}") as r:
                assert r.status == 400, (r.status, recorded)
            async with gw.proxy.get("/hooks/x", headers=bearer(token)) as r:
                assert r.status == 200
            seen = {k.lower(): v for k, v in upstream.requests[-1]["headers"]}
            assert "authorization" not in seen, seen
    finally:
        if server is not own_redis:
            server.stop()


async def test_a_running_replica_learns_the_prefix_another_replica_started_with(
        tmp_path, upstream, redis_url, monkeypatch):
    """During a rolling change from ``kg`` to ``xy``, a replica still on ``kg`` forwarded a
    live ``xy`` token (issued by a replica already on ``xy``) in a query: it read the
    recorded prefixes only at its start. It reads them again every KEY_PREFIXES_EVERY s
    (here 0.2)."""
    import gateway.app
    from harness import eventually
    monkeypatch.setattr(gateway.app, "KEY_PREFIXES_EVERY", 0.2)
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    write(path, _doc(url, "kg"))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch) as old:
        new_path = tmp_path / "new.yaml"
        write(new_path, _doc(url, "xy"))
        async with gateway_under_test(load_config(new_path), redis_url, monkeypatch) as new:
            await new.workspace("acme")
            token, _ = await new.key("acme", scopes=["people:read"])
            assert token.startswith("xy_live_")

            async def refused() -> bool:
                async with old.proxy.get(f"/hooks/x?token={token}") as r:
                    return r.status == 400
            assert await eventually(refused, timeout=3)


async def test_prefixes_recorded_past_the_bound_are_said_and_the_most_recent_kept(
        tmp_path, upstream, redis_url, monkeypatch, caplog):
    """Past KEY_PREFIXES_MAX recorded, some were left out by name, silently: 40 short names
    that sort first and the prefix a reload replaced (``zz``, whose tokens are still live
    secrets) was forgotten by every process started afterwards, with nothing in the log. The
    most recently recorded are kept, and the log says how many were left out."""
    with redis.Redis.from_url(redis_url) as r:
        r.zadd("kg:prefixes", {"kg": 1, "zz": 2, **{f"a{i}": 3 + i for i in range(40)}})
    path = tmp_path / "keygate.yaml"
    write(path, _doc(str(upstream.make_url("")), "kg"))
    caplog.set_level(logging.WARNING)
    async with gateway_under_test(load_config(path), redis_url, monkeypatch,
                                  config_path=str(path)) as gw:
        old, _ = make_token("zz", "live")
        async with gw.proxy.get(f"/hooks/x?token={old}") as r:
            refused = r.status == 400
    warned = [rec.getMessage() for rec in caplog.records
              if rec.levelno >= logging.WARNING and "prefix" in rec.getMessage()]
    assert refused or warned, "a recorded prefix was dropped without a word"


async def test_a_stop_while_serve_records_its_prefix_at_start_is_a_stop_at_once(
        tmp_path, redis_url):
    """serve's start-up store checks end at once on a stop (a frozen Redis waits each out:
    ``_serve`` cancels them). The read of kg:prefixes once came after them, when a stop no
    longer cancels: a Redis that stalls there (answers PING and the script check, then
    freezes) held a SIGTERM for the whole store.timeout, then serve bound its listeners,
    said it was listening, and only then stopped."""
    import asyncio
    import signal
    import time
    from harness import HeldReplies
    async with HeldReplies(redis_url) as relay:
        relay.delay_when(b"kg:prefixes")  # SADD kg:prefixes stalls in the store
        path, proxy, admin = write_config(tmp_path, redis_url=relay.url, store_timeout=10)
        served = Served(path, proxy, admin)
        try:
            deadline = time.monotonic() + 20
            while not relay.held_back:
                assert served.proc.poll() is None and time.monotonic() < deadline, \
                    served.stderr()
                await asyncio.sleep(0.01)
            served.proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            while served.proc.poll() is None and time.monotonic() - stopped < 20:
                await asyncio.sleep(0.05)
            took = time.monotonic() - stopped
            relay.release()
            assert took < 3, (took, served.stderr())
        finally:
            relay.release()
            served.close()


async def test_a_token_of_an_earlier_prefix_pasted_into_the_admin_api_is_refused(
        tmp_path, upstream, redis_url, monkeypatch):
    """The admin API refuses to store a key's token pasted into a text field (a name, a
    description, meta): it is listed to every keys:admin key and kept in the audit. It
    looked only for the config's own prefix: after a change of keys.prefix, an old token
    (still a live secret) pasted into a description was stored in the clear. Every prefix
    recorded in the store is looked for."""
    path = tmp_path / "keygate.yaml"
    url = str(upstream.make_url(""))
    write(path, _doc(url, "kg"))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        old, _ = await gw.key("acme", scopes=["people:read"])
    write(path, _doc(url, "xy"))
    async with gateway_under_test(load_config(path), redis_url, monkeypatch) as gw:
        status, body = await gw.admin_json("POST", "/workspaces/acme/keys", {
            "name": "ci", "scopes": ["people:read"], "description": f"was {old}"})
        assert status == 400, body
        assert "description" in body["error"]["message"]
        status, body = await gw.admin_json("POST", "/workspaces/acme/keys", {
            "name": "ci", "scopes": ["people:read"], "meta": {"note": old}})
        assert status == 400, body
        status, body = await gw.admin_json("PATCH", "/workspaces/acme", {"name": old})
        assert status == 400, body

