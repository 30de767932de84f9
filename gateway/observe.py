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
from .metrics import Metrics, WorkersProcessCollector

log = logging.getLogger("keygate")

# /metrics needs no token, and a scrape costs the event loop the proxy listener shares time
# that grows with the workspaces (2000: ~90 ms of CPU to read and render their gauges).
# Scrapes take at most SCRAPE_SHARE of the time, with bursts of up to SCRAPE_BURST seconds:
# past that, a scrape is answered the last exposition again until the budget has refilled.
# A scraper (every few seconds or more) and people never meet the bound; a flood does.
# A scrape is charged its time, less that of a read of the store that failed (a wait).
SCRAPE_SHARE = 0.1
SCRAPE_BURST = 1.0


class ScrapeBudget:
    """The seconds scrapes may still take now: ``SCRAPE_BURST`` at most, refilled at
    ``SCRAPE_SHARE`` of a second per second, spent by the time each scrape takes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.credit = SCRAPE_BURST
        self.at = clock()

    def available(self) -> bool:
        now = self.clock()
        self.credit = min(SCRAPE_BURST, self.credit + (now - self.at) * SCRAPE_SHARE)
        self.at = now
        return self.credit > 0

    def spend(self, seconds: float) -> None:
        self.credit -= seconds


class UsageGauges:
    """The per-workspace month gauges, read fresh at each scrape in one store round trip
    (:meth:`Store.usage_all`, given the workspaces the last scrape found); concurrent scrapes
    share one read."""

    def __init__(self, metrics: Metrics, store) -> None:
        self.metrics, self.store = metrics, store
        self._known: list[str] = []
        self._reading: asyncio.Future | None = None
        self._timer = metrics.store_timer("usage_scrape")

    async def refresh(self) -> None:
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if self._reading is reading and reading.done():
                self._reading = None

    async def _read(self) -> None:
        started = time.perf_counter()
        try:
            usages = await self.store.usage_all(self._known)
        finally:
            self._timer(time.perf_counter() - started)
        self._known = [usage["workspace"] for usage in usages]
        self.metrics.usage.usages = [(u["workspace"], u["used"], u["limit"]) for u in usages]


def add_metrics_route(app: web.Application, metrics: Metrics, store, config: Config) -> None:
    """``GET /metrics``. Scrapes that overlap share one exposition; scrapes past the budget
    (:class:`ScrapeBudget`) are answered the last one again."""
    gauges = UsageGauges(metrics, store)
    budget = ScrapeBudget()
    last: bytes | None = None
    running: asyncio.Future | None = None

    async def expose() -> bytes:
        nonlocal last
        started = time.perf_counter()
        try:
            try:
                await gauges.refresh()
            except StoreError:
                metrics.store_errors.inc()  # the process's own metrics are still worth serving
                # charged from here: a failed read is a wait (store.timeout, a refusal), not
                # the loop's time, and charged it made the scrapes during a store outage
                # answers of the last exposition again, its store errors standing still
                started = time.perf_counter()
            registry = metrics.registry
            if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # serve --workers N
                metrics.flush()   # this worker's tallies; the others flush every FLUSH_EVERY s
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
                registry.register(metrics.usage)  # as this scrape read it, not from the files
                registry.register(WorkersProcessCollector(directory))
                PlatformCollector(registry=registry)
            last = generate_latest(registry)
            return last
        finally:
            budget.spend(time.perf_counter() - started)

    def done(task: asyncio.Future) -> None:
        nonlocal running
        running = None
        if not task.cancelled():
            task.exception()  # retrieved: every scrape waiting on it re-raises it

    async def handle_metrics(request: web.Request) -> web.Response:
        nonlocal running
        if running is None:
            if last is not None and not budget.available():
                return _exposition(last)
            running = asyncio.ensure_future(expose())  # its own task: a scrape that goes
            running.add_done_callback(done)           # away does not cancel the others'
        return _exposition(await asyncio.shield(running))

    app.router.add_get("/metrics", handle_metrics)


def _exposition(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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

    def add_usage(self, slot, n: int, ttl: int, write_id: str):
        return self._timed("add_usage", super().add_usage(slot, n, ttl, write_id))
