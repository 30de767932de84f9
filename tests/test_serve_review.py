"""An adversarial review of serve's supervisor wait, its start-up check of plans and roles
in use, and the config loader's line numbers for bytes it cannot read: each test here failed
on the code it was written against."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [p.replace(str(path), "FILE") for p in info.value.problems]


def test_not_utf8_byte_in_a_file_with_lone_cr_line_ends_is_at_its_own_line(
        tmp_path: Path) -> None:
    """A file saved with classic-Mac line ends (lone CR), as an editor shows it: three lines,
    the Latin-1 byte on the third. YAML counts a lone CR as a line break (its marks do, and the
    control-character report of the same file says line 3); the not-UTF-8 report counts only
    LF and says line 1, column 25."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"server:\r  port: 8080\rx: \xe9t\xe9\r")
    assert _problems(path) == [
        "FILE:3: cannot read the file: not UTF-8 text (byte 0xe9, column 4); save it as UTF-8"]
    # the same file with a DEL in place of the byte: reported at line 3 (YAML's count)
    path.write_bytes(b"server:\r  port: 8080\rx: \x7ft\r")
    assert _problems(path)[0].startswith("FILE:3: ")


def test_not_utf8_and_control_character_reports_count_lines_alike(tmp_path: Path) -> None:
    """A U+2028 or U+0085 line break before the bad spot: the control-character report counts
    it as YAML does (and every other problem's line, from YAML's marks), the not-UTF-8 report
    does not; the same spot in the same file is given two different lines."""
    for brk in ("\u2028", "\x85"):
        path = tmp_path / "config.yaml"
        head = f"a: 1{brk}b: 2\nx: ".encode()
        path.write_bytes(head + b"\x7f\n")
        control = _problems(path)[0]
        path.write_bytes(head + b"\xe9\n")
        latin = _problems(path)[0]
        assert control.split(": ")[0] == latin.split(": ")[0], (brk, control, latin)



# --- serve's start-up look at what the file drops ----------------------------------

async def test_a_stop_during_the_start_up_checks_retries_is_not_held(tmp_path, upstream,
                                                                      own_redis) -> None:
    """The start-up check of plans/roles in use is retried 15 s apart when the store cannot
    answer it (here: an ACL user that may not SMEMBERS, so the check's read fails while the
    rest of serve works). A SIGTERM during those retries must stop serve at once, exit 0, and
    the check must never hold or fail the start."""
    import asyncio
    import time

    import redis as redis_sync
    from aiohttp import ClientSession
    from served import TIMEOUT, Served, write_config

    admin = redis_sync.Redis.from_url(own_redis.url)
    admin.execute_command("ACL", "SETUSER", "nosm", "on", ">pw", "~*", "&*", "+@all",
                          "-smembers")
    admin.close()
    host_port = own_redis.url.split("://", 1)[1]
    url = f"redis://nosm:pw@{host_port}"
    config, pport, aport = write_config(tmp_path, redis_url=url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, environ={"KEYGATE_DRAIN_SECONDS": "1"})
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            async with s.get(gw.proxy + "/health") as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(2)  # the first attempt failed; the retry sleeps 15 s
        started = time.monotonic()
        gw.proc.terminate()
        code = await asyncio.to_thread(gw.proc.wait, 60)
        took = time.monotonic() - started
        err = gw.stderr()
        assert code == 0, err
        assert took < 8, (took, err)
        assert "Traceback" not in err and "was destroyed but it is pending" not in err, err
    finally:
        gw.close()


async def test_supervisor_wait_with_inherited_descriptors_past_1024(tmp_path, upstream,
                                                                    redis_url) -> None:
    """The supervisor waited on its wake-up pipe with select.select, which cannot take a descriptor
    numbered 1024 or more (ValueError). A serve started with many descriptors open (a parent
    that leaks them, socket activation, a wrapper) gets such a pipe: the supervisor must still
    serve and stop cleanly on SIGTERM (poll/selectors would), not die with a traceback
    leaving its workers to PR_SET_PDEATHSIG."""
    import asyncio
    import subprocess
    import sys

    from served import Served, env, write_config

    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    # descriptors 3..1099 held open across the exec, as a leaky parent leaves them
    launcher = ("import os, sys\n"
                "null = os.open(os.devnull, os.O_RDONLY)\n"
                "for fd in range(3, 1100):\n"
                "    if fd != null:\n"
                "        os.dup2(null, fd)\n"
                "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
    gw = Served.__new__(Served)
    gw.config, gw.proxy_port, gw.admin_port = config, pport, aport
    gw.stderr_path = config.with_suffix(".fds.stderr")
    gw._stderr = open(gw.stderr_path, "wb")
    gw.proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "-m", "gateway", "serve", "--config", str(config),
         "--workers", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=gw._stderr,
        env={**env(), "KEYGATE_DRAIN_SECONDS": "1"}, cwd=str(config.parent))
    try:
        await gw.ready()
        await asyncio.sleep(1)
        assert gw.proc.poll() is None, gw.stderr()
        gw.proc.terminate()
        code = await asyncio.to_thread(gw.proc.wait, 60)
        err = gw.stderr()
        assert code == 0, err
        assert "Traceback" not in err, err
    finally:
        gw.close()


async def test_the_start_up_in_use_check_does_not_stall_requests_on_a_big_store(
        tmp_path, upstream, own_redis) -> None:
    """Serve's start-up look at plans and roles in use "never holds the start": it runs in
    the background once the listeners are up. But on a store of 100,000 workspaces its first
    read (config_names_in_use: one pipeline of an HGET and more per workspace, packed and its
    replies parsed in one stretch) held the worker's event loop: a request right after start
    (/readyz already 200, the balancer sending traffic) waited 1.5-1.7 s, against 6 ms
    without the check. Every pod of every rollout pays it, so the read goes in pieces."""
    import asyncio
    import time

    import redis as redis_sync
    from aiohttp import ClientSession, ClientTimeout
    from served import Served, write_config

    r = redis_sync.Redis.from_url(own_redis.url)
    pipe = r.pipeline(transaction=False)
    for i in range(100_000):
        ws = f"w{i}"
        pipe.hset(f"kg:ws:{{{ws}}}", mapping={"plan": "starter", "name": ws})
        pipe.sadd("kg:workspaces", ws)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    r.close()
    config, pport, aport = write_config(tmp_path, redis_url=own_redis.url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport)
    try:
        await gw.ready(60)
        worst = 0.0
        async with ClientSession(timeout=ClientTimeout(total=30)) as s:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                started = time.monotonic()
                async with s.get(gw.proxy + "/health") as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                worst = max(worst, time.monotonic() - started)
                await asyncio.sleep(0.01)
        assert worst < 0.3, (worst, gw.stderr()[-2000:])
    finally:
        gw.close()
