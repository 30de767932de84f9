"""Where requests go: ``upstreams`` and ``routes``."""

from __future__ import annotations

import ipaddress
import re
import ssl
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import yaml
from yarl import URL

from ..models import HTTP_METHODS, Route, Upstream
from ..routes import FoldedGlobs, case_shadow, case_twin, fall_throughs, glob_problem
from ..settings import ConfigWarning
from .access import AccessSections
from .nodes import BAD, Node, child, is_null, known, one_line, suggest

# A route's keys in the order SPEC and the docs name them (and "allowed: ..." hints list them).
ROUTE_KEYS = ("path", "methods", "upstream", "scopes", "public", "websocket")

# verb-tampering warnings shown one a line; the rest are counted in one more line (a file
# with thousands of such pairs wrote millions of lines, gigabytes of stderr)
VERB_WARNINGS_SHOWN = 20
# how a public route's paths meet a keyed route's (``FallThrough.reading``), as said in its
# warning: an upstream's reading that the matcher guards for the keyed route's methods only
READINGS = {
    "": "",
    "case": "; the paths compared case-insensitively, as many upstreams compare them",
    "slash": "; its paths read without their trailing slash, as many upstreams read them",
    "slashcase": "; its paths read without their trailing slash and compared "
                 "case-insensitively, as many upstreams read them",
}


# a letter outside the escapes: only such a glob reads otherwise compared case-insensitively
_LETTER = re.compile(r"[A-Za-z]")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


_HOST_NAME = re.compile(r"[A-Za-z0-9._~-]+")  # after IDNA encoding, as yarl gives it


def _valid_host(host: str) -> bool:
    """A host name or an IP literal (an IPv6 one with its zone, ``fe80::1%25eth0``)."""
    if ":" in host:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    return bool(_HOST_NAME.fullmatch(host))


def _without_userinfo(url: str) -> str:
    """``url`` as a problem may show it: ``user:password@`` becomes ``***@``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc = rest[:end]
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{rest[end:]}"


def _server(url: str) -> tuple[str, str, int | None] | None:
    """Where an upstream URL sends requests, for the verb-tampering check: (scheme, host,
    port), host lower-cased, the port explicit; None for a URL that is not one."""
    try:
        parsed = URL(url)
        return parsed.scheme.lower(), (parsed.host or "").lower(), parsed.port
    except (ValueError, TypeError):
        return None


class RoutingSections(AccessSections):
    """Upstreams, and routes onto them (a route's scopes are read as ``AccessSections`` reads
    every scope)."""

    def upstreams(self, node: Node | None) -> dict[str, Upstream]:
        upstreams: dict[str, Upstream] = {}
        for name, key_node, value_node in self.mapping(node, "upstreams") or []:
            path = f"upstreams.{name}"
            self.named(key_node, path, name, "upstream")
            if isinstance(value_node, yaml.ScalarNode) and not is_null(value_node):
                url = self.upstream_url(value_node, path)  # shorthand: `crm: http://...`
                upstream = Upstream(name, url if url is not BAD else "")
            else:
                upstream = self.section(value_node, path, Upstream, {
                    "url": self.upstream_url,
                    "timeout": self.seconds,
                    "ca_file": self.ca_file,
                    "max_connections": lambda n, p: self.integer(n, p, minimum=1,
                                                                 maximum=100_000),
                }, required={"url": "(e.g. http://127.0.0.1:9000)"}, name=name, url="")
                if upstream.ca_file is not None and upstream.url \
                        and urlsplit(upstream.url).scheme != "https":
                    self.fail(child(value_node, "ca_file"), f"{path}.ca_file",
                              "only applies to an https:// url, and this upstream's url "
                              "is http:// (use https:// or remove ca_file)")
            upstreams[name] = upstream
        return upstreams

    def ca_file(self, node: Node, path: str) -> Any:
        """A PEM bundle of CAs to trust: checked now, so a bad one stops the gateway at load
        rather than failing every request to the upstream later."""
        name = self.string(node, path, nullable=True)
        if name is BAD or name is None:
            return name
        if not self.readable_file(node, path, name):
            return BAD
        try:
            ssl.create_default_context(cafile=name)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None)
            reason = ("no certificate found in it" if reason == "NO_CERTIFICATE_OR_CRL_FOUND"
                      else reason or "a damaged PEM block")
            return self.fail(node, path, f"'{name}' is not a PEM bundle of CA certificates "
                                         f"({reason})")
        return name

    def upstream_url(self, node: Node, path: str) -> Any:
        url = self.string(node, path)
        if url is BAD:
            return BAD
        shown = _without_userinfo(url)  # a password (often from ${ENV}) is never repeated
        try:
            parts = urlsplit(url)
            port = parts.port  # raises on a bad port
            forwarded = URL(url)  # as the forwarder reads it
        except ValueError:
            return self.fail(node, path, f"'{shown}' is not a valid URL (bad host or port)")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return self.fail(node, path, f"'{shown}' must be an http:// or https:// URL with a "
                                         "host, e.g. http://127.0.0.1:9000")
        if "@" in parts.netloc:  # the forwarder connects to the origin, which has none
            return self.fail(node, path, "must not carry a user name or password "
                                         "(user:password@ before the host): keygate sends "
                                         "none to an upstream")
        if port == 0 or not _valid_host(forwarded.raw_host or ""):
            return self.fail(node, path, f"'{shown}' is not a valid URL (bad host or port)")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            return self.fail(node, path, f"'{shown}' must not have a query or fragment")
        return url

    def routes(self, node: Node | None, upstreams: Mapping[str, Upstream]) -> tuple[Route, ...]:
        if is_null(node):
            return ()

        def upstream(value_node: Node, sub: str) -> Any:
            name = self.string(value_node, sub)
            if name is not BAD and name not in upstreams:
                self.fail(value_node, sub, f"unknown upstream '{name}'"
                                           f"{suggest(name, upstreams)} {known(upstreams)}")
            return name

        readers = {"path": self.route_path, "methods": self.methods, "upstream": upstream,
                   "scopes": self.scopes, "public": self.boolean, "websocket": self.boolean}
        routes: list[Route] = []
        folded = FoldedGlobs()  # the globs so far with a letter, lower-cased
        self.route_nodes: list[Node] = []  # each route's node, for verb_warnings' lines
        for i, item in enumerate(self.sequence(node, "routes") or []):
            # no upstream: a verify-only route (answered by /_keygate/v1/verify, never forwarded)
            route = self.section(item, f"routes[{i}]", Route, readers,
                                 required={"path": "(e.g. /people/**)"}, order=ROUTE_KEYS,
                                 path="/")
            if route.public and route.scopes:
                self.fail(child(item, "scopes"), f"routes[{i}].scopes",
                          "a public route cannot require scopes (no key is checked)")
            if route.websocket is True:
                if route.upstream is None:
                    self.fail(child(item, "websocket"), f"routes[{i}].websocket",
                              "a route without an upstream tunnels nothing (add upstream)")
                elif route.methods and "GET" not in route.methods:
                    self.fail(child(item, "websocket"), f"routes[{i}].websocket",
                              "a WebSocket handshake is a GET, which this route's methods "
                              "leave out (add GET to methods)")
            self.case_twins(item, i, route, routes, folded)
            routes.append(route)
            self.route_nodes.append(item)
        return tuple(routes)

    def verb_warnings(self, routes: tuple[Route, ...], upstreams: Mapping[str, Upstream],
                      cors: bool) -> list[ConfigWarning]:
        """A warning per keyed route and later public route it leaves methods to, on paths
        both match (``gateway.routes.fall_throughs``: HTTP verb tampering). The config is
        valid and matching stays first match in file order (SPEC); the warning names both
        routes, the methods and the fixes. ``cors``: the config has a cors section, so
        keygate answers CORS preflights itself and an OPTIONS that falls through counts too.
        Only for a file without problems (its routes are whole). Only a public route that
        forwards to the keyed route's server counts: the same upstream, or one whose URL has
        the same scheme, host and port (``_server``); verify-only routes (no upstream) are
        all alike, the proxy asking /_keygate/v1/verify forwarding them."""
        nodes = getattr(self, "route_nodes", [])
        if self.problems or len(nodes) != len(routes):
            return []

        def line(i: int) -> int:
            return nodes[i].start_mark.line + 1

        def listed(names: Sequence[str]) -> str:
            return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"

        warnings: list[ConfigWarning] = []
        servers = {name: _server(upstream.url) for name, upstream in upstreams.items()}
        result = fall_throughs(routes, options_kept=not cors,
                               target=lambda route: route.upstream and
                               servers.get(route.upstream, route.upstream))
        for found in result.found[:VERB_WARNINGS_SHOWN]:
            keyed, public = routes[found.keyed], routes[found.public]
            k, p = f"routes[{found.keyed}]", f"routes[{found.public}]"
            mine = found.keyed_methods  # with the other keyed routes' on those paths
            methods = list(found.methods)
            if found.any_other:
                what = (f"{', '.join(methods)} and any other method (PURGE, PROPFIND...)"
                        if methods else "any method 'methods' cannot name (PURGE, PROPFIND...)")
            else:
                what = listed(methods)
            many = len(methods) > 1 or bool(methods and found.any_other)
            verb, reach, them = ("fall", "reach", "them") if many else ("falls", "reaches", "it")
            fixes = [f"list {listed(methods)} in {k}.methods"] if methods else []
            fixes.append(f"give {p} explicit methods" if found.any_other
                         else f"remove {listed(methods)} from {p}.methods")
            fixes.append(f"add a keyed route for '{keyed.path}' without methods after {k}")
            text = one_line(
                f"{self.source}:{line(found.keyed)}: {k}: warning: '{keyed.path}' needs a key "
                f"only for {listed(mine)}; {what} on its paths {verb} through to {p} "
                f"'{public.path}' (line {line(found.public)}{READINGS[found.reading]}), a "
                f"public route, and {reach} "
                "the upstream without a key, where a handler that does not check the method "
                f"may serve {them} as a GET (HTTP verb tampering; docs/security.md). To close "
                "it: "
                f"{', '.join(fixes[:-1])}, or {fixes[-1]}")
            key = ("verb", keyed.path, keyed.methods, keyed.scopes, public.path,
                   public.methods, found.methods, found.any_other)
            warnings.append(ConfigWarning(text, key))
        more = len(result.found) - VERB_WARNINGS_SHOWN
        if more > 0:  # a file with thousands of such pairs printed a line for each
            text = one_line(
                f"{self.source}: routes: warning: and {more} more such pair"
                f"{'s' if more > 1 else ''} of a keyed route and a later public route "
                f"it leaves methods to (only the first {VERB_WARNINGS_SHOWN} are shown); "
                "close the ones above and run keygate config check again")
            warnings.append(ConfigWarning(text, ("verb-more", more)))
        if result.cut_at is not None:
            text = one_line(
                f"{self.source}:{line(result.cut_at)}: routes[{result.cut_at}]: warning: "
                f"the check for methods a keyed route leaves to a later public route "
                f"(HTTP verb tampering) stopped here, after {result.budget} glob "
                f"comparisons, as it would take too long for {len(routes)} routes of "
                f"this shape; routes[{result.cut_at}] was not checked in full, nor the "
                "keyed routes after it (the file is still valid)")
            warnings.append(ConfigWarning(text, ("verb-cut",)))
        return warnings

    def case_twins(self, item: Node, i: int, route: Route, earlier: list[Route],
                   folded: FoldedGlobs) -> None:
        """A glob that differs from an earlier one only by case never matches for the methods
        both take: a path another route matches case-insensitively is refused (bad_path), as
        many upstreams compare paths case-insensitively. Nor does one every path of which an
        earlier glob matches case-insensitively ('/reports/public/*' after '/Reports/**').
        ``folded``: the earlier globs with a letter, to which this one is added; only those
        it yields are compared (comparing every pair made 2000 routes load 0.7 s slower)."""
        def methods(r: Route) -> set[str] | None:
            names = set(r.methods)
            return None if not names else names | {"HEAD"} if "GET" in names else names
        if not isinstance(route.path, str):
            return
        mine = methods(route)
        why = ("a path another route matches case-insensitively is refused (bad_path), so "
               "for the methods both take it never matches (write them in one case, or give "
               "them methods that do not overlap)")
        for k in folded.covering(route.path):
            other = earlier[k]
            theirs = methods(other)
            if mine is not None and theirs is not None and not mine & theirs:
                continue
            if case_twin(route.path, other.path):
                self.fail(child(item, "path"), f"routes[{i}].path",
                          f"'{route.path}' differs from routes[{k}].path '{other.path}' only "
                          f"by case; {why}")
                break
            if case_shadow(route.path, other.path):
                self.fail(child(item, "path"), f"routes[{i}].path",
                          f"every path '{route.path}' matches, routes[{k}].path "
                          f"'{other.path}' matches case-insensitively; {why}")
                break
        if _LETTER.search(_ESCAPE.sub("", route.path)):
            folded.add(i, route.path)

    def route_path(self, node: Node, path: str) -> Any:
        text = self.string(node, path)
        if text is BAD:
            return BAD
        problem = glob_problem(text)
        return text if problem is None else self.fail(node, path, problem)

    def methods(self, node: Node, path: str) -> Any:
        def method(value_node: Node, sub: str) -> Any:
            name = self.string(value_node, sub)
            if name is BAD:
                return BAD
            if name.upper() not in HTTP_METHODS:
                return self.fail(value_node, sub, f"'{name}' is not an HTTP method "
                                                  f"({', '.join(HTTP_METHODS)})")
            return name.upper()
        values = self.string_list(node, path, method)
        if values is BAD:
            return BAD
        if not values:
            return self.fail(node, path, "is empty; leave 'methods' out to allow any method")
        return tuple(dict.fromkeys(values))
