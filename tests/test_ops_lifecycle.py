"""``keygate serve`` stopped and reloaded under load, as an operator does it: a real process on
a real redis-server, a real upstream on loopback, a couple of hundred connections at once
(slow answers, streamed downloads, uploads still arriving, WebSocket tunnels) when the signal
comes.

Bounded: ~200 connections per test, loopback only; each test ends within about 40 s (the
drain-time one waits out the 30 s drain)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import pytest
import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, WSMsgType, web

from harness import eventually, serving
from served import Served, write_config

TIMEOUT = ClientTimeout(total=30)
SLOW, DOWNLOADS, UPLOADS, TUNNELS = 150, 20, 20, 10
CHUNK = b"x" * 4096


@pytest.fixture
async def busy_upstream():
    """An upstream whose every kind of answer takes ~2 s: ``/slow`` a plain one, ``/stream``
    a body streamed in ten pieces, ``/upload`` one given once the whole body arrived, ``/ws``
    a WebSocket echo. ``state`` counts what it has under way."""
    state = {"open": 0, "tunnels": 0, "most": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])
        try:
            if request.path.startswith("/ws"):
                ws = web.WebSocketResponse()
                await ws.prepare(request)
                state["tunnels"] += 1
                async for msg in ws:
                    await ws.send_str(msg.data)
                return ws
            if request.path.startswith("/stream"):
                response = web.StreamResponse()
                response.content_length = 10 * len(CHUNK)
                await response.prepare(request)
                for _ in range(10):
                    await response.write(CHUNK)
                    await asyncio.sleep(0.4)
                await response.write_eof()
                return response
            if request.path.startswith("/upload"):
                body = await request.read()
                return web.json_response({"len": len(body)})
            await asyncio.sleep(4)
            return web.json_response({"path": request.path})
        finally:
            state["open"] -= 1

    async with serving(handler) as url:
        yield url, state


def busy_config(tmp_path, redis_url: str, upstream: str):
    path, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=upstream,
                                      access_log="json")
    doc = yaml.safe_load(path.read_text())
    doc["upstreams"]["api"]["max_connections"] = 1000
    doc["routes"] = [
        {"path": "/slow/**", "methods": ["GET"], "upstream": "api", "public": True},
        {"path": "/stream/**", "methods": ["GET"], "upstream": "api", "public": True},
        {"path": "/upload/**", "methods": ["POST"], "upstream": "api", "public": True},
        {"path": "/ws/**", "methods": ["GET"], "upstream": "api", "public": True,
         "websocket": True},
    ]
    path.write_text(yaml.safe_dump(doc))
    return path, pport, aport


async def slow_upload(session: ClientSession, url: str) -> tuple[int, dict]:
    async def body():
        for _ in range(10):
            yield CHUNK
            await asyncio.sleep(0.5)
    async with session.post(url, data=body()) as r:
        return r.status, await r.json()


async def get(session: ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as r:
        return r.status, await r.read()


async def tunnel(session: ClientSession, url: str, opened: list) -> list:
    """A WebSocket that echoes once, then waits: what ended it, as (type, data) pairs."""
    async with session.ws_connect(url) as ws:
        await ws.send_str("hello")
        first = await ws.receive(timeout=10)
        opened.append(first.data)
        seen = []
        while True:
            msg = await ws.receive(timeout=40)
            seen.append((msg.type, msg.data))
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR, WSMsgType.CLOSING):
                return seen


def access_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()
            if line.startswith("{") and '"request_id"' in line]


# One process takes SIGTERM and SIGINT with one handler (workers._serve's ``stopping``, on
# the loop for its whole life; it sets an Event), so "sigint-then-sigterm" stands for a SIGINT
# alone too (the drain starts from it, the SIGTERM after it sets what is set) and for a second
# signal while it drains: the variants "sigint" and "sigterm-twice" ran the same code again.
STOPS = {"sigterm": ([signal.SIGTERM], ()),
         "sigint-then-sigterm": ([signal.SIGINT, signal.SIGTERM], ()),
         "workers-sigterm": ([signal.SIGTERM], ("--workers", "2"))}


@pytest.mark.parametrize("stop", STOPS)
async def test_a_stop_with_two_hundred_connections_in_flight_finishes_them_all(
        tmp_path, redis_url, busy_upstream, stop):
    """SIGTERM (or Ctrl-C's SIGINT, or a second signal while it drains: systemd and
    Kubernetes resend nothing, but an operator at a terminal does) with ~200 connections
    under way: slow answers, streamed downloads, uploads still arriving and WebSocket tunnels.
    /readyz answers 503 and new connections are refused at once; every HTTP request is
    answered whole; every tunnel is closed (its users reconnect elsewhere); every request
    has its access-log line; the process exits 0."""
    signals, args = STOPS[stop]
    url, state = busy_upstream
    config, pport, aport = busy_config(tmp_path, redis_url, url)
    gw = Served(config, pport, aport, *args)
    try:
        await gw.ready()
        base = gw.proxy
        opened: list = []
        async with ClientSession(timeout=TIMEOUT,
                                 connector=TCPConnector(limit=0, force_close=True)) as s:
            slow = [asyncio.ensure_future(get(s, f"{base}/slow/{i}")) for i in range(SLOW)]
            downloads = [asyncio.ensure_future(get(s, f"{base}/stream/{i}"))
                         for i in range(DOWNLOADS)]
            uploads = [asyncio.ensure_future(slow_upload(s, f"{base}/upload/{i}"))
                       for i in range(UPLOADS)]
            tunnels = [asyncio.ensure_future(tunnel(s, f"{base}/ws/{i}", opened))
                       for i in range(TUNNELS)]
            assert await eventually(
                lambda: state["open"] >= SLOW + DOWNLOADS + TUNNELS
                and len(opened) == TUNNELS, timeout=15), state
            gw.proc.send_signal(signals[0])
            assert await eventually(lambda: "shutting down" in gw.stderr(), timeout=5)
            for again in signals[1:]:
                await asyncio.sleep(0.3)
                gw.proc.send_signal(again)

            async def refused() -> bool:  # new connections: refused, not queued
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", pport)
                except ConnectionRefusedError:
                    return True
                writer.close()
                return False
            assert await eventually(refused, timeout=2)
            async with ClientSession(timeout=ClientTimeout(total=3)) as probe:
                async with probe.get(gw.admin + "/readyz") as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "shutting_down"

            got = await asyncio.gather(*slow)
            assert all(st == 200 for st, _ in got), [st for st, _ in got if st != 200]
            got = await asyncio.gather(*downloads)
            assert all(st == 200 and len(b) == 10 * len(CHUNK) for st, b in got)
            got = await asyncio.gather(*uploads)
            assert all(st == 200 and b["len"] == 10 * len(CHUNK) for st, b in got), got
            ended = await asyncio.gather(*tunnels, return_exceptions=True)
            for seen in ended:  # closed by keygate, so that their users reconnect elsewhere
                assert not isinstance(seen, BaseException), ended
                assert seen[-1][0] in (WSMsgType.CLOSE, WSMsgType.CLOSED), seen
        assert await asyncio.to_thread(gw.proc.wait, 40) == 0
        err = gw.stderr()
        assert "Traceback" not in err, err[-3000:]
        lines = access_lines(err)
        statuses = sorted(line["status"] for line in lines)
        assert len(lines) == SLOW + DOWNLOADS + UPLOADS + TUNNELS, (len(lines), statuses[-20:])
        assert statuses.count(101) == TUNNELS and statuses.count(200) == len(lines) - TUNNELS
    finally:
        gw.close()


async def test_a_request_still_in_flight_when_the_drain_time_ends_is_cut_off_then(
        tmp_path, redis_url):
    """The drain is bounded as documented: requests in flight at SIGTERM get the drain time
    (SHUTDOWN_TIMEOUT, 30 s, or $KEYGATE_DRAIN_SECONDS) to finish. aiohttp waited that long,
    then as long again for the handler before it cancelled it, so one slow upstream (an
    upstream timeout of minutes) held the stop for 60 s: past Kubernetes'
    terminationGracePeriodSeconds with the preStop sleep and the rest of the stop, a SIGKILL
    that lost the usage counted while Redis was down and every access-log line still queued.
    It is cut off at the drain time now, with its access-log line and a warning saying so,
    and the process exits 0. (Run with a drain time of 4 s: the 30 s default is the same
    code path, and test_the_drain_time_is_30_s_unless_the_environment_says_otherwise holds
    the default.)"""
    import time

    drain = 4
    seen = {"n": 0}
    release = asyncio.Event()  # the test's end: the upstream's own stop need not wait

    async def handler(request: web.Request) -> web.Response:
        seen["n"] += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release.wait(), drain + 60)
        return web.json_response({})

    async with serving(handler) as url:
        config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                            access_log="json")
        doc = yaml.safe_load(config.read_text())
        doc["upstreams"]["api"]["timeout"] = 300  # an upstream allowed to take minutes
        config.write_text(yaml.safe_dump(doc))
        gw = Served(config, pport, aport, environ={"KEYGATE_DRAIN_SECONDS": f" {drain} "})
        try:
            await gw.ready()
            async with ClientSession(timeout=ClientTimeout(total=drain + 60)) as s:
                async def one():
                    try:
                        async with s.get(gw.proxy + "/health") as r:
                            return r.status
                    except Exception as exc:  # cut off: the connection closed unanswered
                        return exc.__class__.__name__
                request = asyncio.ensure_future(one())
                assert await eventually(lambda: seen["n"] == 1)
                started = time.monotonic()
                gw.proc.send_signal(signal.SIGTERM)
                got = await request
                cut_at = time.monotonic() - started
            code = await asyncio.to_thread(gw.proc.wait, 60)
            stopped_at = time.monotonic() - started
            assert got != 200, got
            assert drain - 1 < cut_at < drain + 5, cut_at
            assert stopped_at < drain + 8, stopped_at
            assert code == 0
            err = gw.stderr()
            assert "Traceback" not in err, err[-3000:]
            assert f"1 request still in flight after {drain} s cut off" in err, err[-3000:]
            (line,) = [e for e in access_lines(err) if e["path"] == "/health"]
            assert line["duration_ms"] > (drain - 1) * 1000, line
        finally:
            release.set()
            gw.close()


def test_the_drain_time_is_30_s_unless_the_environment_says_otherwise(monkeypatch):
    """The documented default (docs/operations.md, Stopping; the Deployment's grace period is
    sized for it) and the variable's reading: seconds, fractions allowed, blanks around."""
    from gateway.app import SHUTDOWN_TIMEOUT, drain_problem, drain_seconds
    monkeypatch.delenv("KEYGATE_DRAIN_SECONDS", raising=False)
    assert SHUTDOWN_TIMEOUT == 30 and drain_seconds() == 30 and drain_problem() is None
    for text, seconds in (("0", 0), ("2.5", 2.5), (" 90\n", 90), ("3600", 3600)):
        monkeypatch.setenv("KEYGATE_DRAIN_SECONDS", text)
        assert drain_problem() is None and drain_seconds() == seconds, text


def test_a_drain_time_that_is_no_number_of_seconds_is_named_as_the_problem(monkeypatch):
    """A typo read as 0, a unit suffix, an hour-long value past any grace period: each is
    named, with the variable and the value (serve refuses to start then: the test below)."""
    from gateway.app import drain_problem, drain_seconds
    for text in ("", "soon", "-1", "3601", "nan", "inf", "30s", "1e9", "0x10"):
        monkeypatch.setenv("KEYGATE_DRAIN_SECONDS", text)
        assert drain_problem() == "KEYGATE_DRAIN_SECONDS must be a number of seconds from 0 " \
            f"to 3600, not {text!r}", text
        assert drain_seconds() == 30


def test_a_drain_time_that_is_no_number_of_seconds_stops_serve_before_it_starts(
        tmp_path, redis_url):
    """A stop that would drain for a time nobody chose is refused at start, as a config
    problem is: exit 1, the problem on stderr, no traceback."""
    import subprocess
    import sys

    from served import env
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                          env={**env(), "KEYGATE_DRAIN_SECONDS": "30s"}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done
    assert "KEYGATE_DRAIN_SECONDS must be a number of seconds from 0 to 3600, not '30s'" \
        in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


async def test_reloads_under_load_swap_routes_and_identity_headers_together_and_a_broken_file_changes_nothing(
        tmp_path, redis_url):
    """SIGHUP to ``serve --workers 2`` under steady load, alternating two configs that move
    /v/** to another upstream *and* rename the identity header, with a broken file between
    them: no request fails or is answered other than 200; none sees half a swap (upstream A
    with B's header, or B with A's); the broken file is refused by every worker, logged,
    counted as ``keygate_config_reloads_total{result="error"}``, and leaves the config in force
    serving."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from served import new_key

    def upstream(name: str):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response({"who": name, "headers": sorted(
                h for h in request.headers if h.lower().startswith("x-ws-"))})
        return serving(handler)

    async with upstream("A") as url_a, upstream("B") as url_b:
        config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url_a,
                                            plan={"monthly_requests": None, "max_keys": None,
                                                  "rate_limit": None})
        base = yaml.safe_load(config.read_text())
        base["upstreams"] = {"a": {"url": url_a, "timeout": 10}, "b": {"url": url_b, "timeout": 10}}

        def version(name: str, broken: bool = False) -> None:
            doc = json.loads(json.dumps(base))
            doc["routes"] = [{"path": "/v/**", "methods": ["GET"], "scopes": ["people:read"],
                              "upstream": "nowhere" if broken else name.lower()},
                             {"path": "/people/**", "methods": ["GET"], "upstream": "a",
                              "scopes": ["people:read"]}]
            doc["identity_headers"] = {"workspace": f"X-Ws-{name}"}
            config.write_text(yaml.safe_dump(doc))

        version("A")
        gw = Served(config, pport, aport, "--workers", "2")
        try:
            await gw.ready()
            async with ClientSession(timeout=TIMEOUT) as s:
                token = await new_key(s, gw.admin)
            stop = asyncio.Event()
            seen: list = []
            failures: list = []

            async def client() -> None:
                while not stop.is_set():
                    async with ClientSession(timeout=TIMEOUT) as s:
                        for _ in range(25):
                            try:
                                async with s.get(gw.proxy + "/v/1", headers={
                                        "Authorization": f"Bearer {token}"}) as r:
                                    if r.status != 200:
                                        failures.append((r.status, await r.text()))
                                        continue
                                    body = await r.json()
                                    seen.append((body["who"], tuple(body["headers"])))
                            except Exception as exc:
                                failures.append(repr(exc))
                            if stop.is_set():
                                break

            clients = [asyncio.ensure_future(client()) for _ in range(8)]
            reloaded, refused = 0, 0
            for name in ("B", "A", "B", "A"):
                await asyncio.sleep(0.4)
                version(name, broken=True)
                gw.proc.send_signal(signal.SIGHUP)
                refused += 2
                deadline = time.monotonic() + 10
                while gw.stderr().count("the config in force is unchanged") < refused:
                    assert time.monotonic() < deadline, gw.stderr()[-3000:]
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # the broken file in place: still serving
                version(name)
                gw.proc.send_signal(signal.SIGHUP)
                reloaded += 2
                while gw.stderr().count("config reloaded from") < reloaded:
                    assert time.monotonic() < deadline, gw.stderr()[-3000:]
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.4)
            stop.set()
            await asyncio.gather(*clients)
            assert failures == [], failures[:5]
            assert set(seen) == {("A", ("X-Ws-A",)), ("B", ("X-Ws-B",))}, set(seen)
            assert len(seen) > 200
            async with ClientSession(timeout=TIMEOUT) as s:
                async with s.get(gw.admin + "/metrics", headers={"Connection": "close"}) as r:
                    text = await r.text()
            counts = {sample.labels["result"]: int(sample.value)
                      for family in text_string_to_metric_families(text)
                      for sample in family.samples
                      if sample.name == "keygate_config_reloads_total"}
            assert counts == {"ok": reloaded, "error": refused}, counts
            err = gw.stderr()
            assert "unknown upstream 'nowhere'" in err and "Traceback" not in err
            assert await asyncio.to_thread(gw.terminate) == 0
        finally:
            gw.close()


@pytest.mark.parametrize("drain", ["1", "3"])
async def test_requests_cut_off_at_a_short_drain_end_leave_no_traceback(
        tmp_path, redis_url, drain):
    """A drain under 5 s (KEYGATE_DRAIN_SECONDS, for platforms whose grace period is short):
    aiohttp's wait for each request in flight then ends at the same instant as keygate's
    cut-off of those requests (aiohttp rounds its deadline up to a whole second only from
    5 s on). Its wait ended, cancelled, before it could forget it, and the request ending
    under the cut-off then set that cancelled wait: an `Unhandled exception` with a traceback
    (`InvalidStateError`) in the log, one per request cut off, at every such stop. With 100
    requests in flight it came at nearly every stop."""
    in_flight = 100
    seen = {"n": 0}
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        seen["n"] += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release.wait(), 60)
        return web.json_response({})

    async with serving(handler) as url:
        config, pport, aport = write_config(tmp_path, redis_url=redis_url, upstream_url=url,
                                            access_log="json")
        gw = Served(config, pport, aport, environ={"KEYGATE_DRAIN_SECONDS": drain})
        try:
            await gw.ready()
            async with ClientSession(connector=TCPConnector(limit=0),
                                     timeout=ClientTimeout(total=60)) as s:
                async def one():
                    try:
                        async with s.get(gw.proxy + "/health") as r:
                            return r.status
                    except Exception as exc:  # cut off: the connection closed unanswered
                        return exc.__class__.__name__
                requests = [asyncio.ensure_future(one()) for _ in range(in_flight)]
                assert await eventually(lambda: seen["n"] == in_flight)
                gw.proc.send_signal(signal.SIGTERM)
                got = await asyncio.gather(*requests)
            code = await asyncio.to_thread(gw.proc.wait, 60)
        finally:
            release.set()
            gw.close()
    err = gw.stderr()
    assert 200 not in got, got
    assert code == 0
    assert "Traceback" not in err and "Unhandled exception" not in err, err[-3000:]
    assert f"{in_flight} requests still in flight after {drain} s cut off" in err, err[-3000:]
    assert len([e for e in access_lines(err) if e["path"] == "/health"]) == in_flight
