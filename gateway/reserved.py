"""keygate's own endpoints on the proxy listener, under the reserved ``/_keygate/`` prefix:

- ``/_keygate/v1/verify[/...]``: verify-only mode (nginx ``auth_request``, Traefik
  ``forwardAuth``, Envoy ``ext_authz``): the whole pipeline on the *original* request, counted
  as a forwarded request would be, and nothing forwarded;
- ``/_keygate/v1/usage``: the calling key's workspace usage and its own record;
- ``/_keygate/v1/keys[/...]``: self-service key management for a ``keys:admin`` key.

Each admits the caller with the pipeline's own steps (``RequestSteps``), so a key is refused
here exactly as the proxy would refuse it.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Callable, Protocol

from aiohttp import web
from multidict import istr

from . import errors, overrides
from .admin.validate import check_query
from .auth import CachedKey
from .config import Config
from .errors import StoreError
from .models import RESERVED_PATH
from .routes import RouteTable, no_route
from .store.request import OWN_CALLS_RATE

if TYPE_CHECKING:
    from .pipeline import Counted, Outcome

RESERVED = RESERVED_PATH  # keygate's own prefix: never forwarded, and no route may claim it
VERIFY = "/_keygate/v1/verify"
USAGE = "/_keygate/v1/usage"
KEYS = "/_keygate/v1/keys"
_NO_STORE = {"Cache-Control": "no-store"}
_X_FORWARDED_HOST = istr("X-Forwarded-Host")
_X_FORWARDED_CONTENT_LENGTH = istr("X-Forwarded-Content-Length")
_QUERY = re.compile(r"[\x21-\x7e]*")  # visible ASCII: what a request line's query can hold
# The methods the proxy's HTTP parser (llhttp, in aiohttp) takes on an HTTP/1.x request line:
# any other (FOO, 'get', RTSP's PLAY, PRI) it answers 400 bad_request, and so does verify.
# tests/test_verify.py sends every method llhttp knows, and others, to both and compares.
PROXY_METHODS = frozenset((
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY",
    "ACL", "BIND", "CHECKOUT", "COPY", "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR",
    "MKCOL", "MOVE", "M-SEARCH", "NOTIFY", "PROPFIND", "PROPPATCH", "PURGE", "REBIND",
    "REPORT", "SEARCH", "SOURCE", "SUBSCRIBE", "UNBIND", "UNLINK", "UNLOCK", "UNSUBSCRIBE"))


class RequestSteps(Protocol):
    """What these endpoints use of ``gateway.pipeline.Pipeline``."""

    config: Config
    routes: RouteTable
    auth: Any                       # gateway.auth.Authenticator (its ``under``)
    store: Any                      # gateway.store.Store
    self_service: Callable | None   # gateway.admin.handle_self_service
    clock: Callable[[], float]

    def check_host(self, host: str) -> None: ...

    def screen(self, raw_path: str, raw_query: str) -> None: ...

    def credential(self, request: web.BaseRequest) -> str: ...

    def client_ip(self, request: web.BaseRequest) -> str: ...

    async def authenticate(self, token: str, client: str,
                           request: web.BaseRequest | None = None) -> CachedKey: ...

    async def authorise(self, key: CachedKey, scopes: tuple[str, ...], *, count: bool,
                        client: str, peek: bool = False, stamp: bool = False,
                        spend: bool = False, under: tuple[Config, int] | None = None
                        ) -> tuple[CachedKey, dict[str, str], Counted]: ...

    def let_through(self, counted: Counted) -> None: ...

    def store_down(self, cause: BaseException | None = None) -> errors.ServiceUnavailable: ...


async def answer(steps: RequestSteps, request: web.BaseRequest, raw_path: str,
                 outcome: Outcome) -> web.StreamResponse:
    """The answer to a request whose path is under ``RESERVED``."""
    if raw_path == VERIFY or raw_path.startswith(VERIFY + "/"):
        return await verify(steps, request, raw_path[len(VERIFY):], outcome)
    if raw_path == USAGE:
        outcome.route = USAGE
        if request.method not in ("GET", "HEAD"):
            raise errors.MethodNotAllowed("Use GET for the usage endpoint.",
                                          headers={"Allow": "GET, HEAD"})
        key, counted = await _admit(steps, request, outcome, ())
        check_query(request.query)  # as the admin API's usage endpoint: it takes none
        store = steps.store
        try:
            usage = await store.usage(key.workspace)
            current = await store.get_key(key.workspace, key.key_id)
            used, = await store.keys_used_this_month(key.workspace, [key.budget])
        except StoreError as exc:
            raise steps.store_down(exc) from exc
        if current is None:  # deleted since it was admitted (the cache keeps no key object)
            raise errors.invalid_token("invalid_key", "The API key is not valid.")
        usage["key"] = current.to_json(tuple(sorted(key.scopes)), steps.clock(), used)
        steps.let_through(counted)  # answered (a store down for the key's check is back)
        # the key's own record: no browser, proxy or CDN keeps a copy (as the admin listener)
        return web.Response(body=json.dumps(usage).encode(), content_type="application/json",
                            headers=_NO_STORE)
    if raw_path == KEYS or raw_path.startswith(KEYS + "/"):
        outcome.route = KEYS
        key, counted = await _admit(steps, request, outcome, ("keys:admin",))
        try:
            response = await steps.self_service(request, key, steps.store, steps.config)
        except StoreError as exc:  # not a bug: the store failed under the key endpoints
            raise steps.store_down(exc) from exc
        if response.status < 400:
            steps.let_through(counted)
        return response
    raise no_route(request.method, raw_path)


async def _admit(steps: RequestSteps, request: web.BaseRequest, outcome: Outcome,
                 scopes: tuple[str, ...]) -> tuple[CachedKey, Counted]:
    """The caller's key, authenticated and authorised for ``scopes``, and where ``authorise``
    left it (``degraded``: decided with the store down, for ``let_through``): counted in no usage
    and leaving the key's rate limit to its requests, but within ``OWN_CALLS_RATE`` (429
    ``rate_limited`` over it), so no key can call these (the key listing reads the
    workspace's keys) as fast as it likes."""
    outcome.client = client = steps.client_ip(request)
    key = await steps.authenticate(steps.credential(request), client, request)
    outcome.workspace, outcome.key_id = key.workspace, key.key_id
    try:
        key, _, counted = await steps.authorise(key, scopes, count=False, client=client,
                                                stamp=True, spend=True)
    except errors.TooManyRequests as exc:  # over OWN_CALLS_RATE, not the key's own rate
        raise over_own_calls(exc) from None
    return key, counted


def over_own_calls(exc: errors.TooManyRequests) -> errors.TooManyRequests:
    """The refusal of a key's call over ``OWN_CALLS_RATE`` (``authorise`` with ``spend``):
    ``Retry-After`` only, never the RateLimit fields of the key's own rate, which it did not
    spend. The admin listener answers a ``keys:admin`` key's calls with it too."""
    calls, _ = OWN_CALLS_RATE  # per 1000 ms
    return errors.TooManyRequests(
        f"At most {calls} calls a second to keygate's own endpoints with one key; wait "
        "before calling again.", code="rate_limited",
        headers={"Retry-After": exc.headers.get("Retry-After", "1")})


async def verify(steps: RequestSteps, request: web.BaseRequest, suffix: str,
                 outcome: Outcome) -> web.StreamResponse:
    """``/_keygate/v1/verify``. Allowed: 200 with the identity and RateLimit fields as
    headers; refused: the error the proxy would answer."""
    method, target = original_request(request, suffix)
    if method == "CONNECT":  # as the proxy answers it, on any route
        raise errors.NotImplemented_("CONNECT is not supported: keygate opens no tunnels.")
    original_host(steps, request)
    declared = original_length(request)
    raw_path, _, raw_query = target.partition("?")
    if not raw_path.startswith("/"):
        raise errors.BadRequest("The original URI must be a path starting with '/'.",
                                code="bad_path")
    if raw_query and not _QUERY.fullmatch(raw_query):
        # what the proxy's HTTP parser refuses in a request line (400 bad_request); the path
        # is screened byte by byte below, the query is not
        raise errors.BadRequest("The original URI's query holds a space, a control character "
                                "or a non-ASCII byte; percent-encode it.", code="bad_request")
    steps.screen(raw_path, raw_query)
    if raw_path.startswith(RESERVED):
        raise no_route(method, raw_path)
    route = steps.routes.match(method, raw_path)
    # read with the route: a reload while this call waits on the store must not rename the
    # identity headers it answers with (requests in flight finish on the old config)
    ident = steps.config.identity_headers
    max_body = steps.config.server.max_body_bytes
    under = steps.auth.under  # the config (and generation) the key is derived under too
    outcome.route, outcome.upstream = route.path, route.upstream
    public, scopes = route.public, route.scopes
    # the original request's method-override headers (a forward-auth proxy passes the client's
    # headers on) and its _method parameter: authorised as the methods they name too. In any
    # spelling: keygate's proxy drops X.HTTP.Method.Override (lighttpd hands it to the API as
    # HTTP_X_HTTP_METHOD_OVERRIDE), but here the proxy in front forwards, and Traefik and
    # Envoy pass such names on.
    others = overrides.other_spellings(request.headers)
    if others or not request.headers.keys().isdisjoint(overrides.NAMES) or \
            raw_query and overrides.may_name(raw_query):
        named = overrides.requested(request.headers, raw_query, also=others)
        if named:
            public, scopes = overrides.authorised_as(steps.routes, route, method, raw_path,
                                                     named, forwarding=False)
    if public:
        return web.Response(status=200)
    token = steps.credential(request)
    outcome.client = client = steps.client_ip(request)
    trace = outcome.trace
    with trace.step("authenticate"):
        key = await steps.authenticate(token, client, request)
    outcome.workspace, outcome.key_id = key.workspace, key.key_id
    # A declared body over the limit (Envoy's ext_authz with_request_body sends the original
    # one; nginx, which sends none, names its length in X-Forwarded-Content-Length) is
    # refused as the proxy refuses it: after every other check, rate and quotas judged
    # without spending them, and not counted.
    too_large = max(request.content_length or 0, declared) > max_body
    with trace.step("authorise"):
        key, limit_headers, counted = await steps.authorise(key, scopes, count=not too_large,
                                                            client=client, peek=too_large,
                                                            under=under)
    if too_large:
        raise errors.body_too_large(max_body)
    steps.let_through(counted)  # answered allowed: the proxy in front forwards it
    headers = dict(limit_headers)
    headers[ident.workspace] = key.workspace
    headers[ident.key_id] = key.key_id
    headers[ident.scopes] = " ".join(sorted(key.scopes))
    headers[ident.plan] = key.plan
    return web.Response(status=200, headers=headers)


def original_host(steps: RequestSteps, request: web.BaseRequest) -> None:
    """The original request's host, judged as the proxy judges its own ``Host`` (400 for one
    that is not ``host[:port]``: userinfo, a path, a quote): the proxy in front forwards it to
    the API as ``Host`` and ``X-Forwarded-Host``, which APIs build absolute URLs from. It is the
    ``X-Forwarded-Host`` the proxy in front sends (Traefik always does; the nginx configs in
    docs/verify set it); in Envoy's ``path_prefix`` mode it is the call's own ``Host``, which
    the pipeline has already judged. Behind a chain of proxies it is a list (Apache and
    HAProxy append ", host"; a second header line): each entry is judged, as any of them may
    be the one the API reads, and a list is no refusal (keygate's own proxy forwards a trusted
    peer's list as it came). None sent: nothing to judge, as the proxy forwards a request
    without ``Host`` (HTTP/1.0)."""
    for value in request.headers.getall(_X_FORWARDED_HOST, ()):
        for host in value.split(","):
            try:
                steps.check_host(host.strip(" \t"))
            except errors.BadRequest:
                raise errors.BadRequest("X-Forwarded-Host holds a host that is not a valid "
                                        "host[:port].", code="bad_request") from None


def original_length(request: web.BaseRequest) -> int:
    """The original request's declared body length, from ``X-Forwarded-Content-Length``
    (0 when not sent): nginx's auth subrequest carries no body and no Content-Length, so the
    configs in docs/verify name the original one there. Decimal digits only, once, as the
    proxy's HTTP parser takes a Content-Length (400 otherwise)."""
    values = request.headers.getall(_X_FORWARDED_CONTENT_LENGTH, ())
    if not values:
        return 0
    if len(values) > 1 or not values[0].isascii() or not values[0].isdigit():
        raise errors.BadRequest("X-Forwarded-Content-Length must be one length in decimal "
                                "digits.", code="bad_request")
    # no int() of thousands of digits (it raises past 4300): any length past 19 is too large
    return int(values[0]) if len(values[0]) <= 19 else 10**19


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
            # As sent: the HTTP parser already trimmed SP and HTAB around each value, and
            # str.strip() would also drop what is not whitespace to HTTP (a no-break space,
            # NEL), so path sanity would judge another URI than the proxy in front forwards.
            # Not upper-cased either: methods are case-sensitive (RFC 9110 9.1), the proxy
            # refuses 'get' (400), and an upstream may read it as another method than GET
            # ('poſt'.upper() is even 'POST').
            if not methods:
                # Not the call's own method: nginx's auth_request subrequest is always a GET
                # (nginx's own example sets X-Original-URI alone), so every POST or DELETE
                # would be judged as a GET. Refused, so the missing header shows at once.
                raise errors.BadRequest(f"{uri_header} was sent without {method_header}; the "
                                        "proxy in front must send the original method too.",
                                        code="bad_request")
            method = methods[0]
            if method not in PROXY_METHODS:
                raise errors.BadRequest(f"{method_header} is not an HTTP method the proxy "
                                        "accepts.", code="bad_request")
            return method, uri[0]
        if method_header in headers:
            # The method without its URI: a proxy that sends the URI under another name
            # (ingress-nginx's X-Original-URL). The call's own path would be judged instead
            # (its auth URL's, '/' for most), letting every request through where that path
            # is public; refused as the URI without its method is.
            raise errors.BadRequest(f"{method_header} was sent without {uri_header}; the "
                                    "proxy in front must send the original URI too.",
                                    code="bad_request")
    if not suffix:
        # Envoy's path_prefix mode always sends a path after the prefix ('/' for '/'): a bare
        # call is a proxy that named no original request; judging it as '/' would let every
        # request through where '/' is public
        raise errors.BadRequest("The original request was not given: send X-Forwarded-Method "
                                "and X-Forwarded-Uri, or the original path after "
                                f"{VERIFY}.", code="bad_request")
    _, _, query = request.raw_path.partition("?")
    return request.method, f"{suffix}?{query}" if query else suffix
