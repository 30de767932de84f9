"""What the tests share: a whole gateway in the test's event loop (real Redis, real upstream,
real sockets), an injectable clock, and the small helpers every area's tests use."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer

from gateway.app import running_gateway
from gateway.config import (Argon2Config, Config, FailureLimits, KeysConfig, Plan, RateLimit,
                            Route, ServerConfig, StoreConfig, Upstream)
from gateway.tokens import checksum

ADMIN_TOKEN = "test-operator-token-0123456789"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tampered(token: str) -> str:
    """The token with its last character changed: its checksum no longer matches. (Always
    changed: replacing it with a fixed "x" left a token ending in "x" valid, 1 run in 62.)"""
    return token[:-1] + ("x" if token[-1] != "x" else "y")


def wrong_secret(token: str) -> str:
    """The same key id with another secret and a valid checksum."""
    head = token[:-6 - 32] + ("Z" * 32 if token[-38:-6] != "Z" * 32 else "Y" * 32)
    return head + checksum(head)


def _timestamp(when: float | str) -> float:
    if isinstance(when, str):
        return datetime.fromisoformat(when).replace(tzinfo=timezone.utc).timestamp()
    return float(when)


class Clock:
    """An injectable wall clock: tests move time instead of waiting for it.

    ``Clock()`` starts at T0; ``Clock("2026-11-30T23:59:00")`` at that UTC instant. Move it
    with ``clock.now += seconds`` or ``clock.set(when)``."""

    def __init__(self, now: float | str = T0) -> None:
        self.now = _timestamp(now)

    def __call__(self) -> float:
        return self.now

    def set(self, when: float | str) -> None:
        self.now = _timestamp(when)


async def eventually(condition, timeout: float = 10.0, every: float = 0.02):
    """Poll ``condition`` (no arguments, sync or async) until it gives a true value or
    ``timeout`` seconds pass; return its last value. For a background effect (a write-back, a
    pause ending): wait for it, then assert on it, instead of sleeping a fixed time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = condition()
        if asyncio.iscoroutine(got):
            got = await got
        if got or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(every)


def _run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat's second
    field); 0 where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuWait:
    """How long the event loop's thread waited for a CPU that other processes had: a task
    samples the thread's run-queue wait every 10 ms while the block runs. ``waited(a, b)``: of
    the interval [a, b] (``time.monotonic()``), the seconds the loop was ready to run and not
    running, read off the samples (linearly between the two around a moment: a stall with no
    sample in [a, b] counts for its part of it, not for nothing). What a wall-clock deadline of
    the gateway (the store timeout) lost to a loaded machine rather than to keygate: the loop,
    the gateway and the test's clients are one thread."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.samples: list[tuple[float, float]] = []

    def _sample_now(self) -> None:
        self.samples.append((time.monotonic(), _run_queue_wait()))

    async def _sample(self) -> None:
        while True:
            self._sample_now()
            await asyncio.sleep(self.every)

    async def __aenter__(self) -> "CpuWait":
        self._sample_now()
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sample_now()

    def _at(self, when: float) -> float:
        """The run-queue wait so far at ``when``."""
        import bisect
        samples = self.samples
        if not samples:
            return 0.0
        i = bisect.bisect_left(samples, (when, float("-inf")))
        if i == 0:
            return samples[0][1]
        if i == len(samples):
            return samples[-1][1]
        (t0, w0), (t1, w1) = samples[i - 1], samples[i]
        return w0 + (w1 - w0) * (when - t0) / (t1 - t0) if t1 > t0 else w1

    def waited(self, since: float, until: float) -> float:
        return max(0.0, self._at(until) - self._at(since))


def no_retry() -> dict[str, Any]:
    """redis-py client arguments for a probe that answers or raises at once: by default
    redis-py (6+) retries a connection error or a timeout ten times with a backoff, ~3 s of
    a test's time (blocking its event loop) each time it meets a Redis that is down, going
    down or paused."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return {"retry": Retry(NoBackoff(), 0)}


def redis_answers(url: str):
    """A condition for ``eventually``: Redis at ``url`` answers a PING (a pause has ended)."""
    import redis

    def answers() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=0.05, **no_retry())
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()
    return answers


async def get_all(g: "GatewayUnderTest", token: str, n: int) -> list[tuple[int, dict]]:
    """``n`` GETs of /people/1 with ``token``, one after another: (status, headers) each."""
    got = []
    for _ in range(n):
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            await r.read()
            got.append((r.status, dict(r.headers)))
    return got


@dataclasses.dataclass(frozen=True)
class RefusalCost:
    """``fastest``: the fastest refusal's seconds, as the client saw them. ``argon2_cpu``: the
    median CPU seconds the argon2 verification of one refusal took, in the thread it ran on
    (0 for a refusal that verified nothing). ``hashes``: the parameters (``m=...,t=...,p=...``)
    of the hashes verified."""
    fastest: float
    argon2_cpu: float
    hashes: frozenset[str]


async def refusal_costs(g: "GatewayUnderTest", token: str,
                        n: int = 7) -> dict[str, RefusalCost]:
    """What a 401 ``invalid_key`` costs for ``token``'s key id with a wrong secret, for a key
    id that does not exist and for ``token``'s key id in another environment (``n`` of each,
    interleaved, each round in another order), checking that each ran one argon2
    verification.

    Two measures. The fastest wall-clock time, not the median: a loaded machine (the suite's
    other workers) only ever adds time. And the CPU time of each refusal's argon2 run, read
    in the verification's own thread: what the refusal costs, which a loaded machine does not
    change. The argon2 threads run in the idle scheduling class, and on a loaded machine ~90%
    of a refusal's wall-clock time was its argon2 thread waiting for a CPU (measured under 3
    busy processes: 25-50 ms of argon2 CPU each, 0.03 s to several seconds of wall clock);
    the fastest of 7 wrong secrets then came out at 0.367 s in CI while an unknown id's was
    0.047 s, though every run did the same work. The medians of the CPU times of the kinds
    were within 10-20% of each other in every run."""
    from gateway.tokens import SecretHasher

    runs: list[tuple[float, float, str]] = []  # (began, CPU seconds, hash parameters)
    verify = SecretHasher.verify

    def timed(self, encoded_hash: str, secret: str) -> bool:
        began, cpu = time.perf_counter(), time.thread_time()
        try:
            return verify(self, encoded_hash, secret)
        finally:
            parts = encoded_hash.split("$")
            runs.append((began, time.thread_time() - cpu, parts[3] if len(parts) > 3 else ""))

    def forged(env: str, key_id: str, i: int) -> str:
        head = f"kg_{env}_{key_id}{i:032d}"
        return head + checksum(head)

    async def refused(bad: str) -> tuple[float, float, str | None]:
        ran = g.counter("keygate_argon2_verifications_total", result="fail")
        started = time.perf_counter()
        async with g.proxy.get("/people/1", headers=bearer(bad)) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_key"
        took = time.perf_counter() - started
        assert g.counter("keygate_argon2_verifications_total", result="fail") == ran + 1
        # its run: one begun since it was sent (a copy of it, run again by an escalated
        # pool, does the same work)
        mine = [(cpu, params) for began, cpu, params in runs if began >= started]
        cpu, params = max(mine, default=(0.0, None))
        return took, cpu, params

    key_id = token.split("_")[2][:12]
    kinds = {"wrong secret": lambda i: forged("live", key_id, i),
             "unknown id": lambda i: forged("live", f"{i:012d}", i),
             "other environment": lambda i: forged("test", key_id, i)}
    got: dict[str, list[tuple[float, float, str | None]]] = {what: [] for what in kinds}
    order = list(kinds)
    SecretHasher.verify = timed  # type: ignore[method-assign]
    try:
        for i in range(n):
            for what in order[i % 3:] + order[:i % 3]:  # none always first
                got[what].append(await refused(kinds[what](i)))
    finally:
        SecretHasher.verify = verify  # type: ignore[method-assign]
    return {what: RefusalCost(min(t for t, _, _ in each), statistics.median(c for _, c, _ in each),
                              frozenset(p for _, _, p in each if p is not None))
            for what, each in got.items()}


@contextlib.asynccontextmanager
async def serving(handler):
    """A real aiohttp upstream on loopback answering every method and path with ``handler``;
    yields its base URL, and stops it after."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def closed_within(reader: asyncio.StreamReader,
                        seconds: float) -> tuple[bool, bytes]:
    """Read until EOF; (True, bytes) if the gateway closed the connection in time. A reset is
    a close too: a client still writing (a dripped head) when the gateway closes gets RST from
    the kernel for the bytes that arrived after the close, instead of a clean EOF."""
    got = bytearray()
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                got += chunk
        return True, bytes(got)
    except ConnectionError:
        return True, bytes(got)
    except TimeoutError:
        return False, bytes(got)


async def drips_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             first: bytes, seconds: float) -> bool:
    """A slow-loris: send ``first`` (the start of a request head), then a header line every
    0.1 s, never the end of the head; True if the server closed the connection within
    ``seconds``. Closes the writer."""
    writer.write(first)

    async def drip() -> None:
        for i in range(int(seconds * 10) + 20):
            await asyncio.sleep(0.1)
            writer.write(b"X-%d: y\r\n" % i)

    dripping = asyncio.ensure_future(drip())
    try:
        closed, _ = await closed_within(reader, seconds)
    finally:
        dripping.cancel()
        writer.close()
    return closed


async def raw_upstream(answer) -> tuple[asyncio.AbstractServer, str]:
    """A loopback server running ``answer(reader, writer)`` per connection, for upstream answers
    an aiohttp server would never send; returns (server, its http:// URL). Close it after."""
    srv = await asyncio.start_server(answer, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"


def target_parser(on_target) -> Any:
    """An httptools request parser that calls ``on_target(target)`` with the request-target as
    sent, once for each whole request it has read (a raw upstream's view of what arrived)."""
    import httptools

    class Callbacks:
        target = b""

        def on_message_begin(self) -> None:
            self.target = b""

        def on_url(self, url: bytes) -> None:
            self.target += url

        def on_message_complete(self) -> None:
            on_target(self.target)

    return httptools.HttpRequestParser(Callbacks())


def openssl(*args: str) -> None:
    """Run the openssl CLI to make a test PKI; skip the test if it cannot."""
    done = subprocess.run(["openssl", *args], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"openssl could not make the test PKI: {done.stderr[-200:]!r}")


def keygate_at_a_terminal(*args: str, timeout: float = 20) -> tuple[int | None, bytes]:
    """Run ``keygate ARGS`` as a session leader whose controlling terminal is a fresh
    pseudo-terminal (where OpenSSL's pass-phrase prompt would ask): (exit code, None if it was
    still waiting after ``timeout`` s and was killed; all it showed on the terminal)."""
    master, terminal = os.openpty()
    child = ("import os, sys\n"
             "os.close(os.open(sys.argv[1], os.O_RDWR))\n"  # a session leader opening a tty
             "sys.argv = ['keygate'] + sys.argv[2:]\n"     # makes it its terminal
             "from gateway.cli import main\n"
             "sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", child, os.ttyname(terminal), *args],
                            start_new_session=True, stdin=terminal, stdout=terminal,
                            stderr=terminal)
    os.close(terminal)
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    shown = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return code, shown


def make_config(upstream_url: str, **overrides: Any) -> Config:
    read = ("people:read", "companies:read")
    config = Config(
        server=ServerConfig(host="127.0.0.1", access_log="json"),
        # the shipped store timeout: a test of what a timeout does sets its own, shorter one;
        # 0.5 s turned a loaded machine's scheduling stalls into 503s in unrelated tests
        store=StoreConfig(timeout=2.0),
        keys=KeysConfig(argon2=Argon2Config(1, 8, 1), failures=FailureLimits(20, 10, 60)),
        plans={"starter": Plan("starter", 1000, 5, None),
               "tiny": Plan("tiny", 3, 5, None),
               "limited": Plan("limited", None, 5, RateLimit(3, 1)),
               "unlimited": Plan("unlimited", None, None, None),
               "metered": Plan("metered", 100000, 5, RateLimit(1000, 1))},
        default_plan="starter",
        roles={"reader": read, "editor": read + ("people:write",), "admin": ("ALL", "keys:admin")},
        upstreams={"api": Upstream("api", upstream_url, 2.0)},
        routes=(Route("/health", "api", ("GET",), (), True),
                Route("/people/**", "api", ("GET",), ("people:read",)),
                Route("/people", "api", ("GET",), ("people:read",)),
                Route("/people/**", "api", ("POST", "PUT", "PATCH", "DELETE"), ("people:write",)),
                Route("/people", "api", ("POST",), ("people:write",)),
                Route("/companies/**", "api", (), ("companies:read",))),
        source="<test>")
    return dataclasses.replace(config, **overrides)


def under_load_config(upstream: Any, store_timeout: float) -> Config:
    """make_config for a flood of requests against ``upstream`` (an in-process test server)
    through a store fault: the given store timeout, and the shipped upstream timeout (30 s)
    rather than the harness's 2 s. The upstream shares the test's event loop; with 150
    requests in flight on a loaded machine a few took longer than 2 s once the store came
    back, and their 504s are not what these tests are about."""
    url = str(upstream.make_url(""))
    return make_config(url, store=StoreConfig(timeout=store_timeout),
                       upstreams={"api": Upstream("api", url, 30.0)})


VERIFY = "/_keygate/v1/verify"


def verify_config(upstream_url: str, **kw: Any) -> Config:
    """The test config with verify-only routes (no upstream) ahead of the forwarding ones."""
    config = make_config(upstream_url, **kw)
    # a verify-only route (no upstream) first, then the usual forwarding ones
    return dataclasses.replace(config, routes=(
        Route("/orders/**", None, ("GET",), ("orders:read",)),
        Route("/open/**", None, (), (), True),
    ) + config.routes)


class GatewayUnderTest:
    """``proxy`` and ``admin`` are ClientSessions bound to the two listeners."""

    def __init__(self, gw, proxy_server, admin_server, proxy, admin) -> None:
        self.gw, self.proxy_server, self.admin_server = gw, proxy_server, admin_server
        self.proxy, self.admin = proxy, admin

    @property
    def metrics(self):
        return self.gw.metrics

    async def admin_json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.admin.request(method, "/admin/v1" + path, json=body) as r:
            return r.status, await r.json()

    async def _set_up(self, path: str, body: dict) -> tuple[int, Any, bool]:
        """A test's setup write. Tests of store faults run keygate with store timeouts of a
        few tenths of a second; on a loaded machine (CI: 4 workers on 2 cores) opening a
        store connection alone can take that long, and the write is then rightly answered
        503 ``store_unavailable``. That is not what such a test is about: the write is tried
        again (up to 3 times). A retried workspace create that finds the workspace (the first
        try was written, its answer lost) has set it up too."""
        for attempt in range(3):
            status, answer = await self.admin_json("POST", path, body)
            if status != 503 or attempt == 2:
                return status, answer, attempt > 0
            await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def workspace(self, ws: str = "acme", plan: str = "starter") -> None:
        status, body, retried = await self._set_up(
            "/workspaces", {"id": ws, "name": ws.title(), "plan": plan})
        assert status == 201 or (retried and status == 409 and await self._is_workspace(ws, plan)), \
            body

    async def _is_workspace(self, ws: str, plan: str) -> bool:
        status, body = await self.admin_json("GET", f"/workspaces/{ws}")
        return status == 200 and body["plan"] == plan

    async def key(self, ws: str = "acme", **fields: Any) -> tuple[str, dict]:
        fields.setdefault("name", "integration")
        if "role" not in fields and "scopes" not in fields:
            fields["scopes"] = ["people:read"]
        status, body, _ = await self._set_up(f"/workspaces/{ws}/keys", fields)
        assert status == 201, body
        return body["token"], body["key"]

    async def raw_connection(self):
        """A raw (reader, writer) socket to the proxy listener, for framing and timing tests."""
        return await asyncio.open_connection("127.0.0.1", self.proxy_server.port)

    async def used(self, ws: str = "acme") -> int:
        """The workspace's requests counted this month, as the admin API reports them."""
        status, body = await self.admin_json("GET", f"/workspaces/{ws}/usage")
        assert status == 200, body
        return body["used"]

    def logs(self, capfd) -> tuple[str, str]:
        """stdout and stderr so far, with the access log written out first: the lines the
        flusher already handed to the writer thread (waited for: a thread a loaded machine
        has not yet run would otherwise leave them out), then those still buffered."""
        if self.gw.access_log is not None:
            written_out()
            self.gw.access_log.flush_now()
        return capfd.readouterr()

    def counter(self, name: str, **labels: str) -> float:
        return self.gw.metrics.registry.get_sample_value(name, labels or None) or 0.0


def written_out(timeout: float = 10.0) -> None:
    """Until the access-log writer thread has written every block handed to it so far: a
    marker queued behind them (the thread takes blocks in order) says when."""
    import threading

    from gateway import accesslog

    class Marker:  # stands in for the loop the thread tells that a block is written
        def __init__(self) -> None:
            self.written = threading.Event()

        def call_soon_threadsafe(self, *_: Any) -> None:
            self.written.set()

    marker = Marker()
    accesslog._writer().put((b"", marker, None))
    assert marker.written.wait(timeout), "the access-log writer thread is stuck"


class _ProxyTestServer(BaseTestServer):
    """Serves the gateway's own proxy ``web.Server`` object, exactly as ``serve`` does."""

    def __init__(self, server: web.Server, **kw: Any) -> None:
        self._server = server
        super().__init__(**kw)

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self._server)


class _AdminTestServer(TestServer):
    """Serves the admin app through keygate's own ``AdminRunner``, as ``serve`` does (its
    JSON answers to unparseable requests, its handling of ``Expect``): a plain ``TestServer``
    ran aiohttp's stock server, so the tests saw another admin listener than users do."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        from gateway.proxying.server import AdminRunner
        return AdminRunner(self.app, **kwargs)


@contextlib.asynccontextmanager
async def gateway_under_test(config: Config, redis_url: str, monkeypatch, **kw):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    async with running_gateway(config, redis_url, **kw) as gw:
        await gw.learn_key_prefixes()  # as start_listeners does
        proxy_server = _ProxyTestServer(gw.proxy_server, host="127.0.0.1")
        await proxy_server.start_server()
        admin_server = _AdminTestServer(gw.admin_app, host="127.0.0.1")
        # as keygate serves it (AdminRunner, access_log=None): aiohttp's own access log would
        # write admin paths, tokens in them included, once a reload has set the root logger
        # to INFO in an earlier test
        await admin_server.start_server(access_log=None)
        proxy = ClientSession(str(proxy_server.make_url("")), auto_decompress=False)
        admin = ClientSession(str(admin_server.make_url("")),
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            yield GatewayUnderTest(gw, proxy_server, admin_server, proxy, admin)
        finally:
            await proxy.close()
            await admin.close()
            await proxy_server.close()
            await admin_server.close()


class HeldReplies:
    """A loopback TCP relay in front of a real redis-server whose replies a test can hold
    back: Redis has run the commands, their answers wait. This is what a Redis that stalls
    between running a call and writing its reply does (stopped or paused there, a slow AOF
    write), which a signal cannot be timed to hit. ``url`` is the relay's; ``hold()`` keeps
    the replies from then on, ``release()`` sends them, in order, and lets replies flow again.
    ``held_back`` counts the replies that arrived since ``hold()``: once it is above 0, a call
    made after ``hold()`` has reached Redis and waits for its answer."""

    def __init__(self, redis_url: str, reply_delay: float = 0.0) -> None:
        """``reply_delay``: seconds every read of replies waits before it is passed on (a
        store that far away); an attribute a test may change at any time (read per reply)."""
        from urllib.parse import urlsplit
        self.reply_delay = reply_delay
        at = urlsplit(redis_url)
        self._target = (at.hostname, at.port)
        self._db = at.path
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self.url = ""
        self.held_back = 0
        self._hold_marker: bytes | None = None
        self._delay_marker: bytes | None = None
        self._drop_marker: bytes | None = None
        self._undelayed = asyncio.Event()

    async def __aenter__(self) -> "HeldReplies":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{self._db}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._flowing.set()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def hold(self) -> None:
        self.held_back = 0
        self._flowing.clear()

    def release(self) -> None:
        self._hold_marker = None
        self._flowing.set()
        self._undelayed.set()

    def hold_when(self, marker: bytes, nth: int = 1) -> None:
        """``hold()`` as soon as the ``nth`` command holding ``marker`` is passed on to Redis:
        Redis runs it (and what was sent before it), its answer and every later one wait."""
        self._hold_marker, self._hold_nth = marker, nth

    def delay_when(self, marker: bytes) -> None:
        """Keep the command holding ``marker`` from Redis until ``release()`` (and replies
        flowing): Redis runs it late, as a stalled Redis runs what sat in its buffers."""
        self._delay_marker = marker
        self._undelayed = asyncio.Event()
        self.held_back = 0

    def drop_when(self, marker: bytes) -> None:
        """Pass the next command holding ``marker`` on to Redis (it runs it), then close the
        caller's connection instead of passing its answer: a connection that died between
        Redis running a call and its reply arriving (a restart, ``CLIENT KILL``, a proxy)."""
        self._drop_marker = marker

    async def _relay(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(*self._target)
        dropping = asyncio.Event()

        async def pump(reader, writer, held: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if held and dropping.is_set():
                        client_writer.transport.abort()
                        return
                    if not held and self._drop_marker and self._drop_marker in data:
                        self._drop_marker = None
                        dropping.set()
                    if not held and self._delay_marker and self._delay_marker in data:
                        self._delay_marker = None
                        self.held_back += 1
                        await self._undelayed.wait()
                    if not held and self._hold_marker and self._hold_marker in data:
                        self._hold_nth -= 1
                        if self._hold_nth <= 0:
                            self._hold_marker = None
                            self.hold()
                    if held and self.reply_delay:
                        await asyncio.sleep(self.reply_delay)
                    if held and not self._flowing.is_set():
                        self.held_back += 1
                        await self._flowing.wait()
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        tasks = [asyncio.ensure_future(pump(client_reader, redis_writer, False)),
                 asyncio.ensure_future(pump(redis_reader, client_writer, True))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


# --- a raw client socket (listener-edge tests: resets, lingering closes) ---------------------

async def raw_connect(port: int) -> socket.socket:
    """A non-blocking TCP socket connected to 127.0.0.1:``port``."""
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def raw_send_all(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the connection failed first (a reset, a broken pipe)."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
        return True
    except ConnectionError:
        return False


async def raw_read_to_end(sock: socket.socket, seconds: float = 5.0) -> tuple[bytes, str]:
    """Everything the client receives, and how the connection ended: "eof", "reset" or
    "timeout"."""
    got = bytearray()
    try:
        async with asyncio.timeout(seconds):
            while chunk := await asyncio.get_running_loop().sock_recv(sock, 65536):
                got += chunk
        return bytes(got), "eof"
    except ConnectionError:
        return bytes(got), "reset"
    except TimeoutError:
        return bytes(got), "timeout"


def raw_statuses(answer: bytes) -> list[bytes]:
    """The status codes of the HTTP/1.x answers in ``answer``, in order."""
    return re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)


async def raw_send_refused(sock: socket.socket, head: bytes,
                           body: bytes) -> tuple[bool, bytes, str]:
    """Send a request ``head``, give the listener 0.1 s to refuse it from the head alone, then
    send ``body`` in 64 KiB writes as a client still uploading does. Whether every write went
    (no reset), everything that came back, and how the connection ended (raw_read_to_end)."""
    sent = await raw_send_all(sock, head)
    await asyncio.sleep(0.1)
    for at in range(0, len(body), 65536):
        sent = sent and await raw_send_all(sock, body[at:at + 65536])
    answer, end = await raw_read_to_end(sock)
    return sent, answer, end
