"""Resource soak: ``keygate serve`` as a real child process, measured from outside (open fds
in /proc/PID/fd, RSS and threads in /proc/PID/status, its own /metrics, Redis's CLIENT LIST)
while bounded churn runs against it: client connections left in every state, upstreams that
misbehave, WebSocket tunnels, Redis killed or paused, floods of distinct keys, repeated
reloads. After each churn the counts must come back within a small bound of the baseline:
what production would otherwise show after days as a slow climb to the open-file limit or
the OOM killer. Every test is bounded in count and time and uses loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import ClientSession, ClientTimeout, web

from harness import serving
from served import ADMIN_TOKEN as ADMIN, Served, admin_json, write_config

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")

TIMEOUT = ClientTimeout(total=15)


# --- measuring a process from outside ----------------------------------------------------------

def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def snapshot(pid: int, pooled_to: str | None = None) -> dict[str, int]:
    """fds, sockets, threads, RSS; with ``pooled_to`` (an upstream's URL), the connections
    to it (which its pool keeps idle, up to one per request that ran at once) not counted in
    fds and sockets (several URLs: separated by spaces)."""
    pooled = 0
    if pooled_to is not None:
        ports = tuple(f"->{url.rsplit(':', 1)[1].split('/')[0]}" for url in pooled_to.split())
        pooled = sum(1 for d in describe_sockets(pid) if d.split()[0].endswith(ports))
    return {"fds": fds(pid) - pooled, "sockets": sockets(pid) - pooled,
            "threads": status(pid, "Threads"), "rss_kb": status(pid, "VmRSS")}


async def settled(pid: int, baseline: dict[str, int], slack: dict[str, int],
                  timeout: float = 10.0, pooled_to: str | None = None) -> dict[str, int]:
    """The process's counts once each is within ``slack`` of ``baseline`` (polled up to
    ``timeout`` s: closes and thread exits take a moment); the last reading otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(pid, pooled_to)
        if all(now[k] <= baseline[k] + slack.get(k, 0) for k in slack) or \
                time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


def within(now: dict[str, int], baseline: dict[str, int], slack: dict[str, int]) -> bool:
    return all(now[k] <= baseline[k] + slack[k] for k in slack)


async def metrics(s: ClientSession, gw: Served) -> dict[tuple[str, str], float]:
    """/metrics as {(name, labels text): value}."""
    async with s.get(gw.admin + "/metrics") as r:
        text = await r.text()
    got = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)$", line)
            if m:
                got[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return got


def series(samples: dict, name: str) -> int:
    return sum(1 for (n, _) in samples if n.startswith(name))


@contextlib.asynccontextmanager
async def served(tmp_path: Path, redis_url: str, upstream_url: str, *, routes: list | None = None,
                 upstream: dict | None = None, plan: dict | None = None,
                 upstreams: dict | None = None, store: dict | None = None,
                 top: dict | None = None, **server):
    """One ``keygate serve`` on ``redis_url`` in front of ``upstream_url``, ready."""
    server.setdefault("access_log", "json")
    plan = plan or {"monthly_requests": None, "max_keys": 10000, "rate_limit": None}
    path, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=upstream_url,
                                      plan=plan, **server)
    doc = yaml.safe_load(path.read_text())
    doc["store"]["timeout"] = 2.0  # the shipped one: a loaded machine stalls past 0.5 s
    doc["store"].update(store or {})
    doc.update(top or {})
    if routes:
        doc["routes"] = routes + doc["routes"]
    doc["upstreams"]["api"].update(upstream or {})
    doc["upstreams"].update(upstreams or {})
    path.write_text(yaml.safe_dump(doc))
    gw = Served(path, pport, aport)
    try:
        await gw.ready()
        yield gw
    finally:
        gw.close()


async def workspace_key(s: ClientSession, gw: Served, ws: str = "acme", n: int = 1) -> list[str]:
    status_, body = await admin_json(s, gw.admin, "POST", "/workspaces",
                                     {"id": ws, "name": ws.title()})
    assert status_ == 201, body
    tokens = []
    for i in range(n):
        status_, body = await admin_json(s, gw.admin, "POST", f"/workspaces/{ws}/keys",
                                         {"name": f"k{i}", "scopes": ["people:read"]})
        assert status_ == 201, body
        tokens.append(body["token"])
    return tokens


async def warm(s: ClientSession, gw: Served, token: str, n: int = 50) -> None:
    """Requests enough that lazily made things (pools, caches, threads) exist before the
    baseline is read."""
    for _ in range(n):
        async with s.get(gw.proxy + "/people/1", headers={"Authorization": f"Bearer {token}"}) as r:
            await r.read()


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):  # (already closed: nothing to reset)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def bounded(n: int, concurrency: int, one) -> None:
    """``one(i)`` for i in range(n), ``concurrency`` at a time; exceptions of a connection
    torn down on purpose are expected and ignored."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@pytest.fixture
async def echo_upstream():
    """An upstream answering every path: ``/big`` with 1 MiB, slowly, others with a small
    JSON body."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/big"):
            resp = web.StreamResponse()
            resp.content_length = 1 << 20
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"x" * (1 << 14))
                await asyncio.sleep(0.01)
            return resp
        await request.read()
        return web.json_response({"path": request.path})

    async with serving(handler) as url:
        yield url


SLACK = {"fds": 4, "sockets": 4, "threads": 2}


# --- client connections in every state ---------------------------------------------------------

async def test_client_connections_torn_down_in_every_state_leave_no_fds(tmp_path, redis_url,
                                                                        echo_upstream):
    writes = [{"path": "/people/**", "methods": ["POST", "PUT"], "upstream": "api",
               "scopes": ["people:read"]}]
    async with served(tmp_path, redis_url, echo_upstream, routes=writes) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        base = snapshot(pid, echo_upstream)
        auth = b"Authorization: Bearer " + token.encode() + b"\r\n"

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            kind = i % 8
            try:
                if kind == 0:        # idle: opened, closed
                    pass
                elif kind == 1:      # half a head
                    writer.write(b"GET /people/1 HTTP/1.1\r\nHost: t\r\nX-A")
                    await writer.drain()
                elif kind == 2:      # a head, half a body
                    writer.write(b"POST /people/1 HTTP/1.1\r\nHost: t\r\n" + auth +
                                 b"Content-Length: 1000\r\n\r\n" + b"y" * 300)
                    await writer.drain()
                elif kind == 3:      # closed mid-response
                    writer.write(b"GET /people/big HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n")
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    await asyncio.wait_for(reader.read(1000), 5)
                elif kind == 4:      # reset right after the head
                    writer.write(b"GET /people/1 HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.001)
                    rst(writer)
                    return
                elif kind == 5:      # a whole answer, then reset
                    writer.write(b"GET /people/1 HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n")
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    rst(writer)
                    return
                elif kind == 6:      # Expect: 100-continue, and no body after all
                    writer.write(b"PUT /people/1 HTTP/1.1\r\nHost: t\r\n" + auth +
                                 b"Expect: 100-continue\r\nContent-Length: 50\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
                else:                # half a chunked body
                    writer.write(b"POST /people/1 HTTP/1.1\r\nHost: t\r\n" + auth +
                                 b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc")
                    await writer.drain()
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.002)
                if i % 2:
                    rst(writer)
                else:
                    writer.close()
            finally:
                writer.close()

        started = time.monotonic()
        await bounded(2000, 32, one)
        churn = time.monotonic() - started
        after = await settled(pid, base, SLACK, timeout=15, pooled_to=echo_upstream)
        samples = await metrics(s, gw)
        print(f"client churn: 2000 connections in {churn:.1f}s; baseline {base}, after {after}")
        assert within(after, base, SLACK), (base, after)
        assert samples[("keygate_requests_in_flight", "")] == 0
        assert after["rss_kb"] < base["rss_kb"] + 30_000, (base, after)


def describe_sockets(pid: int) -> list[str]:
    """The process's TCP sockets as 'local->remote STATE' (for a failing assertion's message)."""
    inodes = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes[link[8:-1]] = fd
    states = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "07": "CLOSE",
              "08": "CLOSE_WAIT", "0A": "LISTEN", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "09": "LAST_ACK", "0B": "CLOSING"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if table.endswith("unix"):
                    if len(parts) > 6 and parts[6] in inodes:
                        found.append(f"unix {parts[-1] if len(parts) > 7 else ''}")
                    continue
                if parts[9] in inodes:
                    local = int(parts[1].split(":")[1], 16)
                    remote = int(parts[2].split(":")[1], 16)
                    found.append(f"{local}->{remote} {states.get(parts[3], parts[3])}")
    return sorted(found)


# --- upstreams that misbehave ------------------------------------------------------------------

async def test_upstreams_that_refuse_reset_hang_or_hang_up_leave_no_sockets(tmp_path, redis_url):
    """The UpstreamPool's sockets: none left half-closed (CLOSE_WAIT) or open beyond what the
    pool keeps idle, after requests to an upstream that is not there, resets mid-body, never
    answers (its timeout) or closes its keep-alive connections."""
    open_at_upstream: set[asyncio.StreamWriter] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_at_upstream.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/people/reset"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" +
                                 b"z" * 5000)
                    await writer.drain()
                    rst(writer)
                    return
                if path.startswith(b"/people/hang"):
                    await reader.read()  # until keygate gives up
                    return
                body = b'{"ok":true}'
                if path.startswith(b"/people/close"):  # keep-alive promised, then hung up
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            open_at_upstream.discard(writer)
            writer.close()

    from harness import raw_upstream
    srv, url = await raw_upstream(answer)
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s_.getsockname()[1]}"  # bound, never listening: refused
        routes = [{"path": "/dead/**", "methods": ["GET"], "upstream": "dead",
                   "scopes": ["people:read"]}]
        try:
            async with served(tmp_path, redis_url, url, routes=routes,
                              upstream={"timeout": 1, "max_connections": 64},
                              upstreams={"dead": {"url": dead, "timeout": 1}}) as gw, \
                    ClientSession(timeout=TIMEOUT) as s:
                token, = await workspace_key(s, gw)
                await warm(s, gw, token)
                pid = gw.proc.pid
                base = snapshot(pid)
                headers = {"Authorization": f"Bearer {token}"}
                statuses: dict[str, list[int]] = {}
                truncated: list[str] = []

                async def one(churner: ClientSession, i: int) -> None:
                    path = ("/people/reset", "/dead/x", "/people/close", "/people/ok",
                            "/people/hang")[i % 5] if i < 400 else \
                        ("/people/reset", "/dead/x", "/people/close", "/people/ok")[i % 4]
                    async with churner.get(gw.proxy + path, headers=headers) as r:
                        statuses.setdefault(path, []).append(r.status)
                        try:
                            body = await r.read()
                        except Exception:
                            truncated.append(path)
                        else:  # an answer cut short must never look whole
                            assert r.status != 200 or path != "/people/reset", len(body)

                started = time.monotonic()
                async with ClientSession(timeout=TIMEOUT) as churner:  # closed before measuring
                    await bounded(2400, 40, lambda i: one(churner, i))
                churn = time.monotonic() - started
                await asyncio.sleep(1.5)  # the client side's closes reach keygate
                after = await settled(pid, base, {"sockets": 6 + len(open_at_upstream)})
                desc = describe_sockets(pid)
                samples = await metrics(s, gw)
                print(f"upstream churn {churn:.1f}s: baseline {base}, after {after}, open at "
                      f"upstream {len(open_at_upstream)}; "
                      f"{ {p: {st: v.count(st) for st in set(v)} for p, v in statuses.items()} }")
                assert not [d for d in desc if "CLOSE_WAIT" in d], desc
                # what stays: the pool's idle connections, at most one per concurrent request
                assert after["sockets"] <= base["sockets"] + 40, desc
                assert len([d for d in desc if f"->{srv.sockets[0].getsockname()[1]} " in d]) \
                    <= len(open_at_upstream) + 1, desc
                assert len(open_at_upstream) <= 40
                assert after["threads"] <= base["threads"] + 2
                assert samples[("keygate_requests_in_flight", "")] == 0
                assert truncated.count("/people/reset") == statuses["/people/reset"].count(200)
                # a GET that met a connection the upstream had dropped is sent again on a new
                # one: never a 502 (the upstream answered each request it read)
                for path in ("/people/reset", "/people/close", "/people/ok"):
                    assert set(statuses[path]) == {200}, statuses[path]
                assert set(statuses["/people/hang"]) == {504}
                assert set(statuses["/dead/x"]) == {502}
        finally:
            for writer in list(open_at_upstream):
                writer.close()
            srv.close()
            await asyncio.sleep(0.2)


# --- floods of distinct keys -------------------------------------------------------------------

async def pipelined(port: int, requests: list[bytes], source: str = "127.0.0.1") -> list[int]:
    """Send ``requests`` (whole heads) on one connection from ``source``, pipelined; the
    statuses of the answers read before the connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    statuses: list[int] = []
    try:
        writer.write(b"".join(requests))
        while len(statuses) < len(requests):
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                break
            if line.startswith(b"HTTP/1.1 "):
                statuses.append(int(line[9:12]))
            elif line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(n)
    finally:
        writer.close()
    return statuses


def unknown_token() -> str:
    from gateway.tokens import make_token
    return make_token("kg", "live")[0]


def random_token(i: int) -> str:
    return "kg_live_" + os.urandom(20).hex()[:40 + i % 10]


async def test_a_flood_of_distinct_invalid_keys_grows_no_memory_or_label_set(tmp_path,
                                                                           redis_url,
                                                                           echo_upstream):
    """An attacker sending tens of thousands of random tokens (malformed, and well-formed with a
    valid checksum but no such key) from many addresses: every per-key and per-address
    structure (key cache, failure throttle, verify queue, metrics label sets) stays bounded.
    Measured in two equal rounds after a warm-up: the second round adds (almost) nothing."""
    async with served(tmp_path, redis_url, echo_upstream) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid

        def heads(n: int, well_formed: bool) -> list[bytes]:
            out = []
            for i in range(n):
                t = unknown_token() if well_formed else random_token(i)
                where = i % 3
                if where == 0:
                    out.append(b"GET /people/%d HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s"
                               b"\r\n\r\n" % (i, t.encode()))
                elif where == 1:
                    out.append(b"GET /people/x HTTP/1.1\r\nHost: t\r\nX-Api-Key: %s\r\n\r\n"
                               % t.encode())
                else:
                    out.append(b"GET /nowhere/%s HTTP/1.1\r\nHost: t\r\n\r\n" % t.encode())
            return out

        async def round_(r: int, connections: int, per: int) -> dict[int, int]:
            tally: dict[int, int] = {}

            async def one(i: int) -> None:
                # an address of its own for each connection: 127.r.x.y
                source = f"127.{10 + r}.{i // 250}.{1 + i % 250}"
                for st in await pipelined(gw.proxy_port, heads(per, well_formed=i % 2 == 0),
                                          source):
                    tally[st] = tally.get(st, 0) + 1

            await bounded(connections, 16, one)
            return tally

        import redis
        store = redis.Redis.from_url(redis_url)

        def lasting() -> list[bytes]:
            """Keys in Redis that never expire."""
            return sorted(k for k in store.scan_iter(count=1000) if store.ttl(k) == -1)

        lasting0 = lasting()
        samples0 = await metrics(s, gw)
        await round_(0, 40, 50)    # warm-up: 2k
        m1 = await metrics(s, gw)
        first = snapshot(pid)
        started = time.monotonic()
        # 12k measured: a third of them to a path of their own, past the 4,096 (method, path)
        # pairs whose route is remembered
        t1 = await round_(1, 120, 50)   # 6k
        t2 = await round_(2, 120, 50)   # 6k
        took = time.monotonic() - started
        second = await settled(pid, first, SLACK)
        m2 = await metrics(s, gw)
        print(f"key flood: 12k in {took:.1f}s ({t1} / {t2}); after warm-up {first}, "
              f"after 12k more {second}; series {len(samples0)} -> {len(m1)} -> {len(m2)}")
        assert sum(t1.values()) + sum(t2.values()) >= 11_700
        grown = sorted(set(lasting()) - set(lasting0))
        print(f"keys in Redis: {store.dbsize()}, that never expire {len(lasting0)} -> "
              f"{len(lasting0) + len(grown)}: {grown[:5]}")
        assert not grown, grown[:20]   # nothing an attacker sends stays in Redis for ever
        store.close()
        assert len(m2) == len(m1), sorted(set(m2) - set(m1))[:20]
        assert within(second, first, SLACK), (first, second)
        # ~1 MB of the allocator's own over 12k (1.6 MB over 20k); 400 bytes kept a request
        # would be 4.8 MB more
        assert second["rss_kb"] < first["rss_kb"] + 5_000, (first, second)


# --- reloads -----------------------------------------------------------------------------------

async def test_two_hundred_sighup_reloads_leave_no_fds_threads_or_memory(tmp_path, redis_url,
                                                                        echo_upstream):
    async with served(tmp_path, redis_url, echo_upstream) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        headers = {"Authorization": f"Bearer {token}"}

        async def reloads(n: int) -> float:
            """At least n SIGHUPs, and more until n / 2 reloads have run (a SIGHUP while one
            runs may merge into it, more often on a loaded machine: 58 of 200 once), within
            60 s; the reloads run."""
            async def total() -> float:
                return (await metrics(s, gw))[("keygate_config_reloads_total",
                                               '{result="ok"}')]

            async def ran() -> float:
                return await total() - before
            before = await total()
            sent, deadline = 0, time.monotonic() + 60
            while sent < n or (await ran() < n * 0.5 and time.monotonic() < deadline):
                for _ in range(10):
                    gw.proc.send_signal(signal.SIGHUP)
                    async with s.get(gw.proxy + "/people/1", headers=headers) as r:
                        assert r.status == 200
                        await r.read()
                sent += 10
                await asyncio.sleep(0.05)  # let them land
            settle = time.monotonic() + 20
            while (done := await ran()) < n * 0.5 and time.monotonic() < settle:
                await asyncio.sleep(0.1)
            return done

        await reloads(20)   # warm-up
        base = snapshot(pid)
        m1 = await metrics(s, gw)
        done = await reloads(200)
        after = await settled(pid, base, SLACK)
        m2 = await metrics(s, gw)
        print(f"SIGHUP x200 ({done:.0f} reloads): baseline {base}, after {after}; "
              f"series {len(m1)} -> {len(m2)}")
        assert done >= 100
        assert within(after, base, SLACK), (base, after)
        assert after["rss_kb"] < base["rss_kb"] + 8_000, (base, after)
        assert len(m2) == len(m1), sorted(set(m2) ^ set(m1))[:20]


# --- Redis killed, restarted, paused -----------------------------------------------------------

def redis_clients(port: int) -> list[dict]:
    """Redis's CLIENT LIST, less the asking connection."""
    import redis
    with redis.Redis(port=port, socket_timeout=2) as probe:
        return [c for c in probe.client_list(_type="normal") if c["cmd"] != "client|list"]


async def test_redis_killed_restarted_and_paused_under_load_leaves_no_connections(
        tmp_path, own_redis, echo_upstream):
    """Load runs throughout; Redis is killed and restarted three times, and stopped (SIGSTOP,
    past the store timeout) and resumed three times. After it: keygate's sockets and threads
    are back where they were, it answers again, and Redis's CLIENT LIST holds no more of its
    connections than before."""
    import redis
    from conftest import RedisServer
    port = own_redis.port
    async with served(tmp_path, own_redis.url, echo_upstream, store={"timeout": 0.5}) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        base = snapshot(pid, echo_upstream)
        base_clients = redis_clients(port)
        headers = {"Authorization": f"Bearer {token}"}
        tally: dict[int, int] = {}
        stop = asyncio.Event()

        async def load(churner: ClientSession) -> None:
            while not stop.is_set():
                try:
                    async with churner.get(gw.proxy + "/people/1", headers=headers) as r:
                        await r.read()
                        tally[r.status] = tally.get(r.status, 0) + 1
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.01)

        async def seen(answer: int, n: int = 24) -> None:
            """Until the load has had ``n`` more ``answer``s: the store's new state has been
            met by every loader (a fixed 0.7 s was mostly idle, and short on a loaded
            machine)."""
            target = tally.get(answer, 0) + n
            deadline = time.monotonic() + 15
            while tally.get(answer, 0) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

        server = own_redis
        async with ClientSession(timeout=TIMEOUT) as churner:
            loaders = [asyncio.ensure_future(load(churner)) for _ in range(12)]
            try:
                for _ in range(3):
                    await seen(200)                   # store connections in use
                    with redis.Redis(port=port) as probe:
                        probe.save()
                    server.proc.kill()
                    server.proc.wait(5)
                    await seen(503)                   # the outage met
                    server = RedisServer(own_redis.data_dir, port=port).start()
                    await seen(200)                   # connections to the new process
                    server.proc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(1.5)          # three store timeouts
                    server.proc.send_signal(signal.SIGCONT)
                await seen(200)
            finally:
                stop.set()
                await asyncio.gather(*loaders)
        try:
            async with s.get(gw.proxy + "/people/1", headers=headers) as r:
                assert r.status == 200, await r.text()
            after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
            # connections closed go from CLIENT LIST once Redis has read the close (polled
            # up to 10 s, not a fixed 1 s); a connection kept open stays and fails this
            deadline = time.monotonic() + 10
            while len(clients := redis_clients(port)) > len(base_clients) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            print(f"Redis kill/pause x3 under load ({tally}): baseline {base}, after {after}; "
                  f"Redis clients {len(base_clients)} -> {len(clients)}")
            assert within(after, base, SLACK), (base, after, describe_sockets(pid))
            assert len(clients) <= len(base_clients), (base_clients, clients)
            assert 503 in tally and 200 in tally
        finally:
            if server is not own_redis:
                server.stop()


# --- WebSocket tunnels ---------------------------------------------------------------------------

async def test_websocket_tunnels_ended_by_either_side_or_a_vanished_upstream_leave_nothing(
        tmp_path, redis_url):
    import aiohttp
    open_upstream: set = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"path": request.path})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        open_upstream.add(ws)
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                await ws.send_str("echo:" + msg.data)
                if request.path.endswith("/close"):
                    await ws.close()
                elif request.path.endswith("/vanish"):   # the upstream's socket reset
                    transport = request.transport
                    if transport is not None:
                        sock = transport.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        transport.abort()
                    break
        finally:
            open_upstream.discard(ws)
        return ws

    routes = [{"path": "/ws/**", "methods": ["GET"], "upstream": "api",
               "scopes": ["people:read"], "websocket": True}]
    async with serving(handler) as url, \
            served(tmp_path, redis_url, url, routes=routes) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        headers = {"Authorization": f"Bearer {token}"}
        pid = gw.proc.pid
        tally: dict[str, int] = {}

        async def one(churner: ClientSession, i: int) -> None:
            kind = ("client-close", "client-abort", "upstream-close", "vanish")[i % 4]
            path = {"upstream-close": "/ws/close", "vanish": "/ws/vanish"}.get(kind, "/ws/echo")
            ws = await churner.ws_connect(gw.proxy.replace("http", "ws") + path,
                                          headers=headers, autoping=False)
            try:
                await ws.send_str("hi")
                msg = await asyncio.wait_for(ws.receive(), 5)
                ok = msg.type == aiohttp.WSMsgType.TEXT and msg.data == "echo:hi"
                if kind == "client-close":
                    await ws.close()
                elif kind == "client-abort":
                    rst_transport = ws._response.connection.transport
                    if rst_transport is not None:
                        rst_transport.abort()
                else:
                    msg = await asyncio.wait_for(ws.receive(), 5)
                    ok = ok and msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                             aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
                name = kind + (" ok" if ok else " odd")
                tally[name] = tally.get(name, 0) + 1
            finally:
                await ws.close()

        async with ClientSession(timeout=TIMEOUT) as churner:
            await bounded(40, 8, lambda i: one(churner, i))   # warm-up
        base = await settled(pid, snapshot(pid), {})
        started = time.monotonic()
        async with ClientSession(timeout=TIMEOUT) as churner:
            await bounded(800, 16, lambda i: one(churner, i))
        took = time.monotonic() - started
        await asyncio.sleep(1)
        after = await settled(pid, base, SLACK, pooled_to=url)
        samples = await metrics(s, gw)
        print(f"WebSocket x800 in {took:.1f}s ({tally}): baseline {base}, after {after}; "
              f"open at upstream {len(open_upstream)}")
        assert sum(v for k, v in tally.items() if k.endswith(" ok")) >= 780, tally
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))
        assert after["rss_kb"] < base["rss_kb"] + 10_000
        assert await eventually_zero(lambda: len(open_upstream)), len(open_upstream)
        assert samples[("keygate_requests_in_flight", "")] == 0


async def eventually_zero(count, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while count() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count() == 0


# --- TLS handshakes abandoned ------------------------------------------------------------------

async def test_tls_handshakes_abandoned_in_every_state_leave_no_fds(tmp_path, redis_url,
                                                                   echo_upstream):
    """On an HTTPS listener: connections that send nothing, part of a ClientHello, finish the
    handshake and go (FIN or RST), or send half a request after it; those still open are closed
    at the header timeout; nothing is left behind."""
    import shutil
    import ssl
    from harness import openssl
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert))
    ctx = ssl.create_default_context(cafile=str(cert))
    async with served(tmp_path, redis_url, echo_upstream,
                      tls={"cert_file": str(cert), "key_file": str(key)},
                      timeouts={"header": 2, "body": 5, "idle": 5}) as gw:
        pid = gw.proc.pid
        hello = bytes.fromhex("160301020001") + b"\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40
        tally: dict[str, int] = {}
        held: list[asyncio.Future] = []

        async def wait_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                closed = await asyncio.wait_for(reader.read(), 6) == b""
                tally["held closed"] = tally.get("held closed", 0) + closed
            writer.close()

        async def one(i: int) -> None:
            kind = i % 6
            if kind in (0, 1, 5):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
                if kind == 1:
                    writer.write(hello[:5 + i % 30])
                    await writer.drain()
                if i % 12 == 5:          # stays: the header timeout closes it
                    writer.write(hello[:20])
                    await writer.drain()
                    # awaited apart: 60 of them holding one of the 16 senders for the 2 s
                    # each took ~7.5 s; now they are open alongside the churn
                    held.append(asyncio.ensure_future(wait_closed(reader, writer)))
                    return
                rst(writer) if i % 2 else writer.close()
                return
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port, ssl=ctx,
                                                           server_hostname="localhost")
            tally["handshakes"] = tally.get("handshakes", 0) + 1
            if kind == 3:
                writer.write(b"GET /people/1 HTTP/1.1\r\nHost: t\r\nAuth")
                await writer.drain()
            if kind == 4:
                writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n\r\n")
            if kind == 2:
                rst(writer)
            else:
                writer.transport.abort() if i % 4 == 0 else writer.close()

        await bounded(60, 6, one)   # warm-up
        await asyncio.gather(*held)
        base = await settled(pid, snapshot(pid, echo_upstream), {})
        started = time.monotonic()
        await bounded(720, 16, one)
        await asyncio.gather(*held)
        took = time.monotonic() - started
        after = await settled(pid, base, SLACK, timeout=10, pooled_to=echo_upstream)
        print(f"TLS churn x720 in {took:.1f}s ({tally}): baseline {base}, after {after}")
        assert tally["handshakes"] >= 360 and tally["held closed"] >= 60, tally
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))
        assert after["rss_kb"] < base["rss_kb"] + 10_000



async def test_a_long_outage_under_fail_open_keeps_one_pending_write_per_slot(
        tmp_path, own_redis, echo_upstream):
    """With ``on_store_error: open`` the requests let through while Redis is down are counted
    locally and written once it is back. Each second's retry turned every key's new counts
    into a write of its own, kept until the store took it: the ledger grew by one write per
    key in use per second of the outage (an hour, a thousand keys: 3.6 million writes, each
    walked by every retry, then sent one round trip at a time once Redis was back). A key's
    counts now wait in one number while a write of its is pending. Measured from outside: the
    write ids Redis records once it is back, against the keys that were in use."""
    import redis
    from conftest import RedisServer
    n_keys = 12
    async with served(tmp_path, own_redis.url, echo_upstream,
                      store={"on_store_error": "open", "timeout": 0.5}) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        tokens = await workspace_key(s, gw, n=n_keys)
        for token in tokens:
            await warm(s, gw, token, n=2)
        with redis.Redis(port=own_redis.port) as probe:
            probe.save()
        own_redis.proc.kill()
        own_redis.proc.wait(5)
        let_through = 0
        # four retries of the ledger (six took 6 s): a write kept per slot and retry still
        # ends at ~4 x n_keys write ids, twice the bound below
        deadline = time.monotonic() + 4
        async with ClientSession(timeout=TIMEOUT) as churner:
            while time.monotonic() < deadline:
                for token in tokens:
                    async with churner.get(gw.proxy + "/people/1",
                                           headers={"Authorization": f"Bearer {token}"}) as r:
                        await r.read()
                        let_through += r.status == 200
                await asyncio.sleep(0.05)
        restarted = RedisServer(own_redis.data_dir, port=own_redis.port).start()
        try:
            with redis.Redis(port=own_redis.port) as probe:
                async def drained() -> int:
                    status_, body = await admin_json(s, gw.admin, "GET", "/workspaces/acme/usage")
                    return body.get("used", 0) if status_ == 200 else 0
                used = 0
                for _ in range(100):
                    used = await drained()
                    if used >= let_through + 2 * n_keys:
                        break
                    await asyncio.sleep(0.1)
                writes = len(probe.keys("kg:write:*"))
            print(f"fail-open outage: {let_through} let through with {n_keys} keys in ~4 s; "
                  f"used {used}; write ids in Redis {writes}")
            assert used == let_through + 2 * n_keys
            assert writes <= 2 * n_keys, writes
        finally:
            restarted.stop()


# --- the admin listener ------------------------------------------------------------------------

async def test_admin_listener_churn_and_scrapes_leave_no_fds_or_store_connections(
        tmp_path, own_redis, echo_upstream):
    """Scrapes of /metrics (each reads the usage from the store), admin API calls on fresh
    connections, and connections torn down half-way on the admin listener."""
    async with served(tmp_path, own_redis.url, echo_upstream) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        for _ in range(20):
            await metrics(s, gw)
        pooled = f"{echo_upstream} {own_redis.url}"  # (the admin side's store pool, too)
        base = snapshot(pid, pooled)
        base_clients = len(redis_clients(own_redis.port))
        auth = {"Authorization": f"Bearer {token}"}

        async def one(i: int) -> None:
            kind = i % 4
            if kind == 0:
                async with ClientSession(timeout=TIMEOUT) as fresh:
                    await metrics(fresh, gw)
            elif kind == 1:
                async with ClientSession(timeout=TIMEOUT) as fresh:
                    status_, _ = await admin_json(fresh, gw.admin, "GET", "/workspaces/acme/keys")
                    assert status_ == 200
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.admin_port)
                writer.write(b"POST /admin/v1/workspaces HTTP/1.1\r\nHost: t\r\n"
                             b"Content-Length: 100\r\n\r\n{\"id\"" if kind == 2 else
                             b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                await writer.drain()
                if kind == 3:
                    await reader.readuntil(b"\r\n\r\n")
                rst(writer) if i % 8 < 4 else writer.close()

        started = time.monotonic()
        await bounded(800, 12, one)
        took = time.monotonic() - started
        async with s.get(gw.proxy + "/people/1", headers=auth) as r:
            assert r.status == 200
        await asyncio.sleep(1)
        after = await settled(pid, base, SLACK, pooled_to=pooled)
        clients = len(redis_clients(own_redis.port))
        print(f"admin churn x800 in {took:.1f}s: baseline {base}, after {after}; "
              f"Redis clients {base_clients} -> {clients}")
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))
        # the admin side's pool keeps what the 12 concurrent calls needed (at most 64)
        assert clients <= base_clients + 12
        assert after["rss_kb"] < base["rss_kb"] + 10_000


async def test_reloads_that_change_the_upstream_under_load_close_every_retired_pool(
        tmp_path, redis_url, echo_upstream):
    """Each reload changes the upstream (its timeout), so its pool is retired and a new one
    made, while requests run: every retired pool's connections are closed once its requests
    are done; what stays open is the last pool's idle connections."""
    async with served(tmp_path, redis_url, echo_upstream) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        base = snapshot(pid, echo_upstream)
        headers = {"Authorization": f"Bearer {token}"}
        stop = asyncio.Event()
        tally: dict[int, int] = {}

        async def load(churner: ClientSession) -> None:
            while not stop.is_set():
                async with churner.get(gw.proxy + "/people/big", headers=headers) as r:
                    await r.read()
                    tally[r.status] = tally.get(r.status, 0) + 1

        doc = yaml.safe_load(gw.config.read_text())
        async with ClientSession(timeout=TIMEOUT) as churner:
            loaders = [asyncio.ensure_future(load(churner)) for _ in range(8)]
            try:
                for i in range(60):
                    doc["upstreams"]["api"]["timeout"] = 5 + i % 2
                    gw.config.write_text(yaml.safe_dump(doc))
                    async with s.post(gw.admin + "/admin/v1/reload",
                                      headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                        assert r.status == 200, await r.text()
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.gather(*loaders)
        at_upstream = lambda: sum(  # noqa: E731
            1 for d in describe_sockets(pid)
            if d.split()[0].endswith("->" + echo_upstream.rsplit(":", 1)[1]))
        deadline = time.monotonic() + 10
        while at_upstream() > 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
        print(f"60 reloads changing the upstream under load ({tally}): baseline {base}, "
              f"after {after}; connections to the upstream {at_upstream()}")
        assert set(tally) == {200}, tally
        assert at_upstream() <= 8, describe_sockets(pid)
        assert within(after, base, SLACK), (base, after)


async def test_uploads_abandoned_mid_body_free_their_upload_slots_and_connections(
        tmp_path, redis_url):
    """With ``max_connections: 4`` the upstream has 2 upload slots. Ninety uploads that
    stream more than 64 KiB and then go (FIN or RST), or stall until the body timeout: each
    frees its slot and its upstream connection, and a whole upload still goes through."""
    got: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        got.append(len(body))
        return web.json_response({"n": len(body)})

    routes = [{"path": "/up/**", "methods": ["POST"], "upstream": "api",
               "scopes": ["people:read"]}]
    async with serving(handler) as url, \
            served(tmp_path, redis_url, url, routes=routes,
                   upstream={"max_connections": 4, "timeout": 3},
                   timeouts={"header": 5, "body": 1, "idle": 5}) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        headers = {"Authorization": f"Bearer {token}"}
        async with s.post(gw.proxy + "/up/x", headers=headers, data=b"a" * 300_000) as r:
            assert r.status == 200
        pid = gw.proc.pid
        base = snapshot(pid, url)
        chunk = b"b" * 65536

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            writer.write(b"POST /up/%d HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Length: 1000000\r\n\r\n" % (i, token.encode()))
            for _ in range(2):
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.005)
            if i % 10 == 9:      # stalls: the body timeout ends it
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
            elif i % 2:
                rst(writer)
            else:
                writer.close()

        started = time.monotonic()
        await bounded(90, 6, one)
        took = time.monotonic() - started
        upstream_port = "->" + url.rsplit(":", 1)[1]
        # closes take a moment: polled up to 5 s (was a fixed 1 s); a connection kept past
        # the pool's 4 stays and fails this
        deadline = time.monotonic() + 5
        while (at_upstream := sum(1 for d in describe_sockets(pid)
                                  if d.split()[0].endswith(upstream_port))) > 4 and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        async def streamed():
            for _ in range(8):
                yield b"c" * 65536
                await asyncio.sleep(0.01)

        statuses = []
        for _ in range(3):
            async with s.post(gw.proxy + "/up/y", headers=headers, data=streamed()) as r:
                statuses.append(r.status)
        after = await settled(pid, base, SLACK, pooled_to=url)
        print(f"90 abandoned uploads in {took:.1f}s: baseline {base}, after {after}; "
              f"connections to the upstream {at_upstream}; then {statuses}")
        assert statuses == [200, 200, 200]
        assert at_upstream <= 4
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))


async def test_a_long_redis_pause_under_load_holds_a_bounded_number_of_store_connections(
        tmp_path, own_redis, echo_upstream):
    """Redis stopped (SIGSTOP) for 12 store timeouts while requests keep coming: keygate makes
    a new connection per timeout but keeps only a few of those Redis never answered on; once
    Redis resumes, its CLIENT LIST and keygate's sockets go back to where they were."""
    async with served(tmp_path, own_redis.url, echo_upstream, store={"timeout": 0.5}) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        redis_port = f"->{own_redis.port}"
        to_redis = lambda: sum(1 for d in describe_sockets(pid)  # noqa: E731
                               if d.split()[0].endswith(redis_port))
        base, base_redis = snapshot(pid, echo_upstream), to_redis()
        base_clients = len(redis_clients(own_redis.port))
        headers = {"Authorization": f"Bearer {token}"}
        stop = asyncio.Event()
        tally: dict[int, int] = {}
        most = 0

        async def load(churner: ClientSession) -> None:
            while not stop.is_set():
                async with churner.get(gw.proxy + "/people/1", headers=headers) as r:
                    await r.read()
                    tally[r.status] = tally.get(r.status, 0) + 1

        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            async with ClientSession(timeout=TIMEOUT) as churner:
                loaders = [asyncio.ensure_future(load(churner)) for _ in range(8)]
                try:
                    # 12 timeouts (16 took 8 s): a connection kept per timeout ends well
                    # above the bound below (11 after 12 timeouts, bound 6)
                    deadline = time.monotonic() + 6
                    while time.monotonic() < deadline:
                        most = max(most, to_redis())
                        await asyncio.sleep(0.1)
                finally:
                    stop.set()
                    await asyncio.gather(*loaders)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        async with s.get(gw.proxy + "/people/1", headers=headers) as r:
            assert r.status == 200
        after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
        # closed connections leave CLIENT LIST once Redis has read the close: polled up to
        # 10 s (was a fixed 1 s); one kept open stays and fails this
        deadline = time.monotonic() + 10
        while (clients := len(redis_clients(own_redis.port))) > base_clients and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        print(f"Redis paused 6 s under load ({tally}): keygate's connections to it "
              f"{base_redis} -> at most {most} during; baseline {base}, after {after}; "
              f"Redis clients {base_clients} -> {clients}")
        assert most <= base_redis + 4
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))
        assert clients <= base_clients


async def test_sighup_reloads_under_two_workers_leave_no_fds_threads_or_files(tmp_path, redis_url,
                                                                             echo_upstream):
    """``serve --workers 2``: the supervisor passes each SIGHUP to its workers; after 100, no
    process of the group holds more fds or threads than before, and the metrics directory
    holds no more files."""
    from served import children_of
    path, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=echo_upstream,
                                      plan={"monthly_requests": None, "max_keys": 5,
                                            "rate_limit": None})
    gw = Served(path, pport, aport, "--workers", "2")
    try:
        await gw.ready()
        async with ClientSession(timeout=TIMEOUT) as s:
            token, = await workspace_key(s, gw)
            group = [gw.proc.pid, *sorted(children_of(gw.proc.pid))]
            for _ in range(200):  # fresh connections until each worker has served (the
                async with ClientSession(timeout=TIMEOUT) as fresh:   # kernel spreads them)
                    await warm(fresh, gw, token, n=2)
                if all(status(pid, "Threads") > 2 for pid in group[1:]):
                    break
            await warm(s, gw, token)
            files = lambda: sorted(  # noqa: E731
                p.name for pid in group for fd in os.listdir(f"/proc/{pid}/fd")
                for p in [Path(os.path.realpath(f"/proc/{pid}/fd/{fd}"))]
                if p.suffix == ".db")
            metrics_dirs = {p.parent for pid in group for fd in os.listdir(f"/proc/{pid}/fd")
                            for p in [Path(os.path.realpath(f"/proc/{pid}/fd/{fd}"))]
                            if p.suffix == ".db"}

            def on_disk() -> int:
                return sum(len(list(d.glob("*.db"))) for d in metrics_dirs if d.exists())

            headers = {"Authorization": f"Bearer {token}"}
            # reloads first, outside the count: a reload's work runs in each worker's
            # executor, whose threads start as work first needs them (up to its bound); a
            # worker that had served little went from 5 to 8 threads, none of them leaked
            for _ in range(20):
                gw.proc.send_signal(signal.SIGHUP)
                async with s.get(gw.proxy + "/people/1", headers=headers) as r:
                    assert r.status == 200
            await asyncio.sleep(1)
            base = {pid: snapshot(pid) for pid in group}
            base_files = on_disk()
            for i in range(100):
                gw.proc.send_signal(signal.SIGHUP)
                async with s.get(gw.proxy + "/people/1", headers=headers) as r:
                    assert r.status == 200
                if i % 10 == 9:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            after = {pid: await settled(pid, base[pid], SLACK) for pid in group}
            print(f"--workers 2, 100 SIGHUPs: {base} -> {after}; metrics files "
                  f"{base_files} -> {on_disk()} ({files()[:4]})")
            assert all(within(after[pid], base[pid], SLACK) for pid in group), (base, after)
            assert on_disk() <= base_files
            assert sorted(children_of(gw.proc.pid)) == group[1:]
    finally:
        gw.close()



async def test_tracing_to_a_collector_that_is_down_keeps_threads_and_memory_bounded(
        tmp_path, redis_url, echo_upstream):
    """Every request sampled, the OTLP collector refusing connections: spans are dropped
    (bounded by the SDK's queue), no thread or memory grows with the requests, nor with
    reloads."""
    pytest.importorskip("opentelemetry.sdk")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        collector = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with served(tmp_path, redis_url, echo_upstream,
                          top={"tracing": {"otlp_endpoint": collector,
                                           "service_name": "soak", "sample_ratio": 1.0}}) as gw, \
                ClientSession(timeout=TIMEOUT) as s:
            token, = await workspace_key(s, gw)
            headers = {"Authorization": f"Bearer {token}"}
            pid = gw.proc.pid

            async def round_(n: int) -> None:
                async def one(i: int) -> None:
                    async with s.get(gw.proxy + "/people/1", headers=headers) as r:
                        assert r.status == 200, (r.status, await r.text())
                    if i % 100 == 0:
                        gw.proc.send_signal(signal.SIGHUP)
                await bounded(n, 16, one)

            await round_(2000)   # warm-up: the SDK's queue fills, its thread exists
            base = snapshot(pid, echo_upstream)
            await round_(1500)
            mid = snapshot(pid, echo_upstream)
            await round_(1500)
            after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
            print(f"tracing to a closed port, 2 x 1500 requests + 30 reloads: {base} -> {mid} "
                  f"-> {after}")
            assert within(after, base, SLACK), (base, after)
            assert after["rss_kb"] < base["rss_kb"] + 8_000


async def test_clients_pipelining_megabytes_without_reading_hold_bounded_memory(tmp_path,
                                                                              redis_url,
                                                                              echo_upstream):
    """Eight connections each pipeline 4 MB of requests (~100k each) and never read an answer:
    keygate stops reading them instead of parsing every request into memory; when they go,
    everything is freed."""
    async with served(tmp_path, redis_url, echo_upstream) as gw:
        pid = gw.proc.pid
        base = snapshot(pid, echo_upstream)
        one = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
        block = one * ((1 << 20) // len(one))
        peak = dict(base)
        writers = []
        sent = [0] * 8

        async def flood(i: int) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            writers.append(writer)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                for _ in range(4):
                    writer.write(block)
                    await asyncio.wait_for(writer.drain(), 3)
                    sent[i] += len(block)

        floods = asyncio.gather(*(flood(i) for i in range(8)))
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:   # while they send, and 3 s after
            now = snapshot(pid, echo_upstream)
            peak = {k: max(peak[k], now[k]) for k in now}
            await asyncio.sleep(0.2)
            if floods.done() and deadline - time.monotonic() > 3:
                deadline = time.monotonic() + 3
        await floods
        for writer in writers:
            rst(writer)
        await asyncio.sleep(1)
        after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
        print(f"8 connections pipelining {sum(sent) / 1e6:.0f} MB without reading: baseline "
              f"{base}, peak {peak}, after {after}")
        assert peak["rss_kb"] < base["rss_kb"] + 60_000, (base, peak)
        assert within(after, base, SLACK), (base, after)


async def test_the_embedded_redis_killed_repeatedly_under_load_leaves_no_zombie_or_fd(
        tmp_path, echo_upstream):
    """The default store (``embedded``): its redis-server killed four times while requests run;
    keygate starts it again each time. Afterwards one redis-server child, no zombie, and
    keygate's fds, threads and the server's clients are where they were."""
    import redis
    from served import alive, children_of, embedded_pid, short_data_dir
    data_dir = short_data_dir()
    async with served(tmp_path, "embedded", echo_upstream, store={"data_dir": data_dir}) as gw, \
            ClientSession(timeout=TIMEOUT) as s:
        token, = await workspace_key(s, gw)
        await warm(s, gw, token)
        pid = gw.proc.pid
        headers = {"Authorization": f"Bearer {token}"}

        def clients() -> int:
            with redis.Redis(unix_socket_path=str(Path(data_dir, "redis.sock")),
                             socket_timeout=2) as probe:
                return len([c for c in probe.client_list(_type="normal")
                            if c["cmd"] != "client|list"])

        base, base_clients = snapshot(pid, echo_upstream), clients()
        stop = asyncio.Event()
        tally: dict[int, int] = {}

        async def load(churner: ClientSession) -> None:
            while not stop.is_set():
                async with churner.get(gw.proxy + "/people/1", headers=headers) as r:
                    await r.read()
                    tally[r.status] = tally.get(r.status, 0) + 1

        async with ClientSession(timeout=TIMEOUT) as churner:
            loaders = [asyncio.ensure_future(load(churner)) for _ in range(8)]
            try:
                for _ in range(4):
                    before = embedded_pid(data_dir)
                    os.kill(before, signal.SIGKILL)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        with contextlib.suppress(OSError, ValueError):
                            if embedded_pid(data_dir) != before and clients() >= 0:
                                break
                    await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.gather(*loaders)
        async with s.get(gw.proxy + "/people/1", headers=headers) as r:
            assert r.status == 200
        await asyncio.sleep(1)
        after = await settled(pid, base, SLACK, pooled_to=echo_upstream)
        kids = children_of(pid)
        now_clients = clients()
        print(f"embedded redis killed x4 under load ({tally}): baseline {base}, after {after}; "
              f"children {kids}; server clients {base_clients} -> {now_clients}")
        assert kids == {embedded_pid(data_dir)} and all(alive(k) for k in kids), kids
        assert within(after, base, SLACK), (base, after, describe_sockets(pid))
        assert now_clients <= base_clients
