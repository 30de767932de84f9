"""The key-management plane under real Redis faults: a create or rotation whose store call
ran but whose answer was lost (Redis stalled between running it and replying) is answered 503;
its token was never shown, so the change must not stand. Each test runs a real redis-server
behind a loopback relay that holds its replies back (harness.HeldReplies)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import redis

from gateway.config import StoreConfig
from gateway.store import keyspace

from harness import HeldReplies, bearer, eventually, gateway_under_test, make_config

def _state(url: str, ws: str = "acme") -> dict:
    r = redis.Redis.from_url(url, decode_responses=True)
    return {"keys": r.smembers(keyspace.ws_keys_key(ws)),
            "active": set(r.zrange(keyspace.ws_active_key(ws), 0, -1))}


async def _lost_answer(relay: HeldReplies, send, marker: bytes):
    """``send()`` with the reply to the command holding ``marker`` held past the store
    timeout; the held replies are let go once the caller has had its answer."""
    relay.hold_when(marker)
    try:
        return await asyncio.wait_for(send(), 10)
    finally:
        relay.release()


@pytest.fixture
async def held(upstream, redis_url, monkeypatch):
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.5))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace("acme")
        # a first create loads the scripts: the call held is then the script's own run
        # (EVALSHA), not a NOSCRIPT answer
        _, first = await g.key(name="first")
        yield g, relay, redis_url, first["id"]


async def test_a_create_answered_503_leaves_no_key_behind(held):
    g, relay, url, first = held
    status, body = await _lost_answer(
        relay, lambda: g.admin_json("POST", "/workspaces/acme/keys",
                                    {"name": "ci", "scopes": ["people:read"]}), b"key.create")
    assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
    # Redis did run the create: the key its caller never got the token of is taken back
    assert await eventually(lambda: _state(url) == {"keys": {first}, "active": {first}}), \
        _state(url)
    status, listing = await g.admin_json("GET", "/workspaces/acme/keys")
    assert (status, [k["id"] for k in listing["items"]]) == (200, [first])
    status, usage = await g.admin_json("GET", "/workspaces/acme/audit")
    actions = [e["action"] for e in usage["items"]]
    assert actions[:2] == ["key.create.undone", "key.create"], actions
    # the cap counts no ghost: the rest of the plan's 5 keys can still be made
    for i in range(4):
        await g.key(name=f"k{i}")


@pytest.mark.parametrize("grace", [0, 3600])
async def test_a_rotation_answered_503_leaves_the_old_key_as_it_was(held, grace):
    g, relay, url, first = held
    token, key = await g.key(name="integration")
    async with g.proxy.get("/people", headers=bearer(token)) as r:
        assert r.status == 200
    status, body = await _lost_answer(
        relay, lambda: g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                    {"grace_seconds": grace}), b"key.rotate")
    assert (status, body["error"]["code"]) == (503, "store_unavailable"), body

    async def as_before() -> bool:
        st, k = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        return st == 200 and k["status"] == "active" and k["revoked_at"] is None \
            and k["expires_at"] == key["expires_at"] \
            and _state(url) == {"keys": {first, key["id"]}, "active": {first, key["id"]}}

    assert await eventually(as_before), _state(url)
    # the integration keeps working on the token it has (no outage), and the rotation can be
    # sent again
    async with g.proxy.get("/people", headers=bearer(token)) as r:
        assert r.status == 200
    status, body = await g.admin_json("POST", f"/workspaces/acme/keys/{key['id']}/rotate",
                                      {"grace_seconds": grace})
    assert status == 201, body


async def test_a_create_that_reaches_redis_after_it_was_taken_back_adds_nothing(held):
    """A stalled Redis runs what sat in its buffers when it wakes, possibly after the
    take-back sent on another connection: the late create must add no key."""
    g, relay, url, first = held
    relay.delay_when(b"key.create")
    try:
        status, body = await asyncio.wait_for(g.admin_json(
            "POST", "/workspaces/acme/keys", {"name": "ci", "scopes": ["people:read"]}), 10)
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
        r = redis.Redis.from_url(url, decode_responses=True)
        assert await eventually(lambda: r.keys("kg:ws:{acme}:undone:*")), "no take-back ran"
    finally:
        relay.release()  # the create reaches Redis now
    await asyncio.sleep(0.3)
    assert _state(url) == {"keys": {first}, "active": {first}}
    status, listing = await g.admin_json("GET", "/workspaces/acme/keys")
    assert [k["id"] for k in listing["items"]] == [first]


def write_call(call: str, key_id: str) -> tuple[str, dict]:
    """The admin API path and body of the write under test: "create" (a key in acme) or
    "rotate" (of ``key_id``, no grace)."""
    if call == "create":
        return "/workspaces/acme/keys", {"name": "ci", "scopes": ["people:read"]}
    return f"/workspaces/acme/keys/{key_id}/rotate", {}


_ROLES_READ = b"HGETALL\r\n$18\r\nkg:ws:{acme}:roles"


@pytest.mark.parametrize("call", ["create", "rotate"])
async def test_a_write_that_ran_is_answered_with_its_token_when_a_read_after_it_fails(
        held, call):
    """The key object answered with a new token is made without reading the store after the
    write: a read failing there answered 503 for a key that stood, its token lost."""
    g, relay, url, first = held
    path, body = write_call(call, first)
    relay.hold_when(_ROLES_READ + b"\r\n")  # no read of it before the write, only after
    try:
        status, answer = await asyncio.wait_for(g.admin_json("POST", path, body), 10)
    finally:
        relay.release()
    assert status == 201, answer
    assert answer["key"]["scopes"] == ["people:read"]
    assert answer["key"]["used_this_month"] == 0
    async with g.proxy.get("/people", headers=bearer(answer["token"])) as r:
        assert r.status == 200


async def _cli(monkeypatch, g, *argv: str):
    """The real CLI (gateway.cli.main) against the gateway's admin listener, in a thread."""
    import contextlib
    import io

    from gateway.cli import main
    from harness import ADMIN_TOKEN
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("KEYGATE_ADMIN_URL", str(g.admin_server.make_url("")).rstrip("/"))
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))
    code = await asyncio.wait_for(asyncio.to_thread(run), 20)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("verb", ["create", "rotate", "revoke"])
async def test_the_cli_says_what_a_503_on_a_write_means_and_what_to_do(held, monkeypatch,
                                                                         verb):
    g, relay, url, first = held
    argv = {"create": ("keys", "create", "--workspace", "acme", "--name", "ci",
                       "--scope", "people:read"),
            "rotate": ("keys", "rotate", "--workspace", "acme", first),
            "revoke": ("keys", "revoke", "--workspace", "acme", first, "--yes")}[verb]
    marker = {"create": b"key.create", "rotate": b"key.rotate", "revoke": b"key.revoke"}[verb]
    relay.hold_when(marker)
    try:
        code, out, err = await _cli(monkeypatch, g, *argv)
    finally:
        relay.release()
    assert code == 1 and out == "", (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("keygate: ") and lines[0].endswith("(store_unavailable)"), err
    if verb == "revoke":
        assert "may have been made" in err and "run the same command again" in err, err
    else:
        assert "nothing was changed" in err and "taken back" in err, err
        assert "run the same command again" in err, err


@pytest.mark.parametrize("verb", ["create", "rotate"])
async def test_the_cli_says_nothing_was_changed_after_any_503_on_a_key_create_or_rotate(
        held, monkeypatch, verb):
    """docs/cli.md: after a `keys create` or `keys rotate` answered 503 store_unavailable,
    nothing was changed and the same command is run again. With every reply of Redis held
    (the store stalled before the create or rotation ran: a read before it failed), the
    gateway's answer says nothing of a take-back, and the CLI chose its hint by that text: it
    said the hint of the other writes, "the change may have been made or not ... (a create
    then answered 409 conflict was made by the first)", which a rerun of a create never
    answers. The hint is chosen by the command."""
    g, relay, url, first = held
    argv = {"create": ("keys", "create", "--workspace", "acme", "--name", "ci",
                       "--scope", "people:read"),
            "rotate": ("keys", "rotate", "--workspace", "acme", first)}[verb]
    relay.hold()
    try:
        code, out, err = await _cli(monkeypatch, g, *argv)
    finally:
        relay.release()
    assert code == 1 and out == "", (out, err)
    assert err.strip().splitlines()[0].endswith("(store_unavailable)"), err
    assert "taken back" not in err.strip().splitlines()[0], "not the case this test is for"
    assert "nothing was changed" in err and "run the same command again" in err, err
    assert "may have been made" not in err and "409" not in err, err


@pytest.mark.parametrize("call", ["create", "rotate"])
async def test_a_write_whose_caller_left_before_its_answer_is_taken_back(
        upstream, redis_url, monkeypatch, call):
    """The caller (a CLI with a short --timeout) gives up while Redis runs the write and the
    gateway waits for its reply: nobody gets the token, so the write is taken back."""
    import aiohttp
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=5))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace("acme")
        token, first = await g.key(name="first")
        path, body = write_call(call, first['id'])
        relay.hold_when(b"key." + call.encode())
        try:
            with pytest.raises(asyncio.TimeoutError):
                async with g.admin.post("/admin/v1" + path, json=body,
                                        timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    await r.read()
            await asyncio.sleep(0.2)  # the gateway sees the connection closed
        finally:
            relay.release()  # the write's reply reaches the gateway now: the caller is gone
        want = {"keys": {first["id"]}, "active": {first["id"]}}
        assert await eventually(lambda: _state(redis_url) == want), _state(redis_url)

        async def works() -> bool:
            async with g.proxy.get("/people", headers=bearer(token)) as r:
                return r.status == 200
        assert await eventually(works)


async def test_a_rotation_that_stood_is_answered_when_its_read_of_the_old_key_after_fails(held):
    g, relay, url, first = held
    read_old = b"HGETALL\r\n$26\r\n" + f"kg:key:{{acme}}:{first}".encode()
    # the third read of the old key: the admin API's, the store's before the write, then after
    relay.hold_when(read_old, nth=3)
    try:
        status, answer = await asyncio.wait_for(g.admin_json(
            "POST", f"/workspaces/acme/keys/{first}/rotate", {}), 10)
    finally:
        relay.release()
    assert status == 201, answer
    async with g.proxy.get("/people", headers=bearer(answer["token"])) as r:
        assert r.status == 200


def _consistent(url: str, ws: str = "acme") -> list[str]:
    """Every way the key data of ``ws`` can disagree with itself, as sentences (none: sound)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    problems = []
    listed = r.smembers(keyspace.ws_keys_key(ws))
    active = dict(r.zrange(keyspace.ws_active_key(ws), 0, -1, withscores=True))
    stored = {k.rsplit(":", 1)[1] for k in r.scan_iter(keyspace.key_key(ws, "*"))}
    if listed != stored:
        problems.append(f"listed {sorted(listed ^ stored)} vs stored")
    now = time.time()
    for key_id in stored:
        h = r.hgetall(keyspace.key_key(ws, key_id))
        if r.get(keyspace.key_index_key(key_id)) != ws:
            problems.append(f"{key_id} has no index entry")
        exp = float(h["expires_at"]) if h.get("expires_at") else None
        live = not h.get("revoked_at") and (exp is None or exp > now)
        if live != (key_id in active):
            problems.append(f"{key_id}: live {live}, in the active set {key_id in active}")
    for key_id in set(active) - stored:
        problems.append(f"{key_id} is counted as active and does not exist")
    audit = [json.loads(e["e"]) for _, e in r.xrange(keyspace.ws_audit_key(ws))]
    made = {e["target"] for e in audit if e["action"] == "key.create"} | \
        {e["details"]["new_key"] for e in audit if e["action"] == "key.rotate"}
    undone = {e["details"]["new_key"] for e in audit if e["action"].endswith(".undone")}
    if stored - made:
        problems.append(f"keys with no audit of their making: {sorted(stored - made)}")
    if stored & undone:
        problems.append(f"keys taken back yet stored: {sorted(stored & undone)}")
    return problems


async def take_backs_done(g) -> None:
    """Until the take-backs of the 503'd creates and rotations have run (they do once Redis
    answers): each is registered before its 503 is answered, so once the writers are done
    none can start later. A fixed second waited for them, and was the wrong bound under load."""
    assert await eventually(lambda: not g.gw.store._taking_back, timeout=30), \
        f"{len(g.gw.store._taking_back)} take-backs still running after 30 s"


async def test_key_writes_across_pauses_of_redis_leave_every_record_consistent(
        upstream, own_redis, monkeypatch):
    """Creates, rotations (with and without a grace), revokes, PATCHes and limits changes
    sent while Redis is stopped (SIGSTOP) and paused (CLIENT PAUSE) now and then: every key
    answered 201 works with its token, no 503'd one stands, and the index, key hashes, active
    set (the cap's count) and audit agree."""
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.3))
    async with gateway_under_test(config, own_redis.url, monkeypatch) as g:
        await g.workspace("acme")
        made: list[tuple[str, str]] = []  # (token, id) answered 201
        stop = asyncio.Event()
        seen: list[int] = []

        async def writer(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                ids = [k for _, k in made]
                kind = (i + n) % 5
                if kind in (0, 1) or not ids:
                    st, b = await g.admin_json("POST", "/workspaces/acme/keys",
                                               {"name": f"w{i}", "scopes": ["people:read"]})
                elif kind == 2:
                    st, b = await g.admin_json(
                        "POST", f"/workspaces/acme/keys/{ids[n % len(ids)]}/rotate",
                        {"grace_seconds": 3600 * (n % 2)})
                elif kind == 3:
                    st, b = await g.admin_json(
                        "POST", f"/workspaces/acme/keys/{ids[n % len(ids)]}/revoke", {})
                else:
                    st, b = await g.admin_json(
                        "PATCH", f"/workspaces/acme/keys/{ids[n % len(ids)]}", {"name": f"p{n}"})
                    if n % 3 == 0:
                        st, b = await g.admin_json("PATCH", "/workspaces/acme",
                                                   {"limits": {"max_keys": 5 + n % 3}})
                seen.append(st)
                if st == 201:
                    made.append((b["token"], b["key"]["id"]))
                assert st in (200, 201, 409, 503), (st, b)

        work = [asyncio.ensure_future(writer(i)) for i in range(6)]
        try:
            for cycle in range(3):
                await asyncio.sleep(0.4)
                os.kill(own_redis.proc.pid, signal.SIGSTOP)
                await asyncio.sleep(0.5)
                os.kill(own_redis.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.4)
                redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", "500")
                await asyncio.sleep(0.7)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*work), 20)
        assert 503 in seen and 201 in seen, sorted(set(seen))
        await take_backs_done(g)
        assert await eventually(lambda: not _consistent(own_redis.url)), \
            _consistent(own_redis.url)
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        for token, key_id in made:  # every token handed out belongs to a key that stands
            assert r.exists(keyspace.key_key("acme", key_id)), key_id
        stored = r.smembers(keyspace.ws_keys_key("acme"))
        # ... and every key that stands had its token handed out (none from a 503)
        assert stored <= {key_id for _, key_id in made}, stored - {k for _, k in made}


async def test_the_cli_says_what_a_timeout_on_a_create_means_and_what_to_do(
        upstream, redis_url, monkeypatch):
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=5))
    async with HeldReplies(redis_url) as relay, \
            gateway_under_test(config, relay.url, monkeypatch) as g:
        await g.workspace("acme")
        _, first = await g.key(name="first")
        relay.hold_when(b"key.create")
        try:
            code, out, err = await _cli(monkeypatch, g, "keys", "create", "--workspace", "acme",
                                        "--name", "ci", "--scope", "people:read",
                                        "--timeout", "0.5")
        finally:
            relay.release()
        assert code == 1 and out == "" and "Traceback" not in err, (out, err)
        assert "did not answer within 0.5s" in err, err
        assert "taken back" in err and "keygate keys list --workspace acme" in err, err
        want = {"keys": {first["id"]}, "active": {first["id"]}}
        assert await eventually(lambda: _state(redis_url) == want), _state(redis_url)


@pytest.mark.parametrize("persistence", ["aof", "none"])
async def test_key_writes_across_a_killed_and_restarted_redis_leave_every_record_consistent(
        upstream, tmp_path, monkeypatch, persistence):
    """Redis killed (SIGKILL) amid creates, rotations and revokes, and started again on the
    same port, with its AOF (appendfsync everysec, as ``embedded``) or with no persistence:
    whatever survived agrees with itself, and no key stands whose token was not handed out."""
    from conftest import RedisServer
    from test_store_faults import AofRedis
    server = AofRedis(str(tmp_path)) if persistence == "aof" else RedisServer(str(tmp_path))
    server.start()
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.3))
    try:
        async with gateway_under_test(config, server.url, monkeypatch) as g:
            await g.workspace("acme", plan="unlimited")
            made: list[str] = []
            stop = asyncio.Event()

            async def writer(i: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    if n % 3 or not made:
                        st, b = await g.admin_json("POST", "/workspaces/acme/keys",
                                                   {"name": f"w{i}", "scopes": ["people:read"]})
                    else:
                        st, b = await g.admin_json(
                            "POST", f"/workspaces/acme/keys/{made[-1]}/"
                            + ("rotate" if n % 2 else "revoke"), {})
                    if st == 201:
                        made.append(b["key"]["id"])
                    assert st in (200, 201, 404, 409, 503), (st, b)
                    if st in (404, 503):
                        await asyncio.sleep(0.05)

            work = [asyncio.ensure_future(writer(i)) for i in range(4)]
            try:
                await asyncio.sleep(0.8)
                server.proc.kill()
                server.proc.wait(10)
                await asyncio.sleep(0.5)
                server.start()
                await asyncio.sleep(0.8)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*work), 20)
            await take_backs_done(g)
            assert await eventually(lambda: not _consistent(server.url)), \
                _consistent(server.url)
            r = redis.Redis.from_url(server.url, decode_responses=True)
            stored = r.smembers(keyspace.ws_keys_key("acme"))
            assert stored <= set(made), stored - set(made)
    finally:
        server.stop()


async def _rotation_answered_503_then(held, change) -> dict:
    """A rotation without a grace answered 503 (it ran: the old key is revoked); then
    ``change(other, key_id)`` through another replica (a Store straight to Redis), before this
    replica's take-back gets through. Returns the old key as the admin API shows it once the
    take-back has removed the new key."""
    from gateway.store import Store
    g, relay, url, first = held
    relay.hold_when(b"key.rotate")
    try:
        status, body = await asyncio.wait_for(g.admin_json(
            "POST", f"/workspaces/acme/keys/{first}/rotate", {}), 10)
        assert status == 503, body
        other = await Store.connect(url, g.gw.config)  # another replica, straight to Redis
        try:
            await change(other, first)
        finally:
            await other.close()
    finally:
        relay.release()  # this replica's take-back gets through now
    assert await eventually(lambda: _state(url) == {"keys": {first}, "active": set()}), \
        _state(url)
    await asyncio.sleep(0.5)
    st, key = await g.admin_json("GET", f"/workspaces/acme/keys/{first}")
    assert st == 200, key
    return key


async def test_a_revoke_sent_after_a_rotation_answered_503_is_never_undone(held):
    """Rotation without a grace answered 503 (it ran: the old key is revoked); the operator
    then revokes the old key through another replica, before this replica's take-back gets
    through: the take-back removes the new key and leaves the old one revoked."""
    async def revoke(other, key_id: str) -> None:
        assert (await other.revoke_key("acme", key_id)).revoked_at is not None

    key = await _rotation_answered_503_then(held, revoke)
    assert key["status"] == "revoked", key


async def test_a_meta_edit_after_a_rotation_answered_503_is_never_undone(held):
    """As a revoke: the operator edits the old key's meta through another replica after the
    rotation was answered 503 (an edit that moves no rev, nothing a request decides on); the
    take-back still finds the key changed since the rotation, removes the new key and leaves
    the old one as the rotation and the edit left it, never as it was before either."""
    async def edit_meta(other, key_id: str) -> None:
        edited = await other.update_key("acme", key_id, meta=json.dumps({"crm": "c-2"}))
        assert edited.revoked_at is not None  # the rotation ran: revoked

    key = await _rotation_answered_503_then(held, edit_meta)
    assert (key["status"], key["meta"]) == ("revoked", {"crm": "c-2"}), key


@pytest.mark.parametrize("grace", [None, 0, 3600])
async def test_a_write_resent_on_a_fresh_connection_after_it_ran_makes_one_key(held, grace):
    """The connection dies after Redis ran the create or rotation, before its answer came
    (a restart, ``CLIENT KILL``, a proxy): redis-py sends the call again on a fresh connection.
    That second run must answer the first one's outcome: one new key, whose token is shown,
    and (rotating) the old key as that one rotation left it."""
    g, relay, url, first = held
    token, key = await g.key(name="integration")
    if grace is None:
        path, body, marker = "/workspaces/acme/keys", {"name": "ci",
                                                       "scopes": ["people:read"]}, b"key.create"
    else:
        path, body, marker = (f"/workspaces/acme/keys/{key['id']}/rotate",
                              {"grace_seconds": grace}, b"key.rotate")
    relay.drop_when(marker)
    status, answer = await asyncio.wait_for(g.admin_json("POST", path, body), 10)
    assert status == 201, answer
    new = answer["key"]["id"]
    await asyncio.sleep(0.3)  # any take-back has run
    old_active = grace != 0
    assert _state(url) == {"keys": {first, key["id"], new},
                           "active": {first, new} | ({key["id"]} if old_active else set())}, \
        (new, _state(url))
    async with g.proxy.get("/people", headers=bearer(answer["token"])) as r:
        assert r.status == 200


from test_redis_topologies import DATA_PW, SENTINEL_PW, sentinel_group  # noqa: E402,F401


@pytest.mark.parametrize("call", ["create", "rotate"])
async def test_a_write_on_sentinel_that_could_not_be_confirmed_is_taken_back(
        sentinel_group, upstream, monkeypatch, call):  # noqa: F811
    """On Sentinel a write is confirmed after it ran (the Sentinels still name its node as
    the master). Unconfirmed, it is answered 503 although the write may stand (no Sentinel
    answered, or a promotion came just after it): its token never shown, it is taken back as
    every other create or rotation answered 503."""
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.5))
    with redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW) as s:
        sentinel_pid = int(s.info("server")["process_id"])
    data = redis.Redis(port=sentinel_group["master"], password=DATA_PW, decode_responses=True)
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(name="integration")
        path, body = write_call(call, key['id'])
        os.kill(sentinel_pid, signal.SIGSTOP)  # no Sentinel answers: nothing is confirmed
        try:
            status, answer = await asyncio.wait_for(g.admin_json("POST", path, body), 20)
        finally:
            os.kill(sentinel_pid, signal.SIGCONT)
        assert (status, answer["error"]["code"]) == (503, "store_unavailable"), answer

        def state() -> dict:
            return {"keys": data.smembers(keyspace.ws_keys_key("acme")),
                    "active": set(data.zrange(keyspace.ws_active_key("acme"), 0, -1))}

        assert await eventually(lambda: state() == {"keys": {key["id"]},
                                                    "active": {key["id"]}}), state()
        async with g.proxy.get("/people", headers=bearer(token)) as r:
            assert r.status == 200
    data.close()


async def test_a_take_back_pending_when_the_store_closes_is_sent_once_redis_answers(held):
    """A create answered 503 while Redis stalled; Redis answers again just as the gateway
    shuts down. The take-back, waiting between two tries, was cancelled at once by the close:
    the key nobody holds stood (an error logged). It now gets its last try within the close."""
    from gateway.errors import StoreError
    from gateway.store import Store
    g, relay, url, first = held
    store = await Store.connect(relay.url, g.gw.config)
    try:
        warm = (await store.create_key("acme", name="warm", environment="live")).key.id
        relay.hold_when(b"key.create")
        with pytest.raises(StoreError):
            await asyncio.wait_for(store.create_key("acme", name="ci", environment="live"), 10)
        await asyncio.sleep(1.2)  # the take-back's tries meet the stall meanwhile
        relay.release()
        await asyncio.sleep(0.05)
    finally:
        await store.close()
    assert _state(url) == {"keys": {first, warm}, "active": {first, warm}}, _state(url)


@pytest.mark.parametrize("call", ["create", "rotate"])
async def test_a_write_cancelled_after_redis_ran_it_is_taken_back(held, call):
    """The admin listener's shutdown cancels a call still running after its grace (Redis slow
    to answer): a create or rotation cancelled while Redis ran its script is never answered,
    its token never shown. It is taken back as one answered 503 is."""
    from gateway.store import Store
    g, relay, url, first = held
    store = await Store.connect(relay.url, g.gw.config)
    try:
        token, key = await g.key(name="integration")
        if call == "create":
            write = store.create_key("acme", name="ci", environment="live")
        else:
            write = store.rotate_key("acme", key["id"])
        relay.hold_when(b"key.create" if call == "create" else b"key.rotate")
        task = asyncio.ensure_future(write)
        try:
            assert await eventually(lambda: relay.held_back > 0), "the script never ran"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            relay.release()
        assert await eventually(lambda: _state(url) == {"keys": {first, key["id"]},
                                                        "active": {first, key["id"]}}), \
            _state(url)
        async with g.proxy.get("/people", headers=bearer(token)) as r:
            assert r.status == 200
    finally:
        await store.close()
