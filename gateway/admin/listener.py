"""The admin listener's app: the admin API (:data:`api.ROUTES`), the probes, the OpenAPI
document and the console. (``/metrics`` and the reload endpoint are added by
gateway/observe.py and gateway/reload.py.)"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Awaitable, Callable

from aiohttp import web

from ..closing import CLOSE_STEP_TIMEOUT, stop
from ..config import Config
from ..errors import ServiceUnavailable, StoreError
from ..store import Store
from .api import ROUTES, Call, Endpoint, json_response
from .console import add_console_routes
from .keyops import OPERATOR_ACTOR
from .middleware import (ACTOR, MAX_BODY, OPENAPI_PATH, OPERATOR_TOKEN, KeyAuthenticator,
                         error_middleware)
from .openapi import document_bytes
from .throttle import OperatorThrottle

log = logging.getLogger("keygate.admin")

STORE = web.AppKey("store", Store)
# The probes look at Redis's eviction policy again at most this often (seconds): one INFO call
# to each node keygate writes to, on the admin connections, in the background (a probe never
# waits for it), so a CONFIG SET made while keygate runs is seen within a minute of probes.
EVICTION_CHECK_EVERY = 60.0


class Readiness:
    """``/readyz``: ready only when both store clients work: the admin path answers PING and
    the per-request path's own connection can run its script (``per_request_ready``). A
    change is logged, not every probe."""

    def __init__(self, store: Store,
                 per_request_ready: Callable[[], Awaitable[None]] | None) -> None:
        self.store, self.per_request_ready = store, per_request_ready
        self.problem: str | None = None
        # set by `keygate serve` at SIGTERM: the proxy listener no longer accepts and drains
        # (up to 30 s) while this listener still answers, so a balancer polling /readyz must
        # see the replica leave then, not when the admin listener closes after the drain
        self.stopping = False
        self.eviction: str | None = None  # the eviction problem last logged
        self._eviction_checked = -float("inf")  # time.monotonic() of the last look's start
        self._eviction_look: asyncio.Task[None] | None = None  # the look running, if any
        self._closed = False

    def look_at_eviction(self) -> None:
        """Start a look at Redis's eviction policy (``check_eviction``) in the background,
        unless one is still running: at start (``serve``) and from the probes, neither of
        which waits for it (each node is given ``EVICTION_NODE_TIMEOUT``, a paused one would
        otherwise hold a probe for the store timeout). ``close`` stops it."""
        if self._closed or (self._eviction_look is not None
                            and not self._eviction_look.done()):
            return
        self._eviction_checked = time.monotonic()
        # in a context of its own: nothing of the probe's (or of a command it ran) goes on
        self._eviction_look = asyncio.get_running_loop().create_task(
            self.check_eviction(), context=contextvars.Context())
        self._eviction_look.add_done_callback(_look_ended)

    async def check_eviction(self) -> None:
        """Log a warning when Redis starts evicting keys under maxmemory (``eviction_problem``),
        once, and a line when it stops. When that is not known (a node did not answer), the
        last result stands: a silent node is not an end of eviction."""
        self._eviction_checked = time.monotonic()
        try:
            problem = await self.store.eviction_problem()
        except StoreError as exc:
            log.debug("Redis's eviction policy not looked at: %s", exc)
            return
        if problem != self.eviction:
            if problem:
                log.warning("%s", problem)
            else:
                log.info("Redis no longer evicts keys when full (maxmemory-policy noeviction, "
                         "or no maxmemory)")
            self.eviction = problem

    async def close(self) -> None:
        """Stop a look still running (bounded: gateway.closing), and start none from now on."""
        self._closed = True
        if self._eviction_look is not None:
            await stop(self._eviction_look, CLOSE_STEP_TIMEOUT, "the eviction-policy look")

    async def check(self) -> str | None:
        """What is wrong now (None: ready)."""
        problem = None
        if not await self.store.ping():
            problem = "the admin store connection does not answer PING"
        elif self.per_request_ready is not None:
            try:
                await self.per_request_ready()
            except StoreError as exc:
                problem = str(exc)
        if problem is None and (time.monotonic() - self._eviction_checked
                                >= EVICTION_CHECK_EVERY):
            self.look_at_eviction()  # not waited for: its outcome is a log line, not readiness
        if problem != self.problem:
            if problem:
                log.warning("not ready: %s", problem)
            elif self.problem:
                log.info("ready again: the store answers on both paths")
            self.problem = problem
        return problem


def _look_ended(look: "asyncio.Task[None]") -> None:
    """A look that failed other than on the store (which ``check_eviction`` takes) is logged:
    it ran in no request, nothing else would say it."""
    if not look.cancelled() and (exc := look.exception()) is not None:
        log.error("the look at Redis's eviction policy failed", exc_info=exc)


READINESS = web.AppKey("readiness", Readiness)


def create_admin_app(config: Config, store: Store,
                     per_request_ready: Callable[[], Awaitable[None]] | None = None,
                     authenticate_key: KeyAuthenticator | None = None,
                     client_address: Callable[[web.BaseRequest], str] | None = None,
                     throttle: OperatorThrottle | None = None,
                     key_prefixes: Callable[[], str | tuple[str, ...]] | None = None
                     ) -> web.Application:
    """The admin listener's app: ``/admin/v1/...`` (operator token; with ``authenticate_key``
    also workspace admin keys), ``/healthz``, ``/readyz``, and the console at ``/console/``.
    ``client_address``: the caller's address for the log line (the proxy pipeline's, through
    ``server.trusted_proxies``); the connection's peer without it. ``throttle``: wrong operator
    tokens from one client are bounded (gateway/admin/throttle.py); unbounded without it.
    ``key_prefixes``: the key prefixes its log masks (every one the gateway has used since
    start, ``Pipeline.key_prefixes``); the config in force's without it."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware(
        config, authenticate_key=authenticate_key, client_address=client_address,
        throttle=throttle, current=lambda: store.config, key_prefixes=key_prefixes)])
    app[STORE] = store
    app[READINESS] = Readiness(store, per_request_ready)
    r = app.router
    r.add_get(OPENAPI_PATH, openapi_document)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    for endpoint in ROUTES:
        if endpoint.method == "GET":
            r.add_get(endpoint.path, _serving(endpoint))  # and HEAD
        else:
            r.add_route(endpoint.method, endpoint.path, _serving(endpoint))
    add_console_routes(app)
    return app


def _serving(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of one table row: the call as the authenticated actor."""
    async def handle(request: web.Request) -> web.Response:
        store = request.app[STORE]
        return await endpoint.handler(Call(
            store, store.config, request.get(ACTOR, OPERATOR_ACTOR), request.match_info,
            request.query, request.read, connected=lambda: request.transport is not None,
            operator_token=request.get(OPERATOR_TOKEN, "")))
    return handle


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=document_bytes(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    if readiness.stopping:
        raise ServiceUnavailable("The gateway is shutting down.", code="shutting_down")
    if await readiness.check() is None:
        return json_response({"status": "ok"})
    raise ServiceUnavailable("The key store is unreachable.")
