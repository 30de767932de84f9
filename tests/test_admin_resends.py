"""Review (rev2): admin writes re-sent by redis-py's connection retry (redis_urls._retry, up to
3 since r-cluster) after Redis already ran them: the connection dies after the command reached
Redis and before its reply came back (a CLIENT KILL, a proxy or LB reset, a network blip).

``ReplyDroppingRelay``: a loopback TCP relay in front of a real redis-server whose next ``n``
commands holding a marker are passed on to Redis, and their connection is then closed before
Redis's reply is passed back. Redis ran the command; keygate sees a connection error and
(redis-py's Retry) sends it again on a fresh connection."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from importlib import resources
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import redis

from conftest import free_port
from gateway.store.scripts import load
from harness import eventually, gateway_under_test, make_config
from relays import ThreadedRelay


class ReplyDroppingRelay(ThreadedRelay):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._rules: list[list[Any]] = []
        self.dropped = 0

    def drop_reply(self, marker: bytes, n: int) -> None:
        with self._lock:
            self._rules.append([marker, n])

    def _matches(self, data: bytes) -> bool:
        with self._lock:
            for rule in self._rules:
                if rule[1] > 0 and rule[0] in data:
                    rule[1] -= 1
                    self.dropped += 1
                    return True
        return False

    def add(self, target: int) -> int:
        return self.listen(None, 128, lambda listener: self._accept(listener, target))

    async def _accept(self, listener: socket.socket, target: int) -> None:
        while True:
            sock, _ = await self.loop.sock_accept(listener)
            self._spawn(self._serve(sock, target))

    async def _serve(self, sock: socket.socket, target: int) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)

        async def down() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, ConnectionError):
                pass

        async def up() -> None:
            try:
                while data := await reader.read(65536):
                    if self._matches(data):
                        downstream.cancel()  # Redis's reply never comes back
                        up_writer.write(data)
                        await up_writer.drain()
                        await asyncio.sleep(0.2)  # Redis runs it
                        return
                    up_writer.write(data)
                    await up_writer.drain()
            except (OSError, ConnectionError):
                pass

        downstream = asyncio.ensure_future(down())
        try:
            await asyncio.gather(up(), downstream, return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()


@pytest.fixture
def relayed_redis(redis_url) -> Iterator[tuple[str, ReplyDroppingRelay]]:
    parts = urlsplit(redis_url)
    relay = ReplyDroppingRelay()
    port = relay.add(parts.port)
    try:
        yield f"redis://127.0.0.1:{port}{parts.path}", relay
    finally:
        relay.close()


async def _audit(gut, ws: str) -> list[str]:
    status, body = await gut.admin_json("GET", f"/workspaces/{ws}/audit")
    assert status == 200, body
    return [e["action"] for e in body["items"]]


async def test_a_workspace_created_once_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch) -> None:
    """POST /workspaces with an id: Redis creates it, the reply is lost, redis-py sends the
    script again, which finds the id taken: the operator is told 409 conflict for the
    workspace its own call just created."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("warm")  # the script loaded: the dropped call is the one that runs
        relay.drop_reply(b"workspace.create", 1)
        status, body = await gut.admin_json("POST", "/workspaces",
                                            {"id": "acme", "name": "Acme", "plan": "starter"})
        assert relay.dropped == 1
        assert status in (201, 503), (status, body)


async def test_a_workspace_without_an_id_is_not_made_twice_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch) -> None:
    """POST /workspaces without an id: the resend finds the slug taken, and create_workspace
    tries again under a suffixed id: two workspaces for one call, one of them orphaned."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("warm")  # the script loaded: the dropped call is the one that runs
        relay.drop_reply(b"workspace.create", 1)
        status, body = await gut.admin_json("POST", "/workspaces",
                                            {"name": "Acme", "plan": "starter"})
        assert relay.dropped == 1
        status, listing = await gut.admin_json("GET", "/workspaces")
        assert status == 200
        ids = sorted(w["id"] for w in listing["items"])
        assert len([i for i in ids if i != "warm"]) == 1, ids


@pytest.mark.parametrize("lost", [1, 3])
async def test_a_workspace_update_is_audited_once_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch, lost) -> None:
    """PATCH /workspaces/acme: each lost reply makes one more run of the script, one more
    'workspace.update' audit entry (and rev bump). With up to 3 retries now, 3 lost replies
    give 4 entries for one call (answered 200)."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Acme 1"})
        assert status == 200  # the script loaded: the dropped calls are ones that run
        relay.drop_reply(b"workspace.update", lost)
        status, body = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Acme 2"})
        assert relay.dropped == lost
        actions = await _audit(gut, "acme")
        assert actions.count("workspace.update") == 2, (status, actions)  # warm-up's + this


async def test_a_role_put_is_audited_once_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch) -> None:
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        status, _ = await gut.admin_json("PUT", "/workspaces/acme/roles/warm",
                                         {"scopes": ["people:read"]})
        assert status == 200  # the script loaded
        relay.drop_reply(b"role.", 1)
        status, body = await gut.admin_json("PUT", "/workspaces/acme/roles/reader",
                                            {"scopes": ["people:read"]})
        assert relay.dropped == 1
        actions = await _audit(gut, "acme")
        assert actions.count("role.put") == 2, (status, actions)  # warm's and reader's


async def test_a_key_delete_answers_its_outcome_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch) -> None:
    """DELETE of a revoked key: Redis deletes it, the reply is lost, the resend finds no key:
    404 not_found for the delete that happened."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        _, key = await gut.key("acme")
        status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200, body
        _, warm = await gut.key("acme", name="warm")
        await gut.admin_json("POST", f"/workspaces/acme/keys/{warm['id']}/revoke")
        status, _ = await gut.admin_json("DELETE", f"/workspaces/acme/keys/{warm['id']}")
        assert status in (200, 204)  # the script loaded
        relay.drop_reply(b"key.delete", 1)
        status, body = await gut.admin_json("DELETE", f"/workspaces/acme/keys/{key['id']}")
        assert relay.dropped == 1
        assert status in (200, 204, 503), (status, body)


async def test_a_key_update_is_answered_and_audited_once_when_its_reply_is_lost(
        relayed_redis, upstream, monkeypatch) -> None:
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        _, key = await gut.key("acme")
        status, _ = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                         {"name": "warm"})
        assert status == 200  # the script loaded
        relay.drop_reply(b"key.update", 1)
        status, body = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                            {"name": "renamed"})
        assert relay.dropped == 1
        actions = await _audit(gut, "acme")
        assert (status, actions.count("key.update")) == (200, 2), (status, body, actions)


# --- the other admin writes, and what the marker is -------------------------------------------

async def test_a_role_delete_answers_its_outcome_when_its_reply_is_lost(
        relayed_redis, redis_url, upstream, monkeypatch) -> None:
    """DELETE of a workspace role: the resend found the role gone (404 for a delete that
    happened) and the delete generation bumped twice."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        for role in ("warm", "gone"):
            status, _ = await gut.admin_json("PUT", f"/workspaces/acme/roles/{role}",
                                             {"scopes": ["people:read"]})
            assert status == 200
        status, _ = await gut.admin_json("DELETE", "/workspaces/acme/roles/warm")
        assert status in (200, 204)  # the script loaded
        relay.drop_reply(b"role.delete", 1)
        status, body = await gut.admin_json("DELETE", "/workspaces/acme/roles/gone")
        assert relay.dropped == 1
        assert status in (200, 204), (status, body)
        assert (await _audit(gut, "acme")).count("role.delete") == 2
        r = redis.Redis.from_url(redis_url)  # straight to Redis
        try:
            assert r.hget("kg:ws:{acme}:bindings", "deleted:gone") == b"1"  # one delete
        finally:
            r.close()


@pytest.mark.parametrize("lost", [1, 3])
async def test_a_key_create_and_revoke_are_made_once_when_their_replies_are_lost(
        relayed_redis, upstream, monkeypatch, lost) -> None:
    """Already so before the markers (admin_add_key finds its own new key's hash, a revoke of
    a revoked key changes nothing): held now that both carry a marker too."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        _, warm = await gut.key("acme", name="warm")
        await gut.admin_json("POST", f"/workspaces/acme/keys/{warm['id']}/revoke")
        relay.drop_reply(b"key.create", lost)
        token, key = await gut.key("acme")
        assert relay.dropped == lost
        status, keys = await gut.admin_json("GET", "/workspaces/acme/keys")
        assert sorted(k["id"] for k in keys["items"]) == sorted([warm["id"], key["id"]])
        async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        relay.drop_reply(b"key.revoke", lost)
        status, body = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert relay.dropped == 2 * lost
        assert status == 200 and body["revoked_at"], body
        actions = await _audit(gut, "acme")
        assert (actions.count("key.create"), actions.count("key.revoke")) == (2, 2), actions


async def test_a_take_back_is_logged_as_what_it_did_when_its_reply_is_lost(
        relayed_redis, redis_url, upstream, monkeypatch, caplog) -> None:
    """A create whose every reply is lost is answered 503 and taken back; the take-back's own
    reply lost, its resend found nothing left to take back and logged 'it had not run'."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        await gut.key("acme", name="warm")
        r = redis.Redis.from_url(redis_url)  # the take-back's script loaded: its send runs
        r.script_load(load("admin_take_back").text)
        r.close()
        # four sends of the create (three retries), then the take-back's first ("key.create"
        # is in its audit entry too: key.create.undone)
        relay.drop_reply(b"key.create", 5)
        caplog.set_level("WARNING", "keygate.store")
        status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                            {"name": "lost", "scopes": ["people:read"]})
        assert status == 503, body
        await eventually(lambda: "taken back (" in caplog.text)
        assert relay.dropped == 5
        assert "taken back (the new key removed)" in caplog.text, caplog.text
        status, keys = await gut.admin_json("GET", "/workspaces/acme/keys")
        assert [k["name"] for k in keys["items"]] == ["warm"]
        actions = await _audit(gut, "acme")
        assert (actions.count("key.create"), actions.count("key.create.undone")) == (2, 1)


async def test_a_take_back_whose_every_send_lost_its_reply_is_logged_as_what_it_did(
        relayed_redis, redis_url, upstream, monkeypatch, caplog) -> None:
    """The take-back loop (_taking_back_until_done) tried again after a StoreError with a new
    call, hence a new marker: when the first take-back ran but all four of its sends lost their
    replies, the next try found nothing and the create was logged as one that 'had not run'
    (the CHANGELOG says r-resend ended that), although its key was made and removed. Every try
    of one take-back now names one marker: a later try answers what the first one did."""
    url, relay = relayed_redis
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        await gut.key("acme", name="warm")
        r = redis.Redis.from_url(redis_url)
        r.script_load(load("admin_take_back").text)
        r.close()
        # the create's four sends, then the first take-back's four ("key.create.undone")
        relay.drop_reply(b"key.create", 8)
        caplog.set_level("WARNING", "keygate.store")
        status, body = await gut.admin_json("POST", "/workspaces/acme/keys",
                                            {"name": "lost", "scopes": ["people:read"]})
        assert status == 503, body
        await eventually(lambda: "taken back (" in caplog.text)
        assert relay.dropped == 8
        assert "taken back (the new key removed)" in caplog.text, caplog.text
        status, keys = await gut.admin_json("GET", "/workspaces/acme/keys")
        assert [k["name"] for k in keys["items"]] == ["warm"]
        actions = await _audit(gut, "acme")
        assert (actions.count("key.create"), actions.count("key.create.undone")) == (2, 1)
        # the take-back's marker is kept while its loop may try again (minutes), not seconds
        r = redis.Redis.from_url(redis_url)
        kept = [r.pttl(m) for m in r.scan_iter(match="kg:once:{acme}:admin:*")]
        r.close()
        assert max(kept) > 60_000, kept


async def test_each_write_leaves_a_marker_in_its_workspaces_slot_for_a_bounded_time(
        redis_url, upstream, monkeypatch) -> None:
    """Every admin write names a marker of its own (kg:once:{ws}:admin:<call-id>, the
    workspace's hash tag), kept longer than redis-py goes on sending a call again (the
    store timeout, a few times over) and not much longer."""
    from gateway.redis_urls import CONNECTION_RETRIES
    config = make_config(str(upstream.make_url("")))
    r = redis.Redis.from_url(redis_url)
    async with gateway_under_test(config, redis_url, monkeypatch) as gut:
        await gut.workspace("acme")
        status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Acme 2"})
        assert status == 200
        markers = sorted(r.scan_iter(match="kg:once:*"))
        assert len(markers) == 2 and all(m.startswith(b"kg:once:{acme}:admin:") for m in markers)
        assert len(set(markers)) == 2  # one per call
        timeout = config.store.timeout
        for marker in markers:
            assert (CONNECTION_RETRIES + 1) * timeout * 1000 < r.pttl(marker) <= 60_000
    r.close()


async def test_a_refused_admin_write_keeps_its_answer_on_a_full_redis_and_records_nothing(
        own_redis, upstream, monkeypatch) -> None:
    """Redis at maxmemory with noeviction refuses writes (OOM) but still runs a script that
    writes nothing. Before r-resend a refused admin call (the key is active: 409; no such
    role: 404; revoke of an unknown key: 404) wrote nothing and was answered as refused. Then
    every refusal recorded its marker (once_answered's SET, the script's first write), which
    Redis refused with OOM: each of these answered 503 store_unavailable instead. A refusal
    now records nothing (a copy of it is refused again the same way); a change still does."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as gut:
        await gut.workspace("acme")
        _, key = await gut.key("acme")
        status, _ = await gut.admin_json("PUT", "/workspaces/acme/roles/ops",
                                         {"scopes": ["people:read"]})
        assert status == 200
        await gut.key("acme", name="bound", role="ops")
        unknown = "A" * 12
        refusals = (
            ("delete active key", "DELETE", f"/workspaces/acme/keys/{key['id']}", None),
            ("delete unknown role", "DELETE", "/workspaces/acme/roles/nosuch", None),
            ("delete role in use", "DELETE", "/workspaces/acme/roles/ops", None),
            ("revoke unknown key", "POST", f"/workspaces/acme/keys/{unknown}/revoke", None),
            ("delete unknown key", "DELETE", f"/workspaces/acme/keys/{unknown}", None),
            ("patch unknown key", "PATCH", f"/workspaces/acme/keys/{unknown}", {"name": "x"}))
        # (not a create: its id's index entry, SADD, is written before its script, so on a full
        # Redis it is 503, as it always was)
        expected = {"delete active key": (409, "conflict"),
                    "delete unknown role": (404, "not_found"),
                    "delete role in use": (409, "conflict"),
                    "revoke unknown key": (404, "not_found"),
                    "delete unknown key": (404, "not_found"),
                    "patch unknown key": (404, "not_found")}

        async def refused() -> dict:
            answers = {}
            for label, method, path, body in refusals:
                status, answer = await gut.admin_json(method, path, body)
                answers[label] = (status, answer["error"]["code"] if status >= 400 else None)
            return answers

        admin = redis.Redis(port=own_redis.port)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # every write refused (OOM) from now on
        try:
            answers = await refused()
            # a change is refused by the full Redis as it always was: 503
            status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Full"})
            assert status == 503
        finally:
            admin.config_set("maxmemory", "0")
        assert answers == expected, answers
        # with room again: the refusals leave no marker, a change leaves one
        markers = lambda: len(list(admin.scan_iter(match="kg:once:*")))  # noqa: E731
        before = markers()
        assert await refused() == expected
        assert markers() == before
        status, _ = await gut.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200 and markers() == before + 1
        admin.close()


# --- the scripts themselves -------------------------------------------------------------------

_WRITING = re.compile(r"redis\.call\('(SET|HSET|HDEL|HINCRBY|DEL|SADD|SREM|ZADD|ZREM|XADD|"
                      r"ZREMRANGEBYSCORE|EXPIRE)'")


def test_every_admin_script_that_writes_is_given_a_marker_and_reads_it() -> None:
    """A new admin script that writes must be in WRITES (the store then gives its calls a
    marker) and include _once.lua (the script then reads it): else its copies run again.
    Or, a copy of it being harmless, in IDEMPOTENT_WRITES."""
    from gateway.store.admin_base import IDEMPOTENT_WRITES, WRITES
    lua = resources.files("gateway.store").joinpath("lua")
    names = {p.name[:-4] for p in lua.iterdir()
             if p.name.startswith("admin_") and p.name.endswith(".lua")}
    writing = {n[len("admin_"):] for n in names if _WRITING.search(load(n).text)}
    assert not WRITES & IDEMPOTENT_WRITES
    assert writing == WRITES | IDEMPOTENT_WRITES
    for name in WRITES:
        text = (lua / f"admin_{name}.lua").read_text()
        assert "-- include: _once.lua" in text and "return once_answered(" in text, name
        assert "#ARGV" not in text, name  # the field pairs end before the marker's TTL
        # a change answers that it wrote (recorded); a refusal does not (nothing written)
        assert re.search(r"return .+, true\n", text), name


def test_a_copy_of_a_marked_call_answers_as_it_did_and_an_unmarked_call_runs_as_before(
        redis_url) -> None:
    r = redis.Redis.from_url(redis_url)
    create = load("admin_create_workspace").text
    # the scripts' own keys only (as tests and tools call them): each run runs, and the last
    # argument is a field's value, not a TTL
    own = ("kg:ws:{acme}", "kg:ws:{acme}:audit")
    fields = ("id", "acme", "name", "Acme", "plan", "pro")
    assert [r.eval(create, 2, *own, "{}", 100, *fields) for _ in range(2)] == [1, 0]
    assert r.hget("kg:ws:{acme}", "plan") == b"pro" and r.xlen("kg:ws:{acme}:audit") == 1
    # with a marker: every copy answers 1, one workspace made, one audit entry
    once = ("kg:ws:{b}", "kg:ws:{b}:audit", "kg:once:{b}:admin:t:1")
    assert [r.eval(create, 3, *once, "{}", 100, "id", "b", "name", "B", "plan", "pro",
                   30000) for _ in range(3)] == [1, 1, 1]
    assert r.xlen("kg:ws:{b}:audit") == 1
    assert set(r.hgetall("kg:ws:{b}")) == {b"id", b"name", b"plan", b"rev"}
    assert 25_000 < r.pttl(once[2]) <= 30_000
    # a hash answered: every byte the first run answered (JSON's specials, control bytes, NUL,
    # bytes that are not UTF-8), and no second rev bump or audit entry
    update = load("admin_update_workspace").text
    odd = "B \u00e9\u2603 /\\\"[]{}\x00\x01\x1f\x7f".encode() + b"\xff\xfe"
    marked = ("kg:ws:{b}", "kg:ws:{b}:audit", "kg:once:{b}:admin:t:2")
    first, again = (r.eval(update, 3, *marked, "{}", 100, "", "name", odd, 30000)
                    for _ in range(2))
    assert again == first and dict(zip(first[::2], first[1::2]))[b"name"] == odd
    assert r.xlen("kg:ws:{b}:audit") == 2 and r.hget("kg:ws:{b}", "name") == odd
    # nil answered (no such key), and a hash that is gone by the copy (the key deleted)
    delete = load("admin_delete_key").text
    keys = ("kg:key:{b}:k1", "kg:ws:{b}:keys", "kg:ws:{b}:active", "kg:ws:{b}:audit",
            "kg:gone:{b}:k1", "kg:key:{b}:k0", "kg:ws:{b}:roles")
    assert [r.eval(delete, 8, *keys, "kg:once:{b}:admin:t:3", "k1", 1000, "{}", 100, "", 30000)
            for _ in range(2)] == [None, None]
    r.hset("kg:key:{b}:k1", mapping={"id": "k1", "revoked_at": "900", "name": "n"})
    answers = [r.eval(delete, 8, *keys, "kg:once:{b}:admin:t:4", "k1", 1000, "{}", 100, "",
                      30000)
               for _ in range(2)]
    assert answers[0] == answers[1] and b"k1" in answers[0]
    assert not r.exists("kg:key:{b}:k1") and r.xlen("kg:ws:{b}:audit") == 3
    # what answering its token needs is kept, once
    assert r.hgetall("kg:gone:{b}:k1") == {b"id": b"k1", b"revoked_at": b"900",
                                          b"deleted_at": b"1000"}
    r.close()


async def test_a_workspace_update_through_sentinel_is_audited_once_when_its_replies_are_lost(
        relayed_redis, tmp_path, upstream, monkeypatch) -> None:
    """The Sentinel client retries the same way (a fresh connection to the master the
    Sentinels name): the Sentinel watches the master through the relay, so keygate's every
    command to the master passes it."""
    from test_redis_topologies import MASTER, Servers, _wait
    url, relay = relayed_redis
    relay_port = urlsplit(url).port
    servers = Servers(tmp_path)
    sentinel = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"sentinel monitor {MASTER} 127.0.0.1 {relay_port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} 5000\n")
    try:
        servers.start("sentinel", sentinel, "--sentinel", conf=str(conf))
        s = redis.Redis(port=sentinel, decode_responses=True, socket_timeout=1)
        _wait("the Sentinel to see the master",
              lambda: "s_down" not in s.sentinel_master(MASTER)["flags"])
        s.close()
        config = make_config(str(upstream.make_url("")))
        async with gateway_under_test(config, f"redis+sentinel://127.0.0.1:{sentinel}"
                                              f"/{MASTER}/{urlsplit(url).path.strip('/') or 0}",
                                      monkeypatch) as gut:
            await gut.workspace("acme")
            status, _ = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Acme 1"})
            assert status == 200  # the script loaded
            relay.drop_reply(b"workspace.update", 3)
            status, body = await gut.admin_json("PATCH", "/workspaces/acme", {"name": "Acme 2"})
            assert relay.dropped == 3
            assert (status, body["name"]) == (200, "Acme 2"), body
            actions = await _audit(gut, "acme")
            assert actions.count("workspace.update") == 2, actions
    finally:
        servers.stop_all()


def test_a_refusal_of_each_admin_script_records_no_marker_and_a_change_does(redis_url) -> None:
    """Each marked write script refused for want of what it changes (no such workspace or
    key) writes nothing, its marker included: on a Redis at maxmemory (noeviction) that
    marker's SET was refused (OOM) and the refusal answered 503. The same marker on a call
    that changes something is recorded (a copy answers as it did)."""
    r = redis.Redis.from_url(redis_url)
    ws = "kg:ws:{nows}"
    k = "kg:key:{nows}:k1"
    keys_ = "kg:ws:{nows}:keys"
    active = "kg:ws:{nows}:active"
    audit = "kg:ws:{nows}:audit"
    roles = "kg:ws:{nows}:roles"
    bindings = "kg:ws:{nows}:bindings"
    undone = "kg:ws:{nows}:undone:k1"
    calls = {  # script: (its own keys, its own ARGV, the refusal answered)
        "update_workspace": ((ws, audit), ("{}", 100, ""), None),
        "revoke_key": ((k, active, audit, k, roles), ("k1", 1000, "{}", 100, ""), None),
        "delete_key": ((k, keys_, active, audit, "kg:gone:{nows}:k1", k, roles),
                       ("k1", 1000, "{}", 100, ""), None),
        "set_role": ((ws, roles, audit, bindings), ("delete", "r", "", "{}", 100, "", ""),
                     b"no_workspace"),
        "update_key": ((k, active, audit, roles, ws, bindings, k),
                       ("k1", "", 1000, -1, "{}", 100, "", "", "", "", "", "[]", ""),
                       None),
        "add_key": ((ws, keys_, active, k, audit, roles, k, k, undone, bindings),
                    (1000, -1, "+inf", "k1", "{}", 100, "", "", "", "", "", "", "[]",
                     "id", "k1"), b"no_workspace"),
    }
    for n, (name, (own, argv, refusal)) in enumerate(sorted(calls.items())):
        marker = f"kg:once:{{nows}}:admin:t:{n}"
        answer = r.eval(load(f"admin_{name}").text, len(own) + 1, *own, marker, *argv, 30000)
        assert answer == refusal, (name, answer)
        assert not r.exists(marker), name
    assert not any(r.scan_iter(match="kg:*{nows}*"))  # nothing written at all
    # a change: recorded, its copy answers it and changes nothing more
    create = load("admin_create_workspace").text
    marker = "kg:once:{nows}:admin:t:made"
    made = [r.eval(create, 3, ws, audit, marker, "{}", 100, "id", "nows", 30000)
            for _ in range(2)]
    assert made == [1, 1] and r.exists(marker) and r.xlen(audit) == 1
    r.delete(ws, audit, marker)
    r.close()
