"""The proxy listener's request pipeline, top to bottom.

    sanitise path → refuse keys in the URL → match route → extract credential → authenticate
    → authorise (state, scopes, rate, quota: one store round trip) → forward → observe

Each step returns a value or raises one named ``GatewayError``; ``handle`` is the one place
that turns errors into SPEC's JSON responses. Whether a key is admitted (expired → revoked →
disabled → address → scope) is ``gateway.access.refusal``; requests counted while the store is
down are ``gateway.ledger``; keygate's own ``/_keygate/`` endpoints are ``gateway.reserved``,
built from these same steps. With a ``cors`` section, ``gateway.cors`` answers preflights
after the path checks and labels every answer; without one it costs an ``is None`` check.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol

from aiohttp import hdrs, web
from multidict import istr

from . import errors, overrides, reserved
from .access import refusal
from .auth import Authenticator, CachedKey
from .config import Config, Upstream
from .cors import origin_of
from .errors import GatewayError, ServiceUnavailable, StoreError, TooManyRequests
from .proxying.server import answer_and_close
from .proxying.tunnel import TunnelWatch, websocket_handshake
from .store.request import Decision, RequestStore, Slot
from .ledger import RETRY_EVERY, LocalLedger
from .usage import Month, MonthCache, ratelimit_headers, utc_day
from .models import Principal, Route, rfc3339
from .routes import RouteTable, check_path, no_route, query_has_token
from .tokens import adoptable_request_id
from .tracing import Trace, Tracer, new_span_id, new_trace_id
from .trust import TrustedProxies

log = logging.getLogger("keygate.proxy")
access_log = logging.getLogger("keygate.access")

_STALE_RETRIES = 16
"""Tries of a request whose check finds the key (or its workspace) changed since it was read:
each re-reads it and checks again. A change that can decide a request moves the rev (an edit
of a key's name, description or meta, or a workspace's name, does not: lua/_new_rev.lua), so a
key re-scoped, re-dated or disabled while in use meets some; 3 answered ~1 request in 6 503
store_unavailable from a healthy store under a few edits a millisecond. Costs only requests
that meet a change."""
# Request paths remembered as canonical: at most this many, each at most CANONICAL_LEN long
# (an API's paths; a longer one is checked each time), so the set stays under ~1.5 MB.
CANONICAL_MAX = 4096
CANONICAL_LEN = 256


_new_tuple = tuple.__new__
_AUTHORIZATION = hdrs.AUTHORIZATION  # istr: no case-folding per lookup
_X_REQUEST_ID = istr("X-Request-Id")
_VERIFY_UNDER = reserved.VERIFY + "/"
_CACHE_CONTROL = istr("Cache-Control")
_HOST = hdrs.HOST
_EXPECT = hdrs.EXPECT
# RFC 9112 3.2's Host: uri-host [":" port], uri-host an IP literal or a reg-name (RFC 3986 3.2.2)
_HOST_VALUE = re.compile(r"(?:\[[0-9A-Za-z._~!$&'()*+,;=:%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)"
                         r"(?::[0-9]*)?")


class Outcome:
    """What the pipeline learned about a request, for the access log and metrics."""
    __slots__ = ("route", "upstream", "workspace", "key_id", "code", "trace", "client",
                 "own_timeout")

    def __init__(self) -> None:
        self.route = self.upstream = self.workspace = self.key_id = self.code = None
        # an upstream_timeout that is keygate's own refusal (errors.UploadSlotTimeout): no
        # upstream error in the metrics
        self.own_timeout = None
        self.trace = None  # gateway.tracing.Trace
        self.client = None  # the client address the key was checked for (Pipeline.client_ip)


class _Unread:
    """What the access log reads of a request that could not be read (``Pipeline.unreadable``):
    "-" for its method and path, no declared body, the connection's peer and transport (None:
    nothing was sent)."""
    __slots__ = ("remote", "transport")
    method = raw_path = "-"
    content_length = None

    def __init__(self, remote: str | None, transport) -> None:
        self.remote, self.transport = remote, transport


def _held_back_its_body(request: web.BaseRequest) -> bool:
    """A request answered (refused, or by keygate's own endpoints) that asked for ``100
    Continue`` and did not get it: its body may follow or not (RFC 9110 10.1.1). Reading the
    next bytes as that body would swallow the head of a next request sent without it (the
    "0.CL" desync behind a pooling proxy). A body asked for and read whole is at its end; one
    asked for and not all read yet may be closed on too (it would only be dropped).

    Any ``Expect`` counts, not only the exact ``100-continue``: a list holding it, a second
    field, another spelling, or an expectation keygate does not know, which a front proxy
    may have taken for one (and answered with a 100 of its own, holding the body back)."""
    return request.body_exists and not request.content.is_eof() and \
        _EXPECT in request.headers


def _check_transfer_coding(values: list[str]) -> None:
    """Only ``chunked`` is forwarded: the body is re-framed upstream, so another coding
    (``gzip, chunked``) would reach the upstream silently stripped of its label (RFC 9112
    6.1: a server answers 501 to a transfer coding it does not understand)."""
    codings = [c.strip().lower() for v in values for c in v.split(",") if c.strip()]
    if codings != ["chunked"]:
        raise errors.NotImplemented_("Only the 'chunked' transfer coding is supported; send "
                                     "compressed bodies with Content-Encoding.")


class Counted(NamedTuple):
    """Where a request was counted, so a refund takes it back from there: the month and UTC
    day, ``local``, its slot in this process's ledger when it was decided while the store
    was down (fail-open), and ``rate_member``, its entry in the key's rate log (a request
    that never reached the upstream spends none of the rate either). ``degraded``: decided
    from the cached key while the store was down (``on_store_error: open``); once the request
    is let through, ``let_through`` counts it in ``keygate_degraded_decisions_total``."""
    month: Month
    day: str
    local: Slot | None = None
    rate_member: str = ""
    degraded: bool = False


class Held:
    """A request of this process counted against a quota (its workspace's, its key's own cap)
    that may still be taken back: it has not reached its upstream yet (``Pipeline.refund``).
    While it is held, a quota 429 of its workspace or key whose quota it holds the last of
    says so, with a short ``Retry-After``, rather than "used up until next month".
    ``release`` once its upstream's answer came (or its handshake's), or the request ended;
    a second call does nothing. Only this process's requests are seen, not other replicas'."""
    __slots__ = ("pipeline", "workspace", "budget")

    def __init__(self, pipeline: "Pipeline", workspace: str | None,
                 budget: str | None) -> None:
        self.pipeline = pipeline
        self.workspace = workspace  # None: the workspace has no quota
        self.budget = budget        # None: the key has no cap of its own
        if workspace is not None:
            held = pipeline._held_workspaces
            held[workspace] = held.get(workspace, 0) + 1
        if budget is not None:
            held = pipeline._held_keys
            held[budget] = held.get(budget, 0) + 1

    def release(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is None:
            return
        if self.workspace is not None:
            _let_go(pipeline._held_workspaces, self.workspace)
        if self.budget is not None:
            _let_go(pipeline._held_keys, self.budget)


def _let_go(held: dict[str, int], name: str) -> None:
    """One request fewer held under ``name`` (forgotten at none)."""
    if (n := held[name] - 1) > 0:
        held[name] = n
    else:
        del held[name]


class Forwarding(Protocol):
    """Where an allowed request goes (``gateway.proxying.forward.Forwarder``)."""

    async def forward(self, request: web.BaseRequest, upstream: Upstream,
                      principal: Principal | None, request_id: str,
                      response_headers: Mapping[str, str], *,
                      trace: Trace | None = None, rules=None,
                      client_of=None, held: Held | None = None) -> web.StreamResponse: ...
    # held: released once the upstream's answer head came (the request can no longer be
    # taken back)

    async def tunnel(self, request: web.BaseRequest, upstream: Upstream,
                     principal: Principal | None, request_id: str,
                     response_headers: Mapping[str, str], *,
                     trace: Trace | None = None, rules=None,
                     watch=None, held: Held | None = None) -> web.StreamResponse: ...
    # forward for a WebSocket handshake: the tunnel, run until it ends (watch is handed it;
    # held released once the upstream answered the handshake)

    header_rules: Any  # the current RequestHeaderRules (headers, signing, body limits, the
    # config's CORS policy); a request keeps the ones it began with


def _token_kind(token: str) -> tuple[str, str]:
    """A token's prefix and environment (``kg_live_...``: ``("kg", "live")``), as
    ``tokens.parse_token`` reads them; for a token ``authenticate`` accepted."""
    prefix, _, rest = token.partition("_")
    return prefix, rest.partition("_")[0]


class Pipeline:
    def __init__(self, config: Config, store, requests: RequestStore, auth: Authenticator,
                 forwarder: Forwarding, metrics=None, self_service=None,
                 clock: Callable[[], float] = time.time,
                 ledger_retry: float = RETRY_EVERY) -> None:
        self.store = store
        self.requests = requests
        self.auth = auth
        self.forwarder = forwarder
        self.metrics = metrics
        self.self_service = self_service
        self.clock = clock
        self.months = MonthCache()
        self._store_error_logged_at, self._store_errors_unlogged = -1e9, 0
        self.ledger = LocalLedger(requests, self.months, clock,  # fail-open counts
                                  retry_every=ledger_retry)
        self._rate_take_backs: set[asyncio.Task] = set()  # see _counted_after_all
        # this process's counted requests that may still be taken back (Held), per workspace
        # id and per key budget: what a quota 429 tells apart from a month used up
        self._held_workspaces: dict[str, int] = {}
        self._held_keys: dict[str, int] = {}
        self.tunnels = TunnelWatch(self._still_allowed, self._route_now)  # open WebSockets
        self._prefixes_used: list[str] = []  # every keys.prefix since start (key_prefixes)
        # a client's X-Request-Id holding it is never adopted (logged, echoed, forwarded);
        # set by running_gateway, as the admin listener reads it
        self.operator_token = ""
        self.reconfigure(config)
        self._rid_prefix = os.urandom(4).hex()
        self._rid_counter = 0
        self._canonical: set[str] = set()  # paths check_path accepted lately (CANONICAL_MAX)
        self._hosts: set[str] = set()  # Host values accepted lately (as many)
        self.tracer = Tracer()  # gateway.otel.OtelTracer when tracing is configured
        # Whose share of an upstream's upload slots an upload still streaming in takes: a
        # keyed request's workspace (forward reads it from the key), a public route's client
        # address, which forward asks this for only for such a body (the common request pays
        # nothing for it, not even a bound method made per request; a reload of
        # trusted_proxies meanwhile only moves that one upload to another address's share).
        self._client_of = self.client_ip

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` for the next request (a reload). Synchronous, so no request sees
        half of it; one already past route matching keeps the route and upstream it found."""
        self.config = config
        self.routes = RouteTable(config.routes)
        self.fail_open = config.store.on_store_error == "open"
        self.tunnels.recheck_every(config.server.websocket_recheck)
        # Every key prefix this process has used, since start and across reloads: a key of a
        # prefix a reload replaced is still a secret (the same id and secret under the new
        # prefix, its checksum recomputed, open the key; a replica not yet reloaded takes it
        # as is). The query refuses it (key_in_url) and the logs and spans mask it. Bounded
        # by the prefixes an operator has written in the config; one (no reload changed it):
        # the prefix itself, which costs what it always did.
        self.learn_prefixes((config.keys.prefix,))
        self._key_headers = tuple(istr(h) for h in dict.fromkeys(  # istr: no case-folding
            h.lower() for h in config.keys.headers if h.lower() != "authorization"))  # per call
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        self._any_trusted = bool(self.trusted)
        # a quota 429 while requests in flight hold the last of it: retry once they have had
        # their upstream's timeout to reach it or be taken back (the longest of the config's)
        self._held_wait = str(max(1, math.ceil(max(
            (u.timeout for u in config.upstreams.values()), default=1))))

    def learn_prefixes(self, prefixes: Iterable[str]) -> None:
        """Take ``prefixes`` among the key prefixes used: this process's config's, and those
        recorded in the store by any keygate (``Store.key_prefixes_seen``: read at start, at a
        reload that changes the prefix and every minute), so that a process started after a
        prefix changed knows the old one too. The access log's and the spans' masks follow
        them (``running_gateway``)."""
        used = self._prefixes_used
        for prefix in prefixes:
            if prefix not in used:
                used.append(prefix)
        self.key_prefixes: str | tuple[str, ...] = used[0] if len(used) == 1 else tuple(used)
        self._prefix = self.key_prefixes

    # --- the one handler ----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # keygate_requests_in_flight is counted here rather than by a wrapping coroutine,
        # whose frame every request resumed at each of its awaits
        m = self.metrics
        if m is not None:
            m.in_flight_now += 1
        try:
            started = time.perf_counter()
            request_id = self._request_id(request)
            outcome = Outcome()
            outcome.trace = self.tracer.start(request)
            try:
                response = await self.pipeline(request, request_id, outcome)
                # an answer the upstream cut mid-body (its status already sent): the access
                # log's error and keygate_upstream_errors_total say so (40-80 ns a request)
                failed = getattr(response, "upstream_failed", None)
                if failed is not None:
                    outcome.code = failed
            except GatewayError as exc:
                outcome.code = exc.code
                if exc.__class__ is errors.UploadSlotTimeout:
                    outcome.own_timeout = True
                response = exc.response(request_id)
                cors = self.forwarder.header_rules.cors  # the config's one policy, if any
                if cors is not None:
                    cors.label(response.headers, origin_of(request.headers))
                if request.raw_path.startswith(reserved.RESERVED):  # an answer of keygate's
                    response.headers[_CACHE_CONTROL] = "no-store"     # own: no cache keeps it
                if exc.status in (408, 413, 501) or exc.__class__ is errors.BodyCutShort \
                        or _held_back_its_body(request):
                    # the rest of that body is not worth reading, or will never come, or may
                    # come or not (no 100 Continue was sent): never read the next bytes as it
                    response.force_close()
                    if exc.status == 408:  # a stalled sender: answer, then close without the
                        await answer_and_close(request, response)  # lingering read
            except Exception:  # a bug: never a traceback on the wire
                log.exception("unhandled error in request %s", request_id)
                outcome.code = "internal_error"
                response = GatewayError("Internal error.").response(request_id)
                cors = self.forwarder.header_rules.cors
                if cors is not None:
                    cors.label(response.headers, origin_of(request.headers))
                if request.raw_path.startswith(reserved.RESERVED):
                    response.headers[_CACHE_CONTROL] = "no-store"
            if not response.prepared and "X-Request-Id" not in response.headers:
                response.headers["X-Request-Id"] = request_id  # keygate's own /_keygate/ answers
            self.observe(request, response, outcome, request_id, started)
            return response
        finally:
            if m is not None:
                m.in_flight_now -= 1

    async def pipeline(self, request: web.BaseRequest, request_id: str,
                       outcome: Outcome) -> web.StreamResponse:
        if "Transfer-Encoding" in request.headers:
            _check_transfer_coding(request.headers.getall("Transfer-Encoding"))
        if request.method == "CONNECT":
            # aiohttp's parser ends a CONNECT at its head (what follows is tunnel data, its
            # Content-Length unread) and, once it is answered, parses those bytes as the next
            # request; keygate opens no tunnels: 501, which closes the connection unread
            raise errors.NotImplemented_("CONNECT is not supported: keygate opens no tunnels.")
        host = request.headers.get(_HOST)
        if host is not None and host not in self._hosts:
            self.check_host(host)
        raw_path, _, raw_query = request.raw_path.partition("?")
        if raw_path.startswith(_VERIFY_UNDER):
            # Envoy's path_prefix mode: the original path follows the prefix, and verify
            # screens it exactly as a forwarded request's path (its length limit included,
            # which the prefix would otherwise eat into). With X-Forwarded-Uri or
            # X-Original-URI it is never read.
            self.screen("", raw_query)
        else:
            self.screen(raw_path, raw_query)
        # the header rules the key is read under: a reload while this request waits on the
        # store must not forward, say, a credential header that was a credential when read;
        # with them, the config's CORS policy (None: no cors section)
        rules = self.forwarder.header_rules
        cors = rules.cors
        if cors is not None and request.method == "OPTIONS":  # a preflight keygate answers?
            preflight = cors.preflight(request, raw_path, self.routes)
            if preflight is not None:
                response, outcome.route, outcome.upstream = preflight
                return response
        if raw_path.startswith(reserved.RESERVED):
            response = await reserved.answer(self, request, raw_path, outcome)
            if not response.prepared:
                # an identity (verify's 200), a workspace's usage or keys: no browser, proxy
                # or CDN keeps a copy to answer a later request with (keygate's refusals here
                # likewise, in handle)
                response.headers[_CACHE_CONTROL] = "no-store"
                if cors is not None:
                    cors.label(response.headers, origin_of(request.headers))
            if _held_back_its_body(request):
                # answered without asking for it (usage, verify, the key listing read no
                # body): as for a refusal (handle), the next bytes are never read as it
                response.force_close()
            return response
        route = self.routes.match(request.method, raw_path)
        outcome.route, outcome.upstream = route.path, route.upstream
        if route.upstream is None:  # a verify-only route: /_keygate/v1/verify answers it
            raise no_route(request.method, raw_path)
        public, scopes = route.public, route.scopes
        # X-HTTP-Method-Override & co., ?_method=: authorised as the methods they name too
        # (one C-level lookup of their names; no walk of the headers)
        if not request.headers.keys().isdisjoint(overrides.NAMES) or \
                raw_query and overrides.may_name(raw_query):
            named = overrides.requested(request.headers, raw_query)
            if named:
                public, scopes = overrides.authorised_as(self.routes, route, request.method,
                                                         raw_path, named, forwarding=True)
        # the config the route was matched under: the key is derived under it too (a key
        # read or re-read across a reload: authenticate, authorise), so that a request in
        # flight finishes on one config, never half of the old and half of the new
        under = self.auth.under  # (config, generation): the same config as self.config
        upstream = self.config.upstreams[route.upstream]
        # a WebSocket handshake on a route that tunnels them: the same steps, then a tunnel
        tunnel = route.websocket and websocket_handshake(request) is not None
        trace = outcome.trace
        if public:
            with trace.step("forward"):
                if tunnel:  # closed once a reload changes its route (TunnelWatch)
                    return await self.forwarder.tunnel(
                        request, upstream, None, request_id, {}, trace=trace, rules=rules,
                        watch=self.tunnels.watch(None, scopes, "", raw_path, route))
                return await self.forwarder.forward(request, upstream, None, request_id, {},
                                                    trace=trace, rules=rules,
                                                    client_of=self._client_of)
        token = self.credential(request)
        # once, before any await: a reload of trusted_proxies must not change it mid-request
        outcome.client = client = self.client_ip(request)
        with trace.step("authenticate"):
            key = await self.authenticate(token, client, request)
        outcome.workspace, outcome.key_id = key.workspace, key.key_id
        # A declared body over the limit is refused after every other check (SPEC's order:
        # the rate limit and quotas included, judged without spending them) and, like every
        # refusal of keygate's own, is not counted.
        too_large = (request.content_length or 0) > rules.max_body
        with trace.step("authorise"):
            key, limit_headers, counted = await self.authorise(key, scopes,
                                                               count=not too_large,
                                                               client=client, peek=too_large,
                                                               under=under)
        if too_large:
            raise errors.body_too_large(rules.max_body)
        if counted.degraded:
            self.let_through(counted)
            held = None  # counted in this process's ledger: no quota judged meanwhile
        else:  # counted against a quota, until it reaches the upstream or is taken back
            limits = key.limits
            ws_limited = limits is not None and limits.monthly_requests is not None
            held = Held(self, key.workspace if ws_limited else None,
                        key.budget if key.monthly_requests is not None else None) \
                if ws_limited or key.monthly_requests is not None else None
        try:
            with trace.step("forward"):
                if tunnel:  # closed once the key no longer allows it (TunnelWatch)
                    return await self.forwarder.tunnel(
                        request, upstream, key, request_id, limit_headers, trace=trace,
                        rules=rules, watch=self.tunnels.watch(key, scopes, client, raw_path,
                                                              route, _token_kind(token)),
                        held=held)
                return await self.forwarder.forward(request, upstream, key, request_id,
                                                    limit_headers, trace=trace, rules=rules,
                                                    held=held)
        except GatewayError as exc:
            if not exc.reached_upstream:  # refused here, or never sent: it does not count
                await self.refund(key, counted)
            raise
        finally:
            if held is not None:  # (taken back by now, if it was)
                held.release()

    # --- steps --------------------------------------------------------------------------------

    def check_host(self, host: str) -> None:
        """RFC 9112 3.2: a ``Host`` that is not a host is a 400. It goes upstream as
        ``X-Forwarded-Host``, which upstreams build absolute URLs from: userinfo
        (``good.example:@evil.example``), a path or a space in it is an attacker's."""
        if _HOST_VALUE.fullmatch(host) is None:
            raise errors.BadRequest("The Host header is not a valid host[:port].")
        if len(host) <= CANONICAL_LEN:
            if len(self._hosts) >= CANONICAL_MAX:
                self._hosts.clear()
            self._hosts.add(host)

    def screen(self, raw_path: str, raw_query: str) -> None:
        """The first two rows of SPEC's table: a canonical path, and no key in the query.
        An empty ``raw_path``: the query only."""
        # a set lookup, not a regex, for a path seen
        if raw_path and raw_path not in self._canonical:
            check_path(raw_path)
            if len(raw_path) <= CANONICAL_LEN:
                if len(self._canonical) >= CANONICAL_MAX:
                    self._canonical.clear()
                self._canonical.add(raw_path)
        if raw_query:
            if query_has_token(raw_query, self._prefix):
                raise errors.BadRequest(
                    "An API key was sent in the URL; URLs end up in logs. Send it in the "
                    "Authorization header instead, and rotate this key.", code="key_in_url")
            if "#" in raw_query:  # a fragment (never sent) or a '#' to encode: upstreams
                # read it apart (nginx and Node.js cut it off, Go keeps it in the query)
                raise errors.BadRequest("The query string contains '#', which must be "
                                        "percent-encoded as %23.")

    def credential(self, request: web.BaseRequest) -> str:
        """The one token this request carries (missing / malformed / ambiguous otherwise).

        Its shape and checksum are checked by ``Authenticator.authenticate``, only for tokens
        not already verified in this process."""
        headers = request.headers
        found: list[str] = []
        sent = headers.getall(_AUTHORIZATION, ())
        for value in sent:
            scheme, _, rest = value.strip().partition(" ")
            rest = rest.strip()
            if not rest or scheme.lower() != "bearer":
                raise errors.invalid_token(
                    "malformed_key", "The Authorization header must be 'Bearer <key>'.")
            found.append(rest)
        repeated = len(sent) > 1
        for name in self._key_headers:  # case-insensitive lookups, not a walk of every header
            sent = headers.getall(name, ())
            if sent:
                repeated |= len(sent) > 1
                # an empty one is no credential (a client's unset key variable): missing_key
                found += [value for value in map(str.strip, sent) if value]
        if not found:
            raise errors.missing_key()
        token = found[0]
        if repeated or (len(found) > 1 and found.count(token) != len(found)):
            # ambiguous, but SPEC's table puts malformed_key above ambiguous_key: a malformed
            # token is answered as such, whatever else was sent (parsed here only, never for
            # the one credential of an ordinary request)
            for each in found:
                self.auth.parse(each)
            if repeated:
                raise errors.ambiguous_key("The API key header was sent more than once.")
            raise errors.ambiguous_key("Two different API keys were sent; send exactly one.")
        return token

    async def authenticate(self, token: str, client: str,
                           request: web.BaseRequest | None = None) -> CachedKey:
        """``client``: the request's address as ``client_ip`` gives it (the failure throttle's
        and the IP allow-list's). ``request``: the request, whose client going while its key
        waits to be verified ends it (``Authenticator.authenticate``)."""
        try:
            return await self.auth.authenticate(token, client, request)
        except StoreError as exc:
            raise self.store_down(exc) from exc

    async def authorise(self, key: CachedKey, scopes: tuple[str, ...], *, count: bool,
                        client: str, peek: bool = False, stamp: bool = False,
                        spend: bool = False, under: tuple[Config, int] | None = None
                        ) -> tuple[CachedKey, dict[str, str], Counted]:
        """State (revoked/expired/disabled, the key's IP allow-list), scopes, then rate and
        quotas in one round trip. Returns the key as confirmed, the RateLimit fields, and the
        month and day the request was counted in. ``client`` is the address the key's IP
        allow-list is checked against: the one ``authenticate`` was given. Not ``count``:
        nothing is counted, and rate and quotas are judged only with ``peek`` (a request
        refused after them), else not at all (keygate's own endpoints: with ``stamp`` an
        allowed one stamps the key's last use, as a counted request does; with ``spend`` it
        also takes one from the key's rate limit, 429 ``rate_limited`` over it). With the
        store down and ``on_store_error: open``, the returned ``Counted`` says ``degraded``:
        the caller that lets the request through calls ``let_through`` with it (a request
        refused after all, answered 503 or no request at all, such as an open tunnel's
        periodic check of its key or an admin-listener call, is no degraded decision).
        ``under``: the config the request's route was matched under and its generation
        (``Authenticator.under`` then), which ``key`` was derived under (``authenticate``); a
        key found changed is re-read under it, not under one a reload swapped in meanwhile
        (None: under the config in force).

        Decisions read from the cache are confirmed against the store's revision before they
        are answered, so a widened scope, an extended expiry or a key enabled again acts on the
        next request too."""
        for _ in range(_STALE_RETRIES):
            now = self.clock()
            blocked = key.networks is not None and not key.allows(client)
            # Every refusal is confirmed against the store first: an expiry can be extended,
            # a key enabled again, and even a revoked key can be deleted (its token then reads
            # as unknown, invalid_key, at every replica).
            refused = refusal(key, scopes, now=now, blocked=blocked)
            if refused is not None and key.gone:  # deleted: revoked or expired for good,
                raise refused                     # its record as kept is the last word
            month = self.months.get(now)
            day = self.months.day(now)
            rate = key.rate
            try:
                decision = await self.requests.authorize(
                    workspace=key.workspace, key_id=key.key_id, key_rev=key.rev,
                    ws_rev=key.workspace_record.rev,
                    count=count and refused is None, peek=peek and refused is None,
                    stamp=stamp and refused is None, spend=spend and refused is None,
                    rate_limit=rate.requests if rate else 0,
                    rate_period_ms=rate.period_seconds * 1000 if rate else 1000,
                    monthly_limit=key.monthly_limit, period=month.period,
                    counter_ttl=month.counter_ttl(now), now_ms=int(now * 1000),
                    day=day, key_limit=key.key_limit, budget=key.budget,
                    rate_burst=rate.burst if rate else 0)
            except StoreError as exc:
                return key, {}, self._degraded(key, refused, count, Counted(month, day), exc)
            if decision.outcome == "stale":
                try:
                    fresh = await self.auth.refresh(key, under)
                except StoreError as exc:
                    raise self.store_down(exc) from exc
                if fresh is None:
                    raise errors.invalid_token("invalid_key", "The API key is not valid.")
                key = fresh
                continue
            if refused is not None:
                raise refused
            if self.ledger:
                self.ledger.flush()
            # Counted(month, day, None, member, False), without its Python-level __new__
            return key, self._decide(key, decision, month, now), \
                _new_tuple(Counted, (month, day, None, decision.rate_member, False))
        raise ServiceUnavailable("The key changed while this request was checked; retry.",
                                 headers={"Retry-After": "1"})

    def _decide(self, key: CachedKey, d: Decision, month, now: float) -> dict[str, str]:
        headers = ratelimit_headers(key.rate, d.rate_remaining, d.window_reset_ms,
                                    key.monthly_limit, d.month_used, month, now,
                                    key.key_limit, d.key_used)
        if d.outcome == "rate":  # the script reports r=0 for the refused rate itself
            headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_ms / 1000)))
            raise TooManyRequests(f"Rate limit of {key.rate} exceeded for this key.",
                                  code="rate_limited", headers=headers)
        if d.outcome == "quota":
            raise self._quota_refusal(
                "The workspace's monthly quota", key.monthly_limit, d.month_used,
                self._held_workspaces.get(key.workspace, 0), "quota_exceeded", month, now,
                headers)
        if d.outcome == "key_quota":
            raise self._quota_refusal(
                "This key's own monthly cap", key.key_limit, d.key_used,
                self._held_keys.get(key.budget, 0), "key_quota_exceeded", month, now, headers)
        return headers

    def _quota_refusal(self, what: str, limit: int, used: int, held: int, code: str, month,
                       now: float, headers: dict[str, str]) -> TooManyRequests:
        """The 429 of a quota (``what``) the store found spent: used up until the month
        resets, or, while this process's requests in flight that may be taken back (``held``)
        hold the last of it, spent for now, with a short Retry-After."""
        if held and used - held < limit:  # not used up: held, it may come back
            headers["Retry-After"] = self._held_wait
            return TooManyRequests(
                f"{what} of {limit} requests is spent for now: the last of it is held by "
                f"{held} request(s) in flight, given back if they never reach the upstream; "
                f"retry in {self._held_wait} s.", code=code, headers=headers)
        headers["Retry-After"] = str(month.seconds_left(now))
        return TooManyRequests(f"{what} of {limit} requests is used up; it resets at "
                               f"{rfc3339(month.resets_at)}.", code=code, headers=headers)

    async def refund(self, key: CachedKey, counted: Counted | None = None) -> None:
        """Take back a counted request the upstream never received, from where it was counted:
        this process's ledger when it counted it (which writes the subtraction if the count
        was written already), else the month and day that counted it in the store (a connect
        attempt can end after midnight at the turn of the month)."""
        now = self.clock()
        counted = counted or Counted(self.months.get(now), utc_day(now))
        if counted.local is not None:  # the ledger takes it back, and writes that if need be
            self.ledger.take_back(counted.local)
            return
        month = counted.month
        slot = Slot(key.workspace, key.key_id, month.period, counted.day, key.budget)
        try:
            await self.requests.refund(slot, month.counter_ttl(now), counted.rate_member)
        except StoreError as exc:
            if self.metrics:
                self.metrics.store_errors.inc()
            if exc.unsent:
                # it never reached Redis (no connection): the ledger writes the take-back once
                # the store answers again, exactly once (its rate entry leaves the window by
                # itself)
                self.ledger.take_back(slot)
                log.info("a request of key %s (workspace %s) that never reached the upstream "
                         "is taken back once the store answers again (%s)", key.key_id,
                         key.workspace, exc)
                return
            # It may have run (Redis stalled after running it): sent again, it could take back
            # two. The request may stay counted, one too many in the key's and workspace's
            # month: named, so that an operator can correct the usage.
            log.warning("could not take back a request of key %s (workspace %s) that never "
                        "reached the upstream: it may stay counted in %s (%s)", key.key_id,
                        key.workspace, month.period, exc)

    async def _still_allowed(self, key: CachedKey, scopes: tuple[str, ...], client: str,
                             token_kind: tuple[str, str]) -> CachedKey | None:
        """Whether ``key`` still allows a tunnel opened on a route needing ``scopes`` from
        ``client`` with a token of ``token_kind`` (its prefix and environment): the key as
        confirmed now, or None when it would be refused (401, 403). A store that cannot
        answer leaves the tunnel open: the key as it was. A key that still allows it has its
        last use stamped."""
        if not self.auth.accepts(*token_kind):  # a reload stopped accepting such tokens
            return None
        if key.generation != self.auth.generation:
            # derived under a config since reloaded (a role's scopes, a plan): re-derived
            # first, as the key's next request is (authorise re-reads it only when its
            # stored revision moved on, which a reload does not)
            try:
                fresh = await self.auth.refresh(key)
            except StoreError as exc:  # counted and logged as such
                self.store_down(exc)
                if not self.fail_open:
                    return key  # the tunnel stays
                # judged from its cached state, as authorise does fail-open, with the scopes
                # the config now gives a role it defines: a reload during the outage that
                # took the route's scope from the key's role closes the tunnel
                key = self.auth.failing_open(key, self.auth.under)
                blocked = key.networks is not None and not key.allows(client)
                refused = refusal(key, scopes, now=self.clock(), blocked=blocked)
                return key if refused is None or refused.status not in (401, 403) else None
            if fresh is None:  # gone meanwhile (its workspace deleted)
                return None
            key = fresh
        try:
            # stamped: a key whose only traffic is a tunnel open for weeks is in use, not
            # idle since its handshake (keys list --unused, the console's least recently used)
            key, _, _ = await self.authorise(key, scopes, count=False, client=client,
                                             stamp=True)
        except GatewayError as exc:
            return None if exc.status in (401, 403) else key
        return key

    def _route_now(self, raw_path: str) -> Route | None:
        """The route a WebSocket handshake on ``raw_path`` matches under the config now (None:
        none, it would be refused): an open tunnel whose route a reload changed is closed."""
        try:
            return self.routes.match("GET", raw_path)
        except GatewayError:
            return None

    # --- store down ---------------------------------------------------------------------------

    def store_down(self, cause: BaseException | None = None) -> ServiceUnavailable:
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

    def _degraded(self, key: CachedKey, refused: GatewayError | None, count: bool,
                  counted: Counted, exc: StoreError) -> Counted:
        """The store failed on a key verified in this process: fail closed, or — with
        ``on_store_error: open`` — decide from the cached state and count in the ledger.
        Returns where the request was counted, marked ``degraded``: not yet a degraded
        decision, which only a request then let through is (``let_through``)."""
        if exc.counted_late is not None:  # Redis may have counted it all the same
            exc.counted_late.add_done_callback(functools.partial(
                self._counted_after_all,
                Slot(key.workspace, key.key_id, counted.month.period, counted.day, key.budget),
                # answered 503: the rate it spent in Redis goes back too (admitted here
                # instead, fail-open, it is forwarded: the rate it spent stays spent)
                "" if self.fail_open else exc.rate_member))
        if not self.fail_open:
            raise self.store_down(exc) from exc
        if self.metrics:
            self.metrics.store_errors.inc()
        self._log_store_error(exc)
        if refused is not None:
            raise refused
        if count:
            now = self.clock()
            slot = Slot(key.workspace, key.key_id, self.months.get(now).period, utc_day(now),
                        key.budget)
            self.ledger.add(slot)
            counted = counted._replace(local=slot)
        return counted._replace(degraded=True)

    def let_through(self, counted: Counted) -> None:
        """A request ``authorise`` decided with the store down (``counted.degraded``) is let
        through: forwarded, or answered allowed. ``keygate_degraded_decisions_total`` counts
        these only, not a request refused after the decision (413) or answered 503 after it
        (the usage and key endpoints read the store), nor an open tunnel's key check or an
        admin-listener call: idle tunnels and admin calls are no requests let through."""
        if counted.degraded and self.metrics:
            self.metrics.degraded.inc()

    def _counted_after_all(self, slot: Slot, rate_member: str,
                           counted: asyncio.Future[bool]) -> None:
        """The reply to a call given up on came late and says Redis counted the request
        (it ran the call in time, then stalled before replying): the request was answered
        503 or counted in the ledger, so the ledger takes Redis's count back; and a request
        answered 503 gets back the rate it spent (``rate_member``, its rate-log entry)."""
        if not counted.cancelled() and counted.result():
            self.ledger.take_back(slot)
            if rate_member and rate_member != "-":
                task = asyncio.ensure_future(self._take_back_rate(slot, rate_member))
                self._rate_take_backs.add(task)  # kept: a task nobody holds can be collected
                task.add_done_callback(self._rate_take_backs.discard)

    async def _take_back_rate(self, slot: Slot, rate_member: str) -> None:
        try:
            await self.requests.take_back_rate(slot, rate_member)
        except StoreError:  # the entry leaves the rate window by itself within one period
            log.info("could not take back the rate of a request answered 503")

    async def close(self) -> None:
        """At shutdown, after the listeners stopped: write what the ledger counted while the
        store was down."""
        await self.tunnels.close()
        if self._rate_take_backs:
            await asyncio.gather(*self._rate_take_backs, return_exceptions=True)
        await self.ledger.close()

    # --- small helpers ------------------------------------------------------------------------

    def _request_id(self, request: web.BaseRequest) -> str:
        rid = request.headers.get(_X_REQUEST_ID)
        if rid is not None and adoptable_request_id(rid, self.operator_token):
            return rid
        self._rid_counter += 1  # (inline: unreadable makes its ids likewise)
        return f"{self._rid_prefix}{self._rid_counter:012x}"

    def unreadable(self, error: GatewayError, remote: str | None, transport,
                   waited: float = 0.0) -> web.StreamResponse:
        """The answer to a request the proxy listener could not read, logged and counted as
        any answer is (the listener's ``ProxyServer.on_unreadable``): one its HTTP parser
        refused (bad header syntax, a head over 32 KiB, a refused version, broken framing:
        400 ``bad_request``), or, with ``transport`` None, a head cut off unanswered at
        ``server.timeouts.header`` after ``waited`` seconds (408 ``request_timeout``, never
        sent). Nothing of the request is read: its method and path are logged as "-" (never a
        byte of it: it may hold a token), the client is the connection's peer, the request
        id is a new one of this pipeline's (the one the answer's body and ``X-Request-Id``
        say), the trace a new one (no span is recorded for it). Counted in
        ``keygate_requests_total`` under route ``(none)``, method ``OTHER``. Never on the
        usual request's path."""
        started = time.perf_counter()
        self._rid_counter += 1  # as _request_id makes one
        request_id = f"{self._rid_prefix}{self._rid_counter:012x}"
        response = error.response(request_id)
        outcome = Outcome()
        outcome.code = error.code
        outcome.client = remote
        outcome.trace = Trace(new_trace_id(), new_span_id(), self.tracer.new_flags)
        elapsed = waited + time.perf_counter() - started
        m = self.metrics
        if m is not None:
            m.observe_request("(none)", "OTHER", response.status, None, elapsed)
        if self.access is not None:
            self.access(_Unread(remote, transport), response, outcome, request_id, elapsed)
        return response

    def client_ip(self, request: web.BaseRequest) -> str:
        peer = request.remote or "unknown"
        if not self._any_trusted:
            return peer
        return self.trusted.client_address(peer, request.headers.getall("X-Forwarded-For", ()))

    def observe(self, request: web.BaseRequest, response: web.StreamResponse,
                outcome: Outcome, request_id: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        m = self.metrics
        route = outcome.route or "(none)"
        if m is not None:
            status = response.status  # a property: read once
            # request to response headers: a WebSocket's 101 is observed when it was
            # answered, not when its tunnel ended, and a streamed body when its head went out
            # (_stream_back's headers_at), not at its last byte: a tunnel's hours or a
            # stream's minutes would make the route's latency histogram meaningless
            if status == 101:
                took = response.switched_at - started
            else:
                headers_at = getattr(response, "headers_at", None)
                took = elapsed if headers_at is None else headers_at - started
            m.observe_request(route, request.method, status,
                              outcome.workspace if m.workspace_labels else None, took)
            code = outcome.code
            if code is not None:
                # the upstream codes first: an upstream's own 401/403/429 cut mid-body is an
                # upstream error, not an auth failure of keygate's
                if code in ("upstream_unavailable", "upstream_timeout"):
                    if not outcome.own_timeout:  # not keygate's full upload slots
                        m.upstream_errors.labels(outcome.upstream or "", code).inc()
                elif status in (401, 403, 429) or code in ("ambiguous_key", "key_in_url"):
                    m.auth_failures.labels(code).inc()
        if self.access is not None:
            if outcome.client is None:  # no key was checked: the line's client all the same
                outcome.client = self.client_ip(request) if self._any_trusted else \
                    request.remote
            self.access(request, response, outcome, request_id, elapsed)
        outcome.trace.end(request, response, outcome, request_id)

    access: Callable | None = None
