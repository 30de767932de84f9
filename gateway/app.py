"""Wiring and lifecycle: build the gateway from a config, run its two listeners, stop cleanly.

``running_gateway`` owns every resource (store clients, upstream pools, the argon2 pool) and
closes them in reverse order; ``start_listeners``/``stop_listeners`` bind and release the proxy
and admin ports. Processes (``keygate serve``, workers, pre-start checks) are
``gateway.workers``; the listeners' low-level server is ``gateway.proxying.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .auth import Authenticator
from .closing import CLOSE_STEP_TIMEOUT, bounded
from .config import Config
from .errors import StoreError
from .store.request import RequestStore
from .metrics import FLUSH_EVERY, Metrics
from .ledger import RETRY_EVERY
from .pipeline import Pipeline
from .proxying.server import (HEAD_MAX, LINGER_TIME, AdminRunner, ProxyServer,
                              drop_vanished_peers)
from .reload import ListenerTLS, Reloader, add_reload_route
from .argon2_pool import release_freed_memory_every

log = logging.getLogger("keygate")

# Seconds between two readings of the key prefixes recorded in the store (kg:prefixes): a
# replica learns within this long one that another replica started with, and records its own
# once a store that failed at its start or reload answers again.
KEY_PREFIXES_EVERY = 60

# Seconds a stop lets requests in flight finish, then writes what the fail-open ledger counted
# (deploy/k8s/deployment.yaml's grace period covers all three, after its preStop sleep).
# KEYGATE_DRAIN_SECONDS sets the first (drain_seconds): a platform whose grace period is
# shorter, or an API whose requests are long, sets its own.
SHUTDOWN_TIMEOUT = 30
DRAIN_ENV = "KEYGATE_DRAIN_SECONDS"
MAX_DRAIN_SECONDS = 3600
# Then seconds the admin listener lets its calls in flight finish (they are short: a stalled
# one is cut off; aiohttp's default, 60 s, outlasted deploy/k8s's grace period on its own).
ADMIN_SHUTDOWN_TIMEOUT = 5
LEDGER_SHUTDOWN_TIMEOUT = 10


def drain_problem() -> str | None:
    """What is wrong with ``$KEYGATE_DRAIN_SECONDS``, if anything (``serve`` refuses to
    start then, as for a config problem: a stop that drains for a time nobody chose is worse
    than no start)."""
    text = os.environ.get(DRAIN_ENV)
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_DRAIN_SECONDS:  # NaN fails too
        return (f"{DRAIN_ENV} must be a number of seconds from 0 to {MAX_DRAIN_SECONDS}, "
                f"not {text!r}")
    return None


def drain_seconds() -> float:
    """Seconds a stop lets the proxy's requests in flight finish: ``$KEYGATE_DRAIN_SECONDS``,
    else SHUTDOWN_TIMEOUT (``serve`` checked the variable before it started)."""
    if drain_problem() is not None or DRAIN_ENV not in os.environ:
        return SHUTDOWN_TIMEOUT
    return float(os.environ[DRAIN_ENV].strip())
# Open connections the admin listener holds at most (per process); one over it is closed at
# once. Its callers are few (the CLI, the console, probes, a scraper), and its connections
# take their descriptors from the reserve raise_open_file_limit keeps for the store and the
# logs: without a bound, idle admin connections took every descriptor, and the proxy listener
# could no longer accept a client nor open an upstream or store connection.
ADMIN_MAX_CONNECTIONS = 256
# Then seconds each store client may take to close (its connections, its background tasks;
# each of those steps is bounded too: gateway.closing): a close that hung held the stop for
# ever (a cancelled Sentinel master check that went on).
STORE_CLOSE_TIMEOUT = 5


def stop_bound(config: Config) -> float:
    """Seconds a stop (SIGTERM) takes at worst, every step of it waiting its own bound out, as
    docs/operations.md (Stopping) adds them up: 83 with the default drain, the access log and
    tracing on. The supervisor of ``serve --workers N`` kills a worker still there past it
    (``gateway.workers``): one that does not end (its event loop wedged, the process stopped)
    would otherwise hold the stop, and the grace period sized on this bound, for ever."""
    from .accesslog import ACCESS_LOG_CLOSE_TIMEOUT, LOG_FLUSH_TIMEOUT
    from .tracing import SPAN_FLUSH_TIMEOUT
    return (drain_seconds() + ADMIN_SHUTDOWN_TIMEOUT
            + CLOSE_STEP_TIMEOUT                 # the look at Redis's eviction policy
            + LEDGER_SHUTDOWN_TIMEOUT            # the usage counted while Redis was down
            + (ACCESS_LOG_CLOSE_TIMEOUT if config.server.access_log != "off" else 0)
            + (SPAN_FLUSH_TIMEOUT if config.tracing is not None else 0)
            + CLOSE_STEP_TIMEOUT                 # the upstream connections
            + 2 * STORE_CLOSE_TIMEOUT            # the two store clients
            + LOG_FLUSH_TIMEOUT)                 # the log's last lines at exit


@dataclass
class Gateway:
    config: Config
    store: object             # gateway.store.Store
    requests: RequestStore
    pipeline: Pipeline
    metrics: Metrics
    admin_app: web.Application
    proxy_server: web.Server
    access_log: object = None  # gateway.accesslog.AccessLog, when the access log is on
    tls: dict[str, "ListenerTLS"] = field(default_factory=dict)  # "proxy" / "admin"
    reloader: "Reloader | None" = None
    # reads the key prefixes any keygate has served with on this store (kg:prefixes), this
    # config's recorded, then again every KEY_PREFIXES_EVERY s: awaited once the store's
    # start-up checks passed, before listening (serve, demo)
    learn_key_prefixes: Callable[[], Awaitable[None]] | None = None


@contextlib.asynccontextmanager
async def running_gateway(config: Config, store_url: str, *,
                          clock: Callable[[], float] = time.time,
                          ledger_retry: float = RETRY_EVERY,
                          metrics: Metrics | None = None,
                          config_path: str | None = None) -> AsyncIterator[Gateway]:
    """Every resource of one gateway process, opened in order and closed in reverse.

    ``clock``: the wall clock (a test's own, to move time); every time decision takes it
    plus its skew to Redis's clock (``RequestStore.redis_clock``).
    ``ledger_retry``: seconds between attempts to write fail-open counts back to the store.
    ``config_path``: the file ``config`` came from, re-read on reload (SIGHUP, or
    ``POST /admin/v1/reload``)."""
    from .admin import create_admin_app, handle_self_service
    from .admin.throttle import OperatorThrottle
    from .accesslog import AccessLog
    from .proxying.forward import Forwarder
    from .store import Store

    metrics = metrics or Metrics(workspace_labels=config.server.metrics_workspace_labels)
    metrics.upstreams_known(config.upstreams)
    store = await Store.connect(store_url, config, clock=clock)
    try:
        from .observe import TimedRequestStore
        requests = TimedRequestStore(store_url, timeout=config.store.timeout, metrics=metrics)
    except ValueError as exc:  # e.g. a database number that is not a number
        await store.close()
        raise StoreError(f"bad store URL: {exc}") from exc
    # One clock for every replica: Redis's (the host's, or the test's, corrected by the skew
    # to Redis's TIME). The reloader's metric keeps the host's own.
    host_clock, clock = clock, requests.redis_clock(clock)
    store.clock = clock
    forwarder = Forwarder(config)
    forwarder.on_upstream = metrics.observe_upstream
    auth = Authenticator(config, store, requests, metrics, clock=clock)
    store.argon2 = auth.argon2  # new keys' hashes too: never at the event loop's expense
    pipeline = None
    access = None
    flushing = None
    readiness = None
    releasing = asyncio.ensure_future(release_freed_memory_every())  # argon2's 19 MiB runs
    refreshing: asyncio.Future | None = None  # the key prefixes' reading (learn_key_prefixes)
    log_drops = _count_dropped_log_lines(metrics.log_lines_dropped.inc)
    try:
        await forwarder.start()
        pipeline = Pipeline(config, store, requests, auth, forwarder, metrics,
                            self_service=handle_self_service, clock=clock,
                            ledger_retry=ledger_retry)
        # the operator token, as the admin listener reads it (once: a restart changes it),
        # masked in the access log and spans too: a script may send it to the proxy port
        operator_token = os.environ.get(config.admin.token_env, "").strip()
        pipeline.operator_token = operator_token  # never adopted as a request id
        if config.server.access_log != "off":
            access = AccessLog(config, on_drop=metrics.access_log_dropped.inc,
                               operator_token=operator_token)
            await access.start()
            pipeline.access = access.write
        if config.tracing is not None:
            pipeline.tracer = _otel_tracer(config, pipeline.client_ip, operator_token)
        admin_app = create_admin_app(config, store, requests.ready,
                                     authenticate_key=workspace_admin(pipeline),
                                     client_address=pipeline.client_ip,
                                     throttle=OperatorThrottle(auth),
                                     key_prefixes=lambda: pipeline.key_prefixes)
        from .admin.listener import READINESS
        readiness = admin_app[READINESS]
        from .observe import add_metrics_route
        add_metrics_route(admin_app, metrics, store, config)
        # Bodies are forwarded byte for byte as sent: a Content-Encoding body is never inflated
        # (an inflated body no longer matches the framing the client declared).
        timeouts = config.server.timeouts
        # max_line_size: a request line is bounded by the head's bound alone, so a path past
        # the parser's own 8 KiB is refused by path sanity (400 bad_path), as any over-long
        # path is, not as unreadable HTTP. A header field keeps aiohttp's 8 KiB (nginx's and
        # most upstreams' bound on one line; trailer fields too, which HEAD_MAX does not
        # count): a verify call's X-Forwarded-Uri over it is refused, saying so.
        proxy_server = ProxyServer(pipeline.handle, access_log=None, max_line_size=HEAD_MAX,
                                   auto_decompress=False, keepalive_timeout=timeouts.idle,
                                   header_timeout=timeouts.header,
                                   write_timeout=timeouts.body,
                                   lingering_time=min(LINGER_TIME, timeouts.body),
                                   max_connections=raise_open_file_limit(config),
                                   inline=True)
        proxy_server.on_refused = metrics.connections_refused.inc
        proxy_server.on_unreadable = pipeline.unreadable  # its parser's 400s: logged, counted
        tls = {name: ListenerTLS(section.tls) for name, section in
               (("proxy", config.server), ("admin", config.admin)) if section.tls is not None}
        gw = Gateway(config, store, requests, pipeline, metrics, admin_app, proxy_server,
                     access, tls)

        def learn_prefixes(prefixes: list[str]) -> None:
            """Every key prefix used since start, the config's (the pipeline's reconfigure
            adds it) and ``prefixes`` (recorded in the store by any keygate): the query
            refuses their tokens, a public route's Authorization drops them, and the logs and
            spans mask them."""
            pipeline.learn_prefixes(prefixes)
            forwarder.learn_prefixes(prefixes)
            if access is not None:  # on or off, json or text: a restart (it owns a writer)
                access.prefix = pipeline.key_prefixes
            if config.tracing is not None:  # the spans mask what the access log masks
                pipeline.tracer.mask_path = _span_mask(pipeline.key_prefixes, operator_token)

        said = [False]  # a failure to read them said, until they are read again

        async def read_prefixes(config: Config) -> list[str]:
            """``Store.key_prefixes_seen`` for ``config``'s prefix; when the store fails,
            that prefix alone, said in the log once until a read succeeds again."""
            try:
                seen, recorded = await store.key_prefixes_seen(config.keys.prefix)
            except Exception as exc:  # noqa: BLE001  (whatever it is: never a start's end)
                if not said[0]:
                    log.warning("could not read the key prefixes used on this store (tokens "
                                "of an earlier prefix are refused and masked once it answers, "
                                "within %d s): %s", KEY_PREFIXES_EVERY, exc)
                    said[0] = True
                return [config.keys.prefix]
            said[0] = False
            if recorded > len(seen):
                log.warning("the store records %d key prefixes (kg:prefixes); tokens of the %d "
                            "most recent are refused and masked", recorded, len(seen))
            return seen

        async def every_while() -> None:
            while True:
                await asyncio.sleep(KEY_PREFIXES_EVERY)
                learn_prefixes(await read_prefixes(gw.config))

        async def learn_key_prefixes() -> None:
            nonlocal refreshing
            learn_prefixes(await read_prefixes(gw.config))
            if refreshing is None:  # (a process started after another's change learns it)
                refreshing = asyncio.ensure_future(every_while())
        gw.learn_key_prefixes = learn_key_prefixes

        def swap(new: Config) -> None:
            """The reload itself: everything that can fail first, then one synchronous swap."""
            certificates = {name: ListenerTLS.prepare(section.tls, where, new.source)
                            for name, section, where in (("proxy", new.server, "server.tls"),
                                                         ("admin", new.admin, "admin.tls"))
                            if name in tls and section.tls is not None}
            for name, context in certificates.items():
                tls[name].current = context
            store.config = new
            auth.reconfigure(new)
            forwarder.reconfigure(new)
            pipeline.reconfigure(new)
            learn_prefixes(prefixes_seen)  # (in_use read them, just before)
            metrics.upstreams_known(new.upstreams)  # an upstream added: its errors at zero
            if config.tracing is not None:  # (restart-only: the tracer of the start, still)
                pipeline.tracer.upstream_hosts = _upstream_hosts(new)  # forward spans name them
            logging.getLogger().setLevel(new.server.log_level.upper())
            gw.config = new

        from .config_in_use import in_use_problems

        prefixes_seen: list[str] = []

        async def in_use(new: Config, old: Config) -> list[str]:
            # (with what the swap needs made beforehand, off the event loop: the decoy hash;
            # and a new key prefix recorded, with those other keygates recorded)
            problems = await auth.prepare(new) or await in_use_problems(store, new, old)
            if not problems and new.keys.prefix != old.keys.prefix:  # (else nothing to record)
                prefixes_seen[:] = await read_prefixes(new)
            return problems

        gw.reloader = Reloader(config, config_path, swap, metrics, clock=host_clock,
                               in_use=in_use)
        add_reload_route(admin_app, gw.reloader)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # serve --workers N: another worker
            flushing = asyncio.ensure_future(_flush_metrics_every(metrics))  # may answer scrapes
        yield gw
    finally:
        if flushing is not None:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
        if refreshing is not None:  # (its store read, cancelled, ends at once)
            refreshing.cancel()
            await asyncio.gather(refreshing, return_exceptions=True)
        if readiness is not None:  # its look at the eviction policy (bounded), before the
            await readiness.close()  # store it asks is closed
        try:
            # bounded: a store that is still down must not hang a stop (not asyncio.wait_for,
            # which can wait for ever: see gateway.closing)
            if pipeline is not None and not await bounded(
                    pipeline.close(), LEDGER_SHUTDOWN_TIMEOUT, None):
                raise StoreError("the ledger's writes did not end in time")
        except StoreError:
            log.warning("shutdown: requests counted while the store was down were not written")
        finally:
            if flushing is not None:  # after the shutdown's own store calls (the ledger's)
                metrics.flush()
            releasing.cancel()
            log_drops()
            if access is not None:  # after the listeners stopped: every line is written
                await access.close()
            auth.close()
            if pipeline is not None:
                await pipeline.tracer.close()
            # each bounded: one that does not end in time is logged, and the next is closed
            await bounded(forwarder.close(), CLOSE_STEP_TIMEOUT, "closing the upstream pools")
            await bounded(requests.close(), STORE_CLOSE_TIMEOUT, "closing the per-request store")
            await bounded(store.close(), STORE_CLOSE_TIMEOUT, "closing the admin store")


def _count_dropped_log_lines(count: Callable[[], None]) -> Callable[[], None]:
    """Count the application log lines ``setup_logging``'s handler drops (a stderr that does
    not keep up) with ``count``, in this process's metrics (under ``--workers``, prometheus-
    client's shared files sum them as they do the access log's); returns the undoing."""
    from .accesslog import BackgroundHandler
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BackgroundHandler)]
    for handler in handlers:
        handler.on_drop = count

    def stop() -> None:
        for handler in handlers:
            if handler.on_drop == count:  # not a newer gateway's in this process
                handler.on_drop = None
    return stop


async def _flush_metrics_every(metrics: Metrics) -> None:
    """Until cancelled. A flush that fails (the multiprocess directory full or gone) loses
    what it was writing, is logged once, and the next ones go on: the task must not end,
    or this worker's requests would reach the shared files only when it answers a scrape."""
    failing = False
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        try:
            metrics.flush()
        except Exception as exc:
            if not failing:
                log.warning("metrics could not be written to the shared files: %s", exc)
            failing = True
        else:
            failing = False


def workspace_admin(pipeline: Pipeline):
    """The admin API's check of a ``keys:admin`` key: the proxy pipeline's own steps
    (format, throttle, argon2 or the cache, then state and scope against the store)."""
    from .admin import Actor
    from .admin.middleware import confine
    from .errors import GatewayError, TooManyRequests
    from .reserved import over_own_calls

    async def authenticate_key(token: str, request: web.BaseRequest) -> Actor:
        # the key's IP allow-list holds here as on the proxy listener (SPEC: 403
        # ip_not_allowed), against the address the failure throttle saw
        client = pipeline.client_ip(request)
        key = await pipeline.authenticate(token, client)
        try:  # a call out of the key's reach (refused by confine once it is admitted: 404
            confine(request, Actor(key.key_id, key.workspace))  # or 403) is not a use
        except GatewayError:
            reached = False
        else:
            reached = True
        # a use: last_used_at, not usage; and one of the key's own calls, bounded as its
        # /_keygate/ calls are, in the same log (the same operations, on the other listener)
        try:
            key, _, _ = await pipeline.authorise(key, ("keys:admin",), count=False,
                                                 client=client, stamp=reached, spend=reached)
        except TooManyRequests as exc:
            raise over_own_calls(exc) from None
        return Actor(key.key_id, key.workspace, key.scopes, key.expires_at, key.rev)
    return authenticate_key


def _otel_tracer(config: Config, client_address: Callable, operator_token: str = ""):
    """The OTLP exporting tracer (the ``keygate[otel]`` extra; the config loader checked it is
    installed)."""
    from .otel import OtelTracer
    return OtelTracer(config.tracing, _upstream_hosts(config),
                      mask_path=_span_mask(config.keys.prefix, operator_token),
                      client_address=client_address)


def _upstream_hosts(config: Config) -> dict[str, tuple[str, int]]:
    """Each upstream's (host, port), which its ``forward`` spans name (``server.address``,
    ``server.port``): made anew at each reload (the swap gives it to the tracer), as a reload
    moves, adds or removes upstreams."""
    from yarl import URL
    hosts = {}
    for name, upstream in config.upstreams.items():
        url = URL(upstream.url)
        hosts[name] = (url.host or "", url.port or 0)
    return hosts


def _span_mask(prefix: str | tuple[str, ...], operator_token: str = ""
               ) -> Callable[[str], str]:
    """What the spans' paths, User-Agent and tracestate members are masked with: the access
    log's masking (keys of ``prefix``, or of every prefix used since start, and the operator
    token). Made anew at each reload (the swap sets it on the tracer): a mask closing over the
    start's prefix left a reloaded prefix's keys whole."""
    from .accesslog import mask_path, mask_secret
    if not operator_token:
        return lambda text: mask_path(text, prefix)
    return lambda text: mask_secret(mask_path(text, prefix), operator_token)


def raise_open_file_limit(config: Config) -> int:
    """Raise this process's soft open-file limit to fit ``server.max_connections`` client
    connections, every upstream's ``max_connections`` and 1024 more for the store, the admin
    listener (at most ``ADMIN_MAX_CONNECTIONS``) and logs (up to the hard limit). Returns the client-connection bound in force:
    ``max_connections``, or less when the hard limit cannot fit it (so idle clients can never
    take the descriptors that upstream and store connections need)."""
    import resource
    reserve = 1024 + sum(u.max_connections for u in config.upstreams.values())
    wanted = config.server.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted + reserve:
        return wanted
    target = wanted + reserve if hard == resource.RLIM_INFINITY else min(wanted + reserve, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft >= wanted + reserve:
        return wanted
    bound = max(soft - reserve, 64)
    log.warning("the open-file limit (%d) cannot fit server.max_connections %d plus %d for "
                "upstreams and the store: accepting at most %d client connections%s (raise "
                "the hard limit, ulimit -Hn, to lift this)", soft, wanted, reserve, bound,
                "" if soft - reserve >= 64 else " and the upstream bounds may not all fit")
    return bound


class ListenError(Exception):
    """A listener could not bind (port in use, no permission, bad address)."""


class _Site(web.TCPSite):
    """``web.TCPSite`` whose TLS handshakes must end within ``handshake_timeout`` (the
    listeners use ``server.timeouts.header``). aiohttp passes no handshake timeout, so asyncio's
    60 s applied, and the head timeout starts only once the handshake is done: a client that
    opened TCP and never sent a ClientHello held its socket for a minute, outside
    ``server.max_connections`` (a connection counts once its handshake is done). Its TLS
    shutdown has the same bound: asyncio waited 30 s for the client's close_notify after every
    close keygate makes (a refusal's lingering close, an idle keep-alive's end), so a client
    that never answers it held its place under ``server.max_connections`` that long.

    Its listening sockets drop a peer that acknowledges nothing for ``vanish_timeout``
    (``server.timeouts.body``; ``drop_vanished_peers``)."""

    def __init__(self, *args, handshake_timeout: float, vanish_timeout: float,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout = handshake_timeout
        self._vanish_timeout = vanish_timeout

    async def start(self) -> None:
        await self._listen()
        drop_vanished_peers(self._server.sockets, self._vanish_timeout)

    async def _listen(self) -> None:
        if self._ssl_context is None:
            return await super().start()
        await web.BaseSite.start(self)  # registers the site with its runner
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, ssl_handshake_timeout=self._handshake_timeout,
            ssl_shutdown_timeout=self._handshake_timeout)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


async def start_listeners(gw: Gateway, reuse_port: bool = False) -> list[web.BaseRunner]:
    """Bind the proxy and admin listeners. Raises ListenError naming the address."""
    config = gw.config
    proxy_runner = web.ServerRunner(gw.proxy_server, handle_signals=False,
                                    shutdown_timeout=drain_seconds())
    admin_runner = AdminRunner(gw.admin_app, handle_signals=False, access_log=None,
                               shutdown_timeout=ADMIN_SHUTDOWN_TIMEOUT,
                               header_timeout=config.server.timeouts.header,
                               write_timeout=config.server.timeouts.body,
                               keepalive_timeout=config.server.timeouts.idle,
                               lingering_time=min(LINGER_TIME, config.server.timeouts.body),
                               max_connections=ADMIN_MAX_CONNECTIONS)
    await proxy_runner.setup()
    await admin_runner.setup()
    runners = [proxy_runner, admin_runner]
    for runner, host, port in ((proxy_runner, config.server.host, config.server.port),
                               (admin_runner, config.admin.host, config.admin.port)):
        try:
            tls = gw.tls.get("proxy" if runner is proxy_runner else "admin")
            await _Site(runner, host, port, reuse_port=reuse_port or None, backlog=1024,
                        ssl_context=tls.listener if tls else None,
                        handshake_timeout=config.server.timeouts.header,
                        vanish_timeout=config.server.timeouts.body).start()
        except OSError as exc:
            await stop_listeners(runners)
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runners


async def stop_listeners(runners: list[web.BaseRunner]) -> None:
    """Stop accepting, let in-flight requests finish (up to the shutdown timeout), close."""
    for runner in runners:
        await runner.cleanup()
