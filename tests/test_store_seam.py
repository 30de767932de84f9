"""The per-request store's one client seam (gateway.store.clients.ScriptClient) and the rule
that every Lua script lives in gateway/store/lua/. What the store sends is read from a real
Redis's ``MONITOR``, and what it wrote from Redis itself."""

from __future__ import annotations

import asyncio
import codecs
import re
from importlib import resources
from pathlib import Path

import redis

import gateway
from gateway.store.clients import LeanClient, TopologyClient, connect
from gateway.store.keyspace import fail_ip_key, fail_key_key, key_key, ws_key
from gateway.store.request import (ADD_USAGE, AUTHORIZE, DAILY_TTL, LEDGER_WRITE, READY,
                                   ALREADY, NO_WORKSPACE, REFUND, WRITTEN, RequestStore,
                                   Slot)
from harness import eventually


class Monitor:
    """A real ``MONITOR`` connection: every command Redis receives from its other clients, as
    its arguments (bytes, unescaped)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lines: list[bytes] = []

    async def __aenter__(self) -> "Monitor":
        at = redis.connection.parse_url(self.url)
        self.reader, self.writer = await asyncio.open_connection(at.get("host", "localhost"),
                                                                 at.get("port", 6379))
        self.writer.write(b"MONITOR\r\n")
        assert await self.reader.readline() == b"+OK\r\n"
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while line := await self.reader.readline():
            self.lines.append(line)

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        self.writer.close()

    def commands(self) -> list[tuple[str, tuple[bytes, ...]]]:
        """Each command a client sent so far (not the ones scripts ran inside Redis), as
        (the client's address, its arguments)."""
        out = []
        for line in self.lines:
            client = re.search(rb"\[\d+ ([^\]]+)\]", line).group(1).decode()
            if client == "lua":
                continue
            quoted = re.findall(rb'"((?:[^"\\]|\\.)*)"', line)
            out.append((client, tuple(codecs.escape_decode(q)[0] for q in quoted)))
        return out


ALL_SCRIPTS = (AUTHORIZE, ADD_USAGE, REFUND, LEDGER_WRITE, READY)
SCRIPTS = {s.sha.encode(): s.name for s in ALL_SCRIPTS}
TEXTS = {s.text.encode(): s.name for s in ALL_SCRIPTS}


def _named(args: tuple[bytes, ...]) -> tuple[str, ...]:
    """A command with its script named: ('EVALSHA', 'authorize'), ('EVAL', 'refund'), ..."""
    if args[0] == b"EVALSHA":
        return "EVALSHA", SCRIPTS[args[1]]
    if args[0] == b"EVAL":
        return "EVAL", TEXTS[args[1]]
    if args[:2] == (b"SCRIPT", b"LOAD"):
        return "SCRIPT LOAD", TEXTS[args[2]]
    return (args[0].decode(),)


def test_connect_picks_the_lean_client_for_one_server_and_redis_py_for_a_topology():
    assert isinstance(connect("redis://127.0.0.1:6379", 1.0), LeanClient)
    assert isinstance(connect("unix:///tmp/x.sock", 1.0), LeanClient)
    assert isinstance(connect("redis+sentinel://127.0.0.1:26379/mymaster", 1.0), TopologyClient)


async def test_request_store_speaks_only_through_the_seam(redis_url):
    """Every call is one command on the store's one connection: the scripts by digest, the
    failure counts in one MGET; what Redis then holds is what the calls asked for."""
    store = RequestStore(redis_url)
    owner = redis.Redis.from_url(redis_url)  # the slot's workspace and key, for add_usage
    owner.hset(ws_key("acme"), mapping={"id": "acme", "rev": "2"})
    owner.hset(key_key("acme", "k1"), mapping={"id": "k1", "rev": "2"})
    owner.close()
    async with Monitor(redis_url) as monitor:
        await store.ready()
        d = await store.authorize(workspace="acme", key_id="k1", key_rev=1, ws_rev=1,
                                  count=False, rate_limit=0, rate_period_ms=1000,
                                  monthly_limit=None, period="2026-11", counter_ttl=60,
                                  now_ms=1_795_000_000_000, budget="k1")
        assert await store.failure_counts("10.0.0.1", "k1") == (0, 0)
        await store.record_failure("10.0.0.1", "k1", 300)
        assert await store.failure_counts("10.0.0.1", "k1") == (1, 1)
        slot = Slot("acme", "k1", "2026-11", "2026-11-18", "k1")
        await store.refund(slot, 60)  # nothing counted, nothing made: no counter below
        gone = slot._replace(workspace="gone")  # a workspace not in the store: written nothing
        assert await store.add_usage(gone, 4, 60, "w-0") == NO_WORKSPACE
        assert await store.add_usage(slot, 4, 60, "w-1") == WRITTEN
        assert await store.add_usage(slot, 4, 60, "w-1") == ALREADY  # a copy: nothing again
        await store.close()
        await eventually(lambda: len(monitor.commands()) >= 15, timeout=5)  # the last lines
        seen = monitor.commands()
    assert d.outcome == "stale"  # Redis holds key k1 at rev 2: the caller must re-read it
    assert len({client for client, _ in seen}) == 1  # one connection
    commands = [args for _, args in seen]
    assert [_named(c) for c in commands] == [
        ("TIME",),                                  # the clock offset, at connect
        ("SCRIPT LOAD", "authorize"),               # ready()
        ("EVALSHA", "ready"), ("EVAL", "ready"),    # ready(): a script may write here
        ("EVALSHA", "authorize"),
        ("MGET",),                                  # failure_counts: both keys, one call
        ("EVALSHA", "add_usage"), ("EVAL", "add_usage"),  # NOSCRIPT: sent once in full
        ("MGET",),
        ("EVALSHA", "refund"), ("EVAL", "refund"),
        ("EVALSHA", "ledger_write"), ("EVAL", "ledger_write"),
        ("EVALSHA", "ledger_write"),                # loaded now: by digest
        ("EVALSHA", "ledger_write")]
    assert commands[6][2:] == (b"2", fail_ip_key("10.0.0.1").encode(),
                               fail_key_key("k1").encode(), b"1", b"300", b"300")
    r = redis.Redis.from_url(redis_url)
    for counter in slot.counters()[:2]:  # the months: +4 once
        assert int(r.get(counter)) == 4 and 0 < r.ttl(counter) <= 60
    for counter in slot.counters()[2:]:  # the days keep the day counters' own TTL
        assert int(r.get(counter)) == 4 and 60 < r.ttl(counter) <= DAILY_TTL


async def test_failures_are_counted_with_a_ttl_from_the_first(redis_url):
    store = RequestStore(redis_url)
    await store.record_failure("10.0.0.9", "kx", 300)
    await store.record_failure("10.0.0.9", "kx", 300)
    assert await store.failure_counts("10.0.0.9", "kx") == (2, 2)
    r = redis.Redis.from_url(redis_url)
    assert 0 < r.ttl(fail_ip_key("10.0.0.9")) <= 300 and 0 < r.ttl(fail_key_key("kx")) <= 300
    # when each resets, in ms, for a 429's Retry-After (-2: no such counter; None: not asked)
    ip_ms, key_ms = await store.failure_resets_ms("10.0.0.9", "kx", 300)
    assert 290_000 < ip_ms <= 300_000 and 290_000 < key_ms <= 300_000
    assert await store.failure_resets_ms(None, "never-failed", 300) == [-2]
    await store.close()


def test_every_script_is_a_file_in_store_lua():
    lua = resources.files("gateway.store").joinpath("lua")
    names = {p.name for p in lua.iterdir() if p.name.endswith(".lua")}
    assert {f"{s.name}.lua" for s in (AUTHORIZE, ADD_USAGE, REFUND)} <= names
    package = Path(gateway.__file__).parent
    inline = [str(p.relative_to(package)) for p in package.rglob("*.py")
              if re.search(r"redis\.call\(", p.read_text())]
    assert inline == []


def test_the_add_script_takes_the_acting_key_as_judged_and_a_stored_key_without_a_rev(
        redis_url):
    """admin_add_key writes a workspace admin key's create only while the acting key has the
    rev it was judged at and has not expired; a key stored without a rev (as the rest of the
    store reads it: rev 0) is not taken for a changed one."""
    from gateway.store.scripts import load
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset("kg:ws:{acme}", mapping={"id": "acme", "plan": "pro"})
    r.hset("kg:key:{acme}:adm", mapping={"id": "adm"})  # no rev field
    add = load("admin_add_key").text
    keys = ("kg:ws:{acme}", "kg:ws:{acme}:keys", "kg:ws:{acme}:active", "kg:key:{acme}:k2",
            "kg:ws:{acme}:audit", "kg:ws:{acme}:roles", "kg:key:{acme}:adm",
            "kg:key:{acme}:adm", "kg:ws:{acme}:undone:k2", "kg:ws:{acme}:bindings")

    def add_as(rev: str, new: str) -> str:
        return r.eval(add, len(keys), *keys[:3], f"kg:key:{{acme}}:{new}", *keys[4:8],
                      f"kg:ws:{{acme}}:undone:{new}", keys[9], 1000, -1,
                      "+inf", new, "{}", 100, "", "", "", "", "pro\n", rev, "[]", "id", new)

    assert add_as("7", "k1") == "actor_changed" and not r.exists("kg:key:{acme}:k1")
    assert add_as("0", "k2") == "ok"
    r.hset("kg:key:{acme}:adm", mapping={"rev": "7", "expires_at": "999.000"})
    assert add_as("7", "k3") == "actor_changed"  # expired at 999 (now is 1000)
    r.hset("kg:key:{acme}:adm", "expires_at", "")
    assert add_as("7", "k4") == "ok"
    assert add_as("6", "k5") == "actor_changed"


def test_both_scripts_meeting_the_key_cap_refuse_a_changed_plan_or_limits(redis_url):
    """admin_add_key and admin_update_key (a key brought back) take the cap with the plan and
    limits it was worked out from (lua/_cap_basis.lua): either changed since is 'stale_ws',
    nothing written."""
    from gateway.store.scripts import load
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset("kg:ws:{acme}", mapping={"id": "acme", "plan": "pro", "limits": '{"max_keys": 5}'})
    r.hset("kg:key:{acme}:k1", mapping={"id": "k1", "rev": "1"})  # expired: not in :active
    stored, changed = 'pro\n{"max_keys": 5}', 'pro\n{"max_keys": 9}'
    add = load("admin_add_key").text
    add_keys = ("kg:ws:{acme}", "kg:ws:{acme}:keys", "kg:ws:{acme}:active",
                "kg:key:{acme}:k2", "kg:ws:{acme}:audit", "kg:ws:{acme}:roles",
                "kg:key:{acme}:k2", "kg:key:{acme}:k2", "kg:ws:{acme}:undone:k2",
                "kg:ws:{acme}:bindings")
    update = load("admin_update_key").text
    update_keys = ("kg:key:{acme}:k1", "kg:ws:{acme}:active", "kg:ws:{acme}:audit",
                   "kg:ws:{acme}:roles", "kg:ws:{acme}", "kg:ws:{acme}:bindings",
                   "kg:key:{acme}:k1")
    for basis, answer in ((changed, "stale_ws"), (stored, "ok")):
        assert r.eval(add, len(add_keys), *add_keys, 1000, 5, "+inf", "k2", "{}", 100, "",
                      "", "", "", basis, "", "", "id", "k2") == answer
    assert r.eval(update, len(update_keys), *update_keys, "k1", "+inf", 1000, 5, "{}", 100,
                  "", "", "", changed, "", "[]", "") == "stale_ws"
    assert r.zscore("kg:ws:{acme}:active", "k1") is None  # nothing written
    reply = r.eval(update, len(update_keys), *update_keys, "k1", "+inf", 1000, 5, "{}", 100,
                   "", "", "", stored, "", "[]", "")
    assert "k1" in reply and r.zscore("kg:ws:{acme}:active", "k1") == float("inf")
