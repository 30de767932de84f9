"""``/metrics`` on the admin listener, with month-to-date usage read from the store at scrape
time (so usage per workspace needs no per-request label)."""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .config import Config
from .errors import StoreError
from .metrics import Metrics

log = logging.getLogger("keygate")


async def refresh_usage_gauges(metrics: Metrics, store, config: Config) -> None:
    workspaces = await store.list_workspaces()
    usages = []
    for i in range(0, len(workspaces), 100):  # concurrent reads, 100 at a time
        usages += await asyncio.gather(*(store.usage(w.id) for w in workspaces[i:i + 100]),
                                       return_exceptions=True)
    metrics.month_requests.clear()
    metrics.month_limit.clear()
    for usage in usages:
        if isinstance(usage, BaseException):  # e.g. a workspace deleted meanwhile
            if isinstance(usage, StoreError):
                raise usage
            continue
        metrics.month_requests.labels(usage["workspace"]).set(usage["used"])
        if usage["limit"] is not None:
            metrics.month_limit.labels(usage["workspace"]).set(usage["limit"])


def add_metrics_route(app: web.Application, metrics: Metrics, store, config: Config) -> None:
    async def handle_metrics(request: web.Request) -> web.Response:
        try:
            await refresh_usage_gauges(metrics, store, config)
        except StoreError:
            metrics.store_errors.inc()  # the process's own metrics are still worth serving
        registry = metrics.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # keygate serve --workers N
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", handle_metrics)
