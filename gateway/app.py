"""Wiring and lifecycle: build the gateway from a config, run its two listeners, stop cleanly.

``running_gateway`` owns every resource (store clients, upstream pools, the argon2 pool) and
closes them in reverse order; ``serve`` is ``keygate serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .auth import Authenticator
from .config import Config, load_config, servable_problems
from .errors import BadRequest, ConfigError, GatewayError, StoreError
from .store.request import RequestStore
from .metrics import Metrics, counted
from .pipeline import Pipeline
from .redis_urls import redact
from .reload import ListenerTLS, Reloader, add_reload_route

log = logging.getLogger("keygate")


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


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers requests its HTTP parser refuses (ambiguous framing, bad header
    syntax) itself, as text; keygate's contract is a JSON body for every error.

    It also holds the edge's limits that aiohttp lacks (``server.timeouts.header`` and
    ``server.max_connections``); idle keep-alive is aiohttp's own ``keepalive_timeout``."""

    # loop time the current request head started arriving (None: no head under way); the
    # server's sweep closes the connection once it is older than server.timeouts.header
    _head_since: float | None = None
    _last_payload = None  # the body stream of the newest request parsed on this connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        server = self._manager
        limit = getattr(server, "max_connections", None)
        if limit is not None and len(server.connections) > limit:
            # over the bound: refused at once, so idle or slow clients cannot take the file
            # descriptors that the upstream and store connections need
            server.refused_connections += 1
            transport.abort()
            return
        if getattr(server, "header_timeout", None):
            self._head_since = self._loop.time()   # the first head is due from now
            server.sweep_heads()

    def data_received(self, data: bytes) -> None:
        if data and self._head_since is None and not self._request_in_progress \
                and not self._messages \
                and (self._last_payload is None or self._last_payload.is_eof()):
            # the first bytes of the next request head (not the rest of a body that aiohttp
            # reads after a handler that did not read it)
            self._head_since = self._loop.time()
        seen = self._request_count
        super().data_received(data)
        if self._request_count != seen:
            self._head_since = None
            if self._messages:
                self._last_payload = self._messages[-1][1]

    def head_overdue(self, deadline: float) -> bool:
        """No whole request head since before ``deadline`` (a slow-loris, a stalled client)."""
        since = self._head_since
        return since is not None and since < deadline and not self._request_in_progress \
            and not self._messages and self.transport is not None

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            error = GatewayError("Internal error.")
        else:  # the client's fault: no traceback in the log, no parser detail on the wire
            log.debug("refused a malformed request from %s: %s", request.remote, exc)
            error = BadRequest("The request is not valid HTTP/1.1.")
            error.status = status
        response = error.response(uuid.uuid4().hex)
        response.force_close()
        return response


class ProxyServer(web.Server):
    """A low-level aiohttp server whose parser errors are SPEC's JSON errors. The proxy
    listener uses it directly (one handler, no router); the admin listener via AdminRunner.

    ``header_timeout``: seconds for a whole request head; ``max_connections``: open client
    connections beyond which a new one is closed at once (None: no bound)."""

    def __init__(self, handler, *, header_timeout: float | None = None,
                 max_connections: int | None = None, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.refused_connections = 0
        self._sweeper: asyncio.Task | None = None

    def sweep_heads(self) -> None:
        """Make sure the header-timeout sweep runs while there are connections. One task per
        server checks every connection a few times per timeout, instead of a timer armed and
        cancelled for every request."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self._loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        timeout = self.header_timeout
        every = min(1.0, timeout / 4)
        while self._connections:
            await asyncio.sleep(every)
            deadline = self._loop.time() - timeout
            for handler in list(self._connections):
                if handler.head_overdue(deadline):
                    handler.force_close()  # closes the transport

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().shutdown(timeout)

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` for the admin app, with JSON answers to unparseable requests too."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return ProxyServer(server.request_handler, request_factory=server.request_factory,
                           loop=server._loop, **server._kwargs)


@contextlib.asynccontextmanager
async def running_gateway(config: Config, store_url: str, *,
                          clock: Callable[[], float] = time.time,
                          metrics: Metrics | None = None,
                          config_path: str | None = None) -> AsyncIterator[Gateway]:
    """Every resource of one gateway process, opened in order and closed in reverse.

    ``config_path``: the file ``config`` came from, re-read on reload (SIGHUP, or
    ``POST /admin/v1/reload``)."""
    from .admin import create_admin_app, self_service
    from .accesslog import AccessLog
    from .proxy import Forwarder
    from .store import Store

    metrics = metrics or Metrics(workspace_labels=config.server.metrics_workspace_labels)
    for upstream in config.upstreams:  # zeros from the start, so rate() and alerts see them
        for code in ("upstream_unavailable", "upstream_timeout"):
            metrics.upstream_errors.labels(upstream, code)
    store = await Store.connect(store_url, config, clock=clock)
    try:
        from .observe import TimedRequestStore
        requests = TimedRequestStore(store_url, timeout=config.store.timeout, metrics=metrics)
    except ValueError as exc:  # e.g. a database number that is not a number
        await store.close()
        raise StoreError(f"bad store URL: {exc}") from exc
    forwarder = Forwarder(config)
    forwarder.on_upstream = metrics.observe_upstream
    auth = Authenticator(config, store, requests, metrics, clock=clock)
    pipeline = None
    access = None
    try:
        await forwarder.start()
        pipeline = Pipeline(config, store, requests, auth, forwarder, metrics,
                            self_service=self_service, clock=clock)
        if config.server.access_log != "off":
            access = AccessLog(config, on_drop=metrics.access_log_dropped.inc)
            await access.start()
            pipeline.access = access.write
        if config.tracing is not None:
            pipeline.tracer = _otel_tracer(config, pipeline.client_ip)
        admin_app = create_admin_app(config, store, requests.ready,
                                     authenticate_key=workspace_admin(pipeline))
        from .observe import add_metrics_route
        add_metrics_route(admin_app, metrics, store, config)
        # Bodies are forwarded byte for byte as sent: a Content-Encoding body is never inflated
        # (an inflated body no longer matches the framing the client declared).
        timeouts = config.server.timeouts
        proxy_server = ProxyServer(counted(pipeline.handle, metrics.in_flight), access_log=None,
                                   auto_decompress=False, keepalive_timeout=timeouts.idle,
                                   header_timeout=timeouts.header,
                                   max_connections=raise_open_file_limit(config))
        tls = {name: ListenerTLS(section.tls) for name, section in
               (("proxy", config.server), ("admin", config.admin)) if section.tls is not None}
        gw = Gateway(config, store, requests, pipeline, metrics, admin_app, proxy_server,
                     access, tls)

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
            if access is not None:  # on or off, json or text: a restart (it owns a writer)
                access.prefix = new.keys.prefix
            logging.getLogger().setLevel(new.server.log_level.upper())
            gw.config = new

        gw.reloader = Reloader(config, config_path, swap, metrics, clock=clock)
        add_reload_route(admin_app, gw.reloader)
        yield gw
    finally:
        try:
            if pipeline is not None:  # bounded: a store that is still down must not hang a stop
                await asyncio.wait_for(pipeline.close(), timeout=10)
        except (asyncio.TimeoutError, StoreError):
            log.warning("shutdown: requests counted while the store was down were not written")
        finally:
            if access is not None:  # after the listeners stopped: every line is written
                await access.close()
            auth.close()
            if pipeline is not None:
                await pipeline.tracer.close()
            await forwarder.close()
            await requests.close()
            await store.close()


def workspace_admin(pipeline: Pipeline):
    """The admin API's check of a ``keys:admin`` key: the proxy pipeline's own steps
    (format, throttle, argon2 or the cache, then state and scope against the store)."""
    from .admin import Actor

    async def authenticate_key(token: str, request: web.BaseRequest) -> Actor:
        key = await pipeline.authenticate(token, request)
        key, _, _ = await pipeline.authorise(key, ("keys:admin",), count=False)
        return Actor(key.key.id, key.workspace.id, key.principal.scopes, key.key.expires_at)
    return authenticate_key


def _otel_tracer(config: Config, client_address: Callable):
    """The OTLP exporting tracer (the ``keygate[otel]`` extra; the config loader checked it is
    installed)."""
    from yarl import URL

    from .accesslog import mask_path
    from .otel import OtelTracer
    hosts = {}
    for name, upstream in config.upstreams.items():
        url = URL(upstream.url)
        hosts[name] = (url.host or "", url.port or 0)
    prefix = config.keys.prefix
    return OtelTracer(config.tracing, hosts, mask_path=lambda path: mask_path(path, prefix),
                      client_address=client_address)


def raise_open_file_limit(config: Config) -> int:
    """Raise this process's soft open-file limit to fit ``server.max_connections`` client
    connections, every upstream's ``max_connections`` and 1024 more for the store, the admin
    listener and logs (up to the hard limit). Returns the client-connection bound in force:
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


async def start_listeners(gw: Gateway, reuse_port: bool = False) -> list[web.BaseRunner]:
    """Bind the proxy and admin listeners. Raises ListenError naming the address."""
    config = gw.config
    proxy_runner = web.ServerRunner(gw.proxy_server, handle_signals=False, shutdown_timeout=30)
    admin_runner = AdminRunner(gw.admin_app, handle_signals=False, access_log=None)
    await proxy_runner.setup()
    await admin_runner.setup()
    runners = [proxy_runner, admin_runner]
    for runner, host, port in ((proxy_runner, config.server.host, config.server.port),
                               (admin_runner, config.admin.host, config.admin.port)):
        try:
            tls = gw.tls.get("proxy" if runner is proxy_runner else "admin")
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024,
                              ssl_context=tls.listener if tls else None).start()
        except OSError as exc:
            await stop_listeners(runners)
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runners


async def stop_listeners(runners: list[web.BaseRunner]) -> None:
    """Stop accepting, let in-flight requests finish (up to the shutdown timeout), close."""
    for runner in runners:
        await runner.cleanup()


async def _serve(config: Config, store_url: str, reuse_port: bool,
                 config_path: str | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve_gateway(config, store_url, reuse_port, stop, config_path)
    except StoreError as exc:  # raised while opening the store clients: one line, no traceback
        print(f"keygate: cannot use the store at {redact(store_url)}: {exc}", file=sys.stderr)
        return 1


async def _serve_gateway(config: Config, store_url: str, reuse_port: bool,
                         stop: asyncio.Event, config_path: str | None = None) -> int:
    async with running_gateway(config, store_url, config_path=config_path) as gw:
        if problem := await gw.store.ping_problem():
            print(f"keygate: cannot reach the store at {redact(store_url)}: {problem}",
                  file=sys.stderr)
            return 1
        try:  # the per-request path's own connection (its credentials, its permissions)
            await gw.requests.ready()
        except StoreError as exc:
            print(f"keygate: cannot use the store at {redact(store_url)}: {exc}",
                  file=sys.stderr)
            return 1
        try:
            runners = await start_listeners(gw, reuse_port)
        except ListenError as exc:
            print(f"keygate: {exc}", file=sys.stderr)
            return 1
        try:
            log.info("keygate listening: proxy %s:%d, admin %s:%d (config %s, pid %d)",
                     config.server.host, config.server.port, config.admin.host,
                     config.admin.port, os.path.abspath(config.source), os.getpid())
            reloads: set[asyncio.Task] = set()

            def hangup() -> None:
                task = asyncio.ensure_future(gw.reloader.on_signal())
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one held: now
            await stop.wait()
            log.info("shutting down: finishing in-flight requests")
        finally:
            await stop_listeners(runners)
    return 0


def _run_worker(config: Config, store_url: str, reuse_port: bool,
                config_path: str | None = None) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # not on Linux: the default loop is fine
        pass
    return asyncio.run(_serve(config, store_url, reuse_port, config_path))


def _preflight(config: Config, store_url: str) -> str | None:
    """What every worker would fail on (store, ports), checked once before forking, so a bad
    start says it in one line rather than once per worker. None when all is well."""
    import socket

    async def store_problem() -> str | None:
        from .store import Store
        try:
            store = await Store.connect(store_url, config)
        except StoreError as exc:
            return f"cannot use the store at {redact(store_url)}: {exc}"
        try:
            requests = RequestStore(store_url, timeout=config.store.timeout)
        except ValueError as exc:
            await store.close()
            return f"cannot use the store at {redact(store_url)}: bad store URL: {exc}"
        try:
            if problem := await store.ping_problem():
                return f"cannot reach the store at {redact(store_url)}: {problem}"
            await requests.ready()
        except StoreError as exc:
            return f"cannot use the store at {redact(store_url)}: {exc}"
        finally:
            await requests.close()
            await store.close()
        return None

    if problem := asyncio.run(store_problem()):
        return problem
    for host, port in ((config.server.host, config.server.port),
                       (config.admin.host, config.admin.port)):
        try:
            for family, kind, proto, _, addr in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    probe.bind(addr)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _supervise(config: Config, store_url: str, workers: int,
               config_path: str | None = None) -> int:
    """N worker processes sharing the listening ports (SO_REUSEPORT); SIGTERM stops all,
    SIGHUP reloads all."""
    import shutil
    import tempfile

    if problem := _preflight(config, store_url):
        print(f"keygate: {problem}", file=sys.stderr)
        return 1
    # Metrics aggregate across workers through prometheus-client's multiprocess mode: each
    # worker writes its samples to files in this directory; /metrics on any worker sums them.
    metrics_dir = tempfile.mkdtemp(prefix="keygate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["KEYGATE_SUPERVISOR_PID"] = str(os.getpid())  # a worker asks it to reload all
    children: list[int] = []

    def forward(signum, _frame) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    # SIGTERM/SIGINT are held while forking: one arriving mid-loop is delivered once every
    # worker exists and the handler that forwards it is in place (none is orphaned).
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                from prometheus_client import values
                values.ValueClass = values.MultiProcessValue()
                code = _run_worker(config, store_url, reuse_port=True, config_path=config_path)
            except BaseException:  # os._exit below would swallow it: say why the worker died
                import traceback
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def reload_all(signum, _frame) -> None:
        log.info("SIGHUP: asking %d workers to reload", len(children))
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGHUP)

    signal.signal(signal.SIGHUP, reload_all)  # after forking: workers have their own
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals | {signal.SIGHUP})
    status = 0
    remaining = set(children)
    while remaining:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        remaining.discard(pid)
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1  # a worker died (even the last one): the exit code must say so
            if remaining:  # take the rest down so the supervisor above restarts us
                forward(signal.SIGTERM, None)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def setup_logging(config: Config) -> None:
    """Application logs on stderr; JSON lines when the access log is JSON (one format for a
    log pipeline to parse), else ``time level logger: message``."""
    from .accesslog import JsonFormatter
    handler = logging.StreamHandler(sys.stderr)
    if config.server.access_log == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.server.log_level.upper())


def serve(config_path: str | None, workers: int | None = None) -> int:
    """``keygate serve``: exit code 0 after a clean stop, 1 when it cannot start."""
    try:
        config = load_config(config_path)
        if problems := servable_problems(config):
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    setup_logging(config)
    # Until the event loop takes it over, a SIGHUP (a reload) must neither end the process nor
    # be lost: it is held (workers inherit the mask) and delivered once a handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from .store.embedded import EmbeddedError, resolve_store_url
    try:
        store_url, embedded = resolve_store_url(config)
    except EmbeddedError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 1
    try:
        workers = workers or config.server.workers
        if workers > 1:
            return _supervise(config, store_url, workers, config_path)
        return _run_worker(config, store_url, reuse_port=False, config_path=config_path)
    finally:
        if embedded is not None:
            embedded.stop()
