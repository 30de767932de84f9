"""Prometheus metrics, on a registry of the gateway's own (one per app, so tests start fresh).

Request counters are labelled by route (the route's path glob, never the raw path), method and
status class, so cardinality is bounded by the config. Per-workspace usage is read from Redis
at scrape time instead of being a per-request label.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Callable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from . import __version__
from .models import HTTP_METHODS

# No `<name>_created` series (prometheus-client's default for every counter and histogram,
# set before any is made): docs/operations.md's table is the list of what /metrics serves,
# and `serve --workers N` (the multiprocess collector) never serves them, so the series set
# would change with the worker count. A process-wide switch: keygate's process is its own.
disable_created_metrics()

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
STORE_BUCKETS = (.0002, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 workspace_labels: bool = False) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_Flusher(self))   # first: every collect sees the tallies added
        # The conventional process_* and python_info series (a registry of our own does not
        # get prometheus-client's defaults). Under --workers, /metrics sums every worker's
        # process_* instead (WorkersProcessCollector).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge("keygate_build_info", "Always 1; the running keygate version "
                                "in the label.", ["version"], registry=r,
                                multiprocess_mode="max")
        self.build_info.labels(__version__).set(1)
        self.in_flight = Gauge("keygate_requests_in_flight", "Proxy requests being handled "
                               "now.", registry=r, multiprocess_mode="livesum")
        self.store_calls = Histogram("keygate_store_call_duration_seconds",
                                     "Store round trips on the request path (and the usage "
                                     "read of a scrape), by call.", ["call"],
                                     buckets=STORE_BUCKETS, registry=r)
        self.upstream_errors = Counter("keygate_upstream_errors_total",
                                       "Forwards that failed, by upstream and error code "
                                       "(upstream_unavailable|upstream_timeout).",
                                       ["upstream", "code"], registry=r)
        self.workspace_labels = workspace_labels
        labels = ["route", "method", "status_class"] + (["workspace"] if workspace_labels else [])
        self.requests = Counter("keygate_requests_total",
                                "Proxy requests answered, by route, method and status class.",
                                labels, registry=r)
        self.auth_failures = Counter("keygate_auth_failures_total",
                                     "Requests refused by authentication, authorisation or "
                                     "limits, by error code.", ["reason"], registry=r)
        self.request_duration = Histogram("keygate_request_duration_seconds",
                                          "Time from request to response headers, by route.",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("keygate_upstream_duration_seconds",
                                           "Time the upstream took to answer with headers.",
                                           ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.key_cache = Counter("keygate_key_cache_total",
                                 "Verified-key cache lookups, by result (hit|miss).",
                                 ["result"], registry=r)
        self.argon2 = Counter("keygate_argon2_verifications_total",
                              "argon2id verifications run, by result (ok|fail).",
                              ["result"], registry=r)
        self.store_errors = Counter("keygate_store_errors_total",
                                    "Store calls that failed: the request path's (take-"
                                    "backs and open WebSocket tunnels' key checks included) "
                                    "and each scrape's usage read.", registry=r)
        self.degraded = Counter("keygate_degraded_decisions_total",
                                "Requests let through while the store was down "
                                "(on_store_error: open).", registry=r)
        self.access_log_dropped = Counter("keygate_access_log_dropped_total",
                                          "Access-log lines dropped because stderr could not "
                                          "keep up (the buffer was full) or refused them.",
                                          registry=r)
        self.connections_refused = Counter("keygate_connections_refused_total",
                                           "Client connections to the proxy listener closed "
                                           "at once: it held server.max_connections.",
                                           registry=r)
        self.log_lines_dropped = Counter("keygate_log_lines_dropped_total",
                                         "Application log lines dropped because stderr could "
                                         "not keep up (the queue was full) or refused them.",
                                         registry=r)
        # read from the store at each scrape and served as read (never kept in prometheus-
        # client's per-worker files under --workers, where a workspace's limit that went away
        # would outlive its clear())
        self.usage = UsageCollector()  # served after the registry's exposition
        self.config_reloads = Counter("keygate_config_reloads_total",
                                      "Config reloads (SIGHUP or POST /admin/v1/reload), by "
                                      "result (ok|error).", ["result"], registry=r)
        self.config_reloaded_at = Gauge("keygate_config_last_reload_timestamp_seconds",
                                        "When the config in force was loaded (start or last "
                                        "successful reload), Unix seconds; under --workers, "
                                        "the oldest worker's.", registry=r,
                                        multiprocess_mode="min")
        self._per_request: dict[tuple, tuple] = {}
        self._per_upstream: dict[str, _Hist] = {}
        self._counts: dict[int, _Count] = {}
        self._hists: dict[int, _Hist] = {}
        self.in_flight_now = self._in_flight_set = 0  # Pipeline.handle counts requests in
        for result in ("hit", "miss"):
            self.key_cache.labels(result)
        for result in ("ok", "fail"):
            self.argon2.labels(result)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)

    def upstreams_known(self, upstreams) -> None:
        """Every upstream's error counters at zero from the start (and from the reload that
        adds it), so that ``rate()`` and the alerts see its first failures."""
        for upstream in upstreams:
            for code in ("upstream_unavailable", "upstream_timeout"):
                self.upstream_errors.labels(upstream, code)

    # Hot-path helpers. A request's observations are tallied in plain Python (an int, a
    # bucket index found with bisect, a float sum) and added to prometheus-client's values in
    # one go by ``flush``: each ``inc``/``observe`` there takes a lock and a histogram walks
    # its buckets in Python, ~10 µs a request in all (py-spy, 8 connections), where the tally
    # costs ~2. ``flush`` runs before every collect of this registry (a scrape, a test's
    # ``get_sample_value``) and every ``FLUSH_EVERY`` seconds (``serve --workers N``: a scrape
    # answered by one worker reads the others' files). Tallies are loop-thread only.

    def observe_request(self, route: str, method: str, status: int, workspace: str | None,
                        elapsed: float) -> None:
        key = (route, method, status, workspace)
        tally = self._per_request.get(key)
        if tally is None:
            if method not in _METHODS:
                method = "OTHER"  # clients choose methods: keep the label set bounded
            labels = [route, method, f"{status // 100}xx"]
            if self.workspace_labels:
                labels.append(workspace or "")
            tally = (self.tally(self.requests.labels(*labels)),
                     self._hist(self.request_duration, (route,)))
            if len(self._per_request) < 10_000:
                self._per_request[key] = tally
        tally[0].n += 1
        tally[1].observe(elapsed)

    def store_timer(self, call: str) -> Callable[[float], None]:
        """The ``observe`` of the store-call histogram for ``call`` (tallied)."""
        return self._hist(self.store_calls, (call,)).observe

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        tally = self._per_upstream.get(upstream)
        if tally is None:
            tally = self._per_upstream[upstream] = self._hist(self.upstream_duration,
                                                              (upstream,))
        tally.observe(seconds)

    def tally(self, child) -> "_Count":
        """A counter child's tally (``inc()`` adds one, brought in at the next flush)."""
        tally = self._counts.get(id(child))
        if tally is None:
            tally = self._counts[id(child)] = _Count(child)
        return tally

    def _hist(self, histogram: Histogram, labels: tuple[str, ...]) -> "_Hist":
        child = histogram.labels(*labels)
        tally = self._hists.get(id(child))
        if tally is None:
            tally = self._hists[id(child)] = _Hist(child)
        return tally

    def flush(self) -> None:
        """Add every tally to prometheus-client's values, and set the in-flight gauge."""
        for count in self._counts.values():
            if count.n:
                n, count.n = count.n, 0
                count.child.inc(n)
        for hist in self._hists.values():
            if hist.total:
                hist.flush()
        if self.in_flight_now != self._in_flight_set:
            self._in_flight_set = self.in_flight_now
            self.in_flight.set(self.in_flight_now)


FLUSH_EVERY = 0.1


class _Count:
    __slots__ = ("child", "n")

    def __init__(self, child) -> None:
        self.child, self.n = child, 0

    def inc(self) -> None:
        self.n += 1


class _Hist:
    """A histogram child's observations since the last flush: a count per bucket and the sum."""
    __slots__ = ("child", "bounds", "counts", "sum", "total")

    def __init__(self, child) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)   # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sum, self.total = 0.0, 0

    def observe(self, value: float) -> None:
        # prometheus-client's rule: the first bucket whose bound is >= the value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.total += 1

    def flush(self) -> None:
        child, counts, amount = self.child, self.counts, self.sum
        self.counts, self.sum, self.total = [0] * len(self.bounds), 0.0, 0
        # prometheus-client keeps a histogram child's buckets and sum as values of its own;
        # adding to them directly is what ``observe`` does, once per bucket instead of per
        # observation (tests/test_metrics.py compares the two expositions)
        child._sum.inc(amount)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)


class UsageCollector:
    """``keygate_workspace_month_requests`` and ``keygate_workspace_month_limit``, exactly as
    the last scrape read them from the store (``gateway.observe.UsageGauges``): a workspace
    without a monthly limit has no limit sample.

    Not a collector of the registry: the scrape renders the samples a chunk of workspaces at a
    time as it reads them (:meth:`lines`), the event loop free between chunks, and ``/metrics``
    serves the registry's exposition followed by :attr:`text`. Rendered by prometheus-client
    in one go, 2000 workspaces' gauges held the loop the proxy shares for ~20 ms a scrape.
    The lines are prometheus-client's, byte for byte (tests/test_scrape_stall.py)."""

    REQUESTS = GaugeMetricFamily("keygate_workspace_month_requests",
                                 "Requests counted this calendar month (UTC), per workspace; "
                                 "read from the store at scrape time.", labels=["workspace"])
    LIMIT = GaugeMetricFamily("keygate_workspace_month_limit",
                              "The monthly request quota in force, per workspace: its own "
                              "limits override, else its plan's (absent when unlimited); "
                              "read at scrape time.", labels=["workspace"])

    def __init__(self) -> None:
        self.text = self.joined([], [])

    def describe(self) -> list[Metric]:
        """The two families (without samples)."""
        return [self.REQUESTS, self.LIMIT]

    @staticmethod
    def lines(usages: list[tuple[str, float, float | None]]) -> tuple[bytes, bytes]:
        """The samples of (workspace, used, limit) triples: (requests lines, limit lines)."""
        used, limit = [], []
        for workspace, requests, most in usages:
            label = _label_value(workspace)
            used.append(f'keygate_workspace_month_requests{{workspace="{label}"}} '
                        f'{floatToGoString(requests)}\n')
            if most is not None:
                limit.append(f'keygate_workspace_month_limit{{workspace="{label}"}} '
                             f'{floatToGoString(most)}\n')
        return "".join(used).encode(), "".join(limit).encode()

    @classmethod
    def joined(cls, used: list[bytes], limit: list[bytes]) -> bytes:
        """The two families: their HELP and TYPE lines, then the chunks of :meth:`lines`."""
        return b"".join([_header(cls.REQUESTS), *used, _header(cls.LIMIT), *limit])


def _header(family: Metric) -> bytes:
    return generate_latest(_Families(family))


class _Families:
    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _label_value(value: str) -> str:
    """A label value as prometheus-client's text format escapes it (a workspace id has nothing
    to escape; an id put in the set by hand might)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


class _Flusher:
    """First collector of the registry: brings the tallies in before anything is read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        self.metrics.flush()
        return iter(())


# The method label's values: RFC 9110's methods, anything else is "OTHER" (bounded cardinality).
_METHODS = frozenset(HTTP_METHODS)


class WorkersProcessCollector:
    """``process_*`` for ``serve --workers N``: summed over every live worker, found by the pid
    in the names of prometheus-client's multiprocess files (``counter_<pid>.db``), so a scrape
    that any one worker answers describes the whole gateway, not the worker that answered.
    Start time is the oldest worker's."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _pids(self) -> list[int]:
        pids = set()
        for name in os.listdir(self.directory):
            stem = name.rsplit(".", 1)[0]
            tail = stem.rsplit("_", 1)[-1]
            if tail.isdigit() and os.path.exists(f"/proc/{tail}"):
                pids.add(int(tail))
        return sorted(pids) or [os.getpid()]

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in collector.collect():
                if family.name not in merged:
                    merged[family.name] = family
                    continue
                into = merged[family.name]
                for i, theirs in enumerate(family.samples[:len(into.samples)]):
                    mine = into.samples[i]
                    if family.name == "process_start_time_seconds":
                        value = min(mine.value, theirs.value)
                    elif family.name == "process_max_fds":
                        value = mine.value
                    else:
                        value = mine.value + theirs.value
                    into.samples[i] = mine._replace(value=value)
        yield from merged.values()
