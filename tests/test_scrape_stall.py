"""A scrape of ``/metrics`` with thousands of workspaces, measured from inside the gateway's own
event loop (the one its proxy listener shares): the longest stretch of the loop's own work
while scrapes run, and the usage gauges exact.

The loop's stretches are measured in the CPU time of its thread between the ticks of a probe
task (``time.thread_time``), not in wall time: on a loaded machine the other processes take
the cores for tens of milliseconds at a time whether a scrape runs or not, and that is no
stretch of ours; a stretch the loop spends working is the same either way."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time

import redis
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import UsageCollector
from gateway.store.keyspace import WORKSPACES, usage_key, ws_key
from gateway.usage import month_period

from harness import HeldReplies, bearer, gateway_under_test, make_config

WORKSPACES_N = int(os.environ.get("KEYGATE_SCRAPE_WORKSPACES", "2000"))
# the longest stretch a scrape may hold the loop for, in CPU seconds of the loop's thread; it
# measures ~2-4 ms here (2 cores, loaded); the whole scrape in one go took 40-50 ms
LONGEST_STRETCH = 0.012


def expected_usage(i: int) -> tuple[int, float | None]:
    """(used, limit) of the i-th filled workspace: plans with and without a quota, the
    workspace's own limit over its plan's (a number, or unlimited), no counter at all."""
    used = 0 if i % 7 == 0 else i * 13
    limit = {0: 1000, 1: None, 2: 5000 + i, 3: None, 4: 3}[i % 5]
    return used, limit


def fill(client, n: int) -> list[str]:
    """``n`` workspaces written straight into Redis (a client of a server or of a Cluster), as
    the admin scripts lay them out; their ids."""
    period, _ = month_period(time.time())
    ids = [f"ws-{i:05d}" for i in range(n)]
    pipe = client.pipeline(transaction=False)
    for i, ws in enumerate(ids):
        plan = {0: "starter", 1: "unlimited", 2: "starter", 3: "starter", 4: "tiny"}[i % 5]
        fields = {"id": ws, "name": f"Workspace {i}", "plan": plan,
                  "created_at": "1767225600.000", "rev": "1"}
        if i % 5 == 2:
            fields["limits"] = json.dumps({"monthly_requests": 5000 + i, "max_keys": 9})
        elif i % 5 == 3:
            fields["limits"] = json.dumps({"monthly_requests": None})
        pipe.hset(ws_key(ws), mapping=fields)
        used, _ = expected_usage(i)
        if used:
            pipe.set(usage_key(ws, period), used, ex=86400)
        if i % 500 == 499:
            pipe.execute()
    pipe.sadd(WORKSPACES, *ids)
    pipe.execute()
    return ids


def month_gauges(text: str) -> dict[tuple[str, str], float]:
    """(sample name, workspace) -> value of the month gauges of an exposition."""
    return {(s.name, s.labels["workspace"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("keygate_workspace_month_")}


def assert_exact(samples: dict[tuple[str, str], float], ids: list[str]) -> None:
    for i, ws in enumerate(ids):
        used, limit = expected_usage(i)
        assert samples[("keygate_workspace_month_requests", ws)] == used, ws
        assert samples.get(("keygate_workspace_month_limit", ws)) == limit, ws


class StretchProbe:
    """A task in the loop that ticks every millisecond: the loop's thread CPU time between two
    ticks is the longest anything else held the loop for, at most. Less the cyclic garbage
    collector's runs (``in_gc``: their CPU time in all): a full collection walks the whole
    process's heap, in a suite's worker the objects every earlier test left (368 ms once, in a
    full run), whatever allocation set it off; that is no stretch of the scrape's."""

    def __init__(self) -> None:
        self.longest = self.longest_wall = self.in_gc = 0.0
        self._task: asyncio.Task | None = None
        self._gc = [0.0, 0.0]  # CPU time in collections since the last tick, this one's start

    def _collecting(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc[1] = time.thread_time()
        else:
            self._gc[0] += time.thread_time() - self._gc[1]

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        cpu, wall = time.thread_time(), loop.time()
        while True:
            await asyncio.sleep(0.001)
            now_cpu, now_wall = time.thread_time(), loop.time()
            self.longest = max(self.longest, now_cpu - cpu - self._gc[0])
            self.longest_wall = max(self.longest_wall, now_wall - wall)
            self.in_gc += self._gc[0]
            cpu, wall, self._gc[0] = now_cpu, now_wall, 0.0

    def __enter__(self) -> "StretchProbe":
        gc.callbacks.append(self._collecting)
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()
        gc.callbacks.remove(self._collecting)


async def test_a_scrape_of_thousands_of_workspaces_never_holds_the_proxy_loop_for_long(
        redis_url, upstream, monkeypatch):
    """With 2,000 workspaces a scrape read, built and rendered their gauges in one stretch of
    the event loop the proxy shares (one pipeline of 6,000 commands and replies, then every
    usage object, then the exposition): 40-130 ms in which no proxied request moved, at every
    scrape. Now the loop is never held for more than a few milliseconds, the gauges are exact,
    and a cached key's requests keep going during the scrapes."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key("acme")
        client = redis.Redis.from_url(redis_url)
        ids = fill(client, WORKSPACES_N)
        try:
            async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                assert r.status == 200   # the key's cache is warm
            async with g.admin.get("/metrics") as r:   # the first finds the workspaces
                assert r.status == 200
                await r.read()
            latencies: list[float] = []

            async def requests() -> None:
                while True:
                    started = time.perf_counter()
                    async with g.proxy.get("/people/1", headers=bearer(token)) as r:
                        assert r.status == 200
                        await r.read()
                    latencies.append(time.perf_counter() - started)

            with StretchProbe() as quiet:
                await asyncio.sleep(0.3)
            texts, took = [], []
            with StretchProbe() as probe:
                traffic = asyncio.ensure_future(requests())
                for _ in range(3):
                    started = time.perf_counter()
                    async with g.admin.get("/metrics") as r:
                        assert r.status == 200
                        texts.append(await r.read())   # decoded later: not the gateway's work
                    took.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)
                traffic.cancel()
            scrapes = ", ".join(f"{t * 1e3:.0f}" for t in took)
            print(f"\n{WORKSPACES_N} workspaces: longest loop stretch {probe.longest * 1e3:.1f} "
                  f"ms CPU ({probe.longest_wall * 1e3:.1f} ms wall) during scrapes, "
                  f"{quiet.longest * 1e3:.1f} ms ({quiet.longest_wall * 1e3:.1f} ms) without; "
                  f"{probe.in_gc * 1e3:.1f} ms in garbage collections; "
                  f"scrapes {scrapes} ms; {len(latencies)} requests, slowest "
                  f"{max(latencies) * 1e3:.1f} ms")
            assert probe.longest < LONGEST_STRETCH, (probe.longest, quiet.longest)
            assert latencies   # the proxy answered during the scrapes
            # exact: every workspace's count and the limit in force
            for text in texts:
                samples = month_gauges(text.decode())
                assert_exact(samples, ids)
                assert samples[("keygate_workspace_month_requests", "acme")] >= 1  # + traffic
                assert len(samples) == 2 * (WORKSPACES_N + 1) - 2 * WORKSPACES_N // 5
        finally:
            client.flushdb()
            client.close()


def test_the_usage_gauges_are_rendered_as_prometheus_client_renders_them():
    """The chunks rendered during the read are prometheus-client's exposition of the two
    families, byte for byte: odd ids (an id put in the set by hand), big and zero values, a
    workspace without a limit, no workspace at all."""
    usages = [("acme", 3, 1000), ("open", 0, None), ('we"ird\\id\nx', 10**17, 5),
              ("big", 123456789012, 2**53), ("zero", 0, 0)]

    def theirs(usages) -> bytes:
        used = GaugeMetricFamily(UsageCollector.REQUESTS.name,
                                 UsageCollector.REQUESTS.documentation, labels=["workspace"])
        limit = GaugeMetricFamily(UsageCollector.LIMIT.name, UsageCollector.LIMIT.documentation,
                                  labels=["workspace"])
        for workspace, requests, most in usages:
            used.add_metric([workspace], requests)
            if most is not None:
                limit.add_metric([workspace], most)

        class Families:
            def collect(self):
                return iter((used, limit))
        return generate_latest(Families())

    for chunks in ([usages], [usages[:2], usages[2:]], [usages[:1], [], usages[1:]], []):
        rendered = [UsageCollector.lines(chunk) for chunk in chunks]
        ours = UsageCollector.joined([r[0] for r in rendered], [r[1] for r in rendered])
        assert ours == theirs([u for chunk in chunks for u in chunk])


async def test_scrapes_over_a_distant_store_are_fresh_not_the_last_one_again(
        redis_url, upstream, monkeypatch):
    """A scrape reads the workspaces in pipelines of a few dozen, one round trip each, with
    the proxy's requests served between them. The scrape budget bounds the loop's time
    scrapes take: charged the scrape's wall time, a store 20 ms away (another zone) turned
    the round trips of 300 workspaces into ~0.15 s a scrape, and after a few scrapes in a row
    the next were answered the last exposition again, the usage gauges standing still. A
    scrape is charged the loop's time its steps take, not the store's distance."""
    client = redis.Redis.from_url(redis_url)
    fill(client, 300)
    period, _ = month_period(time.time())
    try:
        async with HeldReplies(redis_url, reply_delay=0.02) as far:
            config = make_config(str(upstream.make_url("")))
            async with gateway_under_test(config, far.url, monkeypatch) as g:
                seen, took = [], []
                for i in range(20):
                    client.set(usage_key("ws-00001", period), 1000 + i)
                    started = time.perf_counter()
                    async with g.admin.get("/metrics") as r:
                        samples = month_gauges(await r.text())
                    took.append(round(time.perf_counter() - started, 3))
                    seen.append(samples[("keygate_workspace_month_requests", "ws-00001")])
                # why a value stood still, if one did (it did twice in loaded runs, not since):
                # a read that failed (a store error) or the budget spent (a render fewer)
                why = {"store errors": g.counter("keygate_store_errors_total"),
                       "reads": g.counter("keygate_store_call_duration_seconds_count",
                                          call="usage_scrape"),
                       "seconds each": took}
        assert seen == [1000 + i for i in range(20)], (seen, why)
    finally:
        client.flushdb()
        client.close()
