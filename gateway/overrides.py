"""Method overrides: a request that names another method than its own. Pure: no I/O.

Frameworks that honour ``X-HTTP-Method-Override``, ``X-HTTP-Method`` or ``X-Method-Override``
(Express's method-override, Symfony, ASP.NET, Google's APIs), or a ``_method`` query parameter
(Symfony and Laravel, Express with a query getter), perform the method named there instead of
the one on the request line. keygate forwards these as sent (SPEC: other headers and the query
pass unchanged), so it authorises the request as each method named too: the route for that
method and the same path must exist (``no_route``), be one it forwards to (not verify-only)
and forward to the same upstream as the request's own route (the upstream that performs the
named method is the one the request reaches), and its scopes are required as well
(``insufficient_scope``); if any is not public, a key is.

Read as an upstream might read them: header names in any case and with ``_`` for ``-``
(``X_HTTP_Method_Override``, which CGI/WSGI-style servers read as the same header), every copy
of a repeated header, every item of a comma list; the query parameter's name percent-decoded,
in any case and with PHP's mangling (cut at a NUL, leading spaces dropped, ``.``, `` `` and
an unclosed ``[`` read as ``_``; ``_method[]`` and ``_method[0]`` are arrays under the name),
split on ``&`` and ``;``. A value that is not an HTTP method token is ``bad_request``.

A ``_method`` field in a form body (Rails, Laravel) cannot be judged without reading the body
and is not: docs/security.md says so.

Verify (gateway.reserved), which cannot drop what the proxy in front forwards, also judges
the spellings with other punctuation (``other_spellings``: ``X.HTTP.Method.Override``, which
lighttpd hands the application as ``HTTP_X_HTTP_METHOD_OVERRIDE``); the proxy drops them.

Cost: callers test ``headers.keys().isdisjoint(NAMES)`` (one C-level call looking up sixteen
names, no walk of the request's headers) and, for a request with a query, ``may_name`` (a
lower-casing and a few substring searches) before they call ``requested``: ~0.15 µs for an
ordinary request.
"""

from __future__ import annotations

import itertools
import re
from typing import Sequence

from multidict import CIMultiDictProxy, istr

from .errors import BadRequest, NotFound
from .models import METHOD_OVERRIDE_HEADERS, Route, header_key
from .percent import unquote_plus  # urllib's, without its cost per stray '%'
from .routes import RouteTable, no_route


def _spellings(name: str) -> list[istr]:
    """``name`` with each ``-`` as ``-`` or ``_`` (istr: case-insensitive lookups)."""
    head, *rest = name.split("-")
    return [istr(head + "".join(sep + part for sep, part in zip(seps, rest)))
            for seps in itertools.product("-_", repeat=len(rest))]


HEADERS = METHOD_OVERRIDE_HEADERS
NAMES = tuple(n for h in HEADERS for n in _spellings(h))  # 16 names
PARAM = "_method"
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")  # an RFC 9110 token
_SPLIT = re.compile(r"[&;]")
_PHP_NAME = str.maketrans(" .[", "___")
# Other spellings (verify only): any punctuation for "-", as lighttpd's CGI, FastCGI and SCGI
# read them (X.HTTP.Method.Override is HTTP_X_HTTP_METHOD_OVERRIDE to the application)
_KEYS = frozenset(header_key(h) for h in HEADERS)
_LENGTHS = frozenset(len(h) for h in HEADERS)
_NOT_DASH_OR_UNDERSCORE = re.compile(r"[!#$%&'*+.^`|~]")


def other_spellings(headers: CIMultiDictProxy[str]) -> tuple[str, ...]:
    """The names of ``headers`` that are method-override headers spelled with punctuation
    other than ``-`` and ``_`` (``X.HTTP.Method.Override``, ``X+HTTP+Method``), each once.
    keygate's own proxy drops them (gateway.proxying.headers); verify, which forwards
    nothing, judges them with ``requested(..., also=...)``. Cost: one walk of the names, a
    length test for most."""
    found: dict[str, str] = {}
    for name in headers.keys():
        if len(name) in _LENGTHS and _NOT_DASH_OR_UNDERSCORE.search(name) is not None \
                and header_key(name) in _KEYS:
            found.setdefault(name.lower(), name)
    return tuple(found.values())


def requested(headers: CIMultiDictProxy[str], raw_query: str,
              also: Sequence[str] = ()) -> tuple[str, ...]:
    """The methods a request names besides its own (upper-cased, each once): () for an
    ordinary request. ``also``: header names read as method-override headers too (verify:
    ``other_spellings``). Raises 400 ``bad_request`` for a named value that is no method."""
    found: list[tuple[str, str]] = []  # (where, value)
    if not headers.keys().isdisjoint(NAMES):
        for name in NAMES:
            for value in headers.getall(name, ()):
                found.append(("The method-override header", value))
    for name in also:
        for value in headers.getall(name, ()):
            found.append((f"The method-override header {name}", value))
    if raw_query and may_name(raw_query):
        for value in _param_values(raw_query):
            found.append((f"The {PARAM} query parameter", value))
    if not found:
        return ()
    methods: dict[str, None] = {}
    for where, value in found:
        for item in value.split(","):
            item = item.strip(" \t")
            if not item:
                continue  # nothing named: what an upstream reads as no override
            if _METHOD.fullmatch(item) is None:
                raise BadRequest(f"{where} does not name an HTTP method.", code="bad_request")
            methods[item.upper()] = None
    return tuple(methods)


def may_name(raw_query: str) -> bool:
    """Whether the query may hold ``_method`` (cheap: substring searches; a percent-encoded
    letter of 'method' is %4x to %7x)."""
    low = raw_query.lower()
    if "method" in low:
        return True
    return "%" in low and ("%4" in low or "%5" in low or "%6" in low or "%7" in low)


def _param_values(raw_query: str) -> list[str]:
    values = []
    for part in _SPLIT.split(raw_query):
        name, _, value = part.partition("=")
        # PHP reads a decoded name as a C string: '_method%00x' is '_method' (so does
        # Symfony's HeaderUtils::parseQuery, which mimics it)
        name = unquote_plus(name).partition("\0")[0].lstrip(" ")
        base, bracket, rest = name.partition("[")
        if bracket and "]" in rest:
            # '_method[]', '_method[0]': an array under '_method' to PHP, qs and Rack, whose
            # first item Express's method-override takes (a '[' never closed is PHP's '_')
            name = base
        name = name.translate(_PHP_NAME).lower()
        if name == PARAM:
            values.append(unquote_plus(value))
    return values


def authorised_as(routes: RouteTable, route: Route, method: str, raw_path: str,
                  named: Sequence[str], *, forwarding: bool) -> tuple[bool, tuple[str, ...]]:
    """Whether a request matched to ``route`` by ``method`` that also names the methods
    ``named`` is public, and the scopes it requires: those of every route its methods match.
    ``forwarding``: a verify-only route is no route for the named method either."""
    public, scopes = route.public, list(route.scopes)
    for other in named:
        if other == method:
            continue
        try:
            also = routes.match(other, raw_path)
        except NotFound as exc:
            raise _named(exc) from None
        if forwarding and also.upstream is None:
            raise _named(no_route(other, raw_path))
        if forwarding and also.upstream != route.upstream:
            # the request goes to its own route's upstream, which would perform a method no
            # route sends there: the scopes judged would be another upstream's
            raise _named(no_route(other, raw_path), also=f" on upstream {route.upstream!r}")
        if not also.public:
            public = False
            scopes += also.scopes
    return public, tuple(dict.fromkeys(scopes))


def _named(exc: NotFound, also: str = "") -> NotFound:
    return NotFound(exc.message[:-1] + also + " (the method a method-override header or the "
                    f"{PARAM} query parameter names).", code="no_route")
