"""``/metrics`` and the usage numbers as an attacker and a busy operator see them: callers
choose paths, methods, hosts, tokens and bytes, but never the series ``/metrics`` serves; the
exposition stays valid whatever they send; the counters agree exactly with what hundreds of
concurrent clients saw; scrapes, however many, do not stall the proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import CpuWait, bearer, eventually, gateway_under_test, make_config


def series(text: str) -> set[tuple[str, tuple]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for f in text_string_to_metric_families(text) for s in f.samples}


async def scrape_text(g) -> str:
    async with g.admin.get("/metrics") as r:
        assert r.status == 200
        return await r.text()


def forged(env: str, key_id: str, i: int) -> str:
    from gateway.tokens import checksum
    head = f"kg_{env}_{key_id}{i:032d}"
    return head + checksum(head)


async def raw_exchange(g, head: bytes) -> bytes:
    reader, writer = await g.raw_connection()
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    except (ConnectionError, asyncio.TimeoutError):
        return b""
    finally:
        writer.close()


# methods the HTTP parser takes that RFC 9110 does not define (one it does not know is
# answered 400 by the parser, before keygate sees it: the raw request below)
ODD_METHODS = ["PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "REPORT", "SEARCH",
               "PURGE", "PROPPATCH", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE",
               "UNSUBSCRIBE", "LINK", "UNLINK", "BIND", "REBIND", "UNBIND", "ACL", "SOURCE"]
HOSTILE = [b'/people/"}\\x\nevil 1', b"/people/\xff\xfe\x80", b'/"quote', b"/back\\slash",
           b"/people/%22%7D%5C%0A", b"/people/%ff", b"/" + b"a" * 3000]


async def hostile_traffic(g, token: str, n: int) -> None:
    """``n`` rounds of requests whose every caller-chosen part is new: path, method, Host,
    token (malformed, forged with a good checksum, a real one with junk after it), request id,
    and raw bytes that are not UTF-8 or carry quotes, backslashes and line ends."""
    for i in range(n):
        junk = os.urandom(4).hex()
        for method, path, headers in (
                ("GET", f"/people/{junk}", bearer(token)),
                ("GET", f"/{junk}/x", {}),
                (ODD_METHODS[i % len(ODD_METHODS)], f"/people/{junk}", bearer(token)),
                ("get", "/people/1", bearer(token)),
                ("GET", "/people/1", {"Authorization": f"Bearer kg_live_{junk}"}),
                ("GET", "/people/1", bearer(forged("live", f"{i:012d}", i))),
                ("GET", "/people/1", {"X-Api-Key": junk, "Host": f'h{junk}"\\',
                                      "X-Request-Id": junk})):
            async with g.proxy.request(method, path, headers=headers) as r:
                await r.read()
        raw = HOSTILE[i % len(HOSTILE)]
        await raw_exchange(g, b"GET " + raw.replace(b"\n", b"") + b" HTTP/1.1\r\nHost: "
                           + b'"\\\xff' + junk.encode() + b"\r\nAuthorization: Bearer "
                           + token.encode() + b"\r\nConnection: close\r\n\r\n")
        await raw_exchange(g, b"X" + junk.encode() + b" /people/1 HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")


def labelled_config(upstream):
    """The test config with ``metrics_workspace_labels`` on: every label a caller might reach."""
    base = make_config(str(upstream.make_url("")))
    return dataclasses.replace(base, server=dataclasses.replace(
        base.server, metrics_workspace_labels=True))


async def test_callers_create_no_series_whatever_they_send(redis_url, upstream, monkeypatch):
    """Every label value comes from the config (route globs, upstream names), a fixed set
    (RFC 9110 methods or ``OTHER``, status classes, error codes) or the store (workspaces):
    2000 requests with fresh paths, methods, hosts and tokens add no series after the first
    round of each kind, and no label holds anything a caller sent."""
    async with gateway_under_test(labelled_config(upstream), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        await hostile_traffic(g, token, 25)     # every kind of answer (the throttle past 20)
        before = series(await scrape_text(g))
        await hostile_traffic(g, token, 250)    # 2000 proxy requests, 500 raw ones
        text = await scrape_text(g)
        after = series(text)
        grown = after - before
        assert not grown, sorted(grown)[:20]
        values = {v for _, labels in after for _, v in labels}
        assert all(len(v) < 64 for v in values), [v for v in values if len(v) >= 64]
        assert not values & set(ODD_METHODS)
        assert not any(v.startswith("kg_") for v in values)
        # no route, method OTHER, 4xx: each round's odd method (a 404), its raw request with
        # an unknown method, and its raw request whose target the HTTP parser refuses (a
        # space, bytes over 0x7f: HOSTILE's first two), both answered 400 by the parser and
        # counted there too
        rounds = 25 + 250
        unreadable_targets = sum(1 for i in range(25) if i % len(HOSTILE) < 2) + \
            sum(1 for i in range(250) if i % len(HOSTILE) < 2)
        assert g.counter("keygate_requests_total", route="(none)", method="OTHER",
                         status_class="4xx", workspace="") == \
            rounds + rounds + unreadable_targets


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promtool_accepts_the_exposition_after_hostile_traffic(redis_url, upstream,
                                                                     monkeypatch):
    async with gateway_under_test(labelled_config(upstream), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        await hostile_traffic(g, token, 14)
        text = await scrape_text(g)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert series(text)  # and prometheus-client's parser reads it


# --- agreement under concurrency --------------------------------------------------------------

async def test_every_count_agrees_with_what_300_concurrent_clients_saw(redis_url, upstream,
                                                                       monkeypatch, capfd):
    """300 requests at once: allowed, over the quota (429, counted nowhere), out of scope
    (403), with a wrong secret or none (401, then the failure throttle's 429). The request
    counters, failure reasons, latency counts, the workspace's and the key's usage, the month
    gauge, the access-log lines and the upstream's own count each say exactly what the clients
    saw."""
    from collections import Counter
    from aiohttp import ClientSession, TCPConnector
    from harness import wrong_secret
    from gateway.models import Upstream
    # the shipped upstream timeout, not the harness's 2 s: the upstream shares this test's
    # loop, and 300 requests at once on a loaded machine had 48 answered 504 (a count the test
    # does not plan for) in a run beside three other suites
    config = dataclasses.replace(make_config(str(upstream.make_url(""))), upstreams={
        "api": Upstream("api", str(upstream.make_url("")), 30.0)})
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        status, _ = await g.admin_json("PATCH", "/workspaces/acme",
                                       {"limits": {"monthly_requests": 120}})
        assert status == 200
        token, key = await g.key()
        async with g.proxy.get("/people/0", headers=bearer(token)) as r:  # cached from here
            assert r.status == 200
        g.logs(capfd)  # the warm-up line out of the way
        plan = ([("GET", f"/people/{i}", bearer(token)) for i in range(200)]
                + [("POST", "/people", bearer(token))] * 40
                + [("GET", "/people/1", bearer(wrong_secret(token)))] * 30
                + [("GET", "/people/1", {})] * 30)
        async with ClientSession(str(g.proxy_server.make_url("")),
                                 connector=TCPConnector(limit=0)) as s:
            async def one(method, path, headers):
                async with s.request(method, path, headers=headers) as r:
                    body = await r.read()
                    code = json.loads(body)["error"]["code"] if r.status >= 400 else None
                    return r.status, code
            seen = await asyncio.gather(*(one(*p) for p in plan))
        by_status = Counter(s for s, _ in seen)
        by_code = Counter(c for _, c in seen if c)
        assert by_status[200] == 119 and by_code["quota_exceeded"] == 81, by_code
        assert by_code["insufficient_scope"] == 40 and by_code["missing_key"] == 30
        assert by_code["invalid_key"] + by_code["too_many_failures"] == 30
        text = await scrape_text(g)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))), 0)
        for cls in ("2xx", "4xx", "5xx"):
            want = sum(n for st, n in by_status.items() if f"{st // 100}xx" == cls)
            got = sum(v for (name, labels), v in samples.items()
                      if name == "keygate_requests_total" and ("status_class", cls) in labels)
            assert got == want + (cls == "2xx"), (cls, got, want)
        for code, n in by_code.items():
            assert value("keygate_auth_failures_total", reason=code) == n, code
        assert value("keygate_request_duration_seconds_count", route="/people/**") + \
            value("keygate_request_duration_seconds_count", route="/people") == 301
        assert value("keygate_workspace_month_requests", workspace="acme") == 120
        _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
        assert (usage["used"], usage["limit"], usage["remaining"]) == (120, 120, 0)
        _, k = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
        assert k["used_this_month"] == 120
        assert len(upstream.requests) == 120
        _, err = g.logs(capfd)
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
        lines = [line for line in lines if "request_id" in line and "status" in line]
        assert Counter(line["status"] for line in lines) == by_status
        assert Counter(line["error"] for line in lines if line["error"]) == by_code
        assert sum(1 for line in lines if line["status"] == 200
                   and line["key_id"] == key["id"] and line["workspace"] == "acme") == 119


# --- scrapes and the proxy's event loop -------------------------------------------------------

SCRAPERS = """
import asyncio, sys, time
from aiohttp import ClientSession
async def main(url, n, seconds):
    count, end = 0, time.monotonic() + seconds
    async def one():
        nonlocal count
        async with ClientSession() as s:
            while time.monotonic() < end:
                async with s.get(url) as r:
                    await r.read()
                    count += r.status == 200
    await asyncio.gather(*(one() for _ in range(n)))
    print(count, flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


async def test_twenty_scrapers_leave_a_cached_key_most_of_the_event_loop(redis_url, upstream,
                                                                         monkeypatch):
    """operations.md: scrapes take at most a tenth of a process's time after a 1 s burst. Only
    the rendering was charged: past the budget, every scrape was answered the last exposition
    again at once, and sending a 190 kB exposition (1500 workspaces) thousands of times a
    second took the loop the proxy shares. 20 scrapers (another process) cut the requests a
    cached key got through in 2 s to a tenth; the answers are now charged too, and a scrape
    past the budget waits for it."""
    import sys
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        token, _ = await g.key()
        for i in range(1500):
            await g.gw.store.create_workspace(f"ws-{i}", f"W{i}", "starter")

        waits: list[float] = []  # of each window, the share the loop waited for a CPU

        async def served_in(seconds: float) -> float:
            """Requests served per CPU second of this process (the gateway and its client
            both run in it): what the scrapes leave the key, whatever else loads the machine
            (a wall-clock rate swung with the suite's other workers)."""
            n, end, cpu = 0, time.perf_counter() + seconds, time.process_time()
            async with CpuWait() as loop_wait:
                since = time.monotonic()
                while time.perf_counter() < end:
                    async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                        await r.read()
                        assert r.status == 200
                    n += 1
                until = time.monotonic()
            waits.append(loop_wait.waited(since, until) / (until - since))
            return n / max(time.process_time() - cpu, 1e-3)
        await served_in(0.3)  # cached, connections made
        before = await served_in(2.0)
        renders_before = g.counter("keygate_store_call_duration_seconds_count",
                                   call="usage_scrape")
        scrapers = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SCRAPERS, str(g.admin_server.make_url("/metrics")), "20",
            "5.5", stdout=subprocess.PIPE)
        spawned = time.monotonic()
        try:
            # past the burst: 2 s from the scrapers' first scrape, not from their start (a
            # Python start and an aiohttp import, seconds on a loaded machine: the burst then
            # fell in the window measured)
            assert await eventually(lambda: g.counter("keygate_store_call_duration_seconds_count",
                                                      call="usage_scrape") > renders_before,
                                    timeout=30, every=0.01)
            first_scrape = time.monotonic() - spawned
            await asyncio.sleep(2.0)
            flooded = await served_in(2.0)
            answered = int(await asyncio.wait_for(scrapers.stdout.readline(), 30))
        finally:
            if scrapers.returncode is None:
                scrapers.kill()
            await scrapers.wait()
        after = await served_in(2.0)
        renders = g.counter("keygate_store_call_duration_seconds_count", call="usage_scrape")
    # Each scraper waits for the next scrape the budget allows and shares it, but for
    # STALE_PER_SECOND answers of the last one: it was 3,000 to 33,000 answers for as few
    # renders, and the key got 8 to 15% of its requests through. Per CPU second the scrapes
    # may take their budget (a tenth) and the sending of what they are answered, not most of
    # it (the baseline is the lower of the two measured around the flood). A CPU second is
    # not a fixed amount of work on a shared machine (a busy sibling hyperthread, caches
    # flushed by other processes): 0.34 once in a fresh-clone run beside three other suites,
    # 0.6-0.9 on a quiet one; the bound sits between that and the defect's 0.08-0.15.
    # Under a load average of 13-16 it was 0.13-0.40: a machine that busy makes the measure
    # overlap the defect's, so the bound holds where the loop waited for a CPU less than a
    # third of each window (the counts above hold on any machine: the defect was thousands of
    # answers for as few renders).
    print(f"requests per CPU second: {before:.0f} before, {flooded:.0f} during the scrapes, "
          f"{after:.0f} after (the loop waiting for a CPU "
          f"{', '.join(f'{w:.0%}' for w in waits[1:])} of each window); {answered} scrapes "
          f"answered, {renders} rendered; the first {first_scrape:.2f} s after the scrapers "
          f"were started")
    assert 20 <= answered <= 20 * (renders + 1) + 5 * 6 + 5, (answered, renders)
    if max(waits[1:]) < 1 / 3:
        assert flooded > min(before, after) * 0.25, (before, flooded, after, answered)


async def test_past_the_budget_a_few_scrapes_a_second_get_the_last_one_the_rest_wait(
        redis_url, upstream, monkeypatch):
    """With the budget spent, a scraper (or a few) is still answered at once, with the last
    exposition again; scrapes past STALE_PER_SECOND wait for the budget (here at most 1 s)."""
    import gateway.observe as observe
    monkeypatch.setattr(observe, "SCRAPE_BURST", 1e-6)     # spent by the first scrape
    monkeypatch.setattr(observe, "SCRAPE_SHARE", 1e-6)     # and never refilled
    monkeypatch.setattr(observe, "SCRAPE_MAX_WAIT", 1.0)
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        first = await scrape_text(g)

        async def timed() -> tuple[float, str]:
            started = time.perf_counter()
            text = await scrape_text(g)
            return time.perf_counter() - started, text
        few = [await timed() for _ in range(4)]
        assert all(text == first for _, text in few)          # the last one again
        assert max(took for took, _ in few) < 0.5, few
        flood = await asyncio.gather(*(timed() for _ in range(20)))
        assert all(text == first for _, text in flood)
        waited = sorted(took for took, _ in flood)
        assert waited[-10] >= 0.9, waited                     # most waited out the 1 s


# --- the turn of the month ----------------------------------------------------------------------

async def test_a_request_admitted_in_the_years_last_millisecond_counts_in_december(
        redis_url, monkeypatch):
    """Admitted at 2026-12-31T23:59:59.999Z and answered by the upstream after midnight: it
    counts in December (the workspace's and the key's month, the day, the gauge), and at
    midnight every number starts January at zero, with January's quota and reset."""
    from aiohttp import web
    from harness import Clock, serving
    clock = Clock("2026-12-31T23:59:59.999000")

    async def slow(request):
        clock.now += 0.5  # the upstream answers in January
        return web.json_response({})

    async with serving(slow) as url:
        async with gateway_under_test(make_config(url), redis_url, monkeypatch,
                                      clock=clock) as g:
            await g.workspace("acme")
            token, key = await g.key()
            clock.set("2026-12-31T23:59:59.999000")
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200
                assert r.headers["RateLimit"] == '"monthly";r=999;t=1'

            async def numbers():
                _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
                _, k = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
                _, days = await g.admin_json("GET", "/workspaces/acme/usage/daily?days=2")
                _, kdays = await g.admin_json(
                    "GET", f"/workspaces/acme/keys/{key['id']}/usage/daily?days=2")
                gauge = [s.value for f in text_string_to_metric_families(await scrape_text(g))
                         for s in f.samples if s.name == "keygate_workspace_month_requests"]
                return (usage["period"], usage["used"], usage["remaining"], usage["resets_at"],
                        k["used_this_month"], gauge,
                        [(d["date"], d["requests"]) for d in days["items"]],
                        [(d["date"], d["requests"]) for d in kdays["items"]])
            clock.set("2026-12-31T23:59:59.999500")
            assert await numbers() == (
                "2026-12", 1, 999, "2027-01-01T00:00:00Z", 1, [1.0],
                [("2026-12-30", 0), ("2026-12-31", 1)], [("2026-12-30", 0), ("2026-12-31", 1)])
            clock.set("2027-01-01T00:00:00")
            assert await numbers() == (
                "2027-01", 0, 1000, "2027-02-01T00:00:00Z", 0, [0.0],
                [("2026-12-31", 1), ("2027-01-01", 0)], [("2026-12-31", 1), ("2027-01-01", 0)])


async def test_upstream_failures_and_vanished_clients_are_counted_as_documented(
        redis_url, monkeypatch, capfd):
    """Concurrently: forwards that never reached an upstream (nobody listening: 502, counted
    nowhere), that reached it and were dropped (502) or not answered in time (504), both
    counted, and clients gone while the upstream worked (counted, logged 400). The usage
    numbers are exactly the requests the upstream read; the upstream-error counter and the
    access log are exactly what the clients (or, for those gone, the upstream) saw."""
    from collections import Counter
    from aiohttp import ClientSession, ClientTimeout, TCPConnector
    from conftest import free_port
    from gateway.config import Route, Upstream
    from harness import raw_upstream
    read: Counter = Counter()

    async def answer(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        path = head.split(b" ")[1].decode()
        read[path.split("/")[2]] += 1
        if path.startswith("/people/drop"):
            writer.close()
            return
        await asyncio.sleep(3.0 if path.startswith("/people/slow") else 0.4
                            if path.startswith("/people/gone") else 0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    srv, url = await raw_upstream(answer)
    base = make_config(url)
    config = dataclasses.replace(
        base, upstreams={"api": Upstream("api", url, 1.0),
                         "dead": Upstream("dead", f"http://127.0.0.1:{free_port()}", 1.0)},
        routes=(Route("/dead/**", "dead", ("GET",), ("people:read",)),) + base.routes)
    try:
        async with gateway_under_test(config, redis_url, monkeypatch) as g:
            await g.workspace("acme")
            token, key = await g.key()
            async with g.proxy.get("/people/ok", headers=bearer(token)) as r:
                assert r.status == 200
            g.logs(capfd)
            read.clear()

            async def gone(i):
                reader, writer = await g.raw_connection()
                writer.write(f"GET /people/gone{i} HTTP/1.1\r\nHost: x\r\nAuthorization: "
                             f"Bearer {token}\r\n\r\n".encode())
                await writer.drain()
                # gone while the upstream works on it: once the upstream has read it (a fixed
                # 0.2 s left some unforwarded on a loaded CI machine, rightly never sent)
                assert await eventually(lambda: read[f"gone{i}"] > 0, timeout=10)
                writer.close()

            async with ClientSession(str(g.proxy_server.make_url("")),
                                     connector=TCPConnector(limit=0),
                                     timeout=ClientTimeout(total=20)) as s:
                async def one(path):
                    async with s.get(path, headers=bearer(token)) as r:
                        body = await r.read()
                        return r.status, (json.loads(body)["error"]["code"]
                                          if r.status >= 400 else None)
                paths = ([f"/people/ok{i}" for i in range(60)] + [f"/people/drop{i}"
                         for i in range(40)] + [f"/people/slow{i}" for i in range(20)]
                         + [f"/dead/{i}" for i in range(40)])
                seen, _ = await asyncio.gather(asyncio.gather(*(one(p) for p in paths)),
                                               asyncio.gather(*(gone(i) for i in range(20))))
            await asyncio.sleep(3.5)   # the upstream answers the gone ones, the slow ones end
            codes = Counter(c or s for s, c in seen)
            assert codes == {200: 60, "upstream_unavailable": 80, "upstream_timeout": 20}, codes
            reached = sum(read.values())
            assert read["dead"] == 0 and reached == 140, read
            _, usage = await g.admin_json("GET", "/workspaces/acme/usage")
            _, k = await g.admin_json("GET", f"/workspaces/acme/keys/{key['id']}")
            assert usage["used"] == k["used_this_month"] == 1 + reached
            text = await scrape_text(g)
            got = {(s.labels["upstream"], s.labels["code"]): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "keygate_upstream_errors_total"}
            assert got == {("api", "upstream_unavailable"): 40, ("api", "upstream_timeout"): 20,
                           ("dead", "upstream_unavailable"): 40, ("dead", "upstream_timeout"): 0}
            assert [s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "keygate_requests_in_flight"] == [0]
            classes = Counter()
            for f in text_string_to_metric_families(text):
                for x in f.samples:
                    if x.name == "keygate_requests_total":
                        classes[x.labels["status_class"]] += x.value
            assert classes == {"2xx": 61, "4xx": 20, "5xx": 100}, classes
            _, err = g.logs(capfd)
            lines = [json.loads(x) for x in err.splitlines() if x.startswith('{"time"')]
            lines = [x for x in lines if "request_id" in x and "status" in x]
            assert Counter((x["status"], x["error"]) for x in lines) == {
                (200, None): 60, (502, "upstream_unavailable"): 80,
                (504, "upstream_timeout"): 20, (400, "bad_request"): 20}
    finally:
        srv.close()


# --- a real Prometheus ------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
async def test_a_real_prometheus_scrapes_serve_with_two_workers_and_its_alert_rules_load(
        tmp_path, upstream, redis_url):
    """``keygate serve --workers 2`` scraped by a real Prometheus every second, with the shipped
    alert rules: the target is up, with no scrape error, after hostile traffic (odd methods,
    bytes that are not UTF-8, quotes and backslashes), and what Prometheus stored is the sum
    over the workers: each request once, ``keygate_build_info`` once."""
    from pathlib import Path

    import yaml
    from aiohttp import ClientSession
    from conftest import free_port
    from served import Served, new_key, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")))
    gw = Served(config, pport, aport, "--workers", "2")
    web = free_port()
    alerts = Path(__file__).resolve().parent.parent / "deploy/prometheus/alerts.yml"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(alerts)],
        "scrape_configs": [{"job_name": "keygate", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{aport}"]}]}]}))
    prometheus = None
    try:
        await gw.ready()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        async with ClientSession() as s:
            token = await new_key(s, gw.admin)
            for i, raw in enumerate(HOSTILE + [b"/people/ok"] * 23):
                reader, writer = await asyncio.open_connection("127.0.0.1", pport)
                method = ODD_METHODS[i % len(ODD_METHODS)] if i % 2 else "GET"
                writer.write(method.encode() + b" " + raw.replace(b"\n", b"") + b" HTTP/1.1\r\n"
                             b'Host: "\\\xff\r\nAuthorization: Bearer ' + token.encode()
                             + b"\r\nConnection: close\r\n\r\n")
                await writer.drain()
                await reader.read()
                writer.close()

            async def query(q: str) -> list:
                async with s.get(f"http://127.0.0.1:{web}/api/v1/query",
                                 params={"query": q}) as r:
                    return (await r.json())["data"]["result"]

            async def target() -> dict | None:
                try:
                    async with s.get(f"http://127.0.0.1:{web}/api/v1/targets") as r:
                        if r.status == 503:  # Prometheus still starting ("not ready", text)
                            return None
                        active = (await r.json())["data"]["activeTargets"]
                except OSError:
                    return None
                return active[0] if active and active[0]["health"] != "unknown" else None

            async def scrapes_agree() -> set:
                # whichever worker answers, once every worker's tallies are in its file: each
                # writes them every 0.1 s (metrics.FLUSH_EVERY), later on a loaded machine
                # (26 and 28 once 0.3 s after the requests, beside three other suites)
                counted = set()
                for _ in range(4):
                    async with ClientSession() as fresh:
                        async with fresh.get(gw.admin + "/metrics",
                                             headers={"Connection": "close"}) as r:
                            counted.add(sum(x.value for f in text_string_to_metric_families(
                                await r.text()) for x in f.samples
                                if x.name == "keygate_requests_total"))
                seen.append(counted)
                return len(counted) == 1 and min(counted) >= 23

            seen: list[set] = []
            await eventually(scrapes_agree, timeout=10, every=0.1)
            counted = seen[-1]
            assert len(counted) == 1 and 23 <= min(counted) <= 30, seen[-3:]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = await target()
                if found and found["health"] == "up":
                    total = await query("sum(keygate_requests_total)")
                    if total and float(total[0]["value"][1]) in counted:
                        break
                await asyncio.sleep(0.5)
            found = await target()
            assert found and found["health"] == "up" and not found["lastError"], found
            total = await query("sum(keygate_requests_total)")
            assert {float(total[0]["value"][1])} == counted, total
            assert len(await query("keygate_build_info")) == 1
            assert await query("process_resident_memory_bytes > 0")
            assert await query('keygate_store_call_duration_seconds_count{call="authorize"}')
            from test_metrics import DASHBOARD  # every panel's query parses and is answered
            exprs: list[str] = []

            def walk(node) -> None:
                if isinstance(node, dict):
                    for k, v in node.items():
                        (exprs.append(v) if k == "expr" and isinstance(v, str) else walk(v))
                elif isinstance(node, list):
                    for item in node:
                        walk(item)
            walk(json.loads(DASHBOARD.read_text()))
            assert len(exprs) > 20
            for expr in exprs:
                q = (expr.replace("$__rate_interval", "1m").replace('=~"$job"', '="keygate"')
                     .replace('"$instance"', '".*"').replace('"$route"', '".*"')
                     .replace('"$workspace"', '".*"'))
                async with s.get(f"http://127.0.0.1:{web}/api/v1/query",
                                 params={"query": q}) as r:
                    answer = await r.json()
                assert answer["status"] == "success", (q, answer)
            async with s.get(f"http://127.0.0.1:{web}/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            shipped = sum(len(g["rules"]) for g in yaml.safe_load(alerts.read_text())["groups"])
            assert sum(len(g["rules"]) for g in groups) == shipped >= 12
            assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(20)
        gw.close()
