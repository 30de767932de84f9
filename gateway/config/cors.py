"""The optional ``cors`` section: which browser origins may call the proxy listener."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..settings import CorsConfig
from .access import HEADER_RE
from .nodes import BAD, Node, child, is_null
from .schema import SchemaReader

MAX_AGE = 86400  # Firefox's cap on a cached preflight; Chromium's is 7200
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_HOST = re.compile(r"[a-z0-9_.-]+|\[[0-9a-f:.]+\]")  # a name (IDNA-encoded, as browsers send
# it; '_' too, which browsers take in a name) or an IPv6 literal; no userinfo, no path
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_problem(text: str) -> tuple[str | None, str]:
    """(the origin as a browser serialises it, "") or (None, what is wrong). Lower-cased scheme
    and host, the scheme's default port left out (``https://App.example:443`` is
    ``https://app.example``); any scheme, so ``capacitor://localhost`` (a mobile webview)
    can be listed."""
    if text == "*":
        return None, "'*' cannot be an item: write allow_origins: '*' (not a list) for any origin"
    if text.lower() == "null":
        return None, ("'null' is the origin of sandboxed frames and file: pages, which any "
                      "site can produce; it cannot be allowed")
    if "*" in text:
        return None, f"'{text}': wildcards are not supported; list each origin"
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme.lower()):
        return None, f"'{text}' is not an origin (scheme://host[:port])"
    if rest.endswith("/") and "/" not in rest[:-1]:
        return None, f"'{text}': an origin has no path; write it without the trailing '/'"
    if any(c in rest for c in "/?#@\\") or not rest:
        return None, f"'{text}' is not an origin (scheme://host[:port], no path, query or user)"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None, f"'{text}' has an invalid port"
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if not host or not _HOST.fullmatch(host):
        return None, f"'{text}' is not an origin (scheme://host[:port])"
    scheme = scheme.lower()
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}:{port}", ""
    return f"{scheme}://{host}", ""


class CorsSections(SchemaReader):
    """``cors``."""

    def cors(self, node: Node | None) -> CorsConfig | None:
        if is_null(node):
            return None

        def header_names(value_node: Node, path: str) -> Any:
            def name(item: Node, sub: str) -> Any:
                value = self.string(item, sub, pattern=HEADER_RE, what="a valid HTTP header name")
                if value == "*":
                    return self.fail(item, sub, "list header names: '*' is not supported (it "
                                                "never covers Authorization, and means nothing "
                                                "with credentials)")
                return value
            values = self.string_list(value_node, path, name)
            if values is BAD:
                return BAD
            if len({v.lower() for v in values}) != len(values):
                return self.fail(value_node, path, "lists the same header twice")
            return tuple(values)

        cors = self.section(node, "cors", CorsConfig, {
            "allow_origins": self.allow_origins,
            "allow_headers": header_names,
            "expose_headers": header_names,
            "max_age": lambda n, p: self.integer(n, p, minimum=0, maximum=MAX_AGE),
            "allow_credentials": self.boolean,
        }, required={"allow_origins": "('*' or a list of origins such as "
                                      "https://app.example)"},
            order=("allow_origins", "allow_headers", "expose_headers", "max_age",
                   "allow_credentials"),
            allow_origins=())
        if cors.allow_origins == "*" and cors.allow_credentials:
            self.fail(child(node, "allow_credentials") or node, "cors.allow_credentials",
                      "cannot be true with allow_origins: '*' (browsers refuse credentials "
                      "for any origin); list the origins instead")
        return cors

    def allow_origins(self, node: Node, path: str) -> Any:
        if isinstance(node, yaml.SequenceNode):
            items = self.sequence(node, path)
            if items is None:
                return BAD
            if not items:
                return self.fail(node, path, "list at least one origin (or leave cors out)")
            origins: list[str] = []
            failed = False
            for i, item in enumerate(items):
                sub = f"{path}[{i}]"
                text = self.string(item, sub)
                if text is BAD:
                    failed = True
                    continue
                origin, problem = origin_problem(text)
                if origin is None:
                    self.fail(item, sub, problem)
                    failed = True
                elif origin in origins:
                    self.fail(item, sub, f"'{origin}' is listed twice")
                    failed = True
                else:
                    origins.append(origin)
            return BAD if failed else tuple(origins)
        value = self.string(node, path)
        if value is BAD:
            return BAD
        if value != "*":
            return self.fail(node, path, f"expected '*' or a list of origins, got '{value}' "
                                         "(write a single origin as a one-item list)")
        return "*"
