"""The optional ``cors`` section: which browser origins may call the proxy listener."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

import idna
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
# schemes whose hosts browsers parse as names or addresses (WHATWG URL's special schemes):
# a Unicode name is IDNA-encoded, an IPv4 address in any form they take is written dotted
_SPECIAL = frozenset(("http", "https", "ws", "wss", "ftp"))


def _ipv6(text: str) -> str | None:
    """An IPv6 address as browsers serialise it (WHATWG URL: lower-case hex pieces, the first
    longest run of two or more zero pieces as ``::``, no dotted IPv4 tail); None if invalid."""
    if "%" in text:  # a zone (fe80::1%eth0): Python takes one, browsers do not
        return None
    try:
        value = int(ipaddress.IPv6Address(text))
    except ValueError:
        return None
    pieces = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    start, length, i = -1, 1, 0
    while i < 8:
        j = i
        while j < 8 and pieces[j] == 0:
            j += 1
        if j - i > length:
            start, length = i, j - i
        i = max(j, i + 1)
    hexed = [f"{p:x}" for p in pieces]
    if start < 0:
        return ":".join(hexed)
    return ":".join(hexed[:start]) + "::" + ":".join(hexed[start + length:])


def _ipv4_number(part: str) -> int | None:
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    try:
        return int(part, radix) if part.isascii() and part.isalnum() else None
    except ValueError:
        return None


def _ipv4(host: str) -> str | None | bool:
    """A name that ends in a number is an IPv4 address to browsers (WHATWG URL): that address,
    dotted (``127.1`` and ``0x7f.0.0.1`` are ``127.0.0.1``); False when it is none they take
    (``256.1.1.1``, ``example.123``); None when the host is a name."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    if not last or not (last.isascii() and last.isdigit()) and _ipv4_number(last) is None:
        return None
    numbers = [_ipv4_number(p) if p else None for p in parts]
    if len(parts) > 4 or None in numbers or any(n > 255 for n in numbers[:-1]) or \
            numbers[-1] >= 256 ** (5 - len(numbers)):
        return False
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


def _name(host: str) -> tuple[str | None, str]:
    """A special scheme's host name as browsers send it: UTS 46 mapped, each non-ASCII label
    IDNA-encoded (``Bücher.example`` is ``xn--bcher-kva.example``); (None, why) if it cannot
    be."""
    if host.isascii():
        return host, ""
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(label if label.isascii() else idna.alabel(label).decode()
                        for label in mapped.split(".")), ""
    except (idna.IDNAError, UnicodeError) as exc:
        return None, str(exc)


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
    not_an_origin = f"'{text}' is not an origin (scheme://host[:port])"
    try:
        parts = urlsplit(text)
    except ValueError:  # an IPv6 literal Python cannot read
        return None, not_an_origin
    try:
        port = parts.port
    except ValueError:
        return None, f"'{text}' has an invalid port"
    host = (parts.hostname or "").lower()
    scheme = scheme.lower()
    if ":" in host:
        address = _ipv6(host)
        if address is None:
            return None, not_an_origin
        host = f"[{address}]"
    elif scheme in _SPECIAL and host:
        host, why = _name(host)
        if host is None:
            return None, (f"{not_an_origin}: its name is not a valid domain name ({why}); "
                          "list it as browsers send it, IDNA-encoded (xn--...)")
        address = _ipv4(host)
        if address is False:
            return None, f"'{text}' is not an IPv4 address browsers take"
        host = address or host
    if not host or not _HOST.fullmatch(host):
        return None, not_an_origin
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
