"""``keygate demo`` as a user runs it: one command, a banner with tokens and curl lines, the
curl lines do what the banner says, Ctrl-C stops everything (its redis-server included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout

from served import alive


async def read_banner(proc: asyncio.subprocess.Process, timeout: float = 30,
                      stderr: Path | None = None) -> str:
    """stdout up to the banner's last line (the export for the CLI). On failure, says whether
    the demo exited and what it wrote to ``stderr`` (a file), if given."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
        if not raw:
            break  # the demo exited
        lines.append(raw.decode())
        if b"export KEYGATE_ADMIN_URL=" in raw:
            return "".join(lines)
    said = stderr.read_text(errors="replace")[-3000:] if stderr is not None else ""
    raise AssertionError(f"no banner from keygate demo (exit code {proc.returncode}): "
                         f"{''.join(lines)!r}; stderr: {said}")


async def test_demo_banner_curls_work_and_ctrl_c_stops_everything():
    cwd = tempfile.mkdtemp(prefix="kgd-", dir="/tmp")  # short: the store's unix socket is here
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    stderr = open(Path(cwd, "stderr.txt"), "wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr)
    redis_pid = None
    try:
        banner = await read_banner(proc, stderr=Path(cwd, "stderr.txt"))
        proxy = re.search(r"^\s*proxy\s+(http://127\.0\.0\.1:\d+)", banner, re.M).group(1)
        admin = re.search(r"^\s*admin\s+(http://127\.0\.0\.1:\d+)", banner, re.M).group(1)
        ro = re.search(r"\bRO=(kg_live_[0-9A-Za-z]{50})\b", banner).group(1)
        rw = re.search(r"\bRW=(kg_live_[0-9A-Za-z]{50})\b", banner).group(1)
        # the banner ends with the line that makes the CLI work as pasted
        last = banner.strip().splitlines()[-1].strip()
        exported = re.fullmatch(r"export KEYGATE_ADMIN_URL=(\S+) KEYGATE_ADMIN_TOKEN=(\S+)", last)
        assert exported, last
        assert exported.group(1) == admin
        admin_token = exported.group(2)
        assert ro != rw
        assert f"{proxy}/people/1" in banner and f"{proxy}/_keygate/v1/usage" in banner
        redis_pid = int(Path(cwd, ".keygate-demo", "redis.pid").read_text().strip())

        async with ClientSession(timeout=ClientTimeout(total=15)) as s:
            # curl -s -H "Authorization: Bearer $RO" $PROXY/people/1
            async with s.get(proxy + "/people/1", headers={"Authorization": f"Bearer {ro}"}) as r:
                assert r.status == 200
                person = await r.json()
                assert person["name"] == "Ada Lovelace"
                assert person["caller"]["workspace"] == "demo"
                assert "people:read" in person["caller"]["scopes"]
            # curl -s -X POST -H "Authorization: Bearer $RO" -d '{"name":"Alan"}' $PROXY/people
            async with s.post(proxy + "/people", data=b'{"name":"Alan"}',
                              headers={"Authorization": f"Bearer {ro}"}) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "insufficient_scope"
            # the read-write key may
            async with s.post(proxy + "/people", data=b'{"name":"Alan"}',
                              headers={"Authorization": f"Bearer {rw}"}) as r:
                assert r.status == 201
            # curl -s $PROXY/people/1
            async with s.get(proxy + "/people/1") as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "missing_key"
            # curl -s -H "Authorization: Bearer $RO" $PROXY/_keygate/v1/usage
            async with s.get(proxy + "/_keygate/v1/usage",
                             headers={"Authorization": f"Bearer {ro}"}) as r:
                assert r.status == 200
                usage = await r.json()
                assert usage["workspace"] == "demo" and usage["plan"] == "starter"
                assert usage["used"] == 2 and usage["limit"] == 1000
            # the admin line works with the printed operator token
            async with s.get(admin + "/admin/v1/workspaces/demo/keys",
                             headers={"Authorization": f"Bearer {admin_token}"}) as r:
                assert r.status == 200
                assert len((await r.json())["items"]) >= 2

        # keygate keys list --workspace demo, after pasting the export line
        cli_env = {**env, "KEYGATE_ADMIN_URL": admin, "KEYGATE_ADMIN_TOKEN": admin_token}
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "keys", "list", "--workspace", "demo", "--json",
            env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), 30)
        assert cli.returncode == 0, err
        assert len(json.loads(out)["items"]) >= 2

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0
        deadline = time.monotonic() + 10
        while alive(redis_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(redis_pid), "keygate demo left its redis-server running"
        err = Path(cwd, "stderr.txt").read_text(errors="replace")
        assert "Traceback" not in err
        assert ro not in err and rw not in err  # the access log names key ids, not tokens
        assert "weak" not in err  # the operator token the demo makes is a strong one
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if redis_pid is not None and alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
        stderr.close()
        shutil.rmtree(cwd, ignore_errors=True)


def test_the_demo_keeps_its_documented_port_while_it_is_in_time_wait():
    """Run the demo, use it, Ctrl-C, run it again: the ports it served on are in TIME_WAIT
    for a minute (the server closed connections first), which does not stop a listener from
    binding them (SO_REUSEADDR). The demo must still take the port the docs name, not move to
    a random one while the user's pasted KEYGATE_ADMIN_URL points at the old port."""
    import socket

    from gateway.demo import _port_or_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listeners
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    # nothing listens on the port any more; a connection of it is in TIME_WAIT
    assert _port_or_free("127.0.0.1", port) == port
    # and a port something listens on is still refused
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert _port_or_free("127.0.0.1", busy.getsockname()[1]) != busy.getsockname()[1]


async def test_every_line_of_the_banner_works_pasted_into_a_shell():
    """The README's way: `.venv/bin/keygate demo`, the venv not activated (so `keygate` is not
    on PATH), then each line the banner prints pasted into a shell: the two export lines, the
    curl lines (each answering what its comment says) and the CLI lines."""
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        import pytest
        pytest.skip("needs the curl CLI, which the banner's lines run")
    script = Path(sys.executable).parent / "keygate"  # the venv's console script
    assert script.exists(), script
    path = os.pathsep.join(d for d in ("/usr/local/bin", "/usr/bin", "/bin")
                           if not Path(d, "keygate").exists())
    cwd = tempfile.mkdtemp(prefix="kgp-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYGATE_ADMIN_TOKEN", "KEYGATE_ADMIN_URL", "PROMETHEUS_MULTIPROC_DIR",
                        "VIRTUAL_ENV")}
    env["PATH"] = path
    stderr = open(Path(cwd, "stderr.txt"), "wb")
    proc = await asyncio.create_subprocess_exec(
        str(script), "demo", cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        banner = await read_banner(proc, stderr=Path(cwd, "stderr.txt"))
        lines = [line.strip() for line in banner.splitlines()]
        exports = [line for line in lines if line.startswith("export ")]
        assert len(exports) == 2, banner
        tried = lines[lines.index("Then try:") + 1:]
        tried = [line for line in tried[:tried.index("")]]
        assert any(line.startswith("curl ") for line in tried), banner
        clis = [line for line in tried if not line.startswith("curl ")]
        assert clis, banner

        def paste(line: str) -> subprocess.CompletedProcess:
            return subprocess.run(["sh", "-c", "; ".join(exports + [line])], cwd=cwd, env=env,
                                  capture_output=True, text=True, timeout=30)

        for line in tried:
            command, _, comment = line.partition("#")
            if not command.startswith("curl "):
                continue
            result = paste(command + " -w '\\n%{http_code}'")
            assert result.returncode == 0, (line, result.stderr)
            body, _, status = result.stdout.rpartition("\n")
            expected = comment.split()
            if expected and expected[0].isdigit():
                assert status == expected[0], (line, result.stdout)
            else:
                assert status == "200", (line, result.stdout)
            if status >= "400" and len(expected) > 1:  # "# 403 insufficient_scope"
                assert json.loads(body)["error"]["code"] == expected[1], (line, body)
        for line in clis:
            result = paste(line)
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            assert result.stdout.strip(), line
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        stderr.close()
        shutil.rmtree(cwd, ignore_errors=True)


async def test_a_demo_run_from_a_deep_directory_says_what_to_do():
    """The demo keeps its store's unix socket in ./.keygate-demo, and a socket path has a
    length limit (~104 bytes). From a deep directory the demo cannot start; it has no config,
    so the one line must not tell the user to change a `store.data_dir` they do not have,
    but to run it from a shorter path."""
    import subprocess

    base = tempfile.mkdtemp(prefix="kgl-", dir="/tmp")
    deep = Path(base, "a" * 40, "b" * 40)
    deep.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "demo"], cwd=str(deep), env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "store.data_dir" not in lines[0], lines[0]
        assert "shorter path" in lines[0] and str(deep) in lines[0], lines[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_a_second_demo_in_the_same_directory_leaves_the_first_ones_keys_working():
    """`keygate demo` in a second terminal while the first still runs, in the same directory:
    the second shares the first's store (and takes other ports). It used to revoke every
    active demo key on start, the first demo's included, so the keys the first terminal
    printed answered 401 revoked_key from then on. A run revokes only the keys of runs that
    have ended."""
    cwd = tempfile.mkdtemp(prefix="kg2-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    procs: list[asyncio.subprocess.Process] = []
    stderr = open(Path(cwd, "stderr.txt"), "wb")
    redis_pid = None

    async def demo() -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "demo", cwd=cwd, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        procs.append(proc)
        banner = await read_banner(proc, stderr=Path(cwd, "stderr.txt"))
        proxy = re.search(r"^\s*proxy\s+(http://127\.0\.0\.1:\d+)", banner, re.M).group(1)
        return proxy, re.search(r"\bRO=(kg_live_[0-9A-Za-z]{50})\b", banner).group(1)

    try:
        first = await demo()
        redis_pid = int(Path(cwd, ".keygate-demo", "redis.pid").read_text().strip())
        second = await demo()
        assert first[0] != second[0]
        async with ClientSession(timeout=ClientTimeout(total=15)) as s:
            for proxy, ro in (first, second):
                async with s.get(proxy + "/people/1",
                                 headers={"Authorization": f"Bearer {ro}"}) as r:
                    assert r.status == 200, (proxy, await r.text())
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        # a third run, after both ended, starts from two active keys again: theirs are revoked
        third = await demo()
        async with ClientSession(timeout=ClientTimeout(total=15)) as s:
            async with s.get(third[0] + "/people/1",
                             headers={"Authorization": f"Bearer {first[1]}"}) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "revoked_key"
            async with s.get(third[0] + "/people/1",
                             headers={"Authorization": f"Bearer {third[1]}"}) as r:
                assert r.status == 200
        procs[-1].send_signal(signal.SIGINT)
        assert await asyncio.wait_for(procs[-1].wait(), 15) == 0
        assert "Traceback" not in Path(cwd, "stderr.txt").read_text(errors="replace")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for pidfile in [Path(cwd, ".keygate-demo", "redis.pid")]:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        if redis_pid is not None and alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
        stderr.close()
        shutil.rmtree(cwd, ignore_errors=True)


async def test_a_demo_that_cannot_make_its_store_folder_says_what_to_do():
    """The demo keeps its store in ./.keygate-demo. Run from a folder where that cannot be made
    (read-only, not the user's, or a file of that name there), it said "cannot create
    store.data_dir ...": a setting the demo has no config for. It now names the folder and
    says to run the demo from another directory."""
    import subprocess

    cwd = tempfile.mkdtemp(prefix="kgf-", dir="/tmp")
    Path(cwd, ".keygate-demo").write_text("not a folder")  # read-only needs no root to test
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "demo"], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "store.data_dir" not in lines[0], lines[0]
        assert str(Path(cwd, ".keygate-demo")) in lines[0], lines[0]
        assert "run keygate demo from another directory" in lines[0], lines[0]
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def test_the_export_line_gives_the_shell_an_operator_token_of_ones_own_as_it_is():
    """With KEYGATE_ADMIN_TOKEN set (the banner says to, to choose the token), the banner's
    last line wrote it unquoted: `export ... KEYGATE_ADMIN_TOKEN=my token$1` pasted set the
    token to `my` (and ran `token` with a `$1` gone), `...;...` ran the rest as a command.
    Pasted into a shell, the line now sets exactly the token the demo uses."""
    import subprocess

    from gateway.demo import _banner
    tokens = {"read-only": "kg_live_" + "a" * 50, "read-write": "kg_live_" + "b" * 50}
    for token in ("my token$1", "it's;echo pwned", "a`b`\"c\"\\d&e|f*g?h~", "plain-Token_1"):
        banner = _banner("http://127.0.0.1:8080", "http://127.0.0.1:8081", token, tokens, False)
        (line,) = [ln.strip() for ln in banner.splitlines()
                   if ln.strip().startswith("export KEYGATE_ADMIN_URL=")]
        shown = subprocess.run(["sh", "-c", line + '; printf %s "$KEYGATE_ADMIN_TOKEN"'],
                               capture_output=True, text=True, timeout=10, cwd=tempfile.gettempdir())
        assert shown.stdout == token and shown.stderr == "", (line, shown)
    assert "KEYGATE_ADMIN_TOKEN=plain-Token_1" in banner  # a plain one stays as it is


async def test_the_demo_upstream_answers_400_to_a_json_body_that_is_not_an_object(
        aiohttp_client) -> None:
    """``POST /people`` with ``[1, 2]`` or ``"x"`` raised AttributeError (``.get`` of a list)
    and answered 500, as no real API does; nobody is created for it."""
    from gateway.demo import PEOPLE, sample_upstream

    client = await aiohttp_client(sample_upstream())
    before = dict(PEOPLE)
    for body in ("[1, 2]", '"x"', "7", "null"):
        async with client.post("/people", data=body,
                               headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, (body, resp.status, await resp.text())
            assert "error" in await resp.json(), body
    assert PEOPLE == before
