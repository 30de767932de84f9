"""The per-request store round trip, against a real redis-server."""

from __future__ import annotations

import asyncio
import math
import socket
import contextlib
import os
import re
import signal
import time

import pytest
import redis

from gateway.errors import StoreError
from gateway.store.request import OWN_CALLS_RATE, RequestStore
from gateway.store.resp import RespClient, RespError
from gateway.store import key_key, usage_key, ws_key
from harness import eventually

NOW_MS = 1_795_000_000_000  # 2026-11-18


def seed(url: str, key_rev: int = 1, ws_rev: int = 1) -> None:
    r = redis.Redis.from_url(url)
    r.hset(key_key("acme", "k1"), mapping={"id": "k1", "rev": key_rev})
    r.hset(ws_key("acme"), mapping={"id": "acme", "rev": ws_rev, "plan": "pro"})


async def authorize(store: RequestStore, **kw):
    args = dict(workspace="acme", key_id="k1", key_rev=1, ws_rev=1, count=True,
                rate_limit=0, rate_period_ms=1000, monthly_limit=None, period="2026-11",
                counter_ttl=3600, now_ms=NOW_MS)
    args.update(kw)
    args.setdefault("budget", args["key_id"])
    return await store.authorize(**args)


async def test_resp_client_round_trips_and_pipelines(redis_url):
    client = RespClient(redis_url)
    replies = await asyncio.gather(*(client.call("INCR", "n") for _ in range(100)))
    assert sorted(replies) == list(range(1, 101))
    assert await client.call("GET", "n") == b"100"
    with pytest.raises(RespError):
        await client.call("HGET", "n", "x")  # WRONGTYPE
    assert await client.call("PING") == b"PONG"  # the connection survives an error reply
    await client.close()


async def test_every_caller_gets_its_own_reply_however_calls_meet_on_the_connection(redis_url):
    """A call made while nothing is in flight is written at once; calls made while replies are
    awaited go out together at the end of the loop's turn. Mixed across turns, each caller
    must still get the reply to its own command."""
    client = RespClient(redis_url)

    async def caller(i: int) -> bytes:
        for _ in range(i % 4):          # start on different loop turns
            await asyncio.sleep(0)
        return await client.call("ECHO", f"reply-{i}")

    for _ in range(3):
        replies = await asyncio.gather(*(caller(i) for i in range(200)))
        assert replies == [f"reply-{i}".encode() for i in range(200)]
        assert await client.call("ECHO", "alone") == b"alone"   # nothing in flight now
    await client.close()


async def test_resp_client_reports_unreachable_store_and_reconnects(own_redis):
    client = RespClient(own_redis.url, timeout=0.5, connect_timeout=0.5)
    assert await client.call("PING") == b"PONG"
    own_redis.stop()
    with pytest.raises(ConnectionError):
        await client.call("PING")
    own_redis.start()
    assert await client.call("PING") == b"PONG"
    await client.close()


async def test_stale_when_key_or_workspace_revision_moved(redis_url):
    seed(redis_url, key_rev=2, ws_rev=1)
    store = RequestStore(redis_url)
    assert (await authorize(store)).outcome == "stale"
    assert (await authorize(store, key_rev=2)).outcome == "ok"
    assert (await authorize(store, key_rev=2, ws_rev=7)).outcome == "stale"
    assert (await authorize(store, key_id="gone", key_rev=2)).outcome == "stale"
    await store.close()


async def test_quota_is_exact_under_concurrency_and_refusals_count_nothing(redis_url):
    seed(redis_url)
    store = RequestStore(redis_url)
    decisions = await asyncio.gather(*(authorize(store, monthly_limit=50) for _ in range(150)))
    assert sum(d.outcome == "ok" for d in decisions) == 50
    assert sum(d.outcome == "quota" for d in decisions) == 100
    r = redis.Redis.from_url(redis_url)
    assert r.get(usage_key("acme", "2026-11")) == b"50"
    assert 0 < r.ttl(usage_key("acme", "2026-11")) <= 3600
    await store.close()


async def test_check_mode_counts_nothing(redis_url):
    seed(redis_url)
    store = RequestStore(redis_url)
    await authorize(store)
    d = await authorize(store, count=False)
    assert d.outcome == "ok" and d.month_used == 1
    assert redis.Redis.from_url(redis_url).get(usage_key("acme", "2026-11")) == b"1"
    await store.close()


async def test_counter_regains_a_lost_expiry(redis_url):
    seed(redis_url)
    redis.Redis.from_url(redis_url).set(usage_key("acme", "2026-11"), 5)  # no TTL
    store = RequestStore(redis_url)
    await authorize(store)
    assert redis.Redis.from_url(redis_url).ttl(usage_key("acme", "2026-11")) > 0
    await store.close()


async def test_rate_limit_admits_n_per_window_and_says_when_to_retry(redis_url):
    seed(redis_url)
    store = RequestStore(redis_url)
    t0 = NOW_MS - NOW_MS % 1000
    got = [await authorize(store, rate_limit=5, now_ms=t0 + i) for i in range(8)]
    assert [d.outcome for d in got] == ["ok"] * 5 + ["rate"] * 3
    assert [d.rate_remaining for d in got[:5]] == [4, 3, 2, 1, 0]
    assert 0 < got[5].retry_after_ms <= 1000
    # a rate-limited request is not counted against the month
    assert redis.Redis.from_url(redis_url).get(usage_key("acme", "2026-11")) == b"5"
    # over a steady 3 s, about 5/s get through
    admitted = 0
    for step in range(300):
        d = await authorize(store, rate_limit=5, now_ms=t0 + 1000 + step * 10)
        admitted += d.outcome == "ok"
    assert admitted == 15
    await store.close()


async def test_a_per_minute_rate_with_a_cap_per_second_holds_both_windows(redis_url):
    """A key's own rate and its workspace's that neither is within the other (5/m and 2/s)
    are both in force: at most 2 in any second, 5 in any minute; r counts what is left
    before either is full, and a refusal says when its own window frees one."""
    seed(redis_url)
    store = RequestStore(redis_url)
    t0 = NOW_MS - NOW_MS % 1000

    async def at(ms: int, **kw):
        return await authorize(store, **{"rate_limit": 5, "rate_period_ms": 60000,
                                         "rate_burst": 2, "now_ms": t0 + ms, **kw})

    got = [await at(i) for i in range(3)]
    assert [(d.outcome, d.rate_remaining) for d in got] == [("ok", 1), ("ok", 0), ("rate", 0)]
    assert got[2].retry_after_ms == 998  # the first of this second leaves it then
    assert got[1].window_reset_ms == 999
    peeked = await at(500, count=False, peek=True)
    assert (peeked.outcome, peeked.rate_remaining) == ("rate", 0)
    got = [await at(1001 + i) for i in range(3)]  # a second after the first two
    assert [(d.outcome, d.rate_remaining) for d in got] == [("ok", 1), ("ok", 0), ("rate", 0)]
    d = await at(2002)
    assert (d.outcome, d.rate_remaining, d.window_reset_ms) == ("ok", 0, 57998)  # 5th
    d = await at(3000)
    assert d.outcome == "rate" and d.retry_after_ms == 57000  # the minute's 5 are used
    assert (await at(60000)).outcome == "ok"  # the first left the minute
    # without a cap per second: 5 at once, as before
    r = redis.Redis.from_url(redis_url)
    r.delete(*r.keys("kg:rate:*"))
    got = [await at(200000 + i, rate_burst=0) for i in range(6)]
    assert [d.outcome for d in got] == ["ok"] * 5 + ["rate"]
    await store.close()


async def test_a_log_fuller_than_a_lowered_limit_says_when_one_more_is_admitted(redis_url):
    """A rate (or its cap per second) lowered while the key's log holds more than the new
    bound (a plan downgrade, a key's rate PATCHed, a reload): a refusal's retry is when enough
    have left the window that one more fits, not when the oldest leaves it, which was too
    early (a client that waited that long was refused again, and again)."""
    seed(redis_url)
    store = RequestStore(redis_url)
    t0 = NOW_MS - NOW_MS % 1000
    minute = {"rate_period_ms": 60000}
    for i in range(10):  # 10/m: one every 5 s, t = 0 .. 45 s
        d = await authorize(store, rate_limit=10, now_ms=t0 + i * 5000, **minute)
        assert d.outcome == "ok"
    # now 2/m at t = 50 s: the 9th (t = 40 s, index 10 - 2) must leave first, at t = 100 s
    d = await authorize(store, rate_limit=2, now_ms=t0 + 50000, **minute)
    assert (d.outcome, d.retry_after_ms, d.window_reset_ms) == ("rate", 50000, 50000)
    d = await authorize(store, rate_limit=2, now_ms=t0 + 99999, **minute)
    assert (d.outcome, d.retry_after_ms) == ("rate", 1)
    assert (await authorize(store, rate_limit=2, now_ms=t0 + 100000, **minute)).outcome == "ok"

    # a cap per second lowered from 5/s to 2/s with 5 in the last second (t = 200.0 .. 200.4
    # s): one more fits once the 4th (index 5 - 2, t = 200.3 s) leaves it, at t = 201.3 s
    burst = {"rate_limit": 50, "rate_period_ms": 60000, "now_ms": t0 + 200000}
    for i in range(5):
        burst["now_ms"] = t0 + 200000 + i * 100
        assert (await authorize(store, rate_burst=5, **burst)).outcome == "ok"
    burst["now_ms"] = t0 + 200500
    d = await authorize(store, rate_burst=2, **burst)
    assert (d.outcome, d.retry_after_ms, d.window_reset_ms) == ("rate", 800, 800)
    burst["now_ms"] = t0 + 201299
    assert (await authorize(store, rate_burst=2, **burst)).outcome == "rate"
    burst["now_ms"] = t0 + 201300
    assert (await authorize(store, rate_burst=2, **burst)).outcome == "ok"
    await store.close()


async def test_store_down_is_a_store_error(own_redis):
    seed(own_redis.url)
    store = RequestStore(own_redis.url, timeout=0.5)
    assert (await authorize(store)).outcome == "ok"
    own_redis.stop()
    with pytest.raises(StoreError):
        await authorize(store)
    await store.close()


async def test_authorize_survives_a_script_flush(redis_url):
    seed(redis_url)
    store = RequestStore(redis_url)
    assert (await authorize(store)).outcome == "ok"
    redis.Redis.from_url(redis_url).script_flush()  # e.g. a Redis restart or failover
    assert (await authorize(store)).outcome == "ok"
    assert (await authorize(store)).month_used == 3
    await store.close()


# --- RespClient: failure shapes that must not hang, leak or shift replies ---------------------

async def fake_redis(answer):
    """A loopback server running ``answer(reader, writer)`` per connection: only for the
    shapes a real redis-server cannot be made to send (a reply then a close, not RESP)."""
    conns: list[asyncio.StreamWriter] = []

    async def run(reader, writer):
        conns.append(writer)
        await answer(reader, writer)
    srv = await asyncio.start_server(run, "127.0.0.1", 0)
    srv.conns = conns
    return srv, srv.sockets[0].getsockname()[1]


def own_connections(url: str) -> int:
    """Connections to the redis-server other than the one asking (closed after asking: an
    unclosed client would stay connected until collected, and be counted by the next ask)."""
    with redis.Redis.from_url(url) as asker:
        return len(asker.client_list()) - 1


@contextlib.contextmanager
def stopped(server):
    """A real redis-server frozen (SIGSTOP): it accepts connections (the kernel does) and
    answers nothing until it is continued, on leaving."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def connections_received(asker: redis.Redis) -> int:
    return asker.info("stats")["total_connections_received"]


async def test_resp_auth_timeout_is_a_connection_error_and_closes_the_socket(own_redis):
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    asker = redis.Redis(port=own_redis.port, password="s3cret")

    def clients() -> set[str]:
        return {c["id"] for c in asker.client_list()}
    before = clients()
    client = RespClient(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0", timeout=0.3,
                        connect_timeout=0.3)
    with stopped(own_redis):  # never answers AUTH
        with pytest.raises(ConnectionError):
            await client.call("PING")
    # the stuck connection was not left open: Redis, continued, sees it closed
    assert await eventually(lambda: clients() == before, timeout=3), asker.client_list()
    await client.close()


async def test_resp_connection_lost_right_after_connect_fails_the_call_not_hangs():
    async def ok_then_close(reader, writer):
        await reader.readuntil(b"\r\n")
        writer.write(b"+OK\r\n")
        writer.close()
    srv, port = await fake_redis(ok_then_close)
    client = RespClient(f"redis://:pw@127.0.0.1:{port}/0", timeout=0.5, connect_timeout=0.5)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(client.call("PING"), 3)
    await client.close()
    srv.close()


async def test_resp_cancelled_caller_during_connect_leaks_no_connection(own_redis):
    # a server of its own: the shared one's other clients (other tests' closing ones) would
    # be counted too
    client = RespClient(own_redis.url)
    first = client.call("PING")
    await asyncio.sleep(0)
    first.cancel()
    assert await client.call("PING") == b"PONG"
    assert await client.call("PING") == b"PONG"
    # Redis forgets a closed connection once it has read the close: waited for (a fixed
    # 0.05 s could end first on a loaded machine); a leaked one never goes
    assert await eventually(lambda: own_connections(own_redis.url) == 1), \
        own_connections(own_redis.url)
    await client.close()


async def test_resp_close_during_connect_leaves_nothing_open(own_redis):
    client = RespClient(own_redis.url)
    pending = client.call("PING")
    await asyncio.sleep(0)
    await client.close()
    with pytest.raises(ConnectionError):
        await pending
    # as above: until Redis has read the close (not a fixed 0.1 s); a leaked one never goes
    assert await eventually(lambda: own_connections(own_redis.url) == 0), \
        own_connections(own_redis.url)
    assert client._watchdog is None
    assert await client.call("PING") == b"PONG"   # usable again, like after any loss
    await client.close()


async def test_resp_cancelled_waiters_do_not_shift_replies(redis_url):
    client = RespClient(redis_url)
    await client.call("MSET", "a", "1", "b", "2", "c", "3")
    for _ in range(3):
        fa, fb, fc = client.call("GET", "a"), client.call("GET", "b"), client.call("GET", "c")
        fb.cancel()
        assert await fa == b"1" and await fc == b"3"
        assert await client.call("GET", "b") == b"2"
    await client.close()


async def test_resp_stuck_redis_fails_calls_in_flight_then_reconnects(own_redis):
    asker = redis.Redis.from_url(own_redis.url)  # one connection, made before
    before = connections_received(asker)
    client = RespClient(own_redis.url, timeout=0.3, connect_timeout=0.3)
    with stopped(own_redis):
        calls = [client.call("PING") for _ in range(5)]
        for call in calls:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(call, 3)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(client.call("PING"), 3)
    await client.close()
    # one reconnect for the next call, no more (the asker's own connection is reused)
    await eventually(lambda: connections_received(asker) - before >= 2, timeout=3)
    assert connections_received(asker) - before == 2


async def test_resp_commands_waiting_on_a_stalled_redis_are_bounded(own_redis):
    client = RespClient(own_redis.url, timeout=5, max_pending=50)
    with stopped(own_redis):
        first = client.call("PING")
        await asyncio.sleep(0.05)  # connected, the first command is waiting
        queued = [client.call("PING") for _ in range(49)]
        with pytest.raises(ConnectionError, match="already waiting"):
            await client.call("PING")
        await client.close()
        for fut in [first, *queued]:
            with pytest.raises(ConnectionError):
                await fut


def _stall(seconds: float) -> None:
    """The event loop stops for ``seconds`` (what a gen-2 GC pause of a big heap, or a process
    starved of CPU, does to it) while Redis itself stays quick."""
    time.sleep(seconds)


async def test_resp_a_loop_stall_between_call_and_send_is_not_a_late_redis(redis_url):
    """A command waits for the next loop pass to be written. A stall before that pass made
    the watchdog, which ran in the same pass as the write, count the stall as Redis's
    time: every call on the connection failed with 'Redis did not answer in time' (a whole
    burst of self-service creates answered 503 after ~0.5 s while Redis was healthy)."""
    client = RespClient(redis_url, timeout=0.2)
    assert await client.call("PING") == b"PONG"  # connected, the watchdog armed
    calls = [client.call("PING") for _ in range(50)]
    _stall(0.4)  # in the same step as the calls: they are not written yet
    assert await asyncio.wait_for(asyncio.gather(*calls), 3) == [b"PONG"] * 50
    await client.close()


def test_resp_a_loop_stall_after_send_is_not_a_late_redis(redis_url):
    """Written, then the loop stalled in an I/O callback (a GC pause can land anywhere)
    before Redis's quick reply was read, and the watchdog's check came due meanwhile. uvloop
    (what ``serve`` runs) runs due timers before it polls sockets, so the check runs first
    thing after the stall: it must let the loop read what arrived before it judges Redis
    late, else every call in flight fails while Redis is healthy."""
    uvloop = pytest.importorskip("uvloop")
    import redis as sync_redis

    async def main() -> None:
        client = RespClient(redis_url, timeout=0.2)
        assert await client.call("PING") == b"PONG"
        loop = asyncio.get_running_loop()
        proto = client._proto
        rsock, wsock = socket.socketpair()
        written: list[bool] = []

        def stall_in_io() -> None:  # in the poll right after the PING is written
            rsock.recv(1)
            written.append(proto.waiting[0][1][0] != math.inf)  # the PING's write time
            _stall(0.4)  # the reply arrives meanwhile; the watchdog's check comes due
        loop.add_reader(rsock, stall_in_io)
        # Redis answers 60 ms late (well within the 0.2 s timeout): the reply surely arrives
        # during the stall, not before the poll that runs it
        sync_redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "60")
        try:
            call = client.call("PING")
            # the client writes the PING at once (nothing else is in flight); this comes two
            # turns later, so the socket pair is readable in a poll after the write
            loop.call_soon(loop.call_soon, wsock.send, b"x")
            assert await asyncio.wait_for(call, 3) == b"PONG"
        finally:
            loop.remove_reader(rsock)
            rsock.close()
            wsock.close()
        assert written == [True]  # the stall did come between the write and the read
        assert client._proto is proto and not proto.closed
        await client.close()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_resp_a_late_redis_is_still_caught_after_a_loop_stall(own_redis):
    """The watchdog still fails calls Redis did not answer, stall or not."""
    client = RespClient(own_redis.url, timeout=0.2, connect_timeout=0.3)
    assert await client.call("PING") == b"PONG"
    with stopped(own_redis):
        call = client.call("PING")
        _stall(0.4)
        with pytest.raises(ConnectionError, match="in time"):
            await asyncio.wait_for(call, 3)
    await client.close()


async def test_resp_logs_in_as_redis_py_does_for_the_same_url(own_redis):
    """The lean client's login is redis-py's for the same URL (README, Store: both clients
    read the URL alike). redis-py 8 speaks RESP3 unless the URL says ``protocol=2``: a password
    without a user name goes as ``HELLO 3 AUTH default <password>``, which a Redis whose
    default user has no password (``nopass``) accepts; the lean client sent the legacy
    ``AUTH <password>``, which that Redis refuses ("called without any password configured"),
    so ``config check`` passed a file ``serve`` could not start with. Each URL must log in on
    both clients or on neither, with and without ``requirepass``."""
    port = own_redis.port
    base = f"127.0.0.1:{port}/0"
    admin = redis.Redis(port=port)
    admin.acl_setuser("app", enabled=True, passwords=["+app-pw"], commands=["+@all"],
                      keys=["*"])
    admin.close()

    async def logs_in(url: str) -> tuple[bool, bool]:
        with redis.Redis.from_url(url, socket_timeout=2) as by_redis_py:
            try:
                by_redis_py.ping()
                redis_py = True
            except redis.RedisError:
                redis_py = False
        client = RespClient(url, timeout=2, connect_timeout=2)
        try:
            lean = await client.call("PING") == b"PONG"
        except (ConnectionError, RespError):
            lean = False
        finally:
            await client.close()
        return redis_py, lean

    expected = {  # the default user without a password
        f"redis://:not-needed@{base}": True,
        f"redis://:not-needed@{base}?protocol=3": True,
        f"redis://:not-needed@{base}?protocol=2": False,  # redis-py's legacy AUTH <password>
        f"redis://{base}": True,
        f"redis://app:app-pw@{base}": True,
        f"redis://app:app-pw@{base}?protocol=2": True,
        f"redis://app:wrong@{base}": False,
    }
    for url, works in expected.items():
        assert await logs_in(url) == (works, works), url
    redis.Redis(port=port).config_set("requirepass", "s3cret")
    expected = {  # the default user with requirepass
        f"redis://:s3cret@{base}": True,
        f"redis://:s3cret@{base}?protocol=2": True,
        f"redis://default:s3cret@{base}": True,
        f"redis://:wrong@{base}": False,
        f"redis://:wrong@{base}?protocol=2": False,
        f"redis://{base}": False,
        f"redis://app:app-pw@{base}": True,
    }
    for url, works in expected.items():
        assert await logs_in(url) == (works, works), url


def lean_socket(client: RespClient) -> socket.socket:
    return client._proto.transport.get_extra_info("socket")


def keepalive_of(sock) -> tuple[int, ...]:
    """SO_KEEPALIVE and, when on, the TCP keepalive settings of ``sock``."""
    on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    tuning = tuple(sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                   for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
                   if hasattr(socket, name)) if on else ()
    return (int(on), *tuning)


@pytest.mark.parametrize("query", ["?socket_keepalive=true", "?socket_keepalive=false", ""])
async def test_resp_socket_keepalive_of_the_url_is_honoured_as_by_redis_py(own_redis, query):
    """``?socket_keepalive=true`` (accepted by ``check_store_url``): redis-py sets SO_KEEPALIVE
    (and its TCP keepalive settings: idle 30 s, probes 5 s apart, 3 of them) on its
    connections, by default too; the lean per-request client ignored the option and set
    nothing (SPEC, Store: every part of the gateway, per-request path alike, honours every
    option), so a Redis gone without a word (a NAT or firewall dropping the connection) was
    found only by the store timeout of a call."""
    from gateway.redis_urls import check_store_url, standalone_client
    url = f"redis://127.0.0.1:{own_redis.port}/0{query}"
    check_store_url(url)
    admin = standalone_client(url, timeout=2, decode_responses=False)
    try:
        await admin.ping()
        conn = admin.connection_pool._available_connections[0]
        by_redis_py = keepalive_of(conn._writer.transport.get_extra_info("socket"))
    finally:
        await admin.aclose()
    assert by_redis_py[0] == (query != "?socket_keepalive=false"), by_redis_py
    lean = RespClient(url, timeout=2)
    try:
        assert await lean.call("PING") == b"PONG"
        assert keepalive_of(lean_socket(lean)) == by_redis_py, \
            f"the per-request connection does not honour {query!r} as redis-py does"
        lean._proto.abort(ConnectionError("gone"))  # and its next connection alike
        assert await lean.call("PING") == b"PONG"
        assert keepalive_of(lean_socket(lean)) == by_redis_py
    finally:
        await lean.close()


async def test_resp_reconnect_sends_auth_and_select_again(own_redis):
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin = redis.Redis(port=own_redis.port, password="s3cret", db=3)
    admin.set("where", "db3")
    client = RespClient(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3", timeout=1)
    assert await client.call("GET", "where") == b"db3"
    admin.client_kill_filter(_type="normal", skipme=True)   # Redis drops our connection
    await asyncio.sleep(0.05)
    assert client._proto is None           # the loss was noticed
    assert await client.call("GET", "where") == b"db3"   # reconnected: AUTH, SELECT 3
    await client.close()


@pytest.mark.parametrize("scheme", ["REDIS", "Redis", "rEdIs"])
async def test_the_per_request_store_takes_an_upper_case_scheme_as_redis_py_does(redis_url,
                                                                                  scheme):
    """``REDIS://`` is ``redis://`` (RFC 3986: schemes are case-insensitive; redis-py and
    ``check_store_url`` read it so): the per-request store took it for a topology URL."""
    from gateway.store.clients import LeanClient
    url = scheme + redis_url[len("redis"):]
    store = RequestStore(url, timeout=2)
    try:
        assert isinstance(store._resp, LeanClient)
        await store.ready()
    finally:
        await store.close()


async def silent_server() -> tuple[asyncio.AbstractServer, int]:
    """A TCP listener that accepts and never says a word (a TLS terminator that hangs, a
    half-dead node): a TLS handshake to it never completes."""
    async def hold(reader, writer):
        await reader.read()
    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("query, bound", [("", 0.3), ("&socket_connect_timeout=0.5", 0.5)])
async def test_store_timeout_bounds_the_per_request_connect_as_it_bounds_the_admin_one(
        query, bound):
    """settings: ``store.timeout`` is the "seconds per store call before it counts as down";
    the admin path's redis-py client is given it as ``socket_connect_timeout`` too. The lean
    per-request client kept RespClient's default connect timeout of 2.0 s (clients.connect
    passed only ``timeout``), so with ``store.timeout: 0.3`` a request to a store whose TLS
    handshake hangs waited 2 s for its 503, ~7x what the operator set. A URL's own
    ``socket_connect_timeout`` wins, as on the admin path."""
    from gateway.redis_urls import check_store_url, standalone_client
    server, port = await silent_server()
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none{query}"
    check_store_url(url)
    try:
        admin = standalone_client(url, timeout=0.3, decode_responses=False)
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            await admin.ping()
        admin_took = time.monotonic() - started
        await admin.aclose()

        store = RequestStore(url, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.ready()
        lean_took = time.monotonic() - started
        await store.close()
        assert admin_took < bound + 0.5, admin_took
        assert bound - 0.05 <= lean_took < bound + 0.5, (
            f"per-request connect gave up after {lean_took:.2f} s, admin after "
            f"{admin_took:.2f} s; store.timeout is 0.3 s, the URL {query or 'gives none'}")
    finally:
        server.close()


async def test_resp_garbage_from_the_server_fails_calls_cleanly(caplog):
    async def garbage(reader, writer):
        await reader.readuntil(b"\r\n")
        writer.write(b"\x00\x01not resp at all\r\n")
        await writer.drain()
        await reader.read()
    srv, port = await fake_redis(garbage)
    client = RespClient(f"redis://127.0.0.1:{port}", timeout=1)
    with pytest.raises(ConnectionError, match="malformed"):
        await asyncio.wait_for(client.call("PING"), 3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    await client.close()
    srv.close()


async def test_resp_close_right_after_the_connection_is_made_leaves_nothing_open(own_redis):
    client = RespClient(own_redis.url)
    pending = client.call("PING")
    task = client._connecting
    while not (task is not None and task.done()):   # connected, outcome not yet recorded
        await asyncio.sleep(0)
        task = task or client._connecting
    await client.close()
    with pytest.raises(ConnectionError):
        await pending
    # until Redis has read the close (not a fixed 0.05 s); a leaked connection never goes
    assert await eventually(lambda: own_connections(own_redis.url) == 0), \
        own_connections(own_redis.url)
    assert client._watchdog is None


from hypothesis import given, strategies as st  # noqa: E402


@given(st.lists(st.one_of(st.integers(min_value=-2**63, max_value=2**63),
                          st.text(max_size=40), st.binary(max_size=20),
                          st.floats(allow_nan=False, allow_infinity=False), st.booleans()),
                max_size=14))
def test_every_command_is_encoded_as_redis_reads_it(args):
    """The hot path's fast encoding (ASCII str and int) and the general one (bytes, floats,
    non-ASCII text) give the RESP bytes Redis parses back into the same arguments."""
    import hiredis

    from gateway.store.resp import _encode

    data = _encode(tuple(args))
    reader = hiredis.Reader()
    reader.feed(data)
    parsed = reader.gets()
    expected = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert parsed == expected
    assert reader.gets() is False   # nothing left over


async def test_resp_a_call_given_up_on_still_hears_its_late_reply(redis_url):
    """Redis ran the call and its reply came after the timeout: the caller got TimedOut at
    the timeout, and its ``late`` future gets the reply when it comes; the connection,
    retired meanwhile, closes once every late reply is in."""
    from harness import HeldReplies
    from gateway.store.resp import TimedOut
    async with HeldReplies(redis_url) as relay:
        client = RespClient(relay.url, timeout=0.2)
        assert await client.call("PING") == b"PONG"
        relay.hold()
        calls = [client.call("INCR", "late"), client.call("HGET", "late", "x")]
        late = []
        for call in calls:
            with pytest.raises(TimedOut) as raised:
                await asyncio.wait_for(call, 3)
            late.append(raised.value.late)
        relay.release()
        assert await asyncio.wait_for(late[0], 3) == 1   # Redis did run it
        assert isinstance(await asyncio.wait_for(late[1], 3), RespError)  # WRONGTYPE
        assert await client.call("GET", "late") == b"1"  # on a new connection
        assert await eventually(lambda: not client._retired)
        await client.close()


async def test_resp_a_long_pause_leaves_no_pile_of_retired_connections(own_redis):
    """Each timeout during a pause makes a new connection; those Redis never answered on are
    closed once their calls are past any deadline, so a long pause holds a few sockets,
    not one per timeout."""
    client = RespClient(own_redis.url, timeout=0.2, connect_timeout=0.2)
    assert await client.call("PING") == b"PONG"
    with stopped(own_redis):
        for _ in range(10):  # ~2.5 s of calls timing out, one after another
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(client.call("PING"), 3)
        assert len(client._retired) <= 3
    assert await client.call("PING") == b"PONG"
    assert await eventually(lambda: not client._retired and own_connections(own_redis.url) == 1)
    await client.close()


@given(st.tuples(*[st.one_of(st.text(max_size=30), st.text(alphabet="0123456789:-abc"),
                             st.integers(), st.binary(max_size=10))] * 4))
def test_the_unrolled_encoding_of_the_authorize_arguments_is_the_general_one(args):
    """The authorize call's four varying arguments go through an unrolled format when they are
    all str; whatever they are (non-ASCII text, int, bytes), the bytes are _bulk's."""
    from gateway.store.resp import _bulk, _bulk_str4

    assert _bulk_str4(args) == _bulk(args)


def test_resp_a_command_to_an_idle_connection_goes_out_before_the_loop_turn_ends():
    """A call made while none of ours is in Redis is written at once: Redis works on it while
    the loop goes on with the rest of its turn (the other requests read with this one). Calls
    made while a reply is awaited go out together when the turn ends. The server is a thread,
    so it sees when the bytes arrive while the loop is busy."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    arrivals: list[tuple[float, bytes]] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                arrivals.append((time.monotonic(), data))
                conn.sendall(b"".join(  # each command's reply, in order
                    b"+PONG\r\n" if cmd == b"PING" else b"*2\r\n$10\r\n1700000000\r\n$1\r\n0\r\n"
                    for cmd in re.findall(rb"PING|TIME", data)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> float:
        client = RespClient(f"redis://127.0.0.1:{port}/0", timeout=5)
        assert await client.call("PING") == b"PONG"  # connected; TIME answered too
        await asyncio.sleep(0.1)
        arrivals.clear()
        calls = [client.call("PING") for _ in range(3)]
        time.sleep(0.3)  # the rest of this loop turn
        turn_ended = time.monotonic()
        assert await asyncio.gather(*calls) == [b"PONG"] * 3
        await client.close()
        return turn_ended

    try:
        turn_ended = asyncio.run(main())
    finally:
        listener.close()
        thread.join(5)
    first, *rest = arrivals
    assert first[1].count(b"PING") == 1 and first[0] < turn_ended - 0.2, arrivals
    assert rest and all(at >= turn_ended for at, _ in rest), arrivals
    assert sum(data.count(b"PING") for _, data in rest) == 2


async def test_url_timeouts_and_client_name_hold_on_the_per_request_path_too(own_redis):
    """SPEC: every part honours every URL option with redis-py's semantics, where the URL's
    options win over the client's arguments. The admin path (redis-py) took socket_timeout,
    socket_connect_timeout and client_name from the URL; the per-request client ignored
    them: a store.timeout of 5 s held requests 5 s against a frozen Redis whose URL said 0.3,
    and its connection was unnamed in CLIENT LIST."""
    from gateway.redis_urls import standalone_client
    url = (f"redis://127.0.0.1:{own_redis.port}/0?socket_timeout=0.3"
           "&socket_connect_timeout=0.4&client_name=kg-edge")
    store = RequestStore(url, timeout=5.0)
    admin = standalone_client(url, timeout=5.0, decode_responses=True)
    asker = redis.Redis(port=own_redis.port, decode_responses=True)
    try:
        await store.ready()
        await admin.ping()
        names = sorted(c["name"] for c in asker.client_list() if c["name"])
        assert names == ["kg-edge", "kg-edge"], asker.client_list()
        with stopped(own_redis):
            for call in (store.failure_counts("198.51.100.7", "abc123def456"),
                         admin.get("x")):
                started = time.monotonic()
                with pytest.raises(Exception):
                    await call
                assert time.monotonic() - started < 2.0  # the URL's 0.3 s, not 5 s
    finally:
        await store.close()
        await admin.aclose()


async def test_a_call_to_keygates_own_endpoints_reads_no_counter(own_redis):
    """Mode "spend" (a key's /_keygate/ calls, within OWN_CALLS_RATE) judges no quota and
    answers no RateLimit fields: its script reads neither the month counter nor the key's,
    admitted or over the bound."""
    seed(own_redis.url)
    r = redis.Redis.from_url(own_redis.url)
    store = RequestStore(own_redis.url)
    try:
        r.config_resetstat()
        for _ in range(OWN_CALLS_RATE[0] + 1):
            d = await authorize(store, count=False, spend=True, monthly_limit=1000,
                                key_limit=100, rate_limit=5)
        assert d.outcome == "rate" and d.retry_after_ms > 0
        stats = r.info("commandstats")
        assert stats["cmdstat_zadd"]["calls"] == OWN_CALLS_RATE[0]
        assert "cmdstat_get" not in stats, stats.get("cmdstat_get")
    finally:
        await store.close()
        r.close()


async def test_a_busy_key_stamps_last_used_at_once_a_second_and_never_back(own_redis):
    """last_used_at is shown to the second: a key's requests within one second write it once
    (one write a second per busy key in Redis's AOF and replication stream, not one a request),
    it holds the second of the latest request, and a replica whose clock is a little behind
    never moves it back."""
    seed(own_redis.url)
    r = redis.Redis.from_url(own_redis.url)
    store = RequestStore(own_redis.url)
    key = key_key("acme", "k1")
    try:
        r.config_resetstat()
        for i in range(50):  # within one second
            assert (await authorize(store, now_ms=NOW_MS + 10 * i)).outcome == "ok"
        assert r.hget(key, "last_used_at") == str(NOW_MS // 1000).encode()
        assert r.info("commandstats")["cmdstat_hset"]["calls"] == 1
        await authorize(store, now_ms=NOW_MS + 1500)  # the next second
        assert r.hget(key, "last_used_at") == str(NOW_MS // 1000 + 1).encode()
        await authorize(store, now_ms=NOW_MS + 200)  # a replica 1.3 s behind
        assert r.hget(key, "last_used_at") == str(NOW_MS // 1000 + 1).encode()
        await authorize(store, count=False, stamp=True, now_ms=NOW_MS + 3000)  # an admin call
        assert r.hget(key, "last_used_at") == str(NOW_MS // 1000 + 3).encode()
        assert r.info("commandstats")["cmdstat_hset"]["calls"] == 3
        r.hset(key, "last_used_at", f"{NOW_MS / 1000 + 4:.3f}")  # as stored before, with ms
        await authorize(store, now_ms=NOW_MS + 4200)
        assert r.hget(key, "last_used_at") == f"{NOW_MS / 1000 + 4:.3f}".encode()
        await authorize(store, now_ms=NOW_MS + 5000)
        assert r.hget(key, "last_used_at") == str(NOW_MS // 1000 + 5).encode()
    finally:
        await store.close()
        r.close()


@pytest.mark.parametrize("quota", [None, 3])
async def test_a_request_without_a_monthly_quota_reads_no_month_counter(own_redis, quota):
    """The month's count is judged only under a quota; without one the count is what the
    increment answers, and reading it first would be a command more a request. Refusals (a
    key's own cap here) still answer the month's count."""
    seed(own_redis.url)
    r = redis.Redis.from_url(own_redis.url)
    store = RequestStore(own_redis.url)
    try:
        r.config_resetstat()
        used = [(await authorize(store, monthly_limit=quota, key_limit=2)) for _ in range(4)]
        assert [d.outcome for d in used] == ["ok", "ok", "key_quota", "key_quota"]
        assert [d.month_used for d in used] == [1, 2, 2, 2]
        gets = r.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
        # the key's own month counter is read by each call (its cap); the workspace's month
        # counter only under a quota, or to answer a refusal
        assert gets == (4 + 4 if quota is not None else 4 + 2), gets
    finally:
        await store.close()
        r.close()


# --- both store clients read a URL alike (SPEC, Store: redis-py's URL semantics) ------------

# every character an operator's generated password may hold, percent-encoded in the URL
HARD_PASSWORD = "p@ss:w/rd#1 x+y%z?&=;"
HARD_ENCODED = "p%40ss%3Aw%2Frd%231%20x+y%25z%3F%26%3D%3B"


def start_redis(tmp_path, *args: str, bind: str = "127.0.0.1"):
    """A redis-server on ``bind`` with ``args``: (process, port)."""
    import subprocess

    from conftest import free_port, redis_server_binary
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", bind,
                                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                                 *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket(family) as probe:
                if probe.connect_ex((bind, port)) == 0:
                    return proc, port
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
    pytest.fail("redis-server did not start")


async def both_log_in(url: str) -> tuple[bool, bool]:
    """(redis-py's asyncio client as the admin path makes it, the lean per-request client):
    whether each logs in and answers on ``url``."""
    from gateway.redis_urls import standalone_client
    admin = standalone_client(url, timeout=2, decode_responses=False)
    try:
        by_admin = await admin.ping() is True
    except redis.RedisError:
        by_admin = False
    finally:
        await admin.aclose()
    lean = RespClient(url, timeout=2, connect_timeout=2)
    try:
        by_lean = await lean.call("PING") == b"PONG"
    except (ConnectionError, RespError):
        by_lean = False
    finally:
        await lean.close()
    return by_admin, by_lean


async def test_special_character_passwords_log_in_on_both_paths(tmp_path):
    """A URL whose password was percent-encoded (every reserved character), in the user info
    and in the query, for the default user and an ACL user with a ':' in its name: both store
    clients log in with it, and agree everywhere."""
    from gateway.redis_urls import check_store_url
    proc, port = start_redis(tmp_path, "--requirepass", HARD_PASSWORD)
    try:
        admin = redis.Redis(port=port, password=HARD_PASSWORD)
        admin.acl_setuser("app:x", enabled=True, passwords=[f"+{HARD_PASSWORD}"],
                          commands=["+@all"], keys=["*"])
        admin.acl_setuser("open", enabled=True, nopass=True, commands=["+@all"], keys=["*"])
        admin.close()
        base, in_query = f"127.0.0.1:{port}", HARD_ENCODED.replace("+", "%2B")
        expected = {
            f"redis://:{HARD_ENCODED}@{base}/0": True,
            f"redis://default:{HARD_ENCODED}@{base}/0": True,
            f"redis://app%3Ax:{HARD_ENCODED}@{base}/0": True,
            f"redis://app%3Ax:{HARD_ENCODED}@{base}/0?protocol=2": True,
            f"redis://{base}/0?password={in_query}": True,
            f"redis://open@{base}/0": True,
            f"redis://open:@{base}/0": True,
            f"redis://open@{base}/0?protocol=2": True,
            f"redis://{base}/0?username=open": True,
            f"redis://{base}/0?username=app%3Ax&password={in_query}&protocol=2": True,
            f"redis://:{HARD_ENCODED}@{base}/0?protocol=2": True,
            f"redis://:wrong@{base}/0": False,
            f"redis://{base}/0": False,
        }
        for url in expected:
            check_store_url(url)
        got = {url: await both_log_in(url) for url in expected}
        assert got == {url: (ok, ok) for url, ok in expected.items()}
    finally:
        proc.kill()
        proc.wait(10)


async def test_ipv6_store_url_works_on_both_paths(tmp_path):
    """``redis://[::1]:port``: an IPv6 host in brackets, as a cloud provider prints it."""
    from gateway.redis_urls import check_store_url
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    proc, port = start_redis(tmp_path, "--requirepass", "pw", bind="::1")
    try:
        url = f"redis://:pw@[::1]:{port}/2"
        check_store_url(url)
        assert await both_log_in(url) == (True, True)
    finally:
        proc.kill()
        proc.wait(10)


async def test_unix_socket_urls_with_db_and_password_agree_on_both_paths(tmp_path):
    """``unix://`` with the database and the password in the query or in the user info: both
    store clients read the same database with the same password."""
    import subprocess

    from conftest import redis_server_binary
    from gateway.redis_urls import check_store_url, standalone_client
    sock = f"/tmp/kg-rs-{os.getpid()}-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", sock,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                             "--requirepass", HARD_PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with redis.Redis(unix_socket_path=sock, password=HARD_PASSWORD, db=5) as marker:
            marker.set("where", "db5")
        in_query = HARD_ENCODED.replace("+", "%2B")
        for url in (f"unix://{sock}?db=5&password={in_query}",
                    f"unix://:{HARD_ENCODED}@{sock}?db=5",
                    f"unix://default:{HARD_ENCODED}@{sock}?db=5"):
            check_store_url(url)
            admin = standalone_client(url, timeout=2, decode_responses=True)
            lean = RespClient(url, timeout=2)
            try:
                assert (await admin.get("where"), await lean.call("GET", "where")) == \
                    ("db5", b"db5"), url
            finally:
                await admin.aclose()
                await lean.close()
    finally:
        proc.kill()
        proc.wait(10)
        with contextlib.suppress(OSError):
            os.unlink(sock)
