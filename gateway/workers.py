"""Running ``keygate serve``: one worker process, or a supervisor forking several.

``serve`` loads the config, sets up logging and runs the gateway (``gateway.app``) in this
process, or in N workers sharing the listening ports (SO_REUSEPORT) under ``_supervise``.
What every worker would fail on (the store, the ports) is checked once before forking
(``_preflight``), so a bad start says it in one line rather than once per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import select
import signal
import sys
import time
from typing import Any, Callable, Coroutine, TypeVar

from .admin.listener import READINESS
from .admin.middleware import operator_token_weakness
from .app import ListenError, running_gateway, start_listeners, stop_bound, stop_listeners
from .config import Config, load_config, servable_problems
from .config.nodes import one_line
from .errors import ConfigError, StoreError
from .store.request import RequestStore
from .redis_urls import redact
from .reload import mark_forked, worker_name, worker_prefix

log = logging.getLogger("keygate")

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def store_hint(problem: str, config: Config, reached: bool, check: str | None = None) -> str:
    """``problem`` (the store failed at start-up) followed by what the operator should do and
    where the URL comes from: ``store.redis_url`` at its line of the file, and the environment
    variable it names (the container config's ``${KEYGATE_REDIS_URL:-embedded}``).
    ``reached``: whether Redis answered at all (else: not running, or not reachable). The
    embedded store has no credentials, database or TLS options, nor a Redis to start: its
    hint names ``store.data_dir``, where its files are. ``check``: what in the URL to check
    when Redis answered (its credentials, database and TLS options by default)."""
    problem = problem.rstrip(". ")
    if config.store.redis_url == "embedded":
        return _embedded_hint(problem, config)
    where = _redis_url_line(config.source) if config.source else None
    if where is None:
        setting = "store.redis_url"
    else:
        number, text = where
        names = _ENV_REF.findall(text)
        setting = (f"store.redis_url ({one_line(config.source)}:{number}"
                   + (f", from ${names[0]}" if names else "") + ")")
    if not reached:
        return (f"{problem}; start Redis, or point {setting} at one this host can reach "
                "(keygate does not serve without its store)")
    return f"{problem}; check {setting}: {check or 'its credentials, database and TLS options'}"


# What an embedded store that cannot write its AOF says (redis's MISCONF, with the errno's text)
_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "Input/output error")


def _embedded_hint(problem: str, config: Config) -> str:
    from .store.embedded import LOGFILE_NAME, data_dir_path
    data_dir = data_dir_path(config.store.data_dir)
    cause = next((c for c in _WRITE_FAILURES if c in problem), None)
    if cause is None and "MISCONF" in problem:
        cause = "it cannot write its AOF"
    if cause is not None:
        return (f"{problem}; the embedded store cannot write to store.data_dir "
                f"{str(data_dir)!r} ({cause}): free space on its file system or make it "
                "writable (or choose another store.data_dir), then start keygate again")
    return (f"{problem}; see the embedded store's log, {str(data_dir / LOGFILE_NAME)!r} "
            "(in store.data_dir)")


# what to check when the Sentinels answered and know no master of the URL's name
_MASTER_NAME = ("the master name after its Sentinels (each Sentinel's `SENTINEL MASTERS` lists "
                "the names it monitors)")


async def _ping_failure(store: Any, store_url: str,
                        problem: str) -> tuple[str, bool, str | None]:
    """The start-up line's problem for a failed PING (``ping_problem``), whether Redis
    answered (``store_hint``'s ``reached``) and what to check. redis-py's MasterNotFoundError
    says the same when no Sentinel answered and when they answered without a master of that
    name: the Sentinels are asked which (a typo, another environment's name is no Redis to
    start)."""
    service = await _unknown_master(store, problem)
    if service is _REFUSED:
        return (f"cannot use the store at {redact(store_url)}: the Sentinels refused the URL's "
                "credentials for them (sentinel_password, or none where they require one): "
                f"{problem}", True, None)
    if service is not None:
        return (f"cannot use the store at {redact(store_url)}: the Sentinels answered and know "
                f"no master named {service!r}", True, _MASTER_NAME)
    return f"cannot reach the store at {redact(store_url)}: {problem}", _answered(problem), None


_REFUSED = "\0refused"  # _unknown_master: a Sentinel answered, refusing the credentials


async def _unknown_master(store: Any, problem: str) -> str | None:
    """The master name of a Sentinel URL when ``problem`` is redis-py's "No master found" and
    a Sentinel answered without that name among its masters; ``_REFUSED`` when none did but
    one refused the credentials; else None (one naming it, or none answering)."""
    if not problem.startswith("MasterNotFoundError"):
        return None
    client = getattr(store, "redis", None)
    sentinel = getattr(client, "_sentinel", None)
    service = getattr(getattr(client, "connection_pool", None), "service_name", None)
    if sentinel is None or not service:
        return None
    answered = refused = False
    for each in sentinel.sentinels:
        try:
            masters = await each.sentinel_masters()
        except Exception as exc:  # noqa: BLE001 - down: it did not answer
            # one refusing the credentials did answer (redis-py's MasterNotFoundError hid it)
            refused = refused or _answered(f"{type(exc).__name__}: {exc}") \
                or any(w in str(exc) for w in ("NOAUTH", "WRONGPASS", "invalid password"))
            continue
        names = {n.decode() if isinstance(n, bytes) else n for n in masters}
        if service in names:
            return None  # known there (but taken for down): not this case
        answered = True
    return service if answered else _REFUSED if refused else None


def _answered(problem: str) -> bool:
    """Whether a failed PING (``ping_problem``: "Class: message") came from a Redis that
    answered, refusing it (credentials, ACL), rather than from none (down, unreachable)."""
    kind = problem.partition(":")[0]
    return any(word in kind for word in ("Authentication", "Authorization", "Permission",
                                         "ResponseError", "ReadOnly"))


def _redis_url_line(source: str) -> tuple[int, str] | None:
    """(line number, text) of ``redis_url:`` in the file's top-level ``store:`` section."""
    from .config.loader import top_level_line
    start = top_level_line(source, "store")
    try:
        if start == 1 or not os.path.isfile(source):
            return None
        with open(source, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, 1):
                if number <= start:
                    continue
                if line[:1] not in (" ", "\t", "#", "\n", "\r", ""):
                    return None  # the next top-level key: no redis_url line in the section
                if line.strip().startswith("redis_url:"):
                    return number, line.strip()
    except (OSError, UnicodeDecodeError):
        pass
    return None


async def _serve(config: Config, store_url: str, reuse_port: bool,
                 config_path: str | None = None, embedded=None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        stop.set()
        if embedded is not None:  # its server stopping too (a SIGTERM to the whole service,
            embedded.quiesce()    # systemd's way) is no crash to restart it from

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    # held since serve() (SIGTERM) or the fork (a worker's SIGINT): delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    starting = asyncio.Event()  # set once the start-up checks are done: listening next
    serving = asyncio.ensure_future(
        _serve_gateway(config, store_url, reuse_port, stop, config_path, starting))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        # A stop while the store's start-up checks wait (a Redis frozen or unreachable: each
        # check waits out store.timeout, with retries) ends the start at once, as a stop:
        # serve waited them all out first (~25 s), past a grace period's SIGKILL.
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done() and not starting.is_set():
            serving.cancel()
            (ended,) = await asyncio.gather(serving, return_exceptions=True)
            if isinstance(ended, int):  # it ended by itself as it was cancelled: as it says
                return ended
            log.info("stopped while starting (the store's start-up check did not finish)")
            return 0
        return await serving
    except StoreError as exc:  # raised while opening the store clients: one line, no traceback
        return _store_failed_at_start(f"cannot use the store at {redact(store_url)}: "
                                      f"{exc}", config, True, stop)
    finally:
        stopped.cancel()


def _store_failed_at_start(problem: str, config: Config, reached: bool,
                           stop: asyncio.Event, check: str | None = None) -> int:
    """A start-up check of the store failed: one line and exit 1, unless a stop came while it
    ran. `systemctl stop` signals the whole service at once, its Redis too: the check then
    fails on the Redis going away, and the start the stop interrupted ends as a stop (0)."""
    if stop.is_set():
        log.info("stopped while starting (the store's start-up check did not finish)")
        return 0
    _say(store_hint(problem, config, reached, check))
    return 1


async def _serve_gateway(config: Config, store_url: str, reuse_port: bool,
                         stop: asyncio.Event, config_path: str | None = None,
                         starting: asyncio.Event | None = None) -> int:
    """``starting``: set once the store's start-up checks are done (until then a stop may
    cancel this; from then on the stop is this function's own: listen, then drain)."""
    async with running_gateway(config, store_url, config_path=config_path) as gw:
        if problem := await gw.store.ping_problem():
            line, reached, check = await _ping_failure(gw.store, store_url, problem)
            return _store_failed_at_start(line, config, reached, stop, check)
        try:  # the per-request path's own connection (its credentials, its permissions)
            await gw.requests.ready()
        except StoreError as exc:
            return _store_failed_at_start(f"cannot use the store at "
                                          f"{redact(store_url)}: {exc}", config, True, stop)
        # a Redis that evicts keys under maxmemory is said at start, not only by a probe; in
        # the background (a node that does not answer must not hold the start), so the
        # warning may come just after the "listening" line
        gw.admin_app[READINESS].look_at_eviction()
        # the key prefixes any keygate served with on the store, before the first request;
        # still a start-up step (a stop cancels it, not waiting out the store's timeout)
        await gw.learn_key_prefixes()
        if starting is not None:
            starting.set()
        try:
            runners = await start_listeners(gw, reuse_port)
        except ListenError as exc:
            _say(str(exc))
            return 1
        frozen = settle_heap()
        checking = None
        try:
            log.info("keygate listening: proxy %s:%d, admin %s:%d (config %s, pid %d)",
                     config.server.host, config.server.port, config.admin.host,
                     config.admin.port, one_line(os.path.abspath(config.source)), os.getpid())
            log.info("start-up heap: %d objects kept out of garbage collection", frozen)
            if os.environ.get("KEYGATE_WORKER", "1") == "1":  # said once, not once a worker
                checking = asyncio.ensure_future(say_what_the_file_drops(gw))
            reloads: set[asyncio.Task] = set()

            def hangup() -> None:
                if stop.is_set():  # stopping: a reload would only race the shutdown
                    return
                task = asyncio.ensure_future(gw.reloader.on_signal())
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            listen_for_hangups(hangup)
            await stop.wait()
            ignore_hangups()
            gw.admin_app[READINESS].stopping = True  # /readyz 503 from now, during the drain
            log.info("shutting down: finishing in-flight requests")
        finally:
            if checking is not None:  # (its store read, cancelled, ends at once)
                checking.cancel()
                await asyncio.gather(checking, return_exceptions=True)
            await stop_listeners(runners)
    return 0


IN_USE_ATTEMPTS = 3     # start-up's look at what the file drops: tries, IN_USE_RETRY s apart
IN_USE_RETRY = 15.0


async def say_what_the_file_drops(gw) -> None:
    """At start, in the background: warn of each plan workspaces are on and each configured
    role keys are bound to that the file lacks (``gateway.config_in_use``), as a reload's
    refusal and ``keygate config check`` word them. A restart (a rollout) takes such a file
    where a reload refuses it: its workspaces fall to ``default_plan``, its keys are left with
    no scopes, and the start said nothing. Never holds nor fails the start: the store is
    asked after the listeners are up, bounded, a few times if it does not answer; then one
    warning says what was not checked."""
    from .config_in_use import in_use_problems, not_checked
    for attempt in range(IN_USE_ATTEMPTS):
        if attempt:
            await asyncio.sleep(IN_USE_RETRY)
        config = gw.config  # (a reload meanwhile: the file in force now)
        try:
            problems = await in_use_problems(gw.store, config)
        except StoreError as exc:
            failure = exc
            continue
        for problem in problems:
            log.warning("started on a file a reload would refuse: %s", problem)
        return
    log.warning("start-up: could not check %s (%s); run keygate config check %s",
                not_checked(gw.config, None), failure, one_line(gw.config.source))


def listen_for_hangups(hangup: Callable[[], None]) -> None:
    """From now on, each SIGHUP calls ``hangup`` in the event loop (a SIGHUP held since start-up
    included), until ``ignore_hangups``.

    A handler of the process's own, not the loop's (``add_signal_handler``): taking the loop's
    off, or the loop closing, puts back the default action (end the process), and the
    ignoring put in after it came a moment too late whenever another thread took a SIGHUP
    meanwhile (the kernel hands one to any thread not holding it: the executor's threads, for
    a reload or a key's hash). Holding it in this thread did not keep it from them.
    The loop still wakes for it: its signal handlers for SIGTERM/SIGINT (``_serve``) have the
    interpreter write each signal's number to the loop's wake-up descriptor."""
    loop = asyncio.get_running_loop()

    def on_sighup(_signum, _frame) -> None:
        try:
            loop.call_soon_threadsafe(hangup)
        except RuntimeError:  # the loop has closed: there is nothing to reload
            pass

    signal.signal(signal.SIGHUP, on_sighup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one held: now


def ignore_hangups() -> None:
    """From the stop on, SIGHUP is ignored for the rest of the process's life: a SIGHUP in the
    last moments of a clean stop (a reload storm, a config tool's HUP as the pod is deleted)
    neither ends ``serve`` by a signal instead of exit 0 nor starts a reload after the loop's
    executor has shut down (a traceback in the log). One step: SIGHUP never has its default
    action from start-up on (held until ``listen_for_hangups``).

    A SIGHUP the interpreter's C handler took just before the switch (in another thread, or
    between ``signal.signal``'s own check and the switch) then finds SIG_IGN in place, and the
    interpreter reports it as "Signal 1 ignored due to race condition" with a traceback in the
    log: under a SIGHUP storm across a stop, one in a few hundred stops. Ignoring it is what
    was asked, so that one report is left out (``sys.unraisablehook``); any other goes on."""
    if not getattr(sys.unraisablehook, "keygate_hangups", False):
        sys.unraisablehook = _without_ignored_hangups(sys.unraisablehook)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _without_ignored_hangups(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    ignored = f"Signal {int(signal.SIGHUP)} ignored due to race condition"

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, OSError) and str(exc) == ignored:
            return
        previous(unraisable)
    hook.keygate_hangups = True  # type: ignore[attr-defined]
    return hook


def settle_heap() -> int:
    """Take what start-up built (modules, config, the app: it lives as long as the process) out
    of the cyclic garbage collector's way, once it is built and collected; returns how many
    objects that is. A full collection then walks only what came later (cached keys, what
    requests leave behind) and stalls the event loop that much less: bench/gc_pause.py
    measured a full collection at 13 ms before and ~0 after at rest, 32 → 1 ms with 10k cached
    keys, 66 → 27 ms with 100k. Frozen objects are still freed by reference counting; only a
    cycle among them would never be collected, hence the collection first."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a uvloop event loop (asyncio's own where uvloop is not
    installed: not Linux). Through a loop factory (``uvloop.run``), not ``uvloop.install()``:
    that sets the process-wide event loop policy, which uvloop deprecates from Python 3.12 on
    (a DeprecationWarning at every start on the Docker image's 3.12: an error under ``-W
    error``) and asyncio from 3.14 on, for removal."""
    try:
        import uvloop
    except ImportError:  # not on Linux: the default loop is fine
        return asyncio.run(main)
    return uvloop.run(main)


def _run_worker(config: Config, store_url: str, reuse_port: bool,
                config_path: str | None = None, embedded=None) -> int:
    return run_event_loop(_serve(config, store_url, reuse_port, config_path, embedded))


LOADING_POLL = 0.25  # seconds between PINGs while Redis loads its data set


def _wait_while_loading(config: Config, store_url: str) -> bool:
    """Wait while the store answers LOADING (a Redis restarted on a large AOF or snapshot, a
    replica syncing): it is running and will serve, so exiting 1 with "start Redis" was a
    wrong hint and, under a process manager, a restart loop with back-off. Said once, and
    once more when it has loaded. False: a SIGTERM came meanwhile (held since ``serve``
    blocked it), a clean stop. Any other problem is left to the start-up checks, which say
    it as before. Costs one PING at start."""
    from .store import Store
    from .store.embedded import _stop_requested

    async def wait() -> bool:
        try:
            store = await Store.connect(store_url, config)
        except StoreError:
            return True
        said = False
        ping: asyncio.Future | None = None
        try:
            while True:
                # redis-py retries a LOADING answer, reconnecting, for seconds: a SIGTERM
                # meanwhile is looked for every 0.1 s, not once per PING
                ping = asyncio.ensure_future(store.ping_problem())
                while not (await asyncio.wait({ping}, timeout=0.1))[0]:
                    # a SIGTERM while the PING waits (a Redis loading, or one that answers
                    # nothing: up to store.timeout) ends the start at once
                    if _stop_requested():
                        ping.cancel()
                        return False
                problem = ping.result()
                # once it said LOADING, a PING unanswered in time is Redis busy with a chunk
                loading = problem is not None and (problem.startswith("BusyLoadingError")
                                                   or (said and "Timeout" in problem))
                if not loading:
                    if said and problem is None:
                        log.info("the store at %s has loaded its data", redact(store_url))
                    return True
                if not said:
                    log.warning("the store at %s is loading its data set (it answers LOADING): "
                                "waiting for it; keygate listens once it has loaded",
                                redact(store_url))
                    said = True
                if _stop_requested():
                    return False
                await asyncio.sleep(LOADING_POLL)
        finally:
            # a Ctrl-C (SIGINT is not held: it cancels this) with the PING waiting: the PING
            # goes too, or asyncio.run's clean-up waited for it, up to store.timeout
            if ping is not None:
                ping.cancel()
            await store.close()

    return asyncio.run(wait())


def _preflight(config: Config, store_url: str) -> str | None:
    """What every worker would fail on (store, ports), checked once before forking, so a bad
    start says it in one line rather than once per worker. None when all is well."""
    import socket

    async def store_problem() -> str | None:
        from .store import Store
        try:
            store = await Store.connect(store_url, config)
        except StoreError as exc:
            return store_hint(f"cannot use the store at {redact(store_url)}: {exc}", config, True)
        try:
            requests = RequestStore(store_url, timeout=config.store.timeout)
        except ValueError as exc:
            await store.close()
            return store_hint(f"cannot use the store at {redact(store_url)}: bad store URL: "
                              f"{exc}", config, True)
        try:
            if problem := await store.ping_problem():
                line, reached, check = await _ping_failure(store, store_url, problem)
                return store_hint(line, config, reached, check)
            await requests.ready()
        except StoreError as exc:
            return store_hint(f"cannot use the store at {redact(store_url)}: {exc}", config, True)
        finally:
            await requests.close()
            await store.close()
        return None

    if problem := asyncio.run(store_problem()):
        return problem
    for host, port in ((config.server.host, config.server.port),
                       (config.admin.host, config.admin.port)):
        try:
            for family, kind, proto, _, addr in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                with socket.socket(family, kind, proto) as probe:
                    # SO_REUSEADDR as the listeners have it (a port in TIME_WAIT is free), but
                    # not SO_REUSEPORT: with it, the bind succeeds on a port another
                    # `serve --workers` (or any reuseport server of this user) listens on, and
                    # the kernel then splits the traffic between the two, silently.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(addr)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


METRICS_DIR_PREFIX = "keygate-metrics-"
METRICS_DIR_RE = re.compile(r"keygate-metrics-[a-z0-9_]{8}")  # tempfile.mkdtemp's names
METRICS_LOCK = "supervisor.lock"  # not *.db: prometheus-client reads only those


def hold_metrics_dir(directory: str) -> None:
    """Mark ``directory`` as in use for as long as this supervisor or any of its workers lives:
    an exclusive flock on a file in it, taken before the file has its name (a supervisor
    looking for stale directories never finds it unheld). The descriptor is inherited by the
    workers (fork) and by no program (close-on-exec); the kernel lets go of the lock when the
    last of them ends, however it ends."""
    import fcntl
    held = os.path.join(directory, f".{METRICS_LOCK}")
    fd = os.open(held, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(held, os.path.join(directory, METRICS_LOCK))  # the descriptor stays open


def remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that are gone. A supervisor killed
    outright (SIGKILL, the OOM killer) never removes its own; one left each time fills the
    temporary directory for good. Only directories of ``hold_metrics_dir``'s kind: named as
    keygate names them, this user's, not a symbolic link, with a lock file nobody holds (its
    supervisor and workers are all gone: not a test of a pid, which another process may have
    taken since, or which a supervisor in another pid namespace sharing /tmp has too).
    Directories of keygate versions without the lock file are left alone."""
    import fcntl
    import shutil
    import stat
    import tempfile
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if METRICS_DIR_RE.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, METRICS_LOCK),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its supervisor or a worker of it is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _stop_with_supervisor(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies, however it dies
    (SIGKILL, the OOM killer): an orphaned worker would go on holding the listening ports
    (a restart then finds them in use, or, with SO_REUSEPORT, shares the traffic with it) and
    its store connections. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before the request took effect: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(config: Config, store_url: str, workers: int,
               config_path: str | None = None, embedded=None) -> int:
    """N worker processes sharing the listening ports (SO_REUSEPORT); SIGTERM stops all,
    SIGHUP reloads all."""
    import shutil
    import tempfile

    if problem := _preflight(config, store_url):
        print(f"keygate: {problem}", file=sys.stderr)
        return 1
    # Metrics aggregate across workers through prometheus-client's multiprocess mode: each
    # worker writes its samples to files in this directory; /metrics on any worker sums them.
    remove_stale_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    hold_metrics_dir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["KEYGATE_SUPERVISOR_PID"] = str(os.getpid())  # a worker asks it to reload all
    children: list[int] = []
    stopping: list[float] = []  # non-empty once the supervisor has asked the workers to stop

    def forward(signum, _frame) -> None:
        stopping.append(time.monotonic())  # the first: when the stop's bound began
        # stopping: a SIGHUP from now on neither reaches the stopping workers nor, once the
        # handler below is gone at exit, ends the supervisor (exit 0, not death by signal)
        ignore_hangups()
        if embedded is not None:  # nor is the embedded server stopping too a crash
            embedded.quiesce()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    # SIGTERM/SIGINT are held while forking: one arriving mid-loop is delivered once every
    # worker exists and the handler that forwards it is in place (none is orphaned).
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    supervisor = os.getpid()
    # no thread may run at fork(): the log writer's, started by a line logged so far, ends
    # (the next line starts another, in the supervisor and in each worker)
    for handler in logging.getLogger().handlers:
        if (end_writer := getattr(handler, "end_writer", None)) is not None:
            end_writer()
    unforked = False
    for _ in range(workers):
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (a container's pids limit), ENOMEM: one line, no
            print(f"keygate: cannot start worker {len(children) + 1} of {workers}: "
                  f"{exc.strerror or exc}; stopping the other workers", file=sys.stderr)
            unforked = True     # traceback; those forked are stopped and waited for below
            forward(signal.SIGTERM, None)
            break
        if pid == 0:
            code = 1
            # its place among the workers (1..N): every line it logs names it
            os.environ["KEYGATE_WORKER"] = str(len(children) + 1)
            try:
                name_worker_in_logs(config)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                _stop_with_supervisor(supervisor)
                # SIGTERM and SIGINT stay held until _serve's loop handles them: one arriving
                # while the worker starts (Ctrl-C reaches every worker of the terminal's
                # process group at once) is a clean stop once it has, not a death by the
                # default action or a KeyboardInterrupt traceback (which the supervisor took
                # for a failed worker: exit 1)
                from prometheus_client import values
                # This worker's pid, read once: by default every metric update calls
                # os.getpid() (a system call) to notice a fork, and a worker never forks.
                worker = os.getpid()
                values.ValueClass = values.MultiProcessValue(lambda: worker)
                code = _run_worker(config, store_url, reuse_port=True, config_path=config_path)
            except BaseException:  # os._exit below would swallow it: say why the worker died
                import traceback
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    for handler in logging.getLogger().handlers:  # os._exit skips the
                        handler.flush()                           # logging module's atexit
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children.append(pid)
        mark_forked(metrics_dir, pid, len(children))  # a reload asked while it starts waits

    reloading = [False, False]  # this handler is running; a SIGHUP came in meanwhile

    def reload_all(signum, _frame) -> None:
        # Nothing here may take a lock: a SIGHUP arriving while this handler runs runs it
        # again, nested, in the same thread. It logged a line: the nested call waited for the
        # log queue's lock the outer one held (the supervisor hung, its workers unreaped and
        # SIGTERM unable to stop it) or found the queue half made (it died). Each worker logs
        # the reload it is asked for. Nor may it nest without bound: a storm of SIGHUPs nested
        # it until RecursionError ended the supervisor. A nested call only says it came; the
        # outer one forwards once more for all that came meanwhile (a reload reads the file
        # when it runs: one for several is the same reload).
        if reloading[0]:
            reloading[1] = True
            return
        while True:
            reloading[0], reloading[1] = True, False
            try:
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGHUP)
            finally:
                reloading[0] = False
            if not reloading[1]:  # (one that came as the flag dropped is seen here)
                return

    if not unforked:  # (stopping: forward ignores SIGHUP from then on)
        signal.signal(signal.SIGHUP, reload_all)  # after forking: workers have their own
    # The wait for the workers wakes for a worker's end and for a signal (a stop starts the
    # clock on its bound): each writes a byte to this pipe (signal.set_wakeup_fd; SIGCHLD
    # given a handler, which does nothing, for it to). A blocking os.waitpid woke for neither:
    # a worker that never ended kept the supervisor waiting for ever, past every bound.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, _woken)  # after forking: the workers keep the default
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals | {signal.SIGHUP})
    if embedded is not None:  # after forking: a thread and fork() do not mix
        embedded.watch()
    status = 1 if unforked else 0
    remaining = set(children)
    bound = stop_bound(config) + STOP_SLACK
    killed_at: float | None = None
    try:
        while remaining:
            try:
                # Workers only (they are in our process group): the embedded redis-server, in
                # a session of its own, is its watcher's to reap. Reaped here, its death used
                # to read as a worker failing and took every worker down with it.
                pid, code = os.waitpid(0, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:  # none has ended (yet): wait for one, a signal or the bound
                timeout = None
                if killed_at is not None:
                    timeout = killed_at + KILL_WAIT - time.monotonic()
                    if timeout <= 0:
                        log.error("%s not reaped %g s after SIGKILL; exiting without them",
                                  ", ".join(_names(children, remaining)), KILL_WAIT)
                        status = 1
                        break
                elif stopping:
                    timeout = stopping[0] + bound - time.monotonic()
                    if timeout <= 0:
                        status = 1
                        killed_at = time.monotonic()
                        _kill_past_the_bound(children, remaining, killed_at - stopping[0],
                                             bound)
                        continue
                # poll, not select: a descriptor past 1024 (a parent that leaves many open)
                # is out of select's range
                waiting = select.poll()
                waiting.register(wake_r, select.POLLIN)
                waiting.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                continue
            remaining.discard(pid)
            exit_code = os.waitstatus_to_exitcode(code)
            if exit_code != 0 or not _asked_to_stop(stopping):
                status = 1  # a worker died (even the last one): the exit code must say so
                # and the log says which and of what (a SIGKILL, the OOM killer, leaves no
                # line of its own: the others' "shutting down" was all an operator saw). A
                # clean stop the supervisor did not ask for (`kill PID` of one worker) is one
                # too: reaped without a word, it left one worker fewer for good.
                log.error("%s: %s%s", worker_name(children.index(pid) + 1, pid),
                          _death(exit_code),
                          "; stopping the other workers" if remaining else "")
                if remaining:  # take the rest down so the supervisor above restarts us
                    forward(signal.SIGTERM, None)
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


# Seconds past stop_bound a worker may take before the supervisor kills it (the steps' own
# bookkeeping, the interpreter's exit), and then for a killed worker to be reaped.
STOP_SLACK = 2.0
KILL_WAIT = 5.0


def _woken(_signum, _frame) -> None:
    """SIGCHLD's handler in the supervisor: nothing, its byte on the wake-up pipe is all."""


def _names(children: list[int], pids: set[int]) -> list[str]:
    return [worker_name(children.index(pid) + 1, pid) for pid in sorted(pids)]


def _kill_past_the_bound(children: list[int], remaining: set[int], waited: float,
                         bound: float) -> None:
    """SIGKILL each worker still there ``waited`` s after the supervisor asked them to stop,
    past ``bound`` (the most every step of a stop takes: ``stop_bound``), saying which and
    why. Reaped next, each then reads as a worker killed (exit 1)."""
    for pid in sorted(remaining):
        log.error("%s: still running %.0f s after it was asked to stop (every step of a stop "
                  "ends within %.0f s); killing it (SIGKILL)",
                  worker_name(children.index(pid) + 1, pid), waited, bound)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _asked_to_stop(stopping: list[float]) -> bool:
    """Whether the supervisor has asked its workers to stop. A function of its own: entering it
    runs the Python-level handler of a stop signal that reached the supervisor before the
    worker's exit was reaped (a Ctrl-C reaches the whole process group in one system call), so
    the worker's clean stop is not taken for one nobody asked for."""
    return bool(stopping)


def _death(exit_code: int) -> str:
    """How a worker ended, from ``os.waitstatus_to_exitcode``: "was killed by signal 9
    (SIGKILL)", "exited with status 1", or for a clean stop (a worker exits 0 only after a
    SIGTERM or SIGINT) that the supervisor did not ask for, which says so."""
    if exit_code == 0:
        return ("stopped without the supervisor asking (a SIGTERM or SIGINT sent to it "
                "alone)")
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            return f"was killed by signal {-exit_code}"
        return f"was killed by signal {-exit_code} ({name})"
    return f"exited with status {exit_code}"


def setup_logging(config: Config) -> None:
    """Application logs on stderr; JSON lines when the access log is JSON (one format for a
    log pipeline to parse), else ``time level logger: message``."""
    from .accesslog import BackgroundHandler
    handler = BackgroundHandler()  # a full stderr must not block the event loop
    handler.setFormatter(_log_format(config))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.server.log_level.upper())


def _log_format(config: Config, prefix: str = "") -> logging.Formatter:
    """``setup_logging``'s format; ``prefix`` begins every message."""
    from .accesslog import JsonFormatter
    if config.server.access_log == "json":
        return JsonFormatter(prefix)
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                             + prefix.replace("%", "%%") + "%(message)s")


def name_worker_in_logs(config: Config) -> None:
    """In a worker of ``serve --workers N``, just forked: every line it logs begins
    ``worker I (pid P): `` (``gateway.reload.worker_prefix``), whichever module logs it, so
    an operator reading the workers' one stream can tell which said what. The supervisor
    names a worker the same way (its end), and so does a worker naming a sibling (a reload
    it refused). Its own lines have none."""
    from .accesslog import BackgroundHandler
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundHandler):
            handler.setFormatter(_log_format(config, worker_prefix()))


def _say(message: str) -> None:
    """A line on stderr that a worker prints rather than logs (a start it cannot make):
    ``keygate: `` then, under ``serve --workers N``, the worker's name as its log lines have
    it."""
    who = worker_prefix() if os.environ.get("KEYGATE_WORKER") else ""
    print(f"keygate: {who}{message}", file=sys.stderr)


def _own_metrics_files() -> None:
    """``PROMETHEUS_MULTIPROC_DIR`` is keygate's own: ``_supervise`` sets it for its workers.
    One inherited from the environment (other Python services' convention) made a single
    process keep its metrics in files there (prometheus-client reads it at import): a missing
    directory stopped the start with a traceback, an existing one summed every earlier run's
    values into this one's."""
    if os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None) is not None:
        from prometheus_client import values
        values.ValueClass = values.MutexValue


def serve(config_path: str | None, workers: int | None = None) -> int:
    """``keygate serve``: exit code 0 after a clean stop, 1 when it cannot start."""
    try:
        config = load_config(config_path)
        if problems := servable_problems(config):
            raise ConfigError(problems)
        from .app import drain_problem
        if problem := drain_problem():
            raise ConfigError([problem])
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    _own_metrics_files()
    from .argon2_pool import one_malloc_arena
    # before any thread starts, in this process and the workers it forks: the first line
    # logged starts the log writer's thread (accesslog.BackgroundHandler)
    one_malloc_arena()
    # Until the event loop takes them over, a SIGHUP (a reload) must neither end the process
    # nor be lost, and a SIGTERM (a pod deleted as it starts) must stop it cleanly once it has
    # started rather than kill it halfway: both are held, in every thread started from here
    # on (the log writer's, the embedded store's watcher) and in the workers, and delivered
    # once a handler is in place (_serve; _supervise for the supervisor).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})
    setup_logging(config)
    for warning in config.warnings:  # as config check prints them; once, before any worker
        log.warning("%s", warning)
    operator_token = os.environ.get(config.admin.token_env, "")
    if not operator_token.strip():
        # The admin API then refuses every call (it never runs open): say so once, at start,
        # rather than leave the operator to find out from the first 401.
        log.warning("the admin API refuses every call: the environment variable %s holding "
                    "the operator token is not set (or empty)", config.admin.token_env)
    elif weakness := operator_token_weakness(operator_token):
        # Guesses are throttled per client IP (keys.failures), not across addresses: a short
        # token still falls to many. Said once, here, before any worker starts; never the
        # token. Not refused: a setup that works keeps working.
        log.warning("the operator token in %s is weak (%s): anyone who reaches the admin "
                    "listener may guess it; set it to a long random one, e.g. python3 -c "
                    "'import secrets; print(secrets.token_urlsafe(32))', and restart",
                    config.admin.token_env, weakness)
    from .store.embedded import EmbeddedError, StoppedWhileStarting, resolve_store_url
    try:
        store_url, embedded = resolve_store_url(config)
    except StoppedWhileStarting as exc:  # SIGTERM while the store was loading: a clean stop
        log.info("%s", exc)
        return 0
    except EmbeddedError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 1
    if embedded is None and not _wait_while_loading(config, store_url):
        log.info("stopped while starting (waiting for the store to answer)")
        return 0
    try:
        workers = workers or config.server.workers
        if workers > 1:
            return _supervise(config, store_url, workers, config_path, embedded)
        if embedded is not None:
            embedded.watch()  # restarts the server if it dies while we run
        return _run_worker(config, store_url, reuse_port=False, config_path=config_path,
                           embedded=embedded)
    finally:
        if embedded is not None:
            embedded.stop()
