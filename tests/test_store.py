"""gateway.store against a real redis-server: layout, atomicity, revisions, no secrets at rest."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis

from gateway.config import Argon2Config, Config, Plan
from gateway.errors import Conflict, NotFound, StoreError
from gateway.store import Store, key_index_key, key_key, slug_from_name, usage_key, ws_key
from gateway.usage import month_period
from gateway.tokens import parse_token
from harness import T0, Clock


def cheap_config(**changes) -> Config:
    base = Config()
    keys = dataclasses.replace(base.keys, argon2=Argon2Config(time_cost=1, memory_cost=8,
                                                                parallelism=1))
    plans = {"default": Plan("default"), "small": Plan("small", monthly_requests=1000,
                                                        max_keys=2)}
    return dataclasses.replace(base, keys=keys, plans=plans,
                               roles={"reader": ("people:read",)}, **changes)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(redis_url, clock):
    s = await Store.connect(redis_url, cheap_config(), clock=clock)
    yield s
    await s.close()


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


async def test_create_workspace_then_read_it_back(store):
    ws = await store.create_workspace("acme", "ACME", "default")
    assert ws.id == "acme" and ws.created_at == T0
    again = await store.get_workspace("acme")
    assert (again.id, again.name, again.plan) == ("acme", "ACME", "default")
    assert [w.id for w in await store.list_workspaces()] == ["acme"]


async def test_explicit_workspace_id_taken_is_a_conflict(store):
    await store.create_workspace("acme", "ACME", "default")
    with pytest.raises(Conflict):
        await store.create_workspace("acme", "Other", "default")
    assert (await store.get_workspace("acme")).name == "ACME"


async def test_derived_workspace_id_gets_a_suffix_when_taken(store):
    first = await store.create_workspace(None, "Acme Corp.", "default")
    second = await store.create_workspace(None, "Acme Corp.", "default")
    assert first.id == "acme-corp"
    assert second.id.startswith("acme-corp-") and second.id != first.id


def test_slug_from_name():
    assert slug_from_name("  Hello, World!  ") == "hello-world"
    assert slug_from_name("!!!") == "ws"


async def test_update_workspace_bumps_rev(store):
    ws = await store.create_workspace("acme", "ACME", "default")
    updated = await store.update_workspace("acme", plan="small")
    assert updated.plan == "small" and updated.rev > ws.rev


async def test_update_unknown_workspace_is_not_found_and_creates_nothing(store, raw):
    with pytest.raises(NotFound):
        await store.update_workspace("ghost", name="x")
    assert not raw.exists(ws_key("ghost"))


async def test_created_key_round_trips_and_verifies(store):
    await store.create_workspace("acme", "ACME", "default")
    new = await store.create_key("acme", name="ci", environment="live", scopes=["a:read"])
    parsed = parse_token(new.token, "kg", ("live", "test"))
    assert parsed.key_id == new.key.id
    key = await store.get_key("acme", new.key.id)
    assert key.scopes == ("a:read",) and key.role is None and key.rev >= 1
    assert key.prefix == new.token[:20]
    assert store.hasher.verify(key.hash, parsed.secret)
    assert await store.key_workspace(new.key.id) == "acme"


async def test_no_token_or_secret_anywhere_in_redis(store, raw):
    await store.create_workspace("acme", "ACME", "default")
    tokens = [(await store.create_key("acme", name=f"k{i}", environment="live")).token
              for i in range(3)]
    old = await store.create_key("acme", name="old", environment="test")
    _, rotated = await store.rotate_key("acme", old.key.id, grace_seconds=60)
    tokens += [old.token, rotated.token]
    secrets_ = [parse_token(t, "kg", ("live", "test")).secret for t in tokens]
    dump: list[str] = []
    for name in raw.scan_iter("*"):
        dump.append(name)
        kind = raw.type(name)
        if kind == "hash":
            for f, v in raw.hgetall(name).items():
                dump += [f, v]
                if f == "hash":
                    assert v.startswith("$argon2id$")
        elif kind == "string":
            dump.append(raw.get(name))
        elif kind == "set":
            dump += raw.smembers(name)
        elif kind == "zset":
            dump += raw.zrange(name, 0, -1)
        elif kind == "stream":
            for _id, fields in raw.xrange(name):
                dump += list(fields.values())
    text = "\n".join(dump)
    for token, secret in zip(tokens, secrets_):
        assert token not in text
        assert secret not in text


async def test_create_key_in_unknown_workspace_leaves_no_index(store, raw):
    with pytest.raises(NotFound):
        await store.create_key("ghost", name="k", environment="live")
    assert raw.keys("kg:keyid:*") == []


async def test_key_cap_counts_only_active_keys(store, clock):
    await store.create_workspace("acme", "ACME", "small")
    a = await store.create_key("acme", name="a", environment="live")
    await store.create_key("acme", name="b", environment="live", expires_at=T0 + 10)
    with pytest.raises(Conflict) as info:
        await store.create_key("acme", name="c", environment="live")
    assert info.value.code == "key_limit_reached"
    await store.revoke_key("acme", a.key.id)
    await store.create_key("acme", name="c", environment="live")  # the revoked one freed a slot
    clock.now = T0 + 11                                            # "b" expired
    await store.create_key("acme", name="d", environment="live")
    with pytest.raises(Conflict):
        await store.create_key("acme", name="e", environment="live")


async def test_concurrent_creates_at_the_cap_admit_exactly_the_cap(store, raw):
    await store.create_workspace("acme", "ACME", "small")
    results = await asyncio.gather(
        *[store.create_key("acme", name=f"k{i}", environment="live") for i in range(12)],
        return_exceptions=True)
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(made) == 2 and len(refused) == 10
    assert len(await store.list_keys("acme")) == 2
    assert len(raw.keys("kg:keyid:*")) == 2  # refused creates released their ids


async def test_revoke_bumps_rev_and_is_idempotent(store):
    await store.create_workspace("acme", "ACME", "default")
    new = await store.create_key("acme", name="k", environment="live")
    first = await store.revoke_key("acme", new.key.id)
    assert first.revoked_at == T0 and first.rev > new.key.rev
    again = await store.revoke_key("acme", new.key.id)
    assert again.revoked_at == first.revoked_at and again.rev == first.rev
    assert len([e for e in await store.audit("acme") if e["action"] == "key.revoke"]) == 1


async def test_update_key_rebinds_and_bumps_rev(store):
    await store.create_workspace("acme", "ACME", "default")
    new = await store.create_key("acme", name="k", environment="live", scopes=["a:read"])
    rebound = await store.update_key("acme", new.key.id, role="reader", name="renamed")
    assert rebound.role == "reader" and rebound.scopes == () and rebound.name == "renamed"
    assert rebound.rev > new.key.rev
    assert await store.effective_scopes("acme", rebound) == ("people:read",)
    back = await store.update_key("acme", new.key.id, scopes=["b:write"], expires_at=T0 + 5)
    assert back.role is None and back.scopes == ("b:write",) and back.expires_at == T0 + 5


async def test_update_unknown_key_is_not_found_and_creates_nothing(store, raw):
    await store.create_workspace("acme", "ACME", "default")
    with pytest.raises(NotFound):
        await store.update_key("acme", "AAAAAAAAAAAA", name="x")
    assert not raw.exists(key_key("acme", "AAAAAAAAAAAA"))


async def test_workspace_role_shadows_config_role_and_bumps_workspace_rev(store):
    ws = await store.create_workspace("acme", "ACME", "default")
    new = await store.create_key("acme", name="k", environment="live", role="reader")
    await store.put_role("acme", "reader", ["people:read", "people:write"])
    assert await store.effective_scopes("acme", new.key) == ("people:read", "people:write")
    after_put = await store.get_workspace("acme")
    assert after_put.rev > ws.rev
    await store.delete_role("acme", "reader")
    assert await store.effective_scopes("acme", new.key) == ("people:read",)
    assert (await store.get_workspace("acme")).rev > after_put.rev
    with pytest.raises(NotFound):
        await store.delete_role("acme", "reader")


async def test_rotate_with_grace_keeps_old_key_until_grace_ends(store, clock):
    await store.create_workspace("acme", "ACME", "small")
    old = await store.create_key("acme", name="k", environment="live", scopes=["x"],
                                 rate_limit="5/s")
    await store.create_key("acme", name="other", environment="live")  # at the cap now
    before, new = await store.rotate_key("acme", old.key.id, grace_seconds=60)
    assert before.expires_at == T0 + 60 and before.revoked_at is None
    assert before.rev > old.key.rev
    assert (new.key.name, new.key.scopes, new.key.rate_limit) == ("k", ("x",), "5/s")
    assert new.key.id != old.key.id
    # the rotation may exceed the cap by the one key during the grace; creates may not
    with pytest.raises(Conflict):
        await store.create_key("acme", name="third", environment="live")
    clock.now = T0 + 61
    assert (await store.get_key("acme", old.key.id)).status(clock.now) == "expired"


async def test_rotate_without_grace_revokes_and_revoked_cannot_rotate(store):
    await store.create_workspace("acme", "ACME", "default")
    old = await store.create_key("acme", name="k", environment="live")
    before, _ = await store.rotate_key("acme", old.key.id)
    assert before.revoked_at == T0
    with pytest.raises(Conflict):
        await store.rotate_key("acme", old.key.id)


async def test_list_keys_filters_by_status(store, clock):
    await store.create_workspace("acme", "ACME", "default")
    a = await store.create_key("acme", name="a", environment="live")
    b = await store.create_key("acme", name="b", environment="live", expires_at=T0 + 1)
    c = await store.create_key("acme", name="c", environment="live")
    await store.revoke_key("acme", c.key.id)
    clock.now = T0 + 2
    assert [k.id for k in await store.list_keys("acme", "active")] == [a.key.id]
    assert [k.id for k in await store.list_keys("acme", "expired")] == [b.key.id]
    assert [k.id for k in await store.list_keys("acme", "revoked")] == [c.key.id]
    assert len(await store.list_keys("acme")) == 3


async def test_usage_reads_the_month_counter(store, raw, clock):
    await store.create_workspace("acme", "ACME", "small")
    clock.now = T0 + 40 * 86400  # 2026-02-10
    period, _ = month_period(clock.now)
    raw.set(usage_key("acme", period), 250)
    assert await store.usage("acme") == {
        "workspace": "acme", "plan": "small", "period": "2026-02", "used": 250,
        "limit": 1000, "remaining": 750, "resets_at": "2026-03-01T00:00:00Z",
        "limits": {"monthly_requests": 1000, "max_keys": 2, "rate_limit": None}}


async def test_usage_unlimited_plan_has_null_limit(store):
    await store.create_workspace("acme", "ACME", "default")
    usage = await store.usage("acme")
    assert usage["used"] == 0 and usage["limit"] is None and usage["remaining"] is None
    assert usage["resets_at"] == "2026-02-01T00:00:00Z"


def test_month_period_rolls_over_the_year():
    assert month_period(T0 - 1) == ("2025-12", T0)


async def test_audit_is_newest_first_and_limited(store):
    await store.create_workspace("acme", "ACME", "default")
    for i in range(3):
        await store.create_key("acme", name=f"k{i}", environment="live")
    events = await store.audit("acme", limit=2)
    assert len(events) == 2
    assert [e["details"]["name"] for e in events] == ["k2", "k1"]
    assert events[0]["actor"] == "operator" and events[0]["at"] == "2026-01-01T00:00:00Z"
    assert (await store.audit("acme"))[-1]["action"] == "workspace.create"


async def test_store_down_raises_store_error(own_redis):
    s = await Store.connect(own_redis.url, cheap_config())
    assert await s.ping()
    own_redis.stop()
    assert not await s.ping()
    with pytest.raises(StoreError):
        await s.get_workspace("acme")
    with pytest.raises(StoreError):
        await s.create_workspace("acme", "ACME", "default")
    await s.close()


async def test_index_entry_points_at_the_workspace(store, raw):
    await store.create_workspace("acme", "ACME", "default")
    new = await store.create_key("acme", name="k", environment="live")
    assert raw.get(key_index_key(new.key.id)) == "acme"


async def test_reviving_an_expired_key_counts_against_the_cap(store, clock):
    await store.create_workspace("acme", "ACME", "small")
    old = await store.create_key("acme", name="a", environment="live", expires_at=T0 + 10)
    clock.now = T0 + 20
    await store.create_key("acme", name="b", environment="live")
    await store.create_key("acme", name="c", environment="live")
    with pytest.raises(Conflict) as info:
        await store.update_key("acme", old.key.id, expires_at=T0 + 1000)
    assert info.value.code == "key_limit_reached"
    assert (await store.get_key("acme", old.key.id)).expires_at == T0 + 10
    renamed = await store.update_key("acme", old.key.id, name="still-expired")
    assert renamed.name == "still-expired"


async def test_extending_an_active_key_at_the_cap_is_fine(store):
    await store.create_workspace("acme", "ACME", "small")
    a = await store.create_key("acme", name="a", environment="live", expires_at=T0 + 10)
    await store.create_key("acme", name="b", environment="live")
    extended = await store.update_key("acme", a.key.id, expires_at=None)
    assert extended.expires_at is None
    with pytest.raises(Conflict):
        await store.create_key("acme", name="c", environment="live")


async def test_rotate_copies_the_key_as_it_is_when_the_script_runs(redis_url, raw):
    """rotate_key read the old key, hashed a new secret (argon2: the slow part), then created
    the new key from that earlier read. An operator narrowing the key's scopes in between was
    undone: the new key got the old, wider scopes. The script now checks the old key's rev."""
    state = {"armed": False}

    def clock() -> float:
        if state["armed"]:  # runs after the read and the hashing, before the script
            state["armed"] = False
            k = key_key("acme", state["id"])
            raw.hset(k, "scopes", '["people:read"]')
            raw.hincrby(k, "rev", 1)
        return T0

    s = await Store.connect(redis_url, cheap_config(), clock=clock)
    try:
        await s.create_workspace("acme", "ACME", "default")
        old = await s.create_key("acme", name="k", environment="live",
                                 scopes=["people:read", "people:write"])
        state.update(armed=True, id=old.key.id)
        _, new = await s.rotate_key("acme", old.key.id)
        assert (await s.get_key("acme", new.key.id)).scopes == ("people:read",)
        # a caller that checked a given revision is told the key changed under it
        other = await s.create_key("acme", name="o", environment="live", scopes=["a:b"])
        with pytest.raises(Conflict):
            await s.rotate_key("acme", other.key.id, expect_rev=other.key.rev + 5)
        assert (await s.get_key("acme", other.key.id)).revoked_at is None
    finally:
        await s.close()


async def test_reviving_an_expired_key_meets_the_cap_as_it_is_when_the_script_runs(redis_url,
                                                                                   raw):
    """A new expiry for an expired key makes it active again, so it meets the key cap: the cap
    was read, then the script ran with it. An operator lowering ``max_keys`` in between was
    not seen, and the key came back over the new cap (creates and rotations check it)."""
    now = {"t": T0, "armed": False}

    def clock() -> float:
        if now["armed"]:  # runs after the workspace read, before the script
            now["armed"] = False
            raw.hset(ws_key("acme"), "limits", '{"max_keys":1}')
            raw.hincrby(ws_key("acme"), "rev", 1)
        return now["t"]

    s = await Store.connect(redis_url, cheap_config(), clock=clock)
    try:
        await s.create_workspace("acme", "ACME", "default")
        old = await s.create_key("acme", name="a", environment="live", expires_at=T0 + 10)
        await s.create_key("acme", name="b", environment="live")
        now["t"] = T0 + 20
        now["armed"] = True
        with pytest.raises(Conflict) as info:
            await s.update_key("acme", old.key.id, expires_at=T0 + 1000)
        assert info.value.code == "key_limit_reached"
        assert (await s.get_key("acme", old.key.id)).expires_at == T0 + 10
        assert [k.id for k in await s.list_keys("acme", "active")] != [old.key.id]
        assert len(await s.list_keys("acme", "active")) == 1
    finally:
        await s.close()


def test_key_lifecycles_keep_their_invariants(redis_url):
    """Random sequences of creates, rotations (with and without a grace), revokes, new
    expiries, deletes, cap changes and the passing of time, against a model: each key's
    revoked_at and expires_at are what the rules say (revoked stays revoked, with its first
    revoked_at; a grace never lengthens a life), the active set is the model's, a key is only
    made active under the cap in force (a rotation with a grace: one over it), and there is
    exactly one audit entry per change (none for a refusal or a repeated revoke)."""
    from hypothesis import HealthCheck, settings, strategies as st
    from hypothesis.stateful import (RuleBasedStateMachine, invariant, rule,
                                     run_state_machine_as_test)

    class Lifecycles(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            with redis.Redis.from_url(redis_url) as client:
                client.flushdb()
            self.loop = asyncio.new_event_loop()
            self.now = T0
            self.store = self.run(Store.connect(redis_url, cheap_config(),
                                                clock=lambda: self.now))
            self.run(self.store.create_workspace("acme", "ACME", "default"))
            self.keys: dict[str, dict] = {}   # in creation order: revoked_at, expires_at
            self.cap: int | None = None
            self.audited = 1                  # workspace.create

        def run(self, coro):
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            self.run(self.store.close())
            self.loop.close()

        def active(self) -> list[str]:
            return [k for k, v in self.keys.items() if v["revoked_at"] is None
                    and (v["expires_at"] is None or v["expires_at"] > self.now)]

        def at_cap(self, over: int = 0) -> bool:
            return self.cap is not None and len(self.active()) >= self.cap + over

        def pick(self, data) -> str | None:
            return data.draw(st.sampled_from(list(self.keys))) if self.keys else None

        @rule(life=st.sampled_from([None, 5, 50]))
        def create(self, life):
            full = self.at_cap()
            try:
                new = self.run(self.store.create_key(
                    "acme", name="k", environment="live",
                    expires_at=None if life is None else self.now + life))
            except Conflict as exc:
                assert full and exc.code == "key_limit_reached"
                return
            assert not full
            self.keys[new.key.id] = {"revoked_at": None, "expires_at": new.key.expires_at}
            self.audited += 1

        @rule(data=st.data())
        def revoke(self, data):
            if (k := self.pick(data)) is None:
                return
            key = self.run(self.store.revoke_key("acme", k))
            if self.keys[k]["revoked_at"] is None:
                self.keys[k]["revoked_at"] = self.now
                self.audited += 1
            assert key.revoked_at == self.keys[k]["revoked_at"]

        @rule(data=st.data(), grace=st.sampled_from([0, 3, 30]))
        def rotate(self, data, grace):
            if (k := self.pick(data)) is None:
                return
            v, active = self.keys[k], k in self.active()
            refused = v["revoked_at"] is not None or (
                not active and self.at_cap()) or (active and grace and self.at_cap(over=1))
            try:
                old, new = self.run(self.store.rotate_key("acme", k, grace_seconds=grace))
            except Conflict:
                assert refused
                return
            assert not refused
            if grace == 0:
                v["revoked_at"] = self.now
            elif active and (v["expires_at"] is None or self.now + grace < v["expires_at"]):
                v["expires_at"] = self.now + grace
            assert (old.revoked_at, old.expires_at) == (v["revoked_at"], v["expires_at"])
            self.keys[new.key.id] = {"revoked_at": None, "expires_at": new.key.expires_at}
            self.audited += 1

        @rule(data=st.data(), life=st.sampled_from([None, 20, 200]))
        def new_expiry(self, data, life):
            if (k := self.pick(data)) is None:
                return
            v = self.keys[k]
            expires_at = None if life is None else self.now + life
            # an active key given a later expiry (or none) needs room while the workspace is
            # over its cap (a rotation's grace, a lowered cap), as an expired one brought back
            later = v["expires_at"] is not None and (expires_at is None
                                                     or expires_at > v["expires_at"])
            refused = v["revoked_at"] is None and (
                (k not in self.active() and self.at_cap())
                or (k in self.active() and later and self.at_cap(over=1)))
            try:
                self.run(self.store.update_key("acme", k, expires_at=expires_at))
            except Conflict:
                assert refused
                return
            assert not refused
            v["expires_at"] = expires_at
            self.audited += 1

        @rule(data=st.data())
        def delete(self, data):
            if (k := self.pick(data)) is None:
                return
            try:
                self.run(self.store.delete_key("acme", k))
            except Conflict:
                assert k in self.active()
                return
            assert k not in self.active()
            del self.keys[k]
            self.audited += 1

        @rule(cap=st.sampled_from([None, 1, 2, 4]))
        def set_cap(self, cap):
            self.run(self.store.update_workspace("acme", limits={"max_keys": cap}))
            self.cap = cap
            self.audited += 1

        @rule(seconds=st.sampled_from([1, 4, 25]))
        def time_passes(self, seconds):
            self.now += seconds

        @invariant()
        def the_store_agrees(self):
            keys = self.run(self.store.list_keys("acme"))
            assert {k.id: (k.revoked_at, k.expires_at) for k in keys} == {
                k: (v["revoked_at"], v["expires_at"]) for k, v in self.keys.items()}
            assert {k.id for k in keys if k.status(self.now) == "active"} == set(self.active())
            assert len(self.run(self.store.audit("acme", 10_000))) == self.audited

    run_state_machine_as_test(Lifecycles, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))
