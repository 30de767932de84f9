"""``keygate serve`` as a real process: start, answer, survive a restart, stop cleanly.

Every test runs ``python -m gateway serve --config <file>`` with real sockets and a real
redis-server (embedded, or the session's), and stops what it started in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import FLUSH_EVERY

from conftest import RedisServer, free_port, redis_server_binary
from harness import drips_until_closed, eventually
from served import (TIMEOUT, Served, admin_json, alive, children_of, embedded_pid, env, new_key,
                    short_data_dir, skewed_clock, write_config)


# --- start, answer, restart, stop -------------------------------------------------------------

async def test_serve_embedded_answers_survives_restart_and_stops_clean(tmp_path, slow_upstream):
    url, _ = slow_upstream
    data_dir = short_data_dir()
    config, pport, aport = write_config(tmp_path, data_dir=data_dir, upstream_url=url)
    try:
        gw = Served(config, pport, aport)
        try:
            await gw.ready()
            async with ClientSession(timeout=TIMEOUT) as s:
                for path in ("/healthz", "/readyz"):
                    async with s.get(gw.admin + path) as r:
                        assert r.status == 200, path
                token = await new_key(s, gw.admin)
                async with s.get(gw.proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
                    assert (await r.json())["workspace"] == "acme"
            redis_pid = embedded_pid(data_dir)
            assert alive(redis_pid)
            assert gw.terminate() == 0
            assert "Traceback" not in gw.stderr()
        finally:
            gw.close()
        deadline = time.monotonic() + 10
        while alive(redis_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(redis_pid), "the embedded redis-server outlived keygate serve"

        again = Served(config, pport, aport)
        try:
            await again.ready()
            async with ClientSession(timeout=TIMEOUT) as s:
                status, body = await admin_json(s, again.admin, "GET", "/workspaces/acme")
                assert status == 200 and body["name"] == "Acme"
                async with s.get(again.proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200  # the key survived too
                status, usage = await admin_json(s, again.admin, "GET", "/workspaces/acme/usage")
                assert usage["used"] == 2
            assert again.terminate() == 0
        finally:
            again.close()
    finally:
        import shutil
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_sigterm_lets_an_in_flight_request_finish(tmp_path, slow_upstream, redis_url):
    url, state = slow_upstream
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
            state["delay"] = 1.0

            async def call() -> tuple[int, Any]:
                async with s.get(gw.proxy + "/people/7",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status, await r.json()

            in_flight = asyncio.ensure_future(call())
            deadline = time.monotonic() + 5
            while state["seen"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert state["seen"] == 1, "the request never reached the upstream"
            gw.proc.send_signal(signal.SIGTERM)
            status, body = await asyncio.wait_for(in_flight, 10)
            assert status == 200 and body["path"] == "/people/7"
        code = await asyncio.to_thread(gw.proc.wait, 20)
        assert code == 0
    finally:
        gw.close()


async def test_an_access_log_write_that_fails_does_not_stop_the_next_ones(
        tmp_path, slow_upstream, redis_url):
    """A gateway started with stderr closed (``2>&-``: Python's sys.stderr is None) cannot
    write its access log; each batch's write fails. The writer thread must outlive a failed
    write: when it died on the first one, every later batch waited for it forever and a
    SIGTERM waited out the access log's whole 5 s close timeout."""
    url, _ = slow_upstream
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                        access_log="json")
    proc = subprocess.Popen(f"exec {sys.executable} -m gateway serve --config {config} 2>&-",
                            shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            env=env(), cwd=str(config.parent))
    gw = Served.__new__(Served)
    gw.proc, gw.proxy_port, gw.admin_port = proc, pport, aport
    gw.stderr = lambda: "(stderr closed)"
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
            for _ in range(3):  # three batches, each handed over after the last one failed
                async with s.get(gw.proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
                await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)  # (its exit code is not this test's: without a stderr it is -6 on main too)
        assert time.monotonic() - started < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_argon2s_memory_goes_back_to_the_system_after_keys_are_made_and_verified(
        tmp_path, slow_upstream, redis_url):
    """An argon2 run takes keys.argon2.memory_cost (19 MiB by default). glibc used to keep it
    in every thread that ran one: four new keys and their first requests took a gateway from
    56 to 115 MB RSS for good."""
    url, _ = slow_upstream
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url)
    doc = yaml.safe_load(config.read_text())
    del doc["keys"]  # the default argon2 parameters, as shipped
    config.write_text(yaml.safe_dump(doc))
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)  # the workspace, and a first argon2 run
            before = rss_mb(gw.proc.pid)
            tokens = [token]
            for name in ("b", "c", "d"):
                status, body = await admin_json(s, gw.admin, "POST", "/workspaces/acme/keys",
                                                {"name": name, "scopes": ["people:read"]})
                assert status == 201, body
                tokens.append(body["token"])

            async def first_request(token: str) -> int:
                async with s.get(gw.proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status

            assert await asyncio.gather(*map(first_request, tokens)) == [200] * 4
        deadline = time.monotonic() + 25  # freed memory is returned every 10 s at most
        while (now := rss_mb(gw.proc.pid)) > before + 12 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert now <= before + 12, f"RSS {before:.1f} MB before, {now:.1f} MB after"
    finally:
        gw.close()


# --- bad starts: one clear line, non-zero exit, no traceback ------------------------------------

def run_serve(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                           *args],
                          capture_output=True, text=True, timeout=timeout, env=env(),
                          stdin=subprocess.DEVNULL, cwd=str(config.parent))


def assert_one_clear_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: [8080\n")
    assert_one_clear_line(run_serve(path), "broken.yaml")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_is_one_line_naming_the_address(tmp_path, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = short_data_dir()
        try:
            config, _, aport = write_config(tmp_path, data_dir=data_dir)
            doc = yaml.safe_load(config.read_text())
            doc["server"]["port"] = port
            config.write_text(yaml.safe_dump(doc))
            line = assert_one_clear_line(run_serve(config, "--workers", workers),
                                         f"127.0.0.1:{port}")
            assert "in use" in line
            pid_file = Path(data_dir, "redis.pid")
            if pid_file.exists():  # the embedded store it started is stopped again
                assert not alive(int(pid_file.read_text().strip()))
        finally:
            import shutil
            shutil.rmtree(data_dir, ignore_errors=True)


def test_workers_refuse_a_port_another_server_holds_with_so_reuseport(tmp_path, redis_url):
    """A second `keygate serve --workers N` (or nginx/envoy with reuseport) on the same ports
    must not join the first one's listening group: the kernel would then split the traffic
    between two gateways with different configs and stores, silently. It is a port in use."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a --workers listener
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _, _ = write_config(tmp_path, redis_url=redis_url)
        doc = yaml.safe_load(config.read_text())
        doc["server"]["port"] = port
        config.write_text(yaml.safe_dump(doc))
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                 str(config), "--workers", "2"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env(),
                                cwd=str(tmp_path), start_new_session=True)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # it started: take it and its workers down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"keygate serve --workers 2 started on 127.0.0.1:{port}, "
                                 "which another server was listening on") from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        line = assert_one_clear_line(result, f"127.0.0.1:{port}")
        assert "in use" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unreachable_redis_is_one_line_without_password(tmp_path, workers):
    port = free_port()
    config, _, _ = write_config(tmp_path, redis_url=f"redis://:hunter2@127.0.0.1:{port}/0")
    line = assert_one_clear_line(run_serve(config, "--workers", workers), f"127.0.0.1:{port}")
    assert "hunter2" not in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unreachable_redis_tells_the_operator_where_the_url_comes_from_and_what_to_do(
        tmp_path, workers):
    """No Redis at start-up (not started yet, a wrong host): the line said only "cannot reach
    the store at URL: ConnectionError ...", not which setting holds the URL (in the container
    config, an environment variable), nor what to do about it."""
    port = free_port()
    config, _, _ = write_config(tmp_path, redis_url="${KG_TEST_REDIS_URL}")
    line_no = config.read_text().splitlines().index("  redis_url: ${KG_TEST_REDIS_URL}") + 1
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                             "--workers", workers], capture_output=True, text=True, timeout=30,
                            env={**env(), "KG_TEST_REDIS_URL": f"redis://127.0.0.1:{port}/0"},
                            stdin=subprocess.DEVNULL, cwd=str(config.parent))
    line = assert_one_clear_line(result, f"127.0.0.1:{port}",
                                 f"store.redis_url ({config}:{line_no}, from "
                                 "$KG_TEST_REDIS_URL)", "start Redis")
    assert result.returncode == 1, line


def test_a_redis_refusing_the_password_at_start_up_says_check_the_credentials(tmp_path):
    """A Redis that answers but refuses the password: the line says to check the URL's
    credentials, not to start a Redis that is running."""
    for _ in range(3):  # a port another test took between free_port and the bind: anew
        port = free_port()
        server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--requirepass", "right-one"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, up = time.monotonic() + 30, False
        while not up and server.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                up = probe.connect_ex(("127.0.0.1", port)) == 0
            time.sleep(0.05)
        if up:
            break
        server.kill()
        server.wait(10)
    else:
        pytest.fail("the password-protected redis-server did not start")
    try:
        config, _, _ = write_config(tmp_path, redis_url=f"redis://:wrong@127.0.0.1:{port}/0")
        for workers in ("1", "2"):
            line = assert_one_clear_line(run_serve(config, "--workers", workers),
                                         "check store.redis_url", "credentials")
            assert "start Redis" not in line and "wrong" not in line, line
    finally:
        server.kill()
        server.wait(10)


async def _checked_then_served(tmp_path, url: str, *, no_note: bool = False) -> None:
    """`keygate config check` passes a file whose store is ``url`` (with ``no_note``, without
    a note either), and `keygate serve` then starts on the same file."""
    config, pport, aport = write_config(tmp_path, redis_url=url)
    checked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "config", "check", str(config)],
        capture_output=True, text=True, env=env(), timeout=60)
    assert checked.returncode == 0 and not (no_note and "note:" in checked.stderr), checked
    gw = Served(config, pport, aport)
    try:
        try:
            await gw.ready(timeout=20)
        except AssertionError:
            raise AssertionError("config check passed the file, but keygate serve refused it: "
                                 + gw.stderr().strip().splitlines()[-1]) from None
    finally:
        gw.close()


async def test_a_password_redis_py_accepts_is_accepted_by_serve_too(tmp_path, redis_url):
    """README, Store: both store clients read the URL alike. A URL with a password, against a
    Redis whose default user has none (``nopass``, the default): redis-py logs in (``HELLO 3
    AUTH default <password>``), so ``keygate config check`` asks that store and passes the
    file; the per-request client sent the legacy ``AUTH <password>``, which Redis refuses
    ("called without any password configured"), and ``keygate serve`` refused to start with
    the same file."""
    from urllib.parse import urlsplit
    url = f"redis://:not-needed-here@127.0.0.1:{urlsplit(redis_url).port}/0"
    await _checked_then_served(tmp_path, url, no_note=True)


WRONG = "Wr0ng@Pa:ss/wo#rd x+y"
WRONG_ENC = "Wr0ng%40Pa%3Ass%2Fwo%23rd%20x%2By"


def test_refused_credentials_never_show_the_password_in_any_output(tmp_path):
    """SPEC: a store that refuses the credentials is a start-up error (one line, no password
    in it); `keygate config check` and `keygate serve` never print it, percent-encoded or
    decoded, whatever part of the URL holds it, and a user that logs in but lacks a
    permission the per-request script needs is refused the same way."""
    from concurrent.futures import ThreadPoolExecutor
    server, port = password_redis(tmp_path, "the-right-one")
    try:
        with redis.Redis(port=port, password="the-right-one") as admin:
            admin.acl_setuser("noscript", enabled=True, passwords=[f"+{WRONG}"],
                              commands=["+@all", "-@scripting"], keys=["*"])
        base = f"127.0.0.1:{port}"
        urls = [f"redis://:{WRONG_ENC}@{base}/0",
                f"redis://someone:{WRONG_ENC}@{base}/1",
                f"redis://{base}/0?password={WRONG_ENC}",
                f"redis://{base}/0?username=default&password={WRONG_ENC}&client_name=kg",
                f"redis://noscript:{WRONG_ENC}@{base}/0"]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i_url: (i_url[1], check_and_serve_outputs(
                tmp_path / f"c{i_url[0]}", i_url[1])), enumerate(urls)))
        problems = []
        for url, outs in results:
            for cmd, code, text in outs:
                for secret in (WRONG, WRONG_ENC, "Wr0ng", "wo#rd"):
                    if secret in text:
                        problems.append(f"{cmd} for {url}: shows {secret!r}: {text.strip()}")
                if cmd == "serve":
                    lines = [line for line in text.splitlines() if line.strip()]
                    if code != 1 or len(lines) != 1 or "Traceback" in text:
                        problems.append(f"serve for {url}: exit {code}, {text.strip()}")
        assert not problems, "\n".join(problems)
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("scheme", ["REDIS", "Redis"])
async def test_an_upper_case_scheme_config_check_passes_is_served_too(tmp_path, redis_url,
                                                                       scheme):
    """URL schemes are case-insensitive (RFC 3986 3.1), and redis-py reads ``REDIS://`` as
    ``redis://``; ``check_store_url`` and the admin path accept it. The per-request client's
    ``clients.connect`` compared the scheme case-sensitively and handed the URL to the
    Sentinel/Cluster client, which refused it: `keygate config check` said ok, `keygate serve`
    refused to start with the same file ("not a Sentinel or Cluster URL (scheme 'redis')")."""
    from urllib.parse import urlsplit
    url = f"{scheme}://127.0.0.1:{urlsplit(redis_url).port}/0"
    await _checked_then_served(tmp_path, url)


def test_a_redis_on_a_unix_socket_refusing_the_password_says_check_the_credentials(tmp_path):
    """The same refusal through `unix:///path?password=...`: redis-py raises it there as a
    plain ConnectionError (its AuthenticationError only as the cause), so the line said
    "start Redis, or point store.redis_url at one this host can reach" to an operator whose
    Redis was running and had refused the password; `config check`'s note said the same."""
    sock = tmp_path / "r.sock"
    server = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no", "--requirepass", "right-one"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for query in ("?password=wr%40ng-one", ""):  # a wrong password, and none at all
            config, _, _ = write_config(tmp_path, redis_url=f"unix://{sock}{query}")
            line = assert_one_clear_line(run_serve(config), "check store.redis_url",
                                         "credentials")
            assert "start Redis" not in line and "wr@ng" not in line, line
    finally:
        server.kill()
        server.wait(10)


def password_redis(tmp_path, password: str) -> tuple[subprocess.Popen, int]:
    """A redis-server whose default user's password is ``password``, and its port."""
    for _ in range(3):  # a port another test took between free_port and the bind: anew
        port = free_port()
        server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no",
                                   "--dir", str(tmp_path), "--requirepass", password],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return server, port
            time.sleep(0.05)
        server.kill()
        server.wait(10)
    pytest.fail("the password-protected redis-server did not start")


def check_and_serve_outputs(where: Path, url: str) -> list[tuple[str, int, str]]:
    """(command, exit code, stdout + stderr) of `keygate config check` and `keygate serve`
    on a config whose store.redis_url is ``url``."""
    where.mkdir(exist_ok=True)
    config, _, _ = write_config(where, redis_url=url)
    outs = []
    for cmd in (["config", "check", str(config)], ["serve", "--config", str(config)]):
        r = subprocess.run([sys.executable, "-m", "gateway", *cmd], capture_output=True,
                           text=True, timeout=60, env=env(), stdin=subprocess.DEVNULL,
                           cwd=str(where))
        outs.append((cmd[0], r.returncode, r.stdout + r.stderr))
    return outs


def test_a_password_with_an_unencoded_at_then_question_mark_is_never_printed(tmp_path):
    """An operator pastes a generated password without percent-encoding it:
    ``redis://default:Kq@Zt9?Wv8@host:port/0`` (password ``Kq@Zt9?Wv8``). The load-time check
    refused a misplaced '@' only when the URL had no user info before it, so this URL was
    accepted: redis-py reads password ``Kq`` and host ``zt9``, and `keygate serve` failed with
    "cannot reach the store at redis://default:***@Zt9?Wv8@127.0.0.1:...: ... connecting to
    zt9:6379" -- most of the password, in the start-up line (SPEC: one line, no password in
    it), after `config check` said ok. It is refused at load, quoting nothing of the URL."""
    password = "Kq@Zt9?Wv8"
    server, port = password_redis(tmp_path, password)
    try:
        problems = []
        for i, url in enumerate([f"redis://default:{password}@127.0.0.1:{port}/0",
                                 f"redis://:{password}@127.0.0.1:{port}/0"]):
            for cmd, code, text in check_and_serve_outputs(tmp_path / f"c{i}", url):
                if "zt9" in text.lower() or "wv8" in text.lower():
                    problems.append(f"{cmd} (exit {code}) shows the password: {text.strip()}")
                if code != 1 or "%40" not in text:
                    problems.append(f"{cmd} (exit {code}) does not refuse it: {text.strip()}")
        assert not problems, "\n".join(problems)
    finally:
        server.kill()
        server.wait(10)


def test_a_query_password_with_an_unencoded_ampersand_is_never_printed(tmp_path):
    """``?password=Kq7&Wv8zz`` (the '&' not percent-encoded): redis-py reads password ``Kq7``
    and drops ``Wv8zz`` (a query part without '='). The check that refuses exactly this ("it
    may be the rest of a password") saw only parts with an '=', so the URL passed `config
    check`, and `keygate serve`'s start-up line was "cannot reach the store at
    redis://...?password=***&Wv8zz: AuthenticationError ..." -- the rest of the password."""
    password = "Kq7&Wv8zz"
    server, port = password_redis(tmp_path, password)
    try:
        problems = []
        for i, url in enumerate([f"redis://127.0.0.1:{port}/0?password={password}",
                                 f"redis://127.0.0.1:{port}/0?db=0&password={password}"]):
            for cmd, code, text in check_and_serve_outputs(tmp_path / f"c{i}", url):
                if "wv8zz" in text.lower():
                    problems.append(f"{cmd} (exit {code}) shows the password: {text.strip()}")
                if code != 1 or "%26" not in text:
                    problems.append(f"{cmd} (exit {code}) does not refuse it: {text.strip()}")
        assert not problems, "\n".join(problems)
    finally:
        server.kill()
        server.wait(10)


@pytest.fixture(scope="module")
def snapshot_of_25_mb(tmp_path_factory) -> Path:
    """A dump.rdb of ~25 MB that does not compress: a Redis started on it answers LOADING
    (between the 2 MB chunks it loads) for as long as --key-load-delay makes it take."""
    where = tmp_path_factory.mktemp("snapshot")
    server = RedisServer(str(where)).start()
    try:
        client = redis.Redis(port=server.port)
        # 100 000 values of 250 bytes, saved uncompressed (filled in Redis, not sent: 100 000
        # SETs took 13 s of a loaded machine)
        client.execute_command("DEBUG", "POPULATE", 100_000, "filler", 250)
        client.config_set("rdbcompression", "no")
        client.save()
        client.close()
    finally:
        server.stop()
    return where / "dump.rdb"


def loading_redis(snapshot: Path, data_dir: Path, port: int) -> subprocess.Popen:
    """A redis-server on ``port`` loading ``snapshot`` for several seconds, returned once it
    answers LOADING (asked on a bare socket: redis-py retries a LOADING answer)."""
    (data_dir / "dump.rdb").write_bytes(snapshot.read_bytes())
    server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(data_dir),
                               "--key-load-delay", "25"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as probe:
                    probe.sendall(b"PING\r\n")
                    answer = probe.recv(100)
                assert answer.startswith(b"-LOADING"), answer
                return server
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    except BaseException:  # never a redis-server left behind
        server.kill()
        server.wait(10)
        raise


async def test_a_loading_redis_is_asked_twice_per_call_not_four_times(tmp_path,
                                                                      snapshot_of_25_mb):
    """A LOADING answer (redis-py's BusyLoadingError, a ConnectionError to it) was sent again
    at once on a fresh connection, three times: a Redis loading answers only between the
    2 MB chunks it loads (every ~0.6 s here), so serve's first PING waited four chunks to learn
    it was loading, 8-9.5 s under load, and a chunk slower than the store timeout on any of
    the three repeats counted as "cannot reach the store". Over TCP it is asked once more (a
    host name may lead a fresh connection to another server:
    test_a_loading_answer_behind_a_service_is_asked_again_on_a_fresh_connection), no more."""
    from gateway.config import load_config
    from gateway.store import Store
    port = free_port()
    server = loading_redis(snapshot_of_25_mb, tmp_path, port)
    try:
        # the connections counted as they are made, through a relay (not from the server's
        # INFO once the load ends: ~9 s of waiting)
        async with _Service([port]) as relay:
            url = relay.url
            path = write_config(tmp_path, redis_url=url)[0]
            doc = yaml.safe_load(path.read_text())
            # a store timeout past the load: the retries are bounded by their count, not by it
            doc["store"]["timeout"] = 60
            path.write_text(yaml.safe_dump(doc))
            store = await Store.connect(url, load_config(path))
            try:
                problem = await store.ping_problem()
            finally:
                await store.close()
            assert problem is not None and problem.startswith("BusyLoadingError"), problem
            # the PING and its one retry, each on a connection of its own
            assert relay.made == 2, relay.made
    finally:
        server.kill()
        server.wait(10)


class _Service:
    """A TCP relay on loopback standing in for a Kubernetes Service / a cloud load balancer /
    a managed Redis's primary endpoint (ElastiCache, Memorystore, Azure Cache): a standalone
    ``redis://host:port`` whose connections go to whichever server is the primary when they
    are made. ``targets``: the backend port for the 1st, 2nd, ... connection (the last one for
    any after)."""

    def __init__(self, targets: list[int]) -> None:
        self.targets, self.made = targets, 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "_Service":
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _relay(self, reader, writer) -> None:
        port = self.targets[min(self.made, len(self.targets) - 1)]
        self.made += 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


async def test_a_loading_answer_behind_a_service_is_asked_again_on_a_fresh_connection(
        tmp_path, own_redis, snapshot_of_25_mb):
    """Failover behind a standalone URL (a Service, an LB, a managed Redis's primary DNS
    name): the demoted primary resyncs and answers LOADING on the connections keygate already
    has, while a fresh connection reaches the promoted one. redis_urls.standalone_client now
    made LOADING final for a while (no retry on a standalone URL): the call raised
    BusyLoadingError (the request or admin call answered 503 ``store_unavailable``) where the
    retry on a fresh connection answered; "a fresh connection goes to the same server" holds
    for a unix socket only. SPEC (Store): "A store that is healthy is never reported as unavailable ...
    Connections the server closed (restart, failover ...) are re-made without a wrong
    answer". Expected: the call answers (retried on a fresh connection, as before)."""
    from gateway.redis_urls import standalone_client
    port = free_port()
    loading = loading_redis(snapshot_of_25_mb, tmp_path, port)
    try:
        async with _Service([port, own_redis.port]) as service:
            client = standalone_client(service.url, timeout=2.0, decode_responses=True)
            try:
                assert await client.set("k", "v")   # the first connection: the LOADING one
            finally:
                await client.aclose()
        assert service.made >= 2
    finally:
        loading.kill()
        loading.wait(10)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_redis_still_loading_its_data_at_start_up_is_waited_for(
        tmp_path, snapshot_of_25_mb, workers):
    """Redis restarted with a large data set answers LOADING until it is in. `serve` started
    meanwhile (a host rebooted, a pod rescheduled with its Redis) exited 1 saying "start Redis,
    or point store.redis_url at one this host can reach" of a Redis that was running: a crash
    loop and a wrong hint. It says it waits for the load, then serves."""
    port = free_port()
    server = loading_redis(snapshot_of_25_mb, tmp_path, port)
    config, proxy_port, admin_port = write_config(tmp_path,
                                                  redis_url=f"redis://127.0.0.1:{port}/0")
    gw = Served(config, proxy_port, admin_port, "--workers", workers)
    try:
        await gw.ready(timeout=60)
        err = gw.stderr()
        assert "loading" in err and "waiting" in err, err
        assert "cannot reach" not in err and "Traceback" not in err, err
        assert gw.terminate() == 0
    finally:
        gw.close()
        server.kill()
        server.wait(10)


async def test_a_sigterm_while_redis_loads_its_data_stops_serve_at_once(tmp_path,
                                                                        snapshot_of_25_mb):
    port = free_port()
    server = loading_redis(snapshot_of_25_mb, tmp_path, port)
    config, proxy_port, admin_port = write_config(tmp_path,
                                                  redis_url=f"redis://127.0.0.1:{port}/0")
    gw = Served(config, proxy_port, admin_port)
    try:
        deadline = time.monotonic() + 20
        while "loading" not in gw.stderr():
            assert gw.proc.poll() is None, gw.stderr()
            assert time.monotonic() < deadline, gw.stderr()
            await asyncio.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=3) as probe:
            probe.sendall(b"PING\r\n")  # still loading: the stop below comes during the wait
            assert probe.recv(100).startswith(b"-LOADING")
        assert gw.terminate(timeout=5) == 0, gw.stderr()
        assert "Traceback" not in gw.stderr(), gw.stderr()
    finally:
        gw.close()
        server.kill()
        server.wait(10)


def sigterm_caught(pid: int) -> bool:
    """Whether the process has its SIGTERM handler: serve's event loop installs it as its last
    step before the start-up checks of the store."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_a_stop_while_serve_checks_its_store_is_a_clean_stop_not_a_failure(tmp_path):
    """`systemctl stop` (SIGTERM to the whole service, its Redis too) while serve, or one of
    its workers, was still checking its store at start-up: the check then failed on the Redis
    that was going away, and serve exited 1 with "cannot use the store ... start Redis" (a
    supervisor: "worker exited with status 1"), a failed unit for a stop it was asked for.
    A start the stop interrupted ends as a stop: exit 0, without the store line."""
    server = RedisServer(str(tmp_path)).start()
    port = server.port
    try:
        client = redis.Redis(port=port)
        # writes held: the start-up check of the per-request connection (a script that
        # writes) waits there, within store.timeout, while PING is answered
        client.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
        config, proxy_port, admin_port = write_config(
            tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", store_timeout=10)
        gw = Served(config, proxy_port, admin_port)
        try:
            deadline = time.monotonic() + 30
            while not sigterm_caught(gw.proc.pid):
                assert gw.proc.poll() is None and time.monotonic() < deadline, gw.stderr()
                time.sleep(0.005)
            time.sleep(0.3)  # at the store's check
            gw.proc.send_signal(signal.SIGTERM)
            server.proc.kill()  # the service's Redis, stopped with it
            server.proc.wait(10)
            assert gw.proc.wait(20) == 0, gw.stderr()
            assert "cannot use the store" not in gw.stderr(), gw.stderr()
            assert "Traceback" not in gw.stderr(), gw.stderr()
        finally:
            gw.close()
    finally:
        server.stop()


def test_bad_store_url_is_one_line_naming_the_field(tmp_path):
    config, _, _ = write_config(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/abc")
    assert_one_clear_line(run_serve(config), "store.redis_url")


def test_unwritable_data_dir_is_one_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    config, _, _ = write_config(tmp_path, data_dir=str(blocker / "sub"))
    assert_one_clear_line(run_serve(config), "data_dir")


# --- several workers, several replicas ---------------------------------------------------------

def requests_total(text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "keygate_requests":
            total += sum(s.value for s in family.samples if s.name == "keygate_requests_total")
    return total


async def two_workers(gw: Served) -> set[int]:
    """The pids of a ``serve --workers 2``'s two workers, once both are forked (10 s at most)."""
    deadline = time.monotonic() + 10
    while len(workers := children_of(gw.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(workers) == 2, workers
    return workers


async def test_two_workers_share_one_port_metrics_and_stop_together(tmp_path, slow_upstream,
                                                                     redis_url):
    url, _ = slow_upstream
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url)
    gw = Served(config, pport, aport, "--workers", "2")
    workers: set[int] = set()
    try:
        await gw.ready()
        workers = await two_workers(gw)
        sent = 0
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, gw.admin)
            for _ in range(3):  # new connections each round, so both workers get some
                async with ClientSession(timeout=TIMEOUT) as fresh:
                    for path in ("/people/1", "/health", "/nope"):
                        async with fresh.get(gw.proxy + path,
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Connection": "close"}) as r:
                            sent += 1
                            assert r.status == (404 if path == "/nope" else 200)
            # each worker adds its requests to the shared files every FLUSH_EVERY seconds (and
            # counts a request once its answer is written): wait until a scrape shows them all,
            # rather than 3 flush periods, which a loaded machine can stretch past
            deadline = time.monotonic() + 15
            while True:
                async with ClientSession(timeout=TIMEOUT) as fresh:
                    async with fresh.get(gw.admin + "/metrics",
                                         headers={"Connection": "close"}) as r:
                        seen = requests_total(await r.text())
                if seen >= sent or time.monotonic() > deadline:
                    break
                await asyncio.sleep(FLUSH_EVERY)
            for _ in range(6):  # any worker may answer; each sees the sum over all workers
                async with ClientSession(timeout=TIMEOUT) as fresh:
                    async with fresh.get(gw.admin + "/metrics",
                                         headers={"Connection": "close"}) as r:
                        assert r.status == 200
                        text = await r.text()
                        assert requests_total(text) == sent
                        month = [s.value for f in text_string_to_metric_families(text)
                                 for s in f.samples
                                 if s.name == "keygate_workspace_month_requests"
                                 and s.labels.get("workspace") == "acme"]
                        assert month == [3]  # the three /people/1 forwards, read from Redis
                        # the conventional series work under --workers too: build info once,
                        # process_* summed over both workers (each holds tens of MiB)
                        samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
                                   for f in text_string_to_metric_families(text)
                                   for x in f.samples}
                        info = [v for (n, _), v in samples.items() if n == "keygate_build_info"]
                        assert info == [1]
                        rss = samples[("process_resident_memory_bytes", ())]
                        assert rss > 2 * 10 * 1024 * 1024
                        assert samples[("process_open_fds", ())] > 0
                        assert ("python_info" in {n for n, _ in samples})
        assert await asyncio.to_thread(gw.terminate) == 0
        assert "Traceback" not in gw.stderr()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(alive(p) for p in workers), "a worker outlived keygate serve"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        gw.close()


def test_a_worker_that_fails_says_why_and_the_supervisor_exits_1(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.workers as app\n"
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


def operations_md_quote(marker: str) -> str:
    """The regular expression of the log line docs/operations.md quotes (in backticks) with
    ``marker`` in it: its ``I`` and ``P`` (a worker's place and pid) stand for any number, a
    closing ``...`` for the rest of the line. The guide's quotes are what operators grep and
    alert on: each must be a line the product writes."""
    text = " ".join((Path(__file__).resolve().parent.parent / "docs" / "operations.md")
                    .read_text().split())
    quoted = [q for q in re.findall(r"`([^`]+)`", text) if marker in q]
    assert len(quoted) == 1, (marker, quoted)
    pattern = re.escape(quoted[0].removesuffix(" ..."))
    return pattern.replace(r"worker\ I\ \(pid\ P\)", r"worker\ \d+\ \(pid\ \d+\)")


async def test_a_worker_killed_outright_is_named_in_the_supervisors_log(tmp_path, upstream,
                                                                        redis_url):
    """One worker of `serve --workers 2` SIGKILLed (the OOM killer, `kill -9`): the supervisor
    stops the other one and exits 1, so the process manager restarts it. It used to do so
    without a word: the log ended on "shutting down: finishing in-flight requests" and the
    operator had no way to tell that a worker had died, which one, or of what."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, "--workers", "2")
    workers: set[int] = set()
    try:
        await gw.ready()
        workers = await two_workers(gw)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.to_thread(gw.proc.wait, 15) == 1
        err = gw.stderr()
        # named as its own lines name it (its place among the workers, its pid)
        assert re.search(rf"worker [12] \(pid {victim}\): was killed by signal 9 \(SIGKILL\)",
                         err), err
        assert "stopping the other workers" in err, err
        assert "Traceback" not in err
        # the line the operations guide quotes (it quoted `worker (pid N) was killed ...`)
        assert re.search(operations_md_quote("was killed by signal 9"), err), err
    finally:
        gw.close()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_worker_stopped_from_outside_is_named_in_the_supervisors_log(tmp_path, upstream,
                                                                           redis_url):
    """One worker of `serve --workers 2` sent SIGTERM on its own (an operator's `kill PID`, a
    tool that signals the wrong pid): it stops cleanly, exit 0, and the supervisor used to
    reap it without a word, serving on with one worker fewer for ever. A worker the supervisor
    did not ask to stop is now treated as one that died: named with how it ended, the others
    stopped, exit 1 for the process manager to restart the whole."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, "--workers", "2")
    workers: set[int] = set()
    try:
        await gw.ready()
        workers = await two_workers(gw)
        victim = min(workers)
        os.kill(victim, signal.SIGTERM)
        assert await asyncio.to_thread(gw.proc.wait, 15) == 1
        err = gw.stderr()
        assert re.search(rf"worker [12] \(pid {victim}\): stopped without the supervisor "
                         r"asking \(a SIGTERM or SIGINT sent to it alone\); stopping the other "
                         r"workers", err), err
        assert "Traceback" not in err
        assert re.search(operations_md_quote("stopped without the supervisor asking"), err), err
    finally:
        gw.close()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_stop_with_a_wedged_worker_is_still_bounded(tmp_path, upstream, redis_url):
    """docs/operations.md, Stopping: "Every step of the stop is bounded, and at worst they add
    up to 83 s with the default drain", and the Deployment's grace period is sized on that.
    Under `--workers 2` the supervisor forwarded SIGTERM to its workers and then waited for
    them with a blocking ``os.waitpid`` for ever: a worker that does not end (its event loop
    wedged; here stopped with SIGSTOP) kept the supervisor running past every bound (still
    there 100 s after the SIGTERM) until something outside SIGKILLed it. It now kills a
    worker still there past the bound (here 1 s of drain, no access log, no tracing: 34 s,
    and 2 s of slack), names it and says why, and exits 1."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, "--workers", "2", environ={"KEYGATE_DRAIN_SECONDS": "1"})
    wedged = None
    try:
        await gw.ready()
        wedged = min(await two_workers(gw))
        os.kill(wedged, signal.SIGSTOP)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        try:  # the documented worst case with a 1 s drain (and tracing on) is 54 s
            code = await asyncio.to_thread(gw.proc.wait, 70)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve --workers 2 still running "
                                 f"{time.monotonic() - started:.0f} s after SIGTERM, waiting "
                                 f"for a wedged worker: {gw.stderr()[-1500:]}") from None
        took = time.monotonic() - started
        err = gw.stderr()
        assert code == 1, err
        assert 34 <= took < 45, (took, err)  # not before the bound, and soon after it
        assert re.search(rf"worker [12] \(pid {wedged}\): still running 3[67] s after it was "
                         r"asked to stop \(every step of a stop ends within 36 s\); killing it "
                         r"\(SIGKILL\)", err), err
        assert re.search(rf"worker [12] \(pid {wedged}\): was killed by signal 9", err), err
        assert re.search(operations_md_quote("still running"), err), err
        assert "Traceback" not in err
        assert not alive(wedged)
    finally:
        if wedged is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(wedged, signal.SIGKILL)
        gw.close()


def test_a_worker_that_cannot_be_forked_is_one_line_and_the_others_stop(tmp_path):
    """`serve --workers N` where the system refuses a fork (a container's pids limit, ENOMEM):
    os.fork's BlockingIOError went up as a traceback, leaving the workers already forked to
    their death signal and the metrics directory behind. It is now one line naming the worker
    and the reason; the workers already forked are stopped and waited for; exit 1."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import errno, os, signal, sys\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.workers as app\n"
        "from harness import make_config\n"
        "app._preflight = lambda config, url: None\n"
        "real_fork, forked = os.fork, []\n"
        "def fork():\n"
        "    if forked:  # the second fork is refused, as a pids limit refuses it\n"
        "        raise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
        "    pid = real_fork()\n"
        "    if pid:\n"
        "        forked.append(pid)\n"
        "    return pid\n"
        "os.fork = fork\n"
        "def worker(*args, **kwargs):  # serves until SIGTERM (held, as a real worker holds it)\n"
        "    signal.sigwait({signal.SIGTERM})\n"
        "    return 0\n"
        "app._run_worker = worker\n"
        "code = app._supervise(make_config('http://127.0.0.1:9'), 'redis://127.0.0.1:9', 3)\n"
        "print(*forked)\n"
        "sys.exit(code)\n"
        % str(Path(__file__).parent))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert ("cannot start worker 2 of 3: Resource temporarily unavailable; stopping the "
            "other workers") in done.stderr, done.stderr
    forked = [int(pid) for pid in done.stdout.split()]
    assert len(forked) == 1 and not alive(forked[0])  # waited for, not left to its signal


def test_the_last_worker_failing_is_still_a_failed_exit(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, %r)\n"
        "import gateway.workers as app\n"
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


async def test_quota_is_exact_across_two_serve_processes(tmp_path, slow_upstream, redis_url):
    url, _ = slow_upstream
    limit = 4
    plan = {"monthly_requests": limit, "max_keys": 5, "rate_limit": None}
    a_cfg, a_p, a_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url, plan=plan,
                                   name="a.yaml")
    b_cfg, b_p, b_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url, plan=plan,
                                   name="b.yaml")
    a = Served(a_cfg, a_p, a_a)
    b = Served(b_cfg, b_p, b_a)
    try:
        await asyncio.gather(a.ready(), b.ready())
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, a.admin)
            headers = {"Authorization": f"Bearer {token}"}

            async def one(base: str) -> tuple[int, str | None]:
                async with s.get(base + "/people/1", headers=headers) as r:
                    body = await r.json()
                    return r.status, (body.get("error") or {}).get("code")

            results = await asyncio.gather(*(one(a.proxy if i % 2 else b.proxy)
                                             for i in range(3 * limit)))
        assert [r for r in results if r[0] == 200].__len__() == limit, results
        assert sorted(set(r for r in results if r[0] != 200)) == [(429, "quota_exceeded")], results
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        a.close()
        b.close()


async def test_a_keys_own_cap_is_exact_across_two_serve_processes(tmp_path, slow_upstream,
                                                                  redis_url):
    url, _ = slow_upstream
    a_cfg, a_p, a_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                   name="a.yaml")
    b_cfg, b_p, b_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                   name="b.yaml")
    a = Served(a_cfg, a_p, a_a)
    b = Served(b_cfg, b_p, b_a)
    cap = 4
    try:
        await asyncio.gather(a.ready(), b.ready())
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, a.admin)  # the workspace's quota (1000) is far off
            status, keys = await admin_json(s, a.admin, "GET", "/workspaces/acme/keys")
            key_id = keys["items"][0]["id"]
            status, _ = await admin_json(s, b.admin, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                         {"monthly_requests": cap})
            assert status == 200
            headers = {"Authorization": f"Bearer {token}"}

            async def one(base: str) -> tuple[int, str | None]:
                async with s.get(base + "/people/1", headers=headers) as r:
                    body = await r.json()
                    return r.status, (body.get("error") or {}).get("code")

            results = await asyncio.gather(*(one(a.proxy if i % 2 else b.proxy)
                                             for i in range(4 * cap)))
            _, key = await admin_json(s, a.admin, "GET", f"/workspaces/acme/keys/{key_id}")
        assert [r for r in results if r[0] == 200].__len__() == cap, results
        assert sorted(set(r for r in results if r[0] != 200)) == \
            [(429, "key_quota_exceeded")], results
        assert key["used_this_month"] == cap
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        a.close()
        b.close()


async def test_two_serve_processes_whose_clocks_are_90s_apart_agree_on_rate_expiry_and_use(
        tmp_path, slow_upstream, redis_url):
    """Replicas share one rate log, one expiry and one last_used_at: each took "now" from its
    own clock, so with B's 90 s behind A's a 2/m key was admitted 4 times at once (A read B's
    entries as older than the window) and B then refused it with a Retry-After of 150 s; B
    admitted a key past its expires_at, and stamped its last use (and a key it made) 90 s in
    the past."""
    url, _ = slow_upstream
    a_cfg, a_p, a_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                   name="a.yaml")
    b_cfg, b_p, b_a = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                   name="b.yaml")
    a = Served(a_cfg, a_p, a_a)
    b = Served(b_cfg, b_p, b_a, environ=skewed_clock(-90))
    try:
        await asyncio.gather(a.ready(), b.ready())
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, a.admin)
            _, keys = await admin_json(s, a.admin, "GET", "/workspaces/acme/keys")
            key_id = keys["items"][0]["id"]
            status, _ = await admin_json(s, a.admin, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                         {"rate_limit": "2/m"})
            assert status == 200

            async def one(base: str, bearer: str = token) -> tuple[int, str | None, int]:
                async with s.get(base + "/people/1",
                                 headers={"Authorization": f"Bearer {bearer}"}) as r:
                    body = await r.json()
                    return (r.status, (body.get("error") or {}).get("code"),
                            int(r.headers.get("Retry-After", 0)))

            assert [await one(b.proxy) for _ in range(2)] == [(200, None, 0)] * 2
            refused = [await one(a.proxy), await one(a.proxy), await one(b.proxy)]
            assert [r[:2] for r in refused] == [(429, "rate_limited")] * 3, refused
            assert all(0 < r[2] <= 60 for r in refused), refused
            _, key = await admin_json(s, a.admin, "GET", f"/workspaces/acme/keys/{key_id}")
            used = datetime.fromisoformat(key["last_used_at"]).timestamp()
            assert abs(used - time.time()) < 10, key["last_used_at"]

            # a second key, made at B (its created_at on the shared clock too) and set at A to
            # expire 2 s from now: past that B refuses it as A does
            status, body = await admin_json(s, b.admin, "POST", "/workspaces/acme/keys",
                                            {"name": "brief", "scopes": ["people:read"]})
            assert status == 201, body
            made = datetime.fromisoformat(body["key"]["created_at"]).timestamp()
            assert abs(made - time.time()) < 10, body["key"]["created_at"]
            brief, brief_id = body["token"], body["key"]["id"]
            assert (await one(b.proxy, brief))[0] == 200  # verified and cached at B
            ends = int(time.time()) + 2
            status, body = await admin_json(
                s, a.admin, "PATCH", f"/workspaces/acme/keys/{brief_id}",
                {"expires_at": datetime.fromtimestamp(ends, timezone.utc).isoformat()})
            assert status == 200, body
            await asyncio.sleep(ends + 0.5 - time.time())
            assert [(await one(g, brief))[:2] for g in (a.proxy, b.proxy)] == \
                [(401, "expired_key")] * 2
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        a.close()
        b.close()


async def test_counters_keep_their_expiry_when_a_gateway_is_killed_mid_run(tmp_path,
                                                                           slow_upstream,
                                                                           redis_url):
    url, state = slow_upstream
    plan = {"monthly_requests": 100000, "max_keys": 5, "rate_limit": "1000/s"}
    cfg, proxy_port, admin_port = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                               plan=plan)
    served = Served(cfg, proxy_port, admin_port)
    try:
        await served.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token = await new_key(s, served.admin)
            headers = {"Authorization": f"Bearer {token}"}
            bad = {"Authorization": "Bearer " + token[:-38] + "Z" * 32 + token[-6:]}

            async def one(h: dict[str, str]) -> None:
                with contextlib.suppress(Exception):
                    async with s.get(served.proxy + "/people/1", headers=h) as r:
                        await r.read()
            calls = [asyncio.ensure_future(one(headers if i % 4 else bad)) for i in range(60)]
            # some counted and forwarded (not a fixed 0.3 s: on a loaded machine none might
            # be yet, and the test then found no usage counter at all)
            deadline = time.monotonic() + 10
            while state["seen"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            served.proc.kill()  # SIGKILL with requests in flight
            await asyncio.gather(*calls)
        served.proc.wait(10)
    finally:
        served.close()
    client = redis.Redis.from_url(redis_url)
    counters = [k for k in client.scan_iter("kg:*")
                if k.startswith((b"kg:usage:", b"kg:rate:", b"kg:fail:"))]
    assert any(k.startswith(b"kg:usage:") for k in counters)
    assert all(client.pttl(k) > 0 for k in counters), [(k, client.pttl(k)) for k in counters]


async def test_the_start_up_heap_is_kept_out_of_garbage_collection(tmp_path, redis_url):
    """What start-up built lives as long as the process; a full garbage collection walking it
    again and again stalled the event loop for ~13 ms at rest (bench/gc_pause.py). serve
    freezes it once listening, and says how much it froze."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            await new_key(s, gw.admin)  # serving after the freeze
        # said once the listeners are up: it may follow the first answers by a moment
        assert await eventually(lambda: "start-up heap:" in gw.stderr()), gw.stderr()
        line = next(l for l in gw.stderr().splitlines() if "start-up heap:" in l)
        frozen = int(line.split("start-up heap:")[1].split()[0])
        assert frozen > 10_000, line  # modules, config and app: tens of thousands of objects
    finally:
        gw.close()


async def test_the_admin_listener_cuts_off_a_request_head_dripped_past_the_header_timeout(
        tmp_path, redis_url):
    """A slow-loris on the admin listener (which should be private, but is a listener all the
    same) is closed once server.timeouts.header has passed without a whole request head, as
    on the proxy listener, instead of holding a connection for as long as it drips."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        timeouts={"header": 1, "body": 5, "idle": 30})
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", aport)
        started = time.monotonic()
        closed = await drips_until_closed(
            reader, writer, b"GET /admin/v1/workspaces HTTP/1.1\r\nHost: x\r\n", 6.0)
        assert closed, "a slow-loris kept its admin connection past the header timeout"
        assert 0.8 < time.monotonic() - started < 5.0
    finally:
        gw.close()


async def test_serve_without_an_operator_token_says_so_at_start(tmp_path, redis_url,
                                                                monkeypatch):
    """A gateway started without KEYGATE_ADMIN_TOKEN (a systemd unit or a pod that forgot the
    secret) refuses every admin call; the operator should read why in the start-up log, not
    find out from the first 401."""
    import served
    plain = served.env()
    plain.pop("KEYGATE_ADMIN_TOKEN")
    monkeypatch.setattr(served, "env", lambda: plain)
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        assert await asyncio.to_thread(gw.terminate) == 0
        warned = [line for line in gw.stderr().splitlines() if "KEYGATE_ADMIN_TOKEN" in line]
        assert len(warned) == 1, gw.stderr()
        assert "WARNING" in warned[0] and "admin" in warned[0], warned[0]
    finally:
        gw.close()
    # with the token set, no such line
    monkeypatch.undo()
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        assert await asyncio.to_thread(gw.terminate) == 0
        assert "KEYGATE_ADMIN_TOKEN" not in gw.stderr()
    finally:
        gw.close()


async def test_workers_do_not_outlive_a_supervisor_killed_outright(tmp_path, upstream, redis_url):
    """The supervisor of `serve --workers 2` SIGKILLed (the OOM killer, `kill -9`, a test
    harness): its workers used to run on as orphans, holding the ports (a restart then found
    them in use, or with SO_REUSEPORT shared the traffic with them) and their store
    connections. They now get SIGTERM when it dies, and stop as on any SIGTERM."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, "--workers", "2")
    workers: set[int] = set()
    try:
        await gw.ready()
        workers = await two_workers(gw)
        gw.proc.kill()
        gw.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(map(alive, workers)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(map(alive, workers)), "workers outlived their supervisor"
    finally:
        gw.close()
        for pid in workers:  # never leave them behind, whatever the outcome
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_supervisor_killed_outright_leaves_no_metrics_directory_for_good(
        tmp_path, upstream, redis_url):
    """`serve --workers 2` keeps its workers' metrics files in a temporary directory
    (keygate-metrics-*) it removes when it stops; SIGKILLed (the OOM killer), it left that
    directory behind, one more each time. The next supervisor removes those whose supervisor
    is gone, and only those: its own kind, its own user's, not one a live supervisor holds."""
    import fcntl
    temp = tmp_path / "tmp"
    temp.mkdir()
    environ = {"TMPDIR": str(temp)}
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    live = temp / "keygate-metrics-livelive"  # as a running supervisor holds its own
    live.mkdir()
    (live / "supervisor.lock").write_text("1\n")
    holder = os.open(live / "supervisor.lock", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    other = temp / "keygate-metricsx-notours"  # not the pattern
    other.mkdir()
    workers: set[int] = set()
    first = Served(config, pport, aport, "--workers", "2", environ=environ)
    try:
        await first.ready()
        workers = await two_workers(first)
        [stale] = set(temp.glob("keygate-metrics-*")) - {live}
        first.proc.kill()
        first.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(map(alive, workers)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(map(alive, workers)), "workers outlived their supervisor"
        assert stale.is_dir()  # what a SIGKILL leaves
        second = Served(config, pport, aport, "--workers", "2", environ=environ)
        try:
            await second.ready()
            assert not stale.exists(), "the dead supervisor's metrics directory is still there"
            assert live.is_dir() and other.is_dir()
            [own] = set(temp.glob("keygate-metrics-*")) - {live}
            assert await asyncio.to_thread(second.terminate) == 0
            assert not own.exists()
        finally:
            second.close()
    finally:
        os.close(holder)
        first.close()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_serve_sets_one_malloc_arena_before_any_thread_of_its_own_starts(tmp_path):
    """``one_malloc_arena`` must run before any thread starts (argon2_pool's docstring: a
    thread that has allocated keeps its own glibc arena, and the process and every worker it
    forks then spreads the argon2 threads' memory over more than one arena). Application log
    lines are now written by a thread started at the first line logged, and serve logs its
    operator-token warning just before it: with the token unset, that thread ran first.
    Run in a fresh interpreter: the test process may hold such a thread from other tests."""
    config, _, _ = write_config(tmp_path)
    run = _threads_when(config, "argon2_pool.one_malloc_arena", "t.name == 'keygate-log'")
    assert run.stdout.strip() == "[]", f"threads started before one_malloc_arena: {run}"


def test_the_event_loop_is_uvloop_without_the_deprecated_process_wide_policy():
    """``keygate serve`` and ``keygate demo`` run on uvloop through a loop factory. They called
    ``uvloop.install()``, which sets asyncio's process-wide event loop policy: deprecated by
    uvloop from Python 3.12 on (the Docker image's Python), so every start warned, and under
    ``-W error`` (PYTHONWARNINGS=error) each worker died at start; asyncio deprecates the
    policy itself from 3.14 on, for removal."""
    import warnings

    uvloop = pytest.importorskip("uvloop")
    from gateway import workers

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert issubclass(workers.run_event_loop(loop_type()), uvloop.Loop)
    assert asyncio.get_event_loop_policy() is policy


def test_the_supervisor_forks_its_workers_with_no_other_thread_running(tmp_path, redis_url):
    """``keygate serve --workers N`` forks with no thread but its own: a thread running at
    ``fork()`` may hold a lock that its copy in the worker never releases (Python 3.12 and
    later warn of it: "This process is multi-threaded, use of fork() may lead to deadlocks in
    the child"). The log writer's thread, started by the first line logged (here the
    operator-token warning, with the token unset), was still running. Run in a fresh
    interpreter, ``os.fork`` replaced by a probe that lists the threads and stops."""
    config, _, _ = write_config(tmp_path, redis_url=redis_url)
    run = _threads_when(config, "os.fork", "t is not threading.main_thread()", ", workers=2")
    assert run.stdout.strip() == "[]", f"threads running at fork(): {run}"
    assert "KEYGATE_ADMIN_TOKEN" in run.stderr, run.stderr  # the line was logged, and written


def _threads_when(config, call: str, which: str, serve_args: str = ""):
    """``keygate serve`` of ``config`` in a fresh interpreter with KEYGATE_ADMIN_TOKEN unset
    (so that serve logs its warning, which starts the log writer's thread), until it makes
    ``call`` (replaced): prints the names of the threads running then that ``which`` (an
    expression of ``t``) selects, and exits."""
    probe = (
        "import os, sys, threading\n"
        "from gateway import argon2_pool, workers\n"
        "def stop(*_):\n"
        f"    print(sorted(t.name for t in threading.enumerate() if {which}))\n"
        "    sys.stdout.flush()\n"
        "    os._exit(0)\n"
        f"{call} = stop\n"
        f"workers.serve({str(config)!r}{serve_args})\n")
    child_env = {k: v for k, v in env().items() if k != "KEYGATE_ADMIN_TOKEN"}
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=child_env, timeout=60)


async def test_serve_logs_a_method_falling_through_to_a_public_route_once_at_start(
        tmp_path, redis_url):
    """GET on /people/** needs a key and a public catch-all for every method follows: 'DELETE
    /people/1' reaches the upstream without one (HTTP verb tampering, served as first match,
    SPEC). `serve` says so once at start, as `config check` prints it, before it forks its
    workers (not once per worker), and serves the file all the same."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    doc = yaml.safe_load(config.read_text())
    doc["routes"].append({"path": "/**", "upstream": "api", "public": True})
    config.write_text(yaml.safe_dump(doc))
    gw = Served(config, pport, aport, "--workers", "2")
    try:
        await gw.ready()
        assert await asyncio.to_thread(gw.terminate) == 0
        warned = [line for line in gw.stderr().splitlines() if ": warning: " in line]
        assert len(warned) == 1, gw.stderr()
        assert "WARNING" in warned[0], warned[0]
        assert f"{config}:" in warned[0] and "routes[1]: warning: '/people/**' needs a key " \
            "only for GET and HEAD; POST, PUT, PATCH, DELETE, TRACE and any other method " \
            "(PURGE, PROPFIND...) on its paths fall through to routes[2] '/**'" in warned[0]
    finally:
        gw.close()


async def test_a_config_path_holding_terminal_controls_is_logged_escaped(tmp_path, redis_url):
    """The start-up line (`keygate listening: ... (config PATH, pid N)`) and a reload's log
    lines (`SIGHUP: reloading PATH`, `config reloaded from PATH`) wrote the config path's raw
    bytes: a name holding an escape sequence retitled the terminal that tails the log, and a
    newline forged a log line of its own. Escaped, as config check's problems have it."""
    name = "evil\x1b]0;PWNED\x07\x1b[2J\nfake.yaml:1: ok"
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, name=name)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        gw.proc.send_signal(signal.SIGHUP)
        assert await eventually(lambda: "config reloaded from" in gw.stderr()), gw.stderr()
        assert await asyncio.to_thread(gw.terminate) == 0
        err = gw.stderr()
        assert "\x1b" not in err and "\x07" not in err, repr(err)
        assert not any(line.startswith("fake.yaml") for line in err.splitlines()), err
        shown = str(tmp_path / "evil\\x1b]0;PWNED\\x07\\x1b[2J\\nfake.yaml:1: ok")
        assert f"(config {shown}, pid " in err, err
        assert f"SIGHUP: reloading {shown}\n" in err, err
        assert f"config reloaded from {shown}\n" in err, err
    finally:
        gw.close()


@pytest.mark.parametrize("drops", ["plan", "role"])
async def test_a_restart_that_drops_a_plan_in_use_says_so(tmp_path, redis_url, drops):
    """docs/configuration.md: a reload that drops or renames a plan workspaces are on, or a
    configured role keys are bound to, is refused, and `keygate config check` reports it. A
    restart (on Kubernetes, a rollout: the documented way to change the config) started on
    such a file without a word: every workspace on the plan silently took default_plan's
    limits, every key on the role was left with no scopes. `serve` now says so at start, as
    a WARNING naming the plan or role and who is on it, as the reload's refusal words it, once
    the store answers (in the background: it never holds nor fails the start)."""
    config, proxy_port, admin_port = write_config(tmp_path, redis_url=redis_url)
    doc = yaml.safe_load(config.read_text())
    doc["roles"] = {"reader": ["people:read"]}
    config.write_text(yaml.safe_dump(doc))
    gw = Served(config, proxy_port, admin_port)
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            status, body = await admin_json(s, gw.admin, "POST", "/workspaces",
                                            {"id": "bigco", "name": "BigCo", "plan": "starter"})
            assert status == 201, body
            status, body = await admin_json(s, gw.admin, "POST", "/workspaces/bigco/keys",
                                            {"name": "it", "role": "reader"})
            assert status == 201, body
        assert await asyncio.to_thread(gw.terminate) == 0
        assert "a reload would refuse" not in gw.stderr(), gw.stderr()  # nothing dropped yet
    finally:
        gw.close()
    if drops == "plan":
        doc["plans"] = {"basic": {"monthly_requests": 10, "max_keys": 1, "rate_limit": None}}
        doc["default_plan"] = "basic"
        said = (r"WARNING keygate: started on a file a reload would refuse: [^\n]*: plans: plan "
                r"'starter' is not in this file, but 1 workspace \(bigco\) is on it and would "
                r"fall back to default_plan 'basic'")
    else:
        del doc["roles"]
        said = (r"WARNING keygate: (worker \d \(pid \d+\): )?started on a file a reload would "
                r"refuse: [^\n]*: roles: role "
                r"'reader' is not in this file, but 1 key \(not revoked or expired\) in 1 "
                r"workspace \(bigco\) is bound to it and would be left with no scopes")
    config.write_text(yaml.safe_dump(doc))
    checked = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(config)],
                             capture_output=True, text=True, timeout=30, env=env(),
                             stdin=subprocess.DEVNULL)
    assert checked.returncode == 1 and ("starter" if drops == "plan" else "reader") in \
        checked.stdout + checked.stderr, checked
    # (under --workers N: said once, by the first worker)
    gw = Served(config, proxy_port, admin_port, *(["--workers", "2"] if drops == "role" else []))
    try:
        await gw.ready()
        assert await eventually(lambda: re.search(said, gw.stderr())), gw.stderr()
        assert await asyncio.to_thread(gw.terminate) == 0
        assert len(re.findall(said, gw.stderr())) == 1, gw.stderr()
    finally:
        gw.close()
