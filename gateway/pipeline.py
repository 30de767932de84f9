"""The proxy listener's request pipeline, top to bottom.

    sanitise path → refuse keys in the URL → match route → extract credential → authenticate
    → authorise (state, scopes, rate, quota: one store round trip) → forward → observe

Each step returns a value or raises one named ``GatewayError``; ``handle`` is the one place
that turns errors into SPEC's JSON responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from typing import Callable, NamedTuple

from aiohttp import web

from . import errors
from .auth import Authenticator, CachedKey
from .config import Config, Route
from .errors import GatewayError, ServiceUnavailable, StoreError, TooManyRequests
from .store.request import Decision, RequestStore, Slot
from .usage import Month, MonthCache, ratelimit_headers, utc_day
from .models import rfc3339
from .routes import RouteTable, check_path, no_route, query_has_token
from .tokens import adoptable_request_id
from .tracing import Tracer
from .trust import TrustedProxies

log = logging.getLogger("keygate.proxy")
access_log = logging.getLogger("keygate.access")

RESERVED = "/_keygate/"
VERIFY = "/_keygate/v1/verify"
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]{1,32}")  # an RFC 9110 token, upper-cased
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STALE_RETRIES = 3
LOCAL_COUNT_RETRY = 1.0  # seconds between attempts to write fail-open counts to the store


class Outcome:
    """What the pipeline learned about a request, for the access log and metrics."""
    __slots__ = ("route", "upstream", "workspace", "key_id", "code", "trace")

    def __init__(self) -> None:
        self.route = self.upstream = self.workspace = self.key_id = self.code = None
        self.trace = None  # gateway.tracing.Trace


def _check_transfer_coding(values: list[str]) -> None:
    """Only ``chunked`` is forwarded: the body is re-framed upstream, so another coding
    (``gzip, chunked``) would reach the upstream silently stripped of its label (RFC 9112
    6.1: a server answers 501 to a transfer coding it does not understand)."""
    codings = [c.strip().lower() for v in values for c in v.split(",") if c.strip()]
    if codings != ["chunked"]:
        raise errors.NotImplemented_("Only the 'chunked' transfer coding is supported; send "
                                     "compressed bodies with Content-Encoding.")


def original_request(request: web.BaseRequest, suffix: str) -> tuple[str, str]:
    """The method and URI (path and query) a verify call asks about: ``X-Forwarded-Method`` +
    ``X-Forwarded-Uri`` (Traefik, nginx), then ``X-Original-Method`` + ``X-Original-URI``
    (nginx ``auth_request``), else the call's own method and its path after the verify prefix
    (Envoy ``ext_authz`` with ``path_prefix``)."""
    headers = request.headers
    for method_header, uri_header in (("X-Forwarded-Method", "X-Forwarded-Uri"),
                                      ("X-Original-Method", "X-Original-URI")):
        uri = headers.getall(uri_header, ())
        if uri:
            methods = headers.getall(method_header, ())
            if len(uri) > 1 or len(methods) > 1:
                raise errors.BadRequest(f"{uri_header} or {method_header} was sent twice.",
                                        code="bad_request")
            method = methods[0].strip().upper() if methods else request.method
            if not _METHOD.fullmatch(method):
                raise errors.BadRequest(f"{method_header} is not an HTTP method.",
                                        code="bad_request")
            return method, uri[0].strip()
    _, _, query = request.raw_path.partition("?")
    path = suffix or "/"
    return request.method, f"{path}?{query}" if query else path


class Counted(NamedTuple):
    """The month and UTC day a request was counted in (a refund takes it back from those)."""
    month: Month
    day: str


class _CountedLocally(dict):
    """The (empty) RateLimit fields of a request decided while the store was down; ``slot`` is
    where it was counted locally, so a refund takes it back there and not from the store."""
    slot: Slot | None = None


class Pipeline:
    def __init__(self, config: Config, store, requests: RequestStore, auth: Authenticator,
                 forwarder, metrics=None, self_service=None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.requests = requests
        self.auth = auth
        self.forwarder = forwarder
        self.metrics = metrics
        self.self_service = self_service
        self.clock = clock
        self.months = MonthCache()
        self._store_error_logged_at, self._store_errors_unlogged = -1e9, 0
        self.local_counts: dict[Slot, int] = {}  # (workspace, key, month, day) → requests
        self._flushes: set[asyncio.Task] = set()
        self._retry: asyncio.Task | None = None
        self.reconfigure(config)
        self._rid_prefix = os.urandom(4).hex()
        self._rid_counter = 0
        self.tracer = Tracer()  # gateway.otel.OtelTracer when tracing is configured

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` for the next request (a reload). Synchronous, so no request sees
        half of it; one already past route matching keeps the route and upstream it found."""
        self.config = config
        self.routes = RouteTable(config.routes)
        self.fail_open = config.store.on_store_error == "open"
        self._prefix = config.keys.prefix
        self.max_body = config.server.max_body_bytes
        self._key_headers = tuple(h.lower() for h in config.keys.headers)
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        ident = config.identity_headers
        self._identity = (ident.workspace, ident.key_id, ident.scopes, ident.plan)

    # --- the one handler ----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = self._request_id(request)
        outcome = Outcome()
        outcome.trace = self.tracer.start(request)
        try:
            response = await self.pipeline(request, request_id, outcome)
        except GatewayError as exc:
            outcome.code = exc.code
            response = exc.response(request_id)
            if exc.status in (408, 413, 501):  # the rest of that body is not worth reading
                response.force_close()
                if exc.status == 408:  # a stalled sender: answer, then close without the
                    await self._answer_and_close(request, response)  # lingering read
        except Exception:  # a bug: never a traceback on the wire
            log.exception("unhandled error in request %s", request_id)
            outcome.code = "internal_error"
            response = GatewayError("Internal error.").response(request_id)
        if not response.prepared and "X-Request-Id" not in response.headers:
            response.headers["X-Request-Id"] = request_id  # keygate's own /_keygate/ answers
        self.observe(request, response, outcome, request_id, started)
        return response

    async def pipeline(self, request: web.BaseRequest, request_id: str,
                       outcome: Outcome) -> web.StreamResponse:
        if "Transfer-Encoding" in request.headers:
            _check_transfer_coding(request.headers.getall("Transfer-Encoding"))
        raw_path, _, raw_query = request.raw_path.partition("?")
        self.screen(raw_path, raw_query)
        if raw_path.startswith(RESERVED):
            return await self.internal(request, raw_path, outcome)
        route = self.routes.match(request.method, raw_path)
        outcome.route, outcome.upstream = route.path, route.upstream
        if route.upstream is None:  # a verify-only route: /_keygate/v1/verify answers it
            raise no_route(request.method, raw_path)
        upstream = self.config.upstreams[route.upstream]
        trace = outcome.trace
        if route.public:
            with trace.step("forward"):
                return await self.forwarder.forward(request, upstream, None, request_id, {},
                                                    trace=trace)
        token = self.credential(request)
        with trace.step("authenticate"):
            key = await self.authenticate(token, request)
        outcome.workspace, outcome.key_id = key.workspace.id, key.key.id
        # A declared body over the limit is refused after every other check (SPEC's order)
        # and, like every refusal of keygate's own, is not counted.
        too_large = (request.content_length or 0) > self.max_body
        with trace.step("authorise"):
            key, limit_headers, counted = await self.authorise(key, route.scopes,
                                                               count=not too_large,
                                                               request=request)
        if too_large:
            raise errors.body_too_large(self.max_body)
        try:
            with trace.step("forward"):
                return await self.forwarder.forward(request, upstream, key.principal,
                                                    request_id, limit_headers, trace=trace)
        except GatewayError as exc:
            if not exc.reached_upstream:  # refused here, or never sent: it does not count
                await self.refund(key, limit_headers, counted)
            raise

    # --- steps --------------------------------------------------------------------------------

    def screen(self, raw_path: str, raw_query: str) -> None:
        """The first two rows of SPEC's table: a canonical path, and no key in the query."""
        check_path(raw_path)
        if raw_query and query_has_token(raw_query, self._prefix):
            raise errors.BadRequest(
                "An API key was sent in the URL; URLs end up in logs. Send it in the "
                "Authorization header instead, and rotate this key.", code="key_in_url")

    def credential(self, request: web.BaseRequest) -> str:
        """The one token this request carries (missing / malformed / ambiguous otherwise).

        Its shape and checksum are checked by ``Authenticator.authenticate``, only for tokens
        not already verified in this process."""
        found: list[str] = []
        repeated = False
        seen_headers: set[str] = set()
        for name, value in request.headers.items():
            lname = name.lower()
            if lname == "authorization":
                scheme, _, rest = value.strip().partition(" ")
                if scheme.lower() != "bearer" or not rest.strip():
                    raise errors.invalid_token(
                        "malformed_key", "The Authorization header must be 'Bearer <key>'.")
                value = rest.strip()
            elif lname not in self._key_headers:
                continue
            repeated |= lname in seen_headers
            seen_headers.add(lname)
            found.append(value.strip())
        if not found:
            raise errors.missing_key()
        if repeated:
            raise errors.ambiguous_key("The API key header was sent more than once.")
        if any(v != found[0] for v in found[1:]):
            raise errors.ambiguous_key("Two different API keys were sent; send exactly one.")
        return found[0]

    async def authenticate(self, token: str, request: web.BaseRequest) -> CachedKey:
        try:
            return await self.auth.authenticate(token, self.client_ip(request))
        except StoreError as exc:
            raise self._store_down(exc) from exc

    async def authorise(self, key: CachedKey, scopes: tuple[str, ...], *, count: bool,
                        request: web.BaseRequest | None = None
                        ) -> tuple[CachedKey, dict[str, str], Counted]:
        """State (revoked/expired/disabled, the key's IP allow-list), scopes, then rate and
        quotas in one round trip. Returns the key as confirmed, the RateLimit fields, and the
        month and day the request was counted in.

        Decisions read from the cache are confirmed against the store's revision before they
        are answered, so a widened scope, an extended expiry or a key enabled again acts on the
        next request too."""
        for _ in range(_STALE_RETRIES):
            now = self.clock()
            k = key.key
            expired = k.expires_at is not None and k.expires_at <= now
            # Revoked is permanent, so the cache may answer it without the store; but the table
            # puts expired_key first, and an expiry must be confirmed (it can be extended).
            if k.revoked_at is not None and not expired:
                raise errors.invalid_token("revoked_key", "This API key has been revoked.")
            missing = next((s for s in scopes if not key.principal.has_scope(s)), None)
            # the client address exactly as the failure throttle computes it
            blocked = key.networks is not None and request is not None and \
                not key.allows(self.client_ip(request))
            month = self.months.get(now)
            counted = Counted(month, self.months.day(now))
            try:
                decision = await self.requests.authorize(
                    workspace=k.workspace, key_id=k.id, key_rev=k.rev, ws_rev=key.workspace.rev,
                    count=count and not expired and missing is None and k.revoked_at is None
                    and k.enabled and not blocked,
                    rate_limit=key.rate.requests if key.rate else 0,
                    rate_period_ms=key.rate.period_seconds * 1000 if key.rate else 1000,
                    monthly_limit=key.monthly_limit, period=month.period,
                    counter_ttl=month.counter_ttl(now), now_ms=int(now * 1000),
                    day=counted.day, key_limit=key.key_limit)
            except StoreError as exc:
                return key, self._degraded(key, expired, missing, blocked, count, exc), counted
            if decision.outcome == "stale":
                try:
                    fresh = await self.auth.refresh(key)
                except StoreError as exc:
                    raise self._store_down(exc) from exc
                if fresh is None:
                    raise errors.invalid_token("invalid_key", "The API key is not valid.")
                key = fresh
                continue
            if expired:
                raise errors.invalid_token("expired_key", "This API key has expired.")
            if k.revoked_at is not None:  # expired once, then extended: revoked all the same
                raise errors.invalid_token("revoked_key", "This API key has been revoked.")
            self._check_controls(key, blocked)
            if missing is not None:
                raise errors.insufficient_scope(missing)
            if self.local_counts:
                self._flush_local_counts()
            return key, self._decide(key, decision, month, now), counted
        raise ServiceUnavailable("The key changed while this request was checked; retry.",
                                 headers={"Retry-After": "1"})

    @staticmethod
    def _check_controls(key: CachedKey, blocked: bool) -> None:
        """The key's own switches, once its secret verified: disabled, IP allow-list."""
        if not key.key.enabled:
            raise errors.invalid_token("disabled_key", "This API key is disabled.")
        if blocked:
            raise errors.Forbidden("This API key may not be used from this address.",
                                   code="ip_not_allowed")

    def _decide(self, key: CachedKey, d: Decision, month, now: float) -> dict[str, str]:
        headers = ratelimit_headers(key.rate, d.rate_remaining, d.window_reset_ms,
                                    key.monthly_limit, d.month_used, month, now,
                                    key.key_limit, d.key_used)
        if d.outcome == "rate":  # the script reports r=0 for the refused rate itself
            headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_ms / 1000)))
            raise TooManyRequests(f"Rate limit of {key.rate} exceeded for this key.",
                                  code="rate_limited", headers=headers)
        if d.outcome == "quota":
            headers["Retry-After"] = str(month.seconds_left(now))
            raise TooManyRequests(
                f"The workspace's monthly quota of {key.monthly_limit} requests is used up; it "
                f"resets at {rfc3339(month.resets_at)}.", code="quota_exceeded", headers=headers)
        if d.outcome == "key_quota":
            headers["Retry-After"] = str(month.seconds_left(now))
            raise TooManyRequests(
                f"This key's own monthly cap of {key.key_limit} requests is used up; it resets "
                f"at {rfc3339(month.resets_at)}.", code="key_quota_exceeded", headers=headers)
        return headers

    async def refund(self, key: CachedKey, limit_headers: dict | None = None,
                     counted: Counted | None = None) -> None:
        """Take back a counted request the upstream never received, from the month and day
        that counted it (a connect attempt can end after midnight at the turn of the month)."""
        now = self.clock()
        counted = counted or Counted(self.months.get(now), utc_day(now))
        month = counted.month
        if isinstance(limit_headers, _CountedLocally):  # counted here while the store was down
            slot = limit_headers.slot
            n = self.local_counts.get(slot, 0)
            if n > 1:
                self.local_counts[slot] = n - 1
                return
            if n == 1:
                del self.local_counts[slot]
                return
            # already flushed to the store: take it back there
        try:
            await self.requests.refund(Slot(key.workspace.id, key.key.id, month.period,
                                            counted.day), month.counter_ttl(now))
        except StoreError:
            log.warning("could not refund a request that never reached the upstream")

    # --- store down ---------------------------------------------------------------------------

    def _store_down(self, cause: BaseException | None = None) -> ServiceUnavailable:
        if self.metrics:
            self.metrics.store_errors.inc()
        self._log_store_error(cause)
        return ServiceUnavailable("The key store is unavailable; the request was not checked.",
                                  headers={"Retry-After": "1"})

    def _log_store_error(self, cause: BaseException | None) -> None:
        """Name the cause of store failures in the log (its class and message, never a
        password), at most once a second however many requests fail."""
        self._store_errors_unlogged += 1
        now = time.monotonic()
        if cause is not None and now - self._store_error_logged_at >= 1.0:
            log.warning("store unavailable: %s (%d store failures since the last report)",
                        cause, self._store_errors_unlogged)
            self._store_error_logged_at, self._store_errors_unlogged = now, 0

    def _degraded(self, key: CachedKey, expired: bool, missing: str | None, blocked: bool,
                  count: bool, exc: StoreError) -> dict[str, str]:
        """The store failed on a key verified in this process: fail closed, or — with
        ``on_store_error: open`` — decide from the cached state and count locally."""
        if not self.fail_open:
            raise self._store_down(exc) from exc
        if self.metrics:
            self.metrics.store_errors.inc()
        self._log_store_error(exc)
        if expired:
            raise errors.invalid_token("expired_key", "This API key has expired.")
        if key.key.revoked_at is not None:
            raise errors.invalid_token("revoked_key", "This API key has been revoked.")
        self._check_controls(key, blocked)
        if missing is not None:
            raise errors.insufficient_scope(missing)
        headers = _CountedLocally()
        if count:
            now = self.clock()
            slot = headers.slot = Slot(key.workspace.id, key.key.id, self.months.get(now).period,
                                       utc_day(now))
            self.local_counts[slot] = self.local_counts.get(slot, 0) + 1
            if self._retry is None or self._retry.done():
                self._retry = asyncio.ensure_future(self._retry_flush())
        if self.metrics:
            self.metrics.degraded.inc()
        return headers

    async def _retry_flush(self) -> None:
        """While requests are counted locally, try to write them once a second, so usage is
        right soon after the store returns even if no request comes to trigger a flush."""
        while self.local_counts:
            await asyncio.sleep(LOCAL_COUNT_RETRY)
            if self.local_counts:
                self._flush_local_counts()  # a tracked task: cancelling this loop spares it
                await asyncio.wait(set(self._flushes))

    def _flush_local_counts(self) -> None:
        """Write the requests counted locally to the store, in the background. The counts are
        taken out of ``local_counts`` first, so concurrent flushes never write one twice, and
        put back when the store fails again, so none is lost."""
        counts, self.local_counts = self.local_counts, {}
        task = asyncio.ensure_future(self._flush(counts))
        self._flushes.add(task)  # a task nobody references can be garbage-collected mid-way
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, counts: dict[Slot, int]) -> None:
        now = self.clock()
        ttl = self.months.get(now).counter_ttl(now)
        for slot, n in counts.items():
            try:
                await self.requests.add_usage(slot, n, ttl)
            except StoreError:
                self.local_counts[slot] = self.local_counts.get(slot, 0) + n

    async def close(self) -> None:
        """At shutdown, after the listeners stopped: write what was counted locally while the
        store was down (a process that stops must not take its share of the month with it)."""
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self.local_counts:
            counts, self.local_counts = self.local_counts, {}
            await self._flush(counts)
        if self.local_counts:
            log.warning("the store is unavailable: %d requests counted while it was down were "
                        "not written to the monthly usage", sum(self.local_counts.values()))

    # --- the reserved /_keygate/ prefix -------------------------------------------------------

    async def verify(self, request: web.BaseRequest, suffix: str,
                     outcome: Outcome) -> web.StreamResponse:
        """``/_keygate/v1/verify``: the whole pipeline on the *original* request, counted as a
        forwarded request would be, and nothing forwarded. Allowed: 200 with the identity and
        RateLimit fields as headers; refused: the error the proxy would answer."""
        method, target = original_request(request, suffix)
        raw_path, _, raw_query = target.partition("?")
        if not raw_path.startswith("/"):
            raise errors.BadRequest("The original URI must be a path starting with '/'.",
                                    code="bad_path")
        self.screen(raw_path, raw_query)
        if raw_path.startswith(RESERVED):
            raise no_route(method, raw_path)
        route = self.routes.match(method, raw_path)
        outcome.route, outcome.upstream = route.path, route.upstream
        if route.public:
            return web.Response(status=200)
        token = self.credential(request)
        trace = outcome.trace
        with trace.step("authenticate"):
            key = await self.authenticate(token, request)
        outcome.workspace, outcome.key_id = key.workspace.id, key.key.id
        with trace.step("authorise"):
            key, limit_headers, _ = await self.authorise(key, route.scopes, count=True,
                                                         request=request)
        headers = dict(limit_headers)
        p = key.principal
        ws, kid, scopes, plan = self._identity
        headers[ws] = p.workspace
        headers[kid] = p.key_id
        headers[scopes] = " ".join(sorted(p.scopes))
        headers[plan] = p.plan
        return web.Response(status=200, headers=headers)

    async def internal(self, request: web.BaseRequest, raw_path: str,
                       outcome: Outcome) -> web.StreamResponse:
        if raw_path == VERIFY or raw_path.startswith(VERIFY + "/"):
            return await self.verify(request, raw_path[len(VERIFY):], outcome)
        outcome.route = raw_path if raw_path == "/_keygate/v1/usage" else "/_keygate/v1/keys"
        if raw_path == "/_keygate/v1/usage":
            if request.method not in ("GET", "HEAD"):
                raise errors.MethodNotAllowed("Use GET for the usage endpoint.",
                                              headers={"Allow": "GET, HEAD"})
            token = self.credential(request)
            key = await self.authenticate(token, request)
            outcome.workspace, outcome.key_id = key.workspace.id, key.key.id
            key, _, _ = await self.authorise(key, (), count=False, request=request)
            try:
                usage = await self.store.usage(key.workspace.id)
                current = await self.store.get_key(key.workspace.id, key.key.id) or key.key
                used, = await self.store.keys_used_this_month(key.workspace.id, [current.id])
            except StoreError as exc:
                raise self._store_down(exc) from exc
            usage["key"] = current.to_json(tuple(sorted(key.principal.scopes)), self.clock(),
                                           used)
            return web.Response(body=json.dumps(usage).encode(), content_type="application/json")
        if raw_path == "/_keygate/v1/keys" or raw_path.startswith("/_keygate/v1/keys/"):
            token = self.credential(request)
            key = await self.authenticate(token, request)
            outcome.workspace, outcome.key_id = key.workspace.id, key.key.id
            key, _, _ = await self.authorise(key, ("keys:admin",), count=False, request=request)
            try:
                return await self.self_service(request, key.principal, self.store, self.config)
            except StoreError as exc:  # not a bug: the store failed under the key endpoints
                raise self._store_down(exc) from exc
        raise no_route(request.method, raw_path)

    # --- small helpers ------------------------------------------------------------------------

    @staticmethod
    async def _answer_and_close(request: web.BaseRequest, response: web.Response) -> None:
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass
        if request.transport is not None:
            request.transport.close()

    def _request_id(self, request: web.BaseRequest) -> str:
        rid = request.headers.get("X-Request-Id")
        if adoptable_request_id(rid):
            return rid
        self._rid_counter += 1
        return f"{self._rid_prefix}{self._rid_counter:012x}"

    def client_ip(self, request: web.BaseRequest) -> str:
        peer = request.remote or "unknown"
        if not self.trusted:
            return peer
        return self.trusted.client_address(peer, request.headers.getall("X-Forwarded-For", ()))

    def observe(self, request: web.BaseRequest, response: web.StreamResponse,
                outcome: Outcome, request_id: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        m = self.metrics
        route = outcome.route or "(none)"
        if m is not None:
            m.observe_request(route, request.method, response.status,
                              outcome.workspace if m.workspace_labels else None, elapsed)
            if outcome.code is not None and response.status in (401, 403, 429) or \
                    outcome.code in ("ambiguous_key", "key_in_url"):
                m.auth_failures.labels(outcome.code).inc()
            elif outcome.code in ("upstream_unavailable", "upstream_timeout"):
                m.upstream_errors.labels(outcome.upstream or "", outcome.code).inc()
        if self.access is not None:
            self.access(request, response, outcome, request_id, elapsed)
        outcome.trace.end(request, response, outcome, request_id)

    access: Callable | None = None
