"""One trust decision for a peer, seen through both of its uses: the X-Forwarded-* headers sent
upstream and the client address the failure throttle counts by."""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket

import pytest
from aiohttp import ClientSession, web

from gateway.config import FailureLimits, ServerConfig
from gateway.tokens import checksum
from gateway.trust import TrustedProxies

from harness import gateway_under_test, make_config


def test_ipv4_mapped_peers_are_compared_as_ipv4():
    trusted = TrustedProxies(["127.0.0.0/8"])
    assert trusted.is_trusted("::ffff:127.0.0.1") and trusted.is_trusted("127.0.0.1")
    assert not trusted.is_trusted("::1") and not trusted.is_trusted("garbage")
    assert not TrustedProxies([]).is_trusted("127.0.0.1")


@pytest.mark.parametrize("hop,want", [
    ("198.51.100.1:51234", "198.51.100.1"),        # Azure Application Gateway, IIS ARR
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[::ffff:198.51.100.1]:80", "198.51.100.1"),
    ("198.51.100.1:99999", "10.0.0.5"),            # not a port: nothing proven
    ("198.51.100.1:", "10.0.0.5"),
    ("198.51.100.1:8o", "10.0.0.5"),
    ("[2001:db8::1]x", "10.0.0.5"),
    ("[198.51.100.1]:80", "10.0.0.5"),             # brackets are for IPv6
    ("2001:db8::1:443", "2001:db8::1:443"),        # unbracketed IPv6: all of it is the address
])
def test_a_forwarded_hop_with_a_port_is_its_address(hop, want):
    """Some proxies write the client's port into X-Forwarded-For (Azure Application Gateway:
    ``203.0.113.7:51234``; RFC 7239 style ``[2001:db8::1]:443``). Such a hop read as no
    address at all, so every client behind that proxy counted as the proxy: one shared failure
    throttle (20 wrong guesses from anyone locked everyone out) and allow-lists that matched
    the proxy, not the client."""
    from gateway.trust import TrustedProxies
    assert TrustedProxies(["10.0.0.0/8"]).client_address("10.0.0.5", [hop]) == want
    assert TrustedProxies(["10.0.0.0/8"]).client_address(
        "10.0.0.5", [f"{hop}, 10.0.0.7:8080"]) == want  # a port on a hop of ours, too


@pytest.mark.parametrize("peer,xff,want", [
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),           # untrusted peer: XFF ignored
    ("10.0.0.5", ["198.51.100.1, 10.0.0.7"], "198.51.100.1"),   # nearest untrusted hop
    ("10.0.0.5", ["1.1.1.1", "198.51.100.1"], "198.51.100.1"),  # repeated header = one list
    ("10.0.0.5", ["spoofed-garbage, 198.51.100.1"], "198.51.100.1"),
    ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),      # dual-stack listener
    ("10.0.0.5", ["::ffff:10.0.0.7, 10.0.0.6"], "10.0.0.5"),    # all hops ours
])
def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies(peer, xff, want):
    from gateway.trust import TrustedProxies
    assert TrustedProxies(["10.0.0.0/8"]).client_address(peer, xff) == want


async def test_a_dual_stack_peer_is_trusted_alike_for_forwarded_headers_and_the_throttle(
        redis_url, upstream, monkeypatch):
    """The gateway listens on '::' (dual stack): a proxy at 127.0.0.1 arrives as
    ::ffff:127.0.0.1. It is trusted for both uses, or the throttle locks out every client
    behind it while the upstream still believes its X-Forwarded-For."""
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        base, server=ServerConfig(host="::", trusted_proxies=("127.0.0.0/8",)),
        keys=dataclasses.replace(base.keys, failures=FailureLimits(per_ip=2, per_key=1000,
                                                                   window_seconds=60)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        runner = web.ServerRunner(g.gw.proxy_server)
        await runner.setup()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual stack
        sock.bind(("::", 0))
        port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            async with ClientSession() as s:
                url = f"http://127.0.0.1:{port}"
                # forwarded headers: the proxy's X-Forwarded-For is kept and extended
                async with s.get(url + "/people/1", headers={
                        "Authorization": f"Bearer {token}",
                        "X-Forwarded-For": "198.51.100.7"}) as r:
                    assert r.status == 200
                xff = [v for k, v in upstream.requests[-1]["headers"]
                       if k.lower() == "x-forwarded-for"]
                assert xff == ["198.51.100.7, ::ffff:127.0.0.1"]
                # throttle: an attacker's failures behind the proxy lock out only the attacker
                head = token[:-38] + "Z" * 32                  # same key id, wrong secret
                bad = head + checksum(head)
                for _ in range(4):
                    async with s.get(url + "/people/1", headers={
                            "Authorization": f"Bearer {bad}",
                            "X-Forwarded-For": "203.0.113.66"}) as r:
                        await r.read()
                async with s.get(url + "/people/1", headers={
                        "Authorization": f"Bearer {bad}",
                        "X-Forwarded-For": "203.0.113.66"}) as r:
                    assert r.status == 429
                async with s.get(url + "/people/1", headers={
                        "Authorization": f"Bearer {token}",
                        "X-Forwarded-For": "198.51.100.7"}) as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("hop", ["fe80::1%eth0", "fe80::1%ab c\x1b[31m", "fe80::1%\r\nx: y",
                                 "::ffff:198.51.100.7%0"])
def test_a_forwarded_hop_with_a_zone_gives_the_bare_address(hop):
    """``ipaddress`` accepts an IPv6 zone (``%...``) of any text, control characters
    included, and kept it in the address it returned: that string became the client address
    written to the text access log, and part of the failure throttle's Redis key. A client on
    the other side of a proxy has no zone here: it is dropped."""
    trusted = TrustedProxies(["127.0.0.1/32"])
    client = trusted.client_address("127.0.0.1", [hop])
    assert "%" not in client and client.isprintable() and " " not in client
    assert client == ("198.51.100.7" if "ffff" in hop else "fe80::1")


async def test_a_trusted_proxy_vouches_only_for_the_forwarded_headers_it_writes(
        redis_url, upstream, monkeypatch, capfd):
    """A load balancer in ``trusted_proxies`` writes ``X-Forwarded-For``/``-Proto``; it passes
    a client's ``X_Forwarded_For``/``X_Forwarded_Proto`` on untouched (HAProxy, Envoy and
    cloud balancers keep names with ``_``), and a WSGI upstream reads those as the same
    headers. keygate judged the client by the hyphenated chain alone (throttle, IP
    allow-list, access log), so the upstream must get that chain, not one with the client's
    own entry spliced in after the balancer's, nor the client's word for the scheme."""
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(base, server=dataclasses.replace(
        base.server, trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        async with g.proxy.get("/people/1", headers=[
                ("Authorization", f"Bearer {token}"),
                ("X-Forwarded-For", "203.0.113.9"),          # written by the balancer
                ("X_Forwarded_For", "6.6.6.6"),              # the client's, passed along
                ("X_Forwarded_Proto", "https")]) as r:
            assert r.status == 200
        _, err = g.logs(capfd)
    [line] = [json.loads(x) for x in err.splitlines() if '"/people/1"' in x]
    assert line["client"] == "203.0.113.9"
    forwarded = [(k.lower().replace("_", "-"), v) for k, v in upstream.requests[-1]["headers"]
                 if k.lower().replace("_", "-").startswith("x-forwarded-")]
    xff = [v for k, v in forwarded if k == "x-forwarded-for"]
    assert xff == ["203.0.113.9, 127.0.0.1"]
    # the upstream, trusting keygate's peer and keygate, finds the client keygate found
    assert TrustedProxies(["127.0.0.1"]).client_address("127.0.0.1", xff) == "203.0.113.9"
    assert [v for k, v in forwarded if k == "x-forwarded-proto"] == ["http"]


async def test_connection_cannot_strip_the_forwarded_chain_keygate_judged_the_client_by(
        upstream, redis_url, monkeypatch, capfd):
    """Hop-by-hop abuse. SPEC: "hop-by-hop headers and every header that `Connection` names
    are dropped first, and `Connection` can never name an identity header"; the headers
    keygate sets are added after that filtering. ``X-Forwarded-For`` is one keygate sets
    (SPEC: "then the identity headers are set ..., plus `X-Forwarded-For`"), but from a
    trusted proxy it is the proxy's chain extended, and a ``Connection: X-Forwarded-For``
    (passed on by a balancer that does not consume the client's ``Connection`` header)
    drops that chain: the upstream gets ``X-Forwarded-For: <the balancer>`` alone, i.e. the
    request appears to come from the balancer's internal address, while keygate itself
    judged the client (failure throttle, ``allowed_ips``, access log) by the chain it then
    threw away. An upstream that trusts its internal network (or rate-limits per client) is
    fooled by one header. tests/test_trust.py states the rule this breaks: "keygate judged
    the client by the hyphenated chain alone ..., so the upstream must get that chain".
    Expected: the chain keygate read reaches the upstream (Connection cannot name
    X-Forwarded-For, as it cannot name an identity header)."""
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(base, server=dataclasses.replace(
        base.server, trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key(scopes=["people:read"])
        async with gw.proxy.get("/people/1", headers=[
                ("Authorization", f"Bearer {token}"),
                ("X-Forwarded-For", "203.0.113.9"),          # written by the balancer
                ("Connection", "keep-alive, X-Forwarded-For")]) as r:
            assert r.status == 200
        _, err = gw.logs(capfd)
    [line] = [json.loads(x) for x in err.splitlines() if '"/people/1"' in x]
    assert line["client"] == "203.0.113.9"  # what keygate judged the request by
    xff = [v for k, v in upstream.requests[-1]["headers"] if k.lower() == "x-forwarded-for"]
    # the upstream, trusting keygate and keygate's peer, must find the same client
    assert TrustedProxies(["127.0.0.1"]).client_address("127.0.0.1", xff) == "203.0.113.9", xff


async def test_the_failure_throttle_counts_an_ipv6_client_by_its_64_prefix(
        redis_url, upstream, monkeypatch):
    """An IPv6 subscriber is handed a whole /64: an attacker rotating addresses inside it must
    not get per_ip failures from each of its 2**64 addresses (as a NAT'd IPv4 site is one
    address). Another /64 is another client."""
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        base, server=ServerConfig(trusted_proxies=("127.0.0.0/8",)),
        keys=dataclasses.replace(base.keys, failures=FailureLimits(per_ip=2, per_key=None,
                                                                   window_seconds=60)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])

        async def wrong_key_from(address: str) -> tuple[int, str]:
            head = token[:-38] + "".join(secrets.choice("ABCDEFGH") for _ in range(32))
            async with g.proxy.get("/people/1", headers={
                    "Authorization": f"Bearer {head + checksum(head)}",
                    "X-Forwarded-For": address}) as r:
                return r.status, (await r.json())["error"]["code"]

        assert await wrong_key_from("2001:db8:1:2::a") == (401, "invalid_key")
        assert await wrong_key_from("2001:db8:1:2:ffff:ffff:ffff:ffff") == (401, "invalid_key")
        assert await wrong_key_from("2001:db8:1:2::b") == (429, "too_many_failures")
        assert await wrong_key_from("2001:db8:1:3::a") == (401, "invalid_key")   # another /64
        assert await wrong_key_from("198.51.100.7") == (401, "invalid_key")      # IPv4 as before


# A client's address as upstreams read it besides X-Forwarded-For: nginx's real_ip_header,
# CDNs' own names, frameworks' lists. Sent in other cases and the "_" spelling too.
CLIENT_ADDRESS_SPOOFS = [("X-Real-IP", "6.6.6.1"), ("x-client-ip", "6.6.6.2"),
                         ("X_Real_IP", "6.6.6.3"), ("True-Client-IP", "6.6.6.4"),
                         ("X-Client-IP-Note", "6.6.6.5"), ("CF-CONNECTING-IP", "6.6.6.6"),
                         ("Fastly-Client-IP", "6.6.6.7"), ("X-Cluster-Client-IP", "6.6.6.8"),
                         ("X_Cluster_Client_IP", "6.6.6.9")]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-peer", "trusted-proxy"])
async def test_client_address_headers_reach_the_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted):
    """``X-Real-IP`` and its kin name the client to upstreams (nginx ``real_ip_header``, many
    frameworks): from a peer keygate does not trust they are a forged address and never
    reach the upstream; from a proxy in ``trusted_proxies`` they pass as it wrote them (not
    the ``_`` spellings, which a proxy passes on from the client). Judged on the bytes the
    upstream received."""
    from test_edge_framing import RawUpstream
    up = await RawUpstream().start()
    try:
        config = make_config(f"http://127.0.0.1:{up.port}")
        if trusted:
            config = dataclasses.replace(config, server=dataclasses.replace(
                config.server, trusted_proxies=("127.0.0.1",)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(scopes=["people:read"])
            for path, credential in (("/people/1", [("Authorization", f"Bearer {token}")]),
                                     ("/health", [])):   # a keyed route and a public one
                async with g.proxy.get(path, headers=credential + CLIENT_ADDRESS_SPOOFS) as r:
                    assert r.status == 200, await r.text()
        assert len(up.requests) == 2 and not up.errors
        for raw in up.raw:
            for _, value in CLIENT_ADDRESS_SPOOFS:
                if value == "6.6.6.5":   # a name that only starts like one: not ours
                    assert value.encode() in raw
                elif trusted and value in ("6.6.6.3", "6.6.6.9"):   # X_Real_IP, X_Cluster_...
                    assert value.encode() not in raw
                else:
                    assert (value.encode() in raw) == trusted, (value, bytes(raw))
        if trusted:   # as sent: names, case and values
            for seen in up.requests:
                assert seen.header(b"X-Real-IP") == [b"6.6.6.1"]
                assert (b"x-client-ip", b"6.6.6.2") in seen.headers
                assert (b"CF-CONNECTING-IP", b"6.6.6.6") in seen.headers
                assert (b"True-Client-IP", b"6.6.6.4") in seen.headers
    finally:
        up.close()


async def test_verify_only_never_answers_a_client_address_header(redis_url, upstream,
                                                                 monkeypatch):
    """Verify-only mode answers identity headers for the proxy in front to pass on: a
    client's ``X-Real-IP`` and kin are never among them, whoever sent them."""
    from harness import VERIFY, verify_config
    config = verify_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        async with g.proxy.get(VERIFY, headers=[("Authorization", f"Bearer {token}"),
                                                ("X-Original-URI", "/people/1"),
                                                ("X-Original-Method", "GET"),
                                                *CLIENT_ADDRESS_SPOOFS]) as r:
            assert r.status == 200
            answered = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        assert "X-Workspace-Id: acme" in answered
        assert "6.6.6." not in answered
        assert not {k.lower().replace("_", "-") for k, _ in CLIENT_ADDRESS_SPOOFS} & {
            k.lower().replace("_", "-") for k in r.headers}


@pytest.mark.parametrize("listed", ["::ffff:127.0.0.1", "::ffff:127.0.0.0/104",
                                    "::ffff:7f00:1"])
async def test_a_proxy_listed_in_its_ipv4_mapped_form_is_trusted(redis_url, upstream,
                                                                  monkeypatch, listed):
    """``trusted_proxies: ["::ffff:127.0.0.1"]`` (the form a dual-stack listener's access log
    shows a proxy's address in) names the proxy at 127.0.0.1. Peers are compared as IPv4 (as
    a key's ``allowed_ips`` are, which keeps such an entry as the IPv4 network it names), so
    the entry never matched: the proxy was not trusted, its X-Forwarded-For was replaced,
    and the failure throttle counted every client behind it as the proxy (one client's
    wrong guesses locked out all the others)."""
    base = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(
        base, server=dataclasses.replace(base.server, trusted_proxies=(listed,)),
        keys=dataclasses.replace(base.keys, failures=FailureLimits(per_ip=2, per_key=None,
                                                                   window_seconds=60)))
    assert TrustedProxies([listed]).is_trusted("127.0.0.1")
    assert TrustedProxies([listed]).client_address("127.0.0.1", ["198.51.100.1"]) == \
        "198.51.100.1"
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        bad = token[:-38] + "Z" * 32
        bad += checksum(bad)
        for _ in range(3):  # one client behind the proxy runs into the throttle...
            async with g.proxy.get("/people/1", headers={
                    "Authorization": f"Bearer {bad}", "X-Forwarded-For": "198.51.100.1"}) as r:
                await r.read()
        assert r.status == 429
        async with g.proxy.get("/people/1", headers={   # ...another one does not
                "Authorization": f"Bearer {token}", "X-Forwarded-For": "198.51.100.2"}) as r:
            assert r.status == 200, await r.text()
        xff = [v for k, v in upstream.requests[-1]["headers"] if k == "X-Forwarded-For"]
        assert xff == ["198.51.100.2, 127.0.0.1"]


@pytest.mark.parametrize("chain,per_call_ms", [
    # the client's own garbage left of its address (nginx appends $remote_addr to it)
    (",".join(["x"] * 15000) + ", 198.51.100.1", 0.1),
    # hops that all claim to be ours (a client inside the trusted network, or a proxy that
    # passes the header on without appending)
    (", ".join(["10.0.0.2"] * 3000), 2.0),
])
def test_a_long_forwarded_for_costs_no_more_than_a_short_one(chain, per_call_ms):
    """The client address was read by splitting the whole X-Forwarded-For (up to keygate's
    32 KiB head) into a list and parsing every hop of ours: a client behind a trusted proxy
    made each request cost 0.4-10 ms of the event loop with one long header. It is read from
    the right, at most 64 hops: the nearest hop that is not ours comes first."""
    import time
    trusted = TrustedProxies(["10.0.0.0/8"])
    headers = [chain[i:i + 8000] for i in range(0, len(chain), 8000)]  # as 8 KiB fields
    trusted.client_address("10.0.0.5", headers)
    started = time.process_time()
    for _ in range(50):
        trusted.client_address("10.0.0.5", headers)
    assert (time.process_time() - started) / 50 * 1000 < per_call_ms


def test_more_hops_of_ours_than_any_chain_has_give_the_peer():
    """A chain longer than 64 hops is nobody's real path: past them, as past a hop that is not
    an address, nothing further left is believed."""
    trusted = TrustedProxies(["10.0.0.0/8"])
    ours = ", ".join(["10.0.0.2"] * 63)
    assert trusted.client_address("10.0.0.5", [f"198.51.100.1, {ours}"]) == "198.51.100.1"
    assert trusted.client_address("10.0.0.5", [f"198.51.100.1, {ours}, 10.0.0.3"]) == \
        "10.0.0.5"
    assert trusted.client_address("10.0.0.5", [f"198.51.100.1, {ours}", "10.0.0.3"]) == \
        "10.0.0.5"


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-peer", "trusted-proxy"])
async def test_a_client_cannot_name_another_path_in_a_url_override_header(
        redis_url, aiohttp_server, monkeypatch, trusted):
    """IIS URL Rewrite, Symfony before 3.4.14 and Zend Framework 1/2 route a request by
    ``X-Original-URL`` / ``X-Rewrite-URL`` rather than its request line (CVE-2018-14773). A key
    scoped to ``people:read`` sent ``GET /people/1`` with ``X-Original-URL: /companies/1``:
    keygate authorised ``/people/1``, and such an upstream served ``/companies/1``. From a peer
    keygate does not trust they are dropped, as forged client addresses are; a trusted proxy's
    pass as it wrote them."""
    served: list[str] = []

    async def legacy(request: web.Request) -> web.Response:  # routes as those frameworks do
        override = [v for k, v in request.raw_headers
                    if k.lower().replace(b"_", b"-") in (b"x-original-url", b"x-rewrite-url")]
        path = override[0].decode() if override else request.raw_path
        served.append(path)
        return web.Response(text=path)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", legacy)
    server = await aiohttp_server(app)
    config = make_config(str(server.make_url("")))
    if trusted:
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, trusted_proxies=("127.0.0.1",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        for name in ("X-Original-URL", "x-rewrite-url", "X_Original_URL"):
            for path, credential in (("/people/1", {"Authorization": f"Bearer {token}"}),
                                     ("/health", {})):
                async with g.proxy.get(path, headers={**credential,
                                                      name: "/companies/1"}) as r:
                    assert r.status == 200
                    want = "/companies/1" if trusted and "_" not in name else path
                    assert await r.text() == want, (name, path)
    assert len(served) == 6


def test_the_security_model_lists_exactly_the_client_address_headers_keygate_guards():
    """docs/security.md names every header an upstream may read a client's address from that
    keygate passes only from a trusted proxy; an entry added to (or dropped from) the code's
    set alone would leave an operator configuring an upstream from a wrong list."""
    import re
    from pathlib import Path

    from gateway.proxying.headers import CLIENT_ADDRESS
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    passage = " ".join(text.split("The other headers upstreams read a client's address", 1)[1]
                       .split(") reach the upstream only", 1)[0].split())
    named = {h.lower() for h in re.findall(r"`([A-Za-z0-9-]+)`", passage)}
    assert named == set(CLIENT_ADDRESS)


# The signed-in user as an authenticating proxy in front of an upstream asserts it
# (oauth2-proxy, Authelia, authentik, Apache/nginx auth modules, Grafana and Gitea's auth
# proxy mode, Jenkins reverse-proxy auth, Kubernetes' request-header authentication, cloud
# identity-aware proxies): names as sent, case and spellings varied, each value its own.
AUTH_USER_SPOOFS = [
    ("X-Remote-User", "mallory-01"), ("remote-user", "mallory-02"),
    ("X-Forwarded-User", "mallory-03"), ("X-Forwarded-Email", "mallory-04"),
    ("X-Forwarded-Preferred-Username", "mallory-05"), ("X-Forwarded-Groups", "mallory-06"),
    ("X-Auth-Request-User", "mallory-07"), ("x-auth-request-email", "mallory-08"),
    ("X-Auth-Request-Preferred-Username", "mallory-09"),
    ("X-Auth-Request-Groups", "mallory-10"), ("X-WEBAUTH-USER", "mallory-11"),
    ("X-Remote-Group", "mallory-12"), ("Remote-Groups", "mallory-13"),
    ("Remote-Email", "mallory-14"), ("X-authentik-username", "mallory-15"),
    ("X-Goog-Authenticated-User-Email", "mallory-16"), ("X-Amzn-Oidc-Identity", "mallory-17"),
    ("Cf-Access-Authenticated-User-Email", "mallory-18"),
    ("X-MS-CLIENT-PRINCIPAL-NAME", "mallory-19"), ("X-Auth-Request-Access-Token", "mallory-20"),
    # spellings no proxy writes: dropped from everyone
    ("X_Remote_User", "mallory-21"), ("REMOTE_USER", "mallory-22"),
    ("X.WEBAUTH.USER", "mallory-23"), ("x_auth_request_user", "mallory-24"),
    ("X_Forwarded_User", "mallory-25")]
# What an API client sends in its own right (OpenStack's X-Auth-Token, Swift's X-Auth-User,
# an upstream's own user header) and names that only start like one of the above: never ours.
CLIENT_OWN_HEADERS = [("X-Auth-Token", "own-01"), ("X-Auth-User", "own-02"),
                      ("X-User-Id", "own-03"), ("X-Remote-User-Note", "own-04"),
                      ("X-Auth-Request-Id", "own-05"), ("X-Webauth-Users", "own-06")]


async def _spoofs_reach_upstream_only_from_a_trusted_proxy(redis_url, monkeypatch, trusted: bool,
                                                      spoofs: list, lookalikes: list):
    """``spoofs`` and ``lookalikes`` (name, value) sent on a keyed route with a key and on a
    public one, from an untrusted peer or a trusted proxy: in the bytes the upstream received,
    each spoof only from the trusted proxy and only in its plain spelling (as sent: name,
    case and value), each look-alike always. Returns the proxy's port and the requests seen."""
    from test_edge_framing import RawUpstream
    up = await RawUpstream().start()
    try:
        config = make_config(f"http://127.0.0.1:{up.port}")
        if trusted:
            config = dataclasses.replace(config, server=dataclasses.replace(
                config.server, trusted_proxies=("127.0.0.1",)))
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(scopes=["people:read"])
            port = g.proxy_server.port
            for path, credential in (("/people/1", [("Authorization", f"Bearer {token}")]),
                                     ("/health", [])):   # a keyed route and a public one
                async with g.proxy.get(path, headers=credential + spoofs + lookalikes) as r:
                    assert r.status == 200, await r.text()
        assert len(up.requests) == 2 and not up.errors
        for raw, seen in zip(up.raw, up.requests):
            for name, value in spoofs:
                plain = "_" not in name and "." not in name
                assert (value.encode() in raw) == (trusted and plain), (name, bytes(raw))
                if trusted and plain:
                    assert (name.encode(), value.encode()) in seen.headers
            for name, value in lookalikes:
                assert (name.encode(), value.encode()) in seen.headers, (name, bytes(raw))
        return port, up.requests
    finally:
        up.close()


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-peer", "trusted-proxy"])
async def test_auth_proxy_user_headers_reach_the_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted):
    """An upstream set up behind an authenticating proxy (Grafana's auth.proxy reading
    ``X-WEBAUTH-USER``, oauth2-proxy's ``X-Auth-Request-User``, Apache's and nginx's
    ``X-Remote-User``, Authelia's ``Remote-User``...) takes those headers as the signed-in
    user from the address it trusts, keygate's. A client sending ``X-WEBAUTH-USER: admin``
    through keygate, on a keyed route with its own key or on a public one with none, was
    that user to the upstream. From a peer keygate does not trust they are dropped in every
    spelling; from a trusted proxy (an auth proxy in front of keygate) they pass as it wrote
    them, as ``X-Forwarded-*`` do. Judged on the bytes the upstream received."""
    await _spoofs_reach_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted, AUTH_USER_SPOOFS, CLIENT_OWN_HEADERS)


def test_the_security_model_lists_exactly_the_auth_proxy_user_headers_keygate_guards():
    """docs/security.md names every header an authenticating proxy names the signed-in user
    in that keygate passes only from a trusted proxy: an operator checks an upstream's
    auth-proxy setting against that list."""
    import re
    from pathlib import Path

    from gateway.proxying.headers import AUTH_USER
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    passage = " ".join(text.split("from the address it trusts, keygate's:", 1)[1]
                       .split("From anyone but a trusted proxy (such", 1)[0].split())
    named = {h.lower() for h in re.findall(r"`([A-Za-z0-9-]+)`", passage)}
    assert named == set(AUTH_USER)


# The request's host (and path) as upstreams read it besides Host for URL generation and
# virtual hosting: password-reset links, redirects, cache keys, tenant routing.
HOST_SPOOFS = [("X-Original-Host", "evil-01.example"), ("x-host", "evil-02.example"),
               ("X-HTTP-Host-Override", "evil-03.example"),
               ("X-Forwarded-Server", "evil-04.example"),
               ("Forwarded", "host=evil-05.example"),
               ("X-Original-URI", "/evil-06/admin"),
               ("X_Original_Host", "evil-07.example"), ("X.Host", "evil-08.example"),
               ("x_original_uri", "/evil-09/admin")]
# Names an API client may send in its own right that only look like those
HOST_LOOKALIKES = [("X-Hostname", "own-11"), ("X-Host-Id", "own-12"),
                   ("X-Original-Filename", "own-13"), ("X-Original-URI-Note", "own-14")]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-peer", "trusted-proxy"])
async def test_host_and_uri_headers_reach_the_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted):
    """Upstreams build absolute URLs (password-reset links, redirects) and pick virtual hosts
    from ``X-Original-Host`` (ASP.NET, IIS ARR), ``X-Host``, ``X-HTTP-Host-Override`` and
    ``X-Forwarded-Server`` when a proxy sets them, and nginx-fronted applications take
    ``X-Original-URI`` as the request's path: a client's ``X-Host: evil.example`` reached the
    upstream as sent, which mailed a reset link to the client's host (host header injection),
    and ``X-Original-URI`` named another path than the one keygate authorised. From a peer
    keygate does not trust they are dropped in every spelling, as ``X-Forwarded-Host`` and
    ``Forwarded`` (``host=``) are; from a trusted proxy they pass as it wrote them. Judged on
    the bytes the upstream received, on a keyed route and a public one."""
    ports, seen = await _spoofs_reach_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted, HOST_SPOOFS, HOST_LOOKALIKES)
    for request in seen:
        # the Host the client sent is keygate's X-Forwarded-Host for the upstream, still
        assert request.header(b"X-Forwarded-Host") == [b"127.0.0.1:%d" % ports]


def test_the_security_model_names_every_host_and_path_header_keygate_guards():
    """Every header keygate passes only from a trusted proxy because an upstream takes the
    request's host or path from it is named in docs/security.md, where an operator looks."""
    import re
    from pathlib import Path

    from gateway.proxying.headers import HOST_OVERRIDE, PATH_OVERRIDE
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    named = {h.lower().replace("_", "-") for h in re.findall(r"`([A-Za-z0-9_-]+)`", text)}
    assert HOST_OVERRIDE | PATH_OVERRIDE <= named, (HOST_OVERRIDE | PATH_OVERRIDE) - named


async def test_a_client_cannot_tell_the_upstream_its_scheme_with_x_scheme(
        upstream, redis_url, monkeypatch):
    """SPEC: "client `X-Forwarded-*` are replaced unless the peer is listed in
    `server.trusted_proxies`": the upstream is to learn the scheme the client really used
    from keygate (``X-Forwarded-Proto``), never from the client. keygate drops every other
    header upstreams read the same facts from (client address, host, path, signed-in user:
    docs/security.md), but not ``X-Scheme``, the scheme header Tornado's ``xheaders=True``
    reads *before* ``X-Forwarded-Proto`` (tornado.httputil ``_apply_xheaders``:
    ``headers.get("X-Scheme", headers.get("X-Forwarded-Proto", ...))``) and that
    ingress-nginx writes. A client of keygate's plain-HTTP listener sending
    ``X-Scheme: https`` has a Tornado upstream take the request as HTTPS (or, behind a TLS
    listener, ``X-Scheme: http`` as plain HTTP: redirect loops, insecure URLs built), while
    keygate itself told it ``X-Forwarded-Proto: http``. Expected: dropped from anyone but a
    trusted proxy (any case, ``_`` spelling too), as ``X-Forwarded-Proto`` is."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get("/health", headers=[("X-Scheme", "https"),
                                                    ("x_scheme", "https")]) as r:
            assert r.status == 200
    assert [v for k, v in upstream.requests[-1]["headers"]
            if k.lower() == "x-forwarded-proto"] == ["http"]
    assert [v for k, v in upstream.requests[-1]["headers"]
            if k.lower().replace("_", "-") == "x-scheme"] == []


# The request's scheme as upstreams read it before X-Forwarded-Proto (SCHEME_OVERRIDE)
SCHEME_SPOOFS = [("X-Scheme", "spoof-scheme-01"), ("x-url-scheme", "spoof-scheme-02"),
                 ("Front-End-Https", "spoof-scheme-03"), ("X-ARR-SSL", "spoof-scheme-04"),
                 ("X_Scheme", "spoof-scheme-05"), ("X.Url.Scheme", "spoof-scheme-06")]
SCHEME_LOOKALIKES = [("X-Schema", "own-21"), ("X-Scheme-Version", "own-22")]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-peer", "trusted-proxy"])
async def test_scheme_headers_reach_the_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted):
    """``X-Scheme`` (Tornado reads it before ``X-Forwarded-Proto``), ``X-Url-Scheme``,
    ``Front-End-Https`` and ``X-ARR-SSL``: from a peer keygate does not trust they are dropped
    in every spelling, as ``X-Forwarded-Proto`` is replaced; from a trusted proxy they pass as
    it wrote them. Judged on the bytes the upstream received, on a keyed route and a public
    one."""
    await _spoofs_reach_upstream_only_from_a_trusted_proxy(
        redis_url, monkeypatch, trusted, SCHEME_SPOOFS, SCHEME_LOOKALIKES)


def test_the_security_model_names_every_scheme_header_keygate_guards():
    """Every header keygate passes only from a trusted proxy because an upstream takes the
    request's scheme from it is named in docs/security.md."""
    import re
    from pathlib import Path

    from gateway.models import SCHEME_OVERRIDE
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    named = {h.lower() for h in re.findall(r"`([A-Za-z0-9_-]+)`", text)}
    assert SCHEME_OVERRIDE <= named, SCHEME_OVERRIDE - named


def test_config_check_warns_of_trusted_proxies_that_trust_every_peer(tmp_path, capsys):
    """``trusted_proxies: [0.0.0.0/0]`` (or ``::/0``, or the IPv4-mapped ``::ffff:0.0.0.0/96``)
    makes every client a trusted proxy: it names its own address in X-Forwarded-For (the
    failure throttle, allowed_ips and the access log believe it) and hands the upstream its
    own X-Real-IP, X-Forwarded-Host, signed-in user... It is served (a keygate reachable only
    through balancers may mean it), but config check says so, line and entry named; a
    narrower network says nothing."""
    from gateway.cli import main
    path = tmp_path / "keygate.yaml"
    path.write_text("server:\n"
                    "  trusted_proxies: [10.0.0.0/8, 0.0.0.0/0, '::/0', '::ffff:0.0.0.0/96']\n"
                    "upstreams:\n  crm: {url: 'http://127.0.0.1:9000'}\n"
                    "routes:\n  - {path: /people/**, upstream: crm, public: true}\n")
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n"
    warned = [line for line in err.splitlines() if "trusts every" in line]
    assert [line.split(": warning: ")[0] for line in warned] == [
        f"{path}:2: server.trusted_proxies[{i}]" for i in (1, 2, 3)], err
    assert "'0.0.0.0/0' trusts every IPv4 peer" in warned[0]
    assert "'::/0' trusts every IPv6 peer" in warned[1]
