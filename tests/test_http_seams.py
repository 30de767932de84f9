"""The seams of the request path taken apart: the pure access check, the fail-open ledger (on
a real store that is stopped and started) and the pure header rules, each without a
listener."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis
from hypothesis import given, strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access import refusal
from gateway.auth import CachedKey
from gateway.store.keyspace import write_key
from gateway.store.request import ALREADY, WRITE_ID_TTL, WRITTEN, RequestStore, Slot
from gateway.ledger import LocalLedger
from gateway.usage import MonthCache, ratelimit_headers
from gateway.config import IdentityHeaders, IdentitySignature
from gateway.models import KeyRecord, Principal, RateLimit, Workspace
from gateway.proxying.headers import RequestHeaderRules, response_headers
from gateway.tokens import make_token
from harness import make_config

TOKEN, _ = make_token("kg", "live")

NOW = 1_750_000_000.0


def _key(**changes) -> CachedKey:
    record = KeyRecord("k1", "acme", "ci", "", "live", None, ("people:read",), "h", "kg_",
                       NOW - 100, None, None, None, None)
    record = dataclasses.replace(record, **changes)
    return CachedKey(record, Workspace("acme", "Acme", "starter", NOW - 200),
                     Principal("acme", "k1", frozenset({"people:read"}), "starter"),
                     None, None, b"", 0.0)


def _owned(r: redis.Redis, slot: Slot) -> None:
    """The slot's workspace and key in the store, as the ledger's counts need them there
    (lua/ledger_write.lua: a store that lost them is written nothing)."""
    r.hset(f"kg:ws:{{{slot.workspace}}}", mapping={"id": slot.workspace, "rev": "1"})
    r.hset(f"kg:key:{{{slot.workspace}}}:{slot.key_id}", mapping={"id": slot.key_id, "rev": "1"})


def _code(key: CachedKey, scopes=("people:read",), blocked=False) -> str | None:
    refused = refusal(key, scopes, now=NOW, blocked=blocked)
    return None if refused is None else refused.code


def test_access_is_refused_in_specs_order() -> None:
    everything = _key(expires_at=NOW, revoked_at=NOW - 1, enabled=False)
    assert _code(everything, ("people:write",), blocked=True) == "expired_key"
    assert _code(_key(revoked_at=NOW - 1, enabled=False), ("x",), True) == "revoked_key"
    assert _code(_key(enabled=False), ("x",), True) == "disabled_key"
    assert _code(_key(), ("x",), True) == "ip_not_allowed"
    assert _code(_key(), ("people:write",)) == "insufficient_scope"
    assert _code(_key(expires_at=NOW + 1)) is None


async def test_the_ledger_nets_what_it_takes_back_and_keeps_a_failed_write_as_it_was(
        own_redis) -> None:
    slot = Slot("acme", "k1", "2025-06", "2025-06-15", "k1")
    store = RequestStore(own_redis.url, timeout=0.5)
    ledger = LocalLedger(store, MonthCache(), lambda: NOW, retry_every=3600)  # no retry here
    own_redis.stop()                  # the store is down: nothing listens on its port
    ledger.add(slot)
    ledger.add(slot)
    ledger.take_back(slot)
    assert ledger.counts == {slot: 1}
    ledger.flush()                    # the store is still down: the write waits, unchanged
    assert not ledger.counts and [(w.slot, w.n) for w in ledger.pending.values()] == [(slot, 1)]
    [write_id] = ledger.pending
    await asyncio.wait((ledger._writer,))
    ledger.add(slot)                  # counted meanwhile: not merged into the waiting write,
    ledger.flush()                    # nor a write of its own while that one waits
    await asyncio.wait((ledger._writer,))
    assert [(w.id, w.n) for w in ledger.pending.values()] == [(write_id, 1)]
    assert ledger.counts == {slot: 1}
    ledger.add(slot)
    ledger.flush()                    # a second retry: still the one write, and one number
    await asyncio.wait((ledger._writer,))
    assert [(w.id, w.n) for w in ledger.pending.values()] == [(write_id, 1)]
    assert ledger.counts == {slot: 2}
    ledger.take_back(slot)
    await ledger.close()              # a shutdown with the store still down: tried, then left
    assert [w.n for w in ledger.pending.values()] == [1] and ledger.counts == {slot: 1}
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())
    own_redis.start()                 # the store is back, on the same port
    r = redis.Redis.from_url(own_redis.url)
    _owned(r, slot)
    await ledger.close()
    assert not ledger
    assert [int(r.get(k)) for k in slot.counters()] == [2, 2, 2, 2]  # each written once
    ledger.take_back(slot)            # already in the store: the ledger writes the subtraction
    await ledger.close()
    assert [int(r.get(k)) for k in slot.counters()] == [1, 1, 1, 1]
    await store.close()


async def test_a_ledger_write_sent_twice_counts_once_and_never_below_zero(redis_url) -> None:
    slot = Slot("acme", "k1", "2025-06", "2025-06-15", "k1")
    store = RequestStore(redis_url, timeout=0.5)
    r = redis.Redis.from_url(redis_url)
    _owned(r, slot)
    assert await store.add_usage(slot, 3, 60, "w-1") == WRITTEN
    assert await store.add_usage(slot, 3, 60, "w-1") == ALREADY  # a copy of it: nothing again
    assert [int(r.get(k)) for k in slot.counters()] == [3, 3, 3, 3]
    assert await store.add_usage(slot, -5, 60, "w-2") == WRITTEN
    assert [int(r.get(k)) for k in slot.counters()] == [0, 0, 0, 0]
    assert all(r.ttl(k) > 0 for k in slot.counters())
    assert 0 < r.ttl(write_key("acme", "w-1")) <= WRITE_ID_TTL
    await store.close()


def test_request_header_rules_drop_hop_by_hop_named_identity_and_untrusted_forwarding() -> None:
    rules = RequestHeaderRules(make_config("http://127.0.0.1:9"))
    headers = CIMultiDictProxy(CIMultiDict([
        ("Host", "api.example"), ("Connection", "keep-alive, X-Drop"), ("X-Drop", "1"),
        ("X_Workspace_Id", "evil"), ("X-Forwarded-For", "6.6.6.6"), ("Accept", "a"),
        ("Accept", "b"), ("Content-Length", "3")]))
    out = rules.passed_on(headers, "10.0.0.1", "http", None)
    assert out == [("Accept", "a"), ("Accept", "b"), ("X-Forwarded-For", "10.0.0.1"),
                   ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "api.example")]


def test_response_headers_drop_hop_by_hop_and_connection_named_ones() -> None:
    out = response_headers([(b"Connection", b"close, X-Secret"), (b"X-Secret", b"s"),
                            (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                            (b"Keep-Alive", b"timeout=5")],
                           RequestHeaderRules(make_config("http://127.0.0.1:9")))
    assert list(out.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


async def test_a_ledger_closed_starts_no_retry_loop_for_what_comes_later(redis_url) -> None:
    """A late store reply can take a request back while the gateway shuts down, after the
    ledger wrote what it held: no retry loop may start then (a task left pending at exit)."""
    slot = Slot("acme", "k1", "2025-06", "2025-06-15", "k1")
    store = RequestStore(redis_url, timeout=0.5)
    ledger = LocalLedger(store, MonthCache(), lambda: NOW, retry_every=3600)
    ledger.add(slot)
    await ledger.close()
    ledger.take_back(slot)
    assert ledger._retry is None or ledger._retry.done()
    await store.close()


_NAMES = ["Host", "host", "Accept", "Authorization", "authorization", "X-Api-Key", "x_api_key",
          "X-Forwarded-For", "x_forwarded_for", "X-Forwarded-Proto", "X-Forwarded-Host",
          "X-Forwarded-Port", "Forwarded", "X-Workspace-Id", "X_Workspace_Id", "Keep-Alive",
          "TE", "Upgrade", "Content-Length", "Expect", "X-Request-Id", "traceparent",
          "tracestate", "X-Keygate-Signature", "Cookie", "X-Custom", "x-custom",
          "X-Real-IP", "x_real_ip", "True-Client-IP", "Client-IP", "X-Forwarded",
          "X.Workspace.Id", "x+forwarded+for", "X.Real.IP", "X~Keygate~Signature",
          "X.HTTP.Method.Override", "X_HTTP_Method_Override", "X-Remote-User",
          "REMOTE_USER", "X-WEBAUTH-USER", "x.webauth.user", "X-Host", "x_host",
          "X-Original-URI", "X-Auth-Token"]


@given(st.lists(st.tuples(st.sampled_from(_NAMES),
                          st.sampled_from(["1", "a b", f"Bearer {TOKEN}", f"bearer\t{TOKEN}",
                                           "Bearer other", "Basic x", "6.6.6.6", "https"])),
                max_size=12),
       st.sampled_from(["10.0.0.1", "127.0.0.1", None]), st.booleans(), st.booleans())
def test_the_header_rules_fast_path_passes_on_what_the_rules_do(pairs, peer, keyed, trust):
    """passed_on remembers what it does with each header name; for any mix of names (case,
    `_` spellings, repeats, forwarding headers from trusted and untrusted peers, Bearer tokens
    on keyed and public routes), it passes on exactly what applying the rules one header at a
    time does."""
    config = make_config("http://127.0.0.1:9")
    if trust:
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, trusted_proxies=("127.0.0.1/32",)))
    rules = RequestHeaderRules(config)
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    principal = Principal("acme", "k1", frozenset({"people:read"}), "starter") if keyed else None
    for _ in range(2):  # the second time from what it remembered
        assert rules.passed_on(headers, peer, "http", principal) == \
            rules.passed_on_by_rule(headers, peer, "http", principal)



from gateway.proxying.headers import _HOP_BY_HOP_BYTES as HOP_BY_HOP_BYTES  # noqa: E402
from gateway.proxying.headers import AUTH_USER, HOST_OVERRIDE, PATH_OVERRIDE  # noqa: E402


def response_headers_by_rule(raw, own: frozenset[bytes] = frozenset()):
    """What response_headers did before it remembered names (judging every name afresh):
    the reference the remembering one is tested against. ``own``: keygate's identity and
    signature header names (lower case, ``-`` spelling), dropped too."""
    named: set[bytes] | None = None
    kept: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in raw:
        lname = raw_name.lower()
        if lname in HOP_BY_HOP_BYTES:
            if lname == b"connection":
                named = named or set()
                named.update(t.strip().lower() for t in raw_value.split(b",") if t.strip())
            continue
        if lname.replace(b"_", b"-") in own:
            continue
        kept.append((raw_name, raw_value))
    out: CIMultiDict = CIMultiDict()
    for raw_name, raw_value in kept:
        if named and raw_name.lower() in named:
            continue
        out.add(raw_name.decode("latin-1"), raw_value.decode("utf-8", "surrogateescape"))
    return out


_RESPONSE_NAMES = [b"Content-Type", b"content-type", b"Set-Cookie", b"X-Secret", b"x-secret",
                   b"Connection", b"connection", b"Keep-Alive", b"Transfer-Encoding",
                   b"Upgrade", b"Proxy-Authenticate", b"Date", b"Server", b"X-\xe9",
                   b"X-Workspace-Id", b"x_workspace_id", b"X-Tenant", b"X_TENANT", b"X-Sig",
                   b"X-Keygate-Signature", b"x-api-scopes"]


@given(st.lists(st.tuples(st.sampled_from(_RESPONSE_NAMES),
                          st.sampled_from([b"1", b"close", b"keep-alive", b"close, X-Secret",
                                           b" x-secret ,Upgrade", b"a=\xe9\xff", b""])),
                max_size=10))
def test_response_headers_fast_path_passes_back_what_the_rules_do(raw):
    """response_headers remembers each upstream header name; for any mix (case, hop-by-hop,
    Connection naming other headers, non-UTF-8 bytes, keygate's identity and signature
    headers under default and configured names) it passes back what judging every name
    afresh does, the first time and from memory."""
    defaults = frozenset({b"x-workspace-id", b"x-api-key-id", b"x-api-scopes",
                          b"x-workspace-plan", b"x-keygate-signature"})
    for _ in range(2):
        assert list(response_headers(raw, RESPONSE_RULES[0]).items()) == \
            list(response_headers_by_rule(raw, defaults).items())
        assert list(response_headers(raw, RESPONSE_RULES[1]).items()) == \
            list(response_headers_by_rule(raw, defaults - {b"x-workspace-id"}
                                          | {b"x-tenant", b"x-sig"}).items())


_CONFIG = make_config("http://127.0.0.1:9")
RESPONSE_RULES = (RequestHeaderRules(_CONFIG), RequestHeaderRules(dataclasses.replace(
    _CONFIG, identity_headers=IdentityHeaders(workspace="X-Tenant"),
    identity_signature=IdentitySignature("SIG", header="X-Sig"))))  # remembered across examples


# --- RateLimit fields: the policy is formatted once per key and month ---------------------------

def _ratelimit_headers_by_rule(rate, rate_remaining, rate_reset_ms, monthly_limit, month_used,
                               month, now, key_limit=None, key_used=0):
    """The fields as written before the policy was remembered: the reference."""
    import math
    policies, values = [], []
    if rate is not None:
        policies.append(f'"rate";q={rate.requests};w={rate.period_seconds}')
        values.append(f'"rate";r={max(0, rate_remaining)};'
                      f't={max(0, math.ceil(rate_reset_ms / 1000))}')
    if monthly_limit is not None:
        policies.append(f'"monthly";q={monthly_limit};w={month.seconds}')
        values.append(f'"monthly";r={max(0, monthly_limit - month_used)};'
                      f't={month.seconds_left(now)}')
    if key_limit is not None:
        policies.append(f'"key-monthly";q={key_limit};w={month.seconds}')
        values.append(f'"key-monthly";r={max(0, key_limit - key_used)};'
                      f't={month.seconds_left(now)}')
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(values)}


# few distinct limits, so a remembered policy is met again, in other months and for other keys
_LIMITS = st.sampled_from([None, 0, 1000, 10**9])
_RATES = st.sampled_from([None, RateLimit(5, 1), RateLimit(5, 60), RateLimit(100, 1)])
# instants across months of 28, 29, 30 and 31 days (2023-2025)
_NOW = st.floats(1_672_531_200, 1_767_225_600, allow_nan=False)


@given(st.lists(st.tuples(_RATES, st.integers(-5, 10**6), st.integers(-2000, 120_000),
                          _LIMITS, st.integers(0, 10**9), _LIMITS, st.integers(0, 10**9), _NOW),
                min_size=1, max_size=30))
def test_ratelimit_fields_are_what_formatting_them_each_time_gives(calls):
    """Many calls in a row (so remembered policies are reused across keys, limits and
    months): each answer is the reference's."""
    months = MonthCache()
    for rate, remaining, reset_ms, monthly, used, key_limit, key_used, now in calls:
        month = months.get(now)
        assert ratelimit_headers(rate, remaining, reset_ms, monthly, used, month, now,
                                 key_limit, key_used) == \
            _ratelimit_headers_by_rule(rate, remaining, reset_ms, monthly, used, month, now,
                                       key_limit, key_used)


# Names upstream libraries read the client's address from besides the six nginx/CDN ones:
# django-ipware (HTTP_CLIENT_IP, HTTP_X_FORWARDED, HTTP_FORWARDED_FOR), request-ip (npm:
# x-forwarded, forwarded-for, do-connecting-ip, x-appengine-user-ip, cf-pseudo-ipv4), Java
# stacks (Proxy-Client-IP, WL-Proxy-Client-IP), Fly.io, Akamai, X-Originating-IP.
_MORE_CLIENT_ADDRESS = ["Client-IP", "X-Forwarded", "Forwarded-For", "X_Forwarded",
                        "Proxy-Client-IP", "WL-Proxy-Client-IP", "X-Originating-IP",
                        "X-Remote-IP", "X-Remote-Addr", "DO-Connecting-IP", "Fly-Client-IP",
                        "X-AppEngine-User-IP", "CF-Connecting-IPv6", "CF-Pseudo-IPv4",
                        "Akamai-Client-IP"]


@given(st.sampled_from(_MORE_CLIENT_ADDRESS), st.booleans())
def test_every_client_address_header_upstreams_read_is_dropped_from_an_untrusted_peer(
        name, connection_names_one):
    """A forged client address in any header name a common upstream library reads it from
    never passes from a peer keygate does not trust (fast path and rule by rule)."""
    rules = RequestHeaderRules(make_config("http://127.0.0.1:9"))
    pairs = [("Host", "api.example"), (name, "6.6.6.6"), ("Accept", "a")]
    if connection_names_one:
        pairs.append(("Connection", "X-Other"))
    out = rules.passed_on(CIMultiDictProxy(CIMultiDict(pairs)), "10.0.0.1", "http", None)
    assert "6.6.6.6" not in [v for _, v in out], out


# Names an upstream in a mesh or behind a cloud edge reads the client's address from, which a
# hop between keygate and it passes on from keygate as sent: an Envoy sidecar (Istio) keeps
# X-Envoy-External-Address from an internal peer (keygate is one) and documents it for
# applications; CloudFront's CloudFront-Viewer-Address, Azure Front Door's X-Azure-ClientIP and
# X-Azure-SocketIP, ingress-nginx's X-Original-Forwarded-For.
@pytest.mark.parametrize("name", ["X-Envoy-External-Address", "CloudFront-Viewer-Address",
                                  "X-Azure-ClientIP", "X-Azure-SocketIP",
                                  "X-Original-Forwarded-For", "x_envoy_external_address"])
@pytest.mark.parametrize("connection_names_one", [False, True])
def test_a_mesh_or_cloud_edges_client_address_header_is_dropped_from_an_untrusted_peer(
        name, connection_names_one):
    rules = RequestHeaderRules(make_config("http://127.0.0.1:9"))
    pairs = [("Host", "api.example"), (name, "6.6.6.6"), ("Accept", "a")]
    if connection_names_one:
        pairs.append(("Connection", "X-Other"))
    out = rules.passed_on(CIMultiDictProxy(CIMultiDict(pairs)), "10.0.0.1", "http", None)
    assert "6.6.6.6" not in [v for _, v in out], out
    # and kept as sent from a trusted proxy, as the others are
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("10.0.0.0/8",)))
    rules = RequestHeaderRules(config)
    out = rules.passed_on(CIMultiDictProxy(CIMultiDict([("Host", "a"), (name, "6.6.6.6")])),
                          "10.0.0.1", "http", None)
    assert (name, "6.6.6.6") in out or name.startswith("x_"), out


# --- method overrides: the fast test never misses what the full reading finds ------------------

from urllib.parse import quote  # noqa: E402

from gateway import overrides  # noqa: E402
from gateway.errors import BadRequest  # noqa: E402


def _override_names():
    """Header names in random case and with random '-'/'_', some of them override headers."""
    base = st.sampled_from(list(overrides.HEADERS) + ["X-HTTP-Methods", "X-Method", "Accept"])
    return st.builds(lambda name, flips: "".join(
        (c.swapcase() if f & 1 else c) if c != "-" else ("_" if f & 2 else "-")
        for c, f in zip(name, flips + [0] * len(name))), base, st.lists(st.integers(0, 3)))


def _query_names():
    """'_method' spelled as an upstream may decode it (case, percent-encoding, PHP's '.'),
    and names that are not it."""
    raw = st.sampled_from(["_method", "_METHOD", ".method", " _method", "method", "_methods",
                           "x_method", "page", "_"])
    return st.builds(lambda name, enc: quote(name, safe="") if enc == 1 else
                     "".join("%%%02X" % ord(c) for c in name) if enc == 2 else name,
                     raw, st.integers(0, 2))


@given(st.lists(st.tuples(_override_names(), st.sampled_from(["DELETE", "get", "", "A B"])),
                max_size=4),
       st.lists(st.tuples(_query_names(), st.sampled_from(["DELETE", "put", "", "%20"])),
                max_size=3), st.sampled_from(["&", ";"]))
def test_the_override_fast_test_never_misses_what_requested_finds(pairs, params, sep):
    """The pipeline reads overrides only when headers.keys().isdisjoint(NAMES) is False or
    may_name(query) is True; for any header names (case, '_' spellings) and query parameter
    names (case, percent-encoding, PHP mangling) requested() finds nothing otherwise, and it
    finds an override sent under any spelling of the names."""
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    query = sep.join(f"{n}={v}" for n, v in params)
    suspect = not headers.keys().isdisjoint(overrides.NAMES) or \
        bool(query) and overrides.may_name(query)
    try:
        named = overrides.requested(headers, query)
    except BadRequest:
        assert suspect
        return
    if not suspect:
        assert named == ()
    sent_header = any(n.replace("_", "-").lower() in
                      {h.lower() for h in overrides.HEADERS} and v == "DELETE"
                      for n, v in pairs)
    if sent_header:
        assert "DELETE" in named


async def test_a_ledger_closing_writes_a_slots_held_counts_though_another_slots_write_fails(
        own_redis) -> None:
    """At shutdown, a slot whose waiting write the store confirms in close() has its counts
    held meanwhile written too, even while another slot's write keeps failing (as in a
    Cluster slot no node serves; here an ACL that refuses that workspace's keys): they were
    dropped, with a warning, because some write was still pending."""
    ok = Slot("acme", "k1", "2025-06", "2025-06-15", "k1")
    bad = Slot("zeta", "k9", "2025-06", "2025-06-15", "k9")
    r = redis.Redis.from_url(own_redis.url)
    _owned(r, ok)
    _owned(r, bad)
    r.acl_setuser("gw", enabled=True, passwords=["+pw"], commands=["+@all"], keys=[],
                  reset_keys=True)   # no key at all: every ledger write is refused (NOPERM)
    url = own_redis.url.replace("redis://", "redis://gw:pw@")
    store = RequestStore(url, timeout=0.5)
    ledger = LocalLedger(store, MonthCache(), lambda: NOW, retry_every=3600)
    ledger.add(ok)
    ledger.add(bad)
    ledger.flush()
    await asyncio.wait((ledger._writer,))
    assert len(ledger.pending) == 2 and not ledger.counts
    ledger.add(ok)                    # held behind ok's waiting write
    ledger.add(ok)
    r.acl_setuser("gw", enabled=True, keys=["*{acme}*"])  # ok's slot is served again
    await ledger.close()
    assert [int(r.get(k) or 0) for k in ok.counters()] == [3, 3, 3, 3]
    assert ledger.counts == {} and [w.slot for w in ledger.pending.values()] == [bad]
    await store.close()


def _spellings(name: str) -> list[str]:
    """A lower-case "-" name as a client may spell it: title case, upper case with "_" (CGI
    style), and with "." (lighttpd reads it as the same)."""
    title = "-".join(p[:1].upper() + p[1:] for p in name.split("-"))
    return [title, name.upper().replace("-", "_"), title.replace("-", ".")]


@pytest.mark.parametrize("name", sorted(AUTH_USER | HOST_OVERRIDE | PATH_OVERRIDE))
@pytest.mark.parametrize("connection_names_one", [False, True])
def test_every_auth_user_host_and_path_header_is_the_trusted_proxys_alone(
        name, connection_names_one):
    """Every name an upstream takes the signed-in user, the host or the path from when
    infrastructure sets it is dropped from a peer keygate does not trust, in every spelling,
    on the fast path and rule by rule (a Connection naming another header); from a trusted
    proxy its "-" spelling passes as sent and the others never do."""
    untrusted = RequestHeaderRules(make_config("http://127.0.0.1:9"))
    config = make_config("http://127.0.0.1:9")
    trusted = RequestHeaderRules(dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("10.0.0.1",))))
    for spelled in _spellings(name):
        pairs = [("Host", "api.example"), (spelled, "mallory"), ("Accept", "a")]
        if connection_names_one:
            pairs.append(("Connection", "X-Other"))
        headers = CIMultiDictProxy(CIMultiDict(pairs))
        out = untrusted.passed_on(headers, "10.0.0.1", "http", None)
        assert "mallory" not in [v for _, v in out], (spelled, out)
        out = trusted.passed_on(headers, "10.0.0.1", "http", None)
        assert ((spelled, "mallory") in out) == ("_" not in spelled and "." not in spelled), \
            (spelled, out)
