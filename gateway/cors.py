"""CORS on the proxy listener, for browser apps calling an API through keygate (opt-in: the
top-level ``cors`` section; without it nothing here runs and keygate adds no CORS header).

- A preflight (``OPTIONS`` with one ``Origin``, an ``Access-Control-Request-Method`` and no
  body) from an allowed origin, for a path and method a forwarding route serves (or one of
  keygate's own ``/_keygate/v1/usage`` and ``/_keygate/v1/keys`` endpoints), is answered here:
  204 with the origin, the methods served on that path, the headers a client may send
  (``Authorization``, ``keys.headers``, ``Content-Type``, ``X-Request-Id``, ``allow_headers``)
  and ``max_age``. It needs no key, is never counted and never forwarded. Any other
  ``OPTIONS`` goes through the pipeline as before (a route listing ``OPTIONS`` forwards it).
- Every other answer (forwarded, or keygate's own: errors, ``/_keygate/``) carries ``Vary:
  Origin``, and for an allowed ``Origin`` (sent once: two name none)
  ``Access-Control-Allow-Origin`` (that origin, never ``*``), ``Access-Control-Expose-Headers``
  (the RateLimit fields, ``Retry-After``, ``X-Request-Id``, ``expose_headers``) and, with
  ``allow_credentials``, ``Access-Control-Allow-Credentials: true``.
- keygate owns the ``Access-Control-*`` headers browsers read (``RESPONSE_NAMES``): an
  upstream's are removed from forwarded answers, so what a browser may do is what this config
  says, for every route alike.

Origins are compared as browsers serialise them (the config reader normalises the list the
same way); ``null`` is never allowed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, istr

from .errors import GatewayError
from .reserved import KEYS, RESERVED, USAGE

if TYPE_CHECKING:
    from .routes import RouteTable
    from .settings import CorsConfig

ORIGIN = istr("Origin")
_REQUEST_METHOD = istr("Access-Control-Request-Method")
_VARY = istr("Vary")
_ALLOW_ORIGIN = istr("Access-Control-Allow-Origin")
_ALLOW_CREDENTIALS = istr("Access-Control-Allow-Credentials")
_EXPOSE = istr("Access-Control-Expose-Headers")
# every Access-Control-* response header a browser reads (Fetch; Private Network Access): an
# upstream's are dropped, looked up by name (no walk of the answer's headers)
RESPONSE_NAMES = tuple(istr("Access-Control-" + n) for n in (
    "Allow-Origin", "Allow-Credentials", "Allow-Methods", "Allow-Headers", "Max-Age",
    "Expose-Headers", "Allow-Private-Network"))
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")  # an RFC 9110 token
# what a browser sends as an Origin (scheme://host[:port], host IDNA-encoded): echoed for
# allow_origins '*' only when it has this shape
_ORIGIN_SHAPE = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
ALWAYS_ALLOWED = ("Authorization", "Content-Type", "X-Request-Id")
ALWAYS_EXPOSED = ("RateLimit", "RateLimit-Policy", "Retry-After", "X-Request-Id")


def origin_of(headers: CIMultiDict[str]) -> str | None:
    """The request's ``Origin``, None when it sent none, or more than one: a browser sends one,
    and two name no origin to answer for (Envoy's and nginx's readings, the values joined
    with a comma, equal no allowed origin either). Only a request with an ``Origin`` pays for
    the count (a list of its values)."""
    origin = headers.get(ORIGIN)
    if origin is not None and len(headers.getall(ORIGIN)) != 1:
        return None
    return origin


def _names(names) -> str:
    """Header names once each (case-insensitively), in order, as one list value."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(name.lower(), name)
    return ", ".join(seen.values())


class CorsPolicy:
    """One config's ``cors`` section, ready to answer with."""

    def __init__(self, settings: CorsConfig, key_headers: tuple[str, ...]) -> None:
        self.any_origin = settings.allow_origins == "*"
        self.origins = frozenset(() if self.any_origin else settings.allow_origins)
        self.credentials = settings.allow_credentials
        self.allow_headers = _names((*ALWAYS_ALLOWED[:1], *key_headers, *ALWAYS_ALLOWED[1:],
                                     *settings.allow_headers))
        self.expose_headers = _names((*ALWAYS_EXPOSED, *settings.expose_headers))
        self.max_age = str(settings.max_age)
        self._methods: tuple[object, tuple[str, ...]] = (None, ())  # (route table, methods)

    def allows(self, origin: str) -> bool:
        if origin in self.origins:
            return True
        return self.any_origin and _ORIGIN_SHAPE.fullmatch(origin) is not None

    # --- actual responses ---------------------------------------------------------------------

    def label(self, headers: CIMultiDict[str], origin: str | None) -> None:
        """Mark an answer for ``origin`` (``origin_of`` the request's headers)."""
        vary = headers.getall(_VARY, None)
        if vary is None:
            headers[_VARY] = "Origin"
        elif not any(t.strip().lower() in ("origin", "*") for v in vary for t in v.split(",")):
            headers.add(_VARY, "Origin")
        if origin is not None and self.allows(origin):
            headers[_ALLOW_ORIGIN] = origin
            if self.credentials:
                headers[_ALLOW_CREDENTIALS] = "true"
            headers[_EXPOSE] = self.expose_headers

    def label_forwarded(self, headers: CIMultiDict[str], origin: str | None) -> None:
        """``label`` for an upstream's answer, whose own ``Access-Control-*`` are dropped."""
        if not headers.keys().isdisjoint(RESPONSE_NAMES):
            for name in RESPONSE_NAMES:
                headers.popall(name, None)
        self.label(headers, origin)

    # --- preflights ---------------------------------------------------------------------------

    def preflight(self, request: web.BaseRequest, raw_path: str,
                  routes: RouteTable) -> tuple[web.Response, str, str | None] | None:
        """The answer to an ``OPTIONS`` request that is a preflight keygate answers, with the
        route it was for and that route's upstream (None for keygate's own endpoints), for
        the access log and metrics; None for any other."""
        headers = request.headers
        origins = headers.getall(ORIGIN, ())
        wanted = headers.getall(_REQUEST_METHOD, ())
        if len(origins) != 1 or len(wanted) != 1 or request.body_exists or \
                not self.allows(origins[0]):
            return None
        method = wanted[0].strip()
        if _METHOD.fullmatch(method) is None:
            return None
        served = self._served(raw_path, method, routes)
        if served is None:
            return None
        label, upstream, methods = served
        out: CIMultiDict[str] = CIMultiDict()
        out[_ALLOW_ORIGIN] = origins[0]
        if self.credentials:
            out[_ALLOW_CREDENTIALS] = "true"
        out["Access-Control-Allow-Methods"] = ", ".join(methods)
        out["Access-Control-Allow-Headers"] = self.allow_headers
        out["Access-Control-Max-Age"] = self.max_age
        out[_VARY] = "Origin"
        if raw_path.startswith(RESERVED):  # as every answer of keygate's own endpoints
            out["Cache-Control"] = "no-store"
        return web.Response(status=204, headers=out), label, upstream

    def _served(self, raw_path: str, method: str,
                routes: RouteTable) -> tuple[str, str | None, list[str]] | None:
        """(route, its upstream, the methods served on ``raw_path``, ``method`` first) when
        ``method`` is one of them, else None."""
        if raw_path == USAGE:
            served = ["GET", "HEAD"]
            return (USAGE, None, served) if method in served else None
        if raw_path == KEYS or raw_path.startswith(KEYS + "/"):
            served = _self_service_methods(raw_path[len(KEYS):])
            return (KEYS, None, served) if method in served else None
        if raw_path.startswith(RESERVED):  # never a route's, though a glob like '/**' matches
            return None                    # it (verify is the front proxy's to preflight)
        route = _forwarding_route(routes, method, raw_path)
        if route is None:
            return None
        served = [method]
        for other in self._route_methods(routes):
            if other != method and _forwarding_route(routes, other, raw_path) is not None:
                served.append(other)
        return route.path, route.upstream, served

    def _route_methods(self, routes: RouteTable) -> tuple[str, ...]:
        """Every method some route names (HEAD with GET), per route table."""
        table, methods = self._methods
        if table is not routes:
            names: dict[str, None] = {}
            for route in routes.routes:
                for m in route.methods:
                    names[m.upper()] = None
                    if m.upper() == "GET":
                        names["HEAD"] = None
            methods = tuple(names)
            self._methods = (routes, methods)
        return methods


def _forwarding_route(routes: RouteTable, method: str, raw_path: str):
    try:
        route = routes.match(method, raw_path)
    except GatewayError:  # no_route, or a path refused as another route's reading
        return None
    return route if route.upstream is not None else None


def _self_service_methods(rest: str) -> list[str]:
    """The methods ``/_keygate/v1/keys<rest>`` takes (HEAD with GET)."""
    from .admin.self_service import SELF_SERVICE_ROUTES, _match, segments  # the one table
    parts = segments(rest)
    if parts is None:
        return []
    methods: dict[str, None] = {}
    for endpoint, pattern in SELF_SERVICE_ROUTES:
        if "" not in parts and _match(pattern, parts) is not None:
            methods[endpoint.method] = None
            if endpoint.method == "GET":
                methods["HEAD"] = None
    return list(methods)
