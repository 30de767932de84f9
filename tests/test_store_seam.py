"""The per-request store's one client seam (gateway.store.clients.ScriptClient) and the rule
that every Lua script lives in gateway/store/lua/."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import redis

import gateway
from gateway.store.clients import LeanClient, TopologyClient, connect
from gateway.store.keyspace import fail_ip_key, fail_key_key
from gateway.store.request import ADD_USAGE, AUTHORIZE, REFUND, RequestStore, Slot
from gateway.store.scripts import Script


class RecordingClient:
    """A ScriptClient that answers from a script of replies and records every call."""

    clock_offset = None

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def measure_clock(self) -> None:
        self.calls.append(("measure_clock",))

    async def script_load(self, script: Script) -> str:
        return script.sha

    async def run(self, script: Script, keys, args):
        self.calls.append(("run", script.name, tuple(keys), tuple(args)))
        return [b"ok", 1, -1, 0, 0, 0] if script is AUTHORIZE else 1

    async def run_each_slot(self, script: Script, keys, shared, per_key) -> None:
        self.calls.append(("run_each_slot", script.name, tuple(keys), shared, tuple(per_key)))

    async def get_each(self, keys):
        return [b"3", None]

    async def close(self) -> None:
        self.calls.append(("close",))


def test_connect_picks_the_lean_client_for_one_server_and_redis_py_for_a_topology():
    assert isinstance(connect("redis://127.0.0.1:6379", 1.0), LeanClient)
    assert isinstance(connect("unix:///tmp/x.sock", 1.0), LeanClient)
    assert isinstance(connect("redis+sentinel://127.0.0.1:26379/mymaster", 1.0), TopologyClient)


async def test_request_store_speaks_only_through_the_seam():
    client = RecordingClient()
    store = RequestStore("redis://127.0.0.1:1", client=client)
    await store.ready()
    d = await store.authorize(workspace="acme", key_id="k1", key_rev=1, ws_rev=1, count=False,
                              rate_limit=0, rate_period_ms=1000, monthly_limit=None,
                              period="2026-11", counter_ttl=60, now_ms=1_795_000_000_000)
    assert d.outcome == "ok"
    assert await store.failure_counts("10.0.0.1", "k1") == (3, 0)
    await store.record_failure("10.0.0.1", "k1", 300)
    slot = Slot("acme", "k1", "2026-11", "2026-11-18")
    await store.refund(slot, 60)
    assert await store.add_usage(slot, 4, 60) == 1
    await store.close()
    names = [c[:2] for c in client.calls]
    assert names == [("run", "authorize"), ("run_each_slot", "add_usage"), ("run", "refund"),
                     ("run", "add_usage"), ("close",)]
    assert client.calls[1][2:] == ((fail_ip_key("10.0.0.1"), fail_key_key("k1")), (1,),
                                   (300, 300))


async def test_failures_are_counted_with_a_ttl_from_the_first(redis_url):
    store = RequestStore(redis_url)
    await store.record_failure("10.0.0.9", "kx", 300)
    await store.record_failure("10.0.0.9", "kx", 300)
    assert await store.failure_counts("10.0.0.9", "kx") == (2, 2)
    r = redis.Redis.from_url(redis_url)
    assert 0 < r.ttl(fail_ip_key("10.0.0.9")) <= 300 and 0 < r.ttl(fail_key_key("kx")) <= 300
    await store.close()


def test_every_script_is_a_file_in_store_lua():
    lua = resources.files("gateway.store").joinpath("lua")
    names = {p.name for p in lua.iterdir() if p.name.endswith(".lua")}
    assert {f"{s.name}.lua" for s in (AUTHORIZE, ADD_USAGE, REFUND)} <= names
    package = Path(gateway.__file__).parent
    inline = [str(p.relative_to(package)) for p in package.rglob("*.py")
              if re.search(r"redis\.call\(", p.read_text())]
    assert inline == []
