"""Regression tests from the request-path review: each failed before its fix."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote, unquote

import pytest

from gateway.accesslog import mask_query
from gateway.tokens import make_token

from harness import bearer, gateway_under_test, make_config

TOKEN, _ = make_token("kg", "live")


def _recoverable(logged: str) -> bool:
    """Could a reader of the log line get the token back (decoding up to three times)?"""
    text = logged
    for _ in range(4):
        if TOKEN in text or TOKEN[-38:-6] in text:
            return True
        text = unquote(text.replace("+", " "))
    return False


@pytest.mark.parametrize("query", [
    f"a=1;token={TOKEN}",                                  # ';' separator
    f"token={TOKEN};a=1",
    f"token=%6B{TOKEN[1:]}",                                 # first letter percent-encoded
    f"token={quote(quote(TOKEN, safe=''), safe='')}",         # double-encoded
    "token=" + "".join(f"%{b:02X}" for b in TOKEN.encode()),  # every byte encoded
    f"next=https%3A%2F%2Fx.example%2F%3Fkey%3D{TOKEN}",     # inside a larger value
    f"q=Bearer+{TOKEN}",
    f"{TOKEN}=1",                                            # in a name
    f"a={TOKEN}&a={TOKEN}",                                  # repeated
])
def test_access_log_masks_every_query_form_the_gateway_refuses_as_key_in_url(query):
    from gateway.routes import query_has_token
    assert query_has_token(query, "kg")  # the pipeline refuses it as key_in_url ...
    assert not _recoverable(mask_query(query, "kg"))  # ... and the log must not hold it


def test_access_log_keeps_queries_without_keys_as_sent():
    q = "q=ada%20lovelace&page=2&sort=-name;x=1&kg_x=y"
    assert mask_query(q, "kg") == q


# --- verification single-flight ------------------------------------------------------------

@pytest.fixture
async def gut(redis_url, upstream, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        g.upstream = upstream
        await g.workspace("acme")
        yield g


async def test_a_cancelled_first_verification_does_not_fail_the_requests_waiting_on_it(gut):
    token, key = await gut.key()
    auth = gut.gw.pipeline.auth
    first = asyncio.create_task(auth.authenticate(token, "10.0.0.1"))
    await asyncio.sleep(0)          # first is now verifying; the followers join it
    followers = [asyncio.create_task(auth.authenticate(token, "10.0.0.2")) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()                  # e.g. its client went away, or shutdown
    results = await asyncio.gather(*followers, return_exceptions=True)
    assert [getattr(r, "key", r).id for r in results] == [key["id"]] * 3
    with pytest.raises(asyncio.CancelledError):
        await first


# --- RateLimit fields on 429s ----------------------------------------------------------------

async def _get_all(g, token: str, n: int) -> list[tuple[int, dict]]:
    got = []
    for _ in range(n):
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            await r.read()
            got.append((r.status, dict(r.headers)))
    return got


async def test_a_rate_429_reports_the_monthly_quota_actually_left(gut):
    token, _ = await gut.key(rate_limit="2/m")  # acme is on starter: 1000 a month
    got = await _get_all(gut, token, 3)
    assert [s for s, _ in got] == [200, 200, 429]
    assert got[1][1]["RateLimit"].startswith('"rate";r=0;t=60, "monthly";r=998;t=')
    # the refusal counted nothing: the month still has 998 left, not 1000
    assert got[2][1]["RateLimit"].startswith('"rate";r=0;t=60, "monthly";r=998;t=')


async def test_a_quota_429_reports_the_rate_actually_left(gut):
    await gut.admin_json("PATCH", "/workspaces/acme", {"plan": "tiny"})  # 3 a month
    token, _ = await gut.key(rate_limit="10/m")
    got = await _get_all(gut, token, 4)
    assert [s for s, _ in got] == [200, 200, 200, 429]
    assert got[2][1]["RateLimit"].startswith('"rate";r=7;t=60, "monthly";r=0;t=')
    # refused by the quota, the request used no rate: 7 remain, not 0
    assert got[3][1]["RateLimit"].startswith('"rate";r=7;t=60, "monthly";r=0;t=')


# --- fail-open: local counts ------------------------------------------------------------------

async def test_requests_counted_locally_while_the_store_was_down_survive_a_shutdown(
        redis_url, upstream, monkeypatch):
    import redis as sync_redis
    from gateway.config import StoreConfig
    from gateway.limits import month_of
    from gateway.store import usage_key

    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        assert (await _get_all(g, token, 1))[0][0] == 200
        sync_redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1200")
        assert [s for s, _ in await _get_all(g, token, 3)] == [200, 200, 200]
        assert g.counter("keygate_degraded_decisions_total") == 3
        await asyncio.sleep(1.3)  # the store is back; no request came to flush the counts
    import time
    used = sync_redis.Redis.from_url(redis_url).get(usage_key("acme", month_of(time.time()).period))
    assert int(used) == 4


# --- failure throttle under concurrency -----------------------------------------------------

async def test_concurrent_wrong_secrets_cannot_run_argon2_past_the_failure_limit(gut):
    from gateway.tokens import checksum, random_base62
    token, _ = await gut.key()
    guesses = []
    for _ in range(40):  # one key id, forty different wrong secrets, all well-formed
        head = token[:-38] + random_base62(32)
        guesses.append(head + checksum(head))

    async def one(t: str) -> tuple[int, str]:
        async with gut.proxy.get("/people/1", headers=bearer(t)) as r:
            return r.status, (await r.json())["error"]["code"]
    results = await asyncio.gather(*(one(t) for t in guesses))
    ran = gut.counter("keygate_argon2_verifications_total", result="fail")
    assert ran <= 10, ran  # per_key = 10: the rest were refused before argon2
    assert sum(code == "invalid_key" for _, code in results) == ran
    assert all(code in ("invalid_key", "too_many_failures") for _, code in results)


async def test_a_request_counted_locally_that_never_reached_the_upstream_is_taken_back(
        redis_url, monkeypatch):
    import time
    import redis as sync_redis
    from conftest import free_port
    from gateway.config import StoreConfig
    from gateway.limits import month_of
    from gateway.store import usage_key

    config = make_config(f"http://127.0.0.1:{free_port()}",  # nothing listens there
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        async with g.proxy.get("/_keygate/v1/usage", headers=bearer(token)) as r:
            assert r.status == 200  # verified in this process; counts nothing
        sync_redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1500")
        for _ in range(2):
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 502
        assert g.counter("keygate_degraded_decisions_total") == 2
        await asyncio.sleep(1.6)
    used = sync_redis.Redis.from_url(redis_url).get(usage_key("acme", month_of(time.time()).period))
    assert int(used or 0) == 0


# --- error order --------------------------------------------------------------------------------

async def test_a_key_both_expired_and_revoked_is_expired_key_as_the_table_orders(
        redis_url, upstream, monkeypatch):
    clock = type("Clock", (), {"now": 1_795_000_000.0, "__call__": lambda self: self.now})()
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme")
        token, key = await g.key(expires_in=60)
        revoked, rkey = await g.key(name="other")
        clock.now += 120
        for k in (key, rkey):
            status, _ = await g.admin_json("POST", f"/workspaces/acme/keys/{k['id']}/revoke")
            assert status == 200
        for t, want in ((token, "expired_key"), (revoked, "revoked_key")):
            async with g.proxy.get("/people/1", headers=bearer(t)) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == want
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_token"'


async def test_usage_endpoint_405_says_which_methods_are_allowed(gut):
    async with gut.proxy.post("/_keygate/v1/usage") as r:
        assert r.status == 405
        assert (await r.json())["error"]["code"] == "method_not_allowed"
        assert r.headers["Allow"] == "GET, HEAD"  # RFC 9110 15.5.6: a 405 MUST carry Allow
        assert r.headers["X-Request-Id"]


# --- serve --workers -----------------------------------------------------------------------------

def test_a_worker_that_fails_says_why_and_the_supervisor_exits_1(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.app as app\n"
        "from harness import make_config\n"
        "app._preflight = lambda config, url: None\n"
        "def boom(*args, **kwargs):\n"
        "    raise RuntimeError('worker start-up failed: boom')\n"
        "app._run_worker = boom\n"
        "sys.exit(app._supervise(make_config('http://127.0.0.1:9'), 'redis://127.0.0.1:9', 2))\n"
        % str(__import__("pathlib").Path(__file__).parent))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "RuntimeError: worker start-up failed: boom" in done.stderr, done.stderr


def test_the_last_worker_failing_is_still_a_failed_exit(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.app as app\n"
        "from harness import make_config\n"
        "app._preflight = lambda config, url: None\n"
        "def worker(*args, **kwargs):\n"
        "    try:\n"
        "        os.close(os.open(%r, os.O_CREAT | os.O_EXCL))\n"
        "        return 0            # the first worker stops cleanly\n"
        "    except FileExistsError:\n"
        "        time.sleep(0.5)\n"
        "        return 1            # the other one fails, after it\n"
        "app._run_worker = worker\n"
        "sys.exit(app._supervise(make_config('http://127.0.0.1:9'), 'redis://127.0.0.1:9', 2))\n"
        % (str(__import__("pathlib").Path(__file__).parent), str(tmp_path / "first")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr


# --- client IP behind trusted proxies ----------------------------------------------------------

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


# --- refund ---------------------------------------------------------------------------------------

async def test_a_refund_at_the_turn_of_the_month_goes_to_the_month_that_counted(
        redis_url, monkeypatch):
    import redis as sync_redis
    from datetime import datetime, timezone
    from conftest import free_port
    from gateway.store import usage_key

    clock = type("Clock", (), {"__call__": lambda self: self.now})()
    clock.now = datetime(2026, 11, 30, 23, 59, 59, 900000, tzinfo=timezone.utc).timestamp()
    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with gateway_under_test(config, redis_url, monkeypatch, clock=clock) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        r = sync_redis.Redis.from_url(redis_url)
        r.set(usage_key("acme", "2026-12"), 5)  # (December already has some use)
        forwarder = g.gw.pipeline.forwarder
        real_forward = forwarder.forward

        async def forward_after_midnight(*args, **kwargs):
            clock.now += 0.2  # the connect attempt ends in December
            return await real_forward(*args, **kwargs)
        monkeypatch.setattr(forwarder, "forward", forward_after_midnight)
        async with g.proxy.get("/people/1", headers=bearer(token)) as resp:
            assert resp.status == 502
        assert int(r.get(usage_key("acme", "2026-11")) or 0) == 0  # November's count taken back
        assert int(r.get(usage_key("acme", "2026-12"))) == 5       # December's untouched


async def test_store_down_during_a_self_service_call_is_503_not_500(redis_url, upstream,
                                                                      monkeypatch):
    import redis as sync_redis
    from gateway.config import StoreConfig
    config = make_config(str(upstream.make_url("")),
                         store=StoreConfig(timeout=0.3, on_store_error="open"))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(role="admin")  # ALL + keys:admin
        async with g.proxy.get("/_keygate/v1/keys", headers=bearer(token)) as r:
            assert r.status == 200
        sync_redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1500")
        async with g.proxy.get("/_keygate/v1/keys", headers=bearer(token)) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (503, "store_unavailable")
            assert r.headers["Retry-After"] == "1"
        await asyncio.sleep(1.6)


async def test_a_key_in_the_path_is_forwarded_but_never_logged(redis_url, upstream, monkeypatch,
                                                                capfd):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        g.logs(capfd)
        for path in (f"/people/{token}", f"/people/x{token}y/z"):
            async with g.proxy.get(path, headers=bearer(token)) as r:
                assert r.status == 200  # SPEC refuses keys in the query only
        _, err = g.logs(capfd)
    assert token not in err and token[-38:-6] not in err
    paths = [json.loads(line)["path"] for line in err.splitlines() if line.startswith("{")]
    assert paths == ["/people/***", "/people/x***y/z"]


def test_access_log_path_masking_handles_encoded_keys():
    from gateway.accesslog import mask_path
    assert mask_path("/people/1", "kg") == "/people/1"
    assert mask_path("/a/kg_live_short/b%C3%A9", "kg") == "/a/kg_live_short/b%C3%A9"
    assert mask_path(f"/a/%6B{TOKEN[1:]}", "kg") == "/***"
    assert mask_path(f"/a/{quote(TOKEN, safe='')}".replace("_", "%5F"), "kg") == "/***"
