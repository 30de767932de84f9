"""``/metrics`` on the admin listener, with month-to-date usage read from the store at scrape
time (so usage per workspace needs no per-request label)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, PlatformCollector,
                               generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector

from .config import Config
from .errors import StoreError
from .store.request import RequestStore
from .metrics import Metrics, UsageCollector, WorkersProcessCollector

log = logging.getLogger("keygate")

# /metrics needs no token, and a scrape costs the event loop the proxy listener shares time
# that grows with the workspaces (2000: ~60 ms of CPU to read and render their gauges, in
# stretches of a few ms at most, and ~0.1 ms more to send the ~250 kB it makes). Scrapes take
# at most SCRAPE_SHARE of the time, with bursts of up to SCRAPE_BURST seconds: past that, a
# scrape is answered the last exposition again, STALE_PER_SECOND of them a second at most (a
# scraper every second, or several Prometheus servers, meet no wait); the others wait until
# the budget has refilled and share the scrape that runs then (SCRAPE_MAX_WAIT seconds at
# most, then they are answered the last exposition again). A scraper (every few seconds or
# more) and people never meet the bound; a flood does.
# A scrape is charged the loop's time it takes: the steps of its read of the store (not the
# round trips, nor the requests served between its chunks; nothing for a read that failed, a
# wait), its rendering, and the time its answer takes to send (at most SEND_CHARGE_MAX: past
# that, a slow reader's wait).
SCRAPE_SHARE = 0.1
SCRAPE_BURST = 1.0
STALE_PER_SECOND = 5.0
SCRAPE_MAX_WAIT = 5.0
SEND_CHARGE_MAX = 0.01


class ScrapeBudget:
    """The seconds scrapes (or their answers) may still take now: ``burst`` at most,
    refilled at ``share`` of a second per second, spent by the time each takes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 share: float | None = None, burst: float | None = None) -> None:
        self.clock = clock
        self.share = SCRAPE_SHARE if share is None else share
        self.burst = SCRAPE_BURST if burst is None else burst
        self.credit = self.burst
        self.at = clock()

    def available(self) -> bool:
        now = self.clock()
        self.credit = min(self.burst, self.credit + (now - self.at) * self.share)
        self.at = now
        return self.credit > 0

    def spend(self, seconds: float) -> None:
        self.credit -= seconds

    def refilled_in(self) -> float:
        """Seconds until the credit is positive again (at least a millisecond)."""
        return max(0.001, -self.credit / self.share)


class UsageGauges:
    """The per-workspace month gauges, read fresh at each scrape (:meth:`Store.usage_chunks`)
    and rendered a chunk of workspaces at a time, so the proxy's requests go on between the
    chunks; concurrent scrapes share one read. A read that fails leaves the last one's."""

    def __init__(self, metrics: Metrics, store) -> None:
        self.metrics, self.store = metrics, store
        self._reading: asyncio.Future | None = None
        self._timer = metrics.store_timer("usage_scrape")

    async def refresh(self) -> float:
        """Read the gauges; the event loop's time the read took (the time of its steps: not
        the store's round trips, nor what the loop ran meanwhile)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(_stepped(self._read()))
        reading = self._reading
        try:
            return await asyncio.shield(reading)
        finally:
            if self._reading is reading and reading.done():
                self._reading = None

    async def _read(self) -> None:
        started = time.perf_counter()
        used: list[bytes] = []
        limit: list[bytes] = []
        try:
            async for usages in self.store.usage_chunks():
                chunk_used, chunk_limit = UsageCollector.lines(usages)
                used.append(chunk_used)
                limit.append(chunk_limit)
        finally:
            self._timer(time.perf_counter() - started)
        self.metrics.usage.text = UsageCollector.joined(used, limit)


async def _stepped(coro) -> float:
    """Run ``coro``; the seconds its steps took (the time between two of its waits)."""
    steps = _Steps(coro)
    await steps
    return steps.seconds


class _Steps:
    """Awaits a coroutine, adding up the time each of its steps takes."""

    def __init__(self, coro) -> None:
        self.coro, self.seconds = coro, 0.0

    def __await__(self):
        coro, value, error = self.coro, None, None
        while True:
            started = time.perf_counter()
            try:
                waiting = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as finished:
                return finished.value
            finally:
                self.seconds += time.perf_counter() - started
            try:
                value, error = (yield waiting), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: passed on to the coroutine
                value, error = None, exc


def add_metrics_route(app: web.Application, metrics: Metrics, store, config: Config) -> None:
    """``GET /metrics``. Scrapes that overlap share one exposition; scrapes past the budget
    (:class:`ScrapeBudget`) are answered the last one again, a few a second, and the others
    wait for the budget."""
    gauges = UsageGauges(metrics, store)
    budget = ScrapeBudget()
    stale = ScrapeBudget(share=STALE_PER_SECOND, burst=STALE_PER_SECOND)  # answers, not s
    last: bytes | None = None
    running: asyncio.Future | None = None

    async def expose() -> bytes:
        nonlocal last
        started, spent = time.perf_counter(), 0.0
        try:
            try:
                # charged the loop's time the read took, not its round trips: the chunks of
                # thousands of workspaces from a store a few ms away took ~1 s of waiting
                spent = await gauges.refresh()
            except StoreError:
                metrics.store_errors.inc()  # the process's own metrics are still worth serving
                # charged nothing: a failed read is a wait (store.timeout, a refusal), not
                # the loop's time, and charged it made the scrapes during a store outage
                # answers of the last exposition again, its store errors standing still
            await asyncio.sleep(0)  # the requests that came in meanwhile before the rendering
            started = time.perf_counter()
            registry = metrics.registry
            if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # serve --workers N
                metrics.flush()   # this worker's tallies; the others flush every FLUSH_EVERY s
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
                registry.register(WorkersProcessCollector(directory))
                PlatformCollector(registry=registry)
            # the usage gauges as this scrape read them (never from prometheus-client's
            # per-worker files under --workers, where a limit that went away would stay)
            last = generate_latest(registry) + metrics.usage.text
            return last
        finally:
            budget.spend(spent + time.perf_counter() - started)

    def done(task: asyncio.Future) -> None:
        nonlocal running
        running = None
        if not task.cancelled():
            task.exception()  # retrieved: every scrape waiting on it re-raises it

    async def handle_metrics(request: web.Request) -> web.Response:
        nonlocal running
        # Past the budget, the last exposition again, but only a few times a second: answered
        # so every time, a flood of scrapes took the loop all the same, in sending it
        # thousands of times a second (20 scrapers, 190 kB: the proxy kept a tenth of its
        # requests). The others wait for the next scrape the budget allows, and share it.
        waited_until = time.monotonic() + SCRAPE_MAX_WAIT
        while running is None and last is not None and not budget.available():
            if stale.available() or time.monotonic() >= waited_until:
                stale.spend(1)
                return _Exposition(last, budget)
            await asyncio.sleep(min(budget.refilled_in(), 1 / STALE_PER_SECOND))
        if running is None:
            running = asyncio.ensure_future(expose())  # its own task: a scrape that goes
            running.add_done_callback(done)           # away does not cancel the others'
        return _Exposition(await asyncio.shield(running), budget)

    app.router.add_get("/metrics", handle_metrics)


class _Exposition(web.Response):
    """A ``/metrics`` answer that charges the time its body takes to write to the budget (up
    to ``SEND_CHARGE_MAX``, the rest being a slow reader's wait, not the loop's work). Written
    by aiohttp after the middleware added its headers (``X-Request-Id``), like any answer."""

    def __init__(self, body: bytes, budget: ScrapeBudget) -> None:
        super().__init__(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        self._budget = budget

    async def write_eof(self, data: bytes = b"") -> None:
        started = time.perf_counter()
        try:
            await super().write_eof(data)
        finally:
            self._budget.spend(min(time.perf_counter() - started, SEND_CHARGE_MAX))


class TimedRequestStore(RequestStore):
    """The hot-path store client with every round trip timed into
    ``keygate_store_call_duration_seconds{call}`` (failed calls too: a slow failure is what an
    operator needs to see). A subclass, so ``gateway.store.request`` stays free of metrics."""

    def __init__(self, url: str, *, timeout: float, metrics: Metrics) -> None:
        super().__init__(url, timeout=timeout)
        self._observe = {call: metrics.store_timer(call) for call in
                         ("authorize", "failure_counts", "failure_resets", "record_failure",
                          "refund", "add_usage", "key_workspace", "read_key")}
        self.on_authorize = self._observe["authorize"]

    async def _timed(self, call: str, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            self._observe[call](time.perf_counter() - started)

    def failure_counts(self, ip: str, key_id: str | None):
        return self._timed("failure_counts", super().failure_counts(ip, key_id))

    def failure_resets_ms(self, ip: str | None, key_id: str | None, window_seconds: int):
        return self._timed("failure_resets",
                           super().failure_resets_ms(ip, key_id, window_seconds))

    def key_workspace(self, key_id: str):
        return self._timed("key_workspace", super().key_workspace(key_id))

    def read_key(self, ws: str, key_id: str):
        return self._timed("read_key", super().read_key(ws, key_id))

    def record_failure(self, ip: str, key_id: str | None, window_seconds: int):
        return self._timed("record_failure",
                           super().record_failure(ip, key_id, window_seconds))

    def record_operator_failure(self, ip: str, window_seconds: int):
        return self._timed("record_failure", super().record_operator_failure(ip, window_seconds))

    def operator_failures_reset_ms(self, ip: str, window_seconds: int):
        return self._timed("failure_resets",
                           super().operator_failures_reset_ms(ip, window_seconds))

    def refund(self, slot, ttl: int, rate_member: str = ""):
        return self._timed("refund", super().refund(slot, ttl, rate_member))

    def add_usage(self, slot, n: int, ttl: int, write_id: str, since: float | None = None):
        return self._timed("add_usage", super().add_usage(slot, n, ttl, write_id, since))
