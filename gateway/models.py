"""Plain records and the vocabulary every module shares.

The vocabulary (HTTP methods, the reserved path, name and scope syntax, header-name identity)
and the records the request path reads from the config (rate limits, plans, upstreams, routes)
live here rather than in the config loader, so a module that only needs ``Route`` or
``SCOPE_RE`` does not pull in the YAML reader, and each rule has one definition.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping


# --- vocabulary ----------------------------------------------------------------------------------

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
RESERVED_PATH = "/_keygate/"  # keygate's own endpoints; no route may claim a path under it
SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # plan and upstream names
# Role names are slugs (SPEC), as workspace ids are
ROLE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ROLE_NAME_HINT = ("a slug: lowercase letters, digits and '-', starting with a letter or digit, "
                  "at most 63 characters")
# C0 and C1 controls, DEL, line/paragraph separators, bidi marks, embeddings, overrides, isolates
# (a regex character class, written as the OpenAPI document's patterns take it too): what the
# admin API refuses in text (gateway.admin.validate) and the CLI shows escaped (gateway.cli)
UNSAFE_TEXT_CLASS = (r"\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     r"\u2066-\u2069")


# --- header names with a meaning of their own (as header_key spells them) --------------------
# gateway.proxying.headers treats each kind at the edge; gateway.config.access keeps every one
# of them from being an identity, signature or credential header.

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate",
})
# Headers upstream frameworks perform the method named in instead of the request line's
# (gateway.overrides: Express's method-override, Symfony, ASP.NET, Google's APIs)
METHOD_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
# Headers some upstreams take the request's path from instead of its request line (IIS URL
# Rewrite; Symfony before 3.4.14 and Zend Framework 1/2, CVE-2018-14773), or its mount point,
# serving what follows it in the path (gunicorn's SCRIPT_NAME request header; X-Script-Name
# in the much-copied WSGI "ReverseProxied" middleware: '/public/admin' with '/public' is
# /admin to the application): keygate authorised the request line's path, so from anyone but
# a trusted proxy they would name another one. X-Original-URI and X-Original-Method are the
# request's path and method as nginx hands them on (its auth_request examples, ingress-nginx),
# which applications behind nginx read.
PATH_OVERRIDE = frozenset({"x-original-url", "x-rewrite-url", "script-name", "x-script-name",
                           "x-original-uri", "x-original-method"})
# Headers upstreams take the request's host from instead of Host, for the absolute URLs they
# build (password-reset links, redirects) and for virtual hosting: ASP.NET's and IIS ARR's
# X-Original-Host, X-Host, X-HTTP-Host-Override, and X-Forwarded-Server (Apache's
# mod_proxy; an X-Forwarded-* header, listed for the docs and verify examples). From anyone
# but a trusted proxy they would be the client's choice of host (host header injection), as
# X-Forwarded-Host and Forwarded's host= would be.
HOST_OVERRIDE = frozenset({"x-original-host", "x-host", "x-http-host-override",
                           "x-forwarded-server"})
# Headers upstreams take the request's scheme from instead of X-Forwarded-Proto: Tornado's
# xheaders read X-Scheme first (ingress-nginx writes it), X-Url-Scheme (older WSGI
# middleware), Front-End-Https (Microsoft's proxies, "on") and X-ARR-SSL (IIS ARR). From
# anyone but a trusted proxy they would be the client's word on the scheme, against keygate's
# X-Forwarded-Proto: an http request taken as https (secure cookies, no redirect) or the
# reverse (redirect loops). X-Forwarded-Ssl and X-Forwarded-Scheme (Rack, gunicorn) are
# X-Forwarded-* headers, judged as such.
SCHEME_OVERRIDE = frozenset({"x-scheme", "x-url-scheme", "front-end-https", "x-arr-ssl"})


# The characters a header name may hold besides letters, digits and "-" (RFC 9110 tchar)
_NAME_PUNCTUATION = "!#$%&'*+.^_`|~"
_AS_DASH = str.maketrans(_NAME_PUNCTUATION, "-" * len(_NAME_PUNCTUATION))
_PUNCTUATED = re.compile(r"[!#$%&'*+.^_`|~]")


def header_key(name: str) -> str:
    """A header name's identity as a spoofer sees it: case-insensitive, and any punctuation the
    same as ``-``. Many servers and frameworks read ``X_Workspace_Id`` as ``X-Workspace-Id``
    (CGI-style ``HTTP_X_WORKSPACE_ID``), and lighttpd's CGI, FastCGI and SCGI turn every
    character but a letter or digit into ``_``: ``X.Workspace.Id`` and ``X+Workspace+Id`` too."""
    name = name.lower()
    return name.translate(_AS_DASH) if _PUNCTUATED.search(name) is not None else name


def plain_header_name(name: str) -> bool:
    """Whether ``name`` is spelled with letters, digits and ``-`` only, as the proxies that
    write ``X-Forwarded-*`` spell them (a punctuated spelling is the client's, passed on)."""
    return _PUNCTUATED.search(name) is None


class TooManyDigits(ValueError):
    """A number of more digits than Python reads (``sys.get_int_max_str_digits()``, 4300)."""


def whole_number(text: str) -> int:
    """``int(text)``, raising ``TooManyDigits`` in keygate's words for a number past Python's
    limit on digits: int()'s own message told the user to "use sys.set_int_max_str_digits()
    to increase the limit". Any other ValueError is int()'s."""
    try:
        return int(text)
    except ValueError:
        digits = sum(c.isdigit() for c in text)
        if digits > 4300 and re.fullmatch(r"\s*[+-]?[0-9_]+\s*", text):
            raise TooManyDigits(f"a number of {digits} digits is too large") from None
        raise


# --- rate limits and plans ------------------------------------------------------------------------

RATE_LIMIT_RE = re.compile(r"\s*([0-9]+)\s*/\s*([sm])\s*")
MAX_RATE = 10**9
# Bounds the admin API holds values to, shared with the CLI (which refuses a value past them
# as bad usage, before any call): a count (monthly_requests, max_keys), a listing's
# unused_days, an audit listing's limit.
MAX_COUNT = 10**15
MAX_UNUSED_DAYS = 36500
MAX_AUDIT_LIMIT = 1000
# Bounds of key fields the admin API checks (gateway.admin.validate) and the CLI checks as
# option values (gateway.cli.parsing): one definition each
MAX_SECONDS = 100 * 365 * 86400   # expires_in / grace_seconds ceiling (a century)
MAX_SCOPES = 100
MAX_SCOPE_LEN = 128
MAX_META_BYTES = 4096
MAX_META_DEPTH = 32    # objects and lists within meta, itself included


def well_formed_scope(scope: Any) -> bool:
    """Whether ``scope`` is a scope string: ``people:read`` (letters, digits, '_', '.', '-',
    parts joined by ':'), at most MAX_SCOPE_LEN characters."""
    return isinstance(scope, str) and len(scope) <= MAX_SCOPE_LEN \
        and SCOPE_RE.fullmatch(scope) is not None


def meta_json(value: dict) -> str:
    """A key's ``meta`` object as the compact UTF-8 JSON stored; ValueError (saying what is
    wrong, after "The field 'meta' ") when nested more than MAX_META_DEPTH deep or larger
    than MAX_META_BYTES. 4 KiB of '[' nests ~900 deep, which the request's reader could take
    but a deeper call stack could not write back: every listing holding the key answered
    500."""
    level: list[Any] = [value]
    for _ in range(MAX_META_DEPTH):  # breadth first: no recursion of our own
        level = [child for parent in level
                 for child in (parent.values() if isinstance(parent, dict) else parent)
                 if isinstance(child, (dict, list))]
    if level:
        raise ValueError(f"is nested more than {MAX_META_DEPTH} levels deep")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise ValueError("holds text that is not valid Unicode (a lone surrogate)") from None
    if size > MAX_META_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_META_BYTES}")
    return text


@dataclass(frozen=True)
class RateLimit:
    """``N/s`` or ``N/m``: ``requests`` per ``period_seconds``; ``burst``, only ever made by
    ``within``: at most that many in any one second besides (an ``N/m`` rate and a ``B/s``
    one in force together)."""
    requests: int
    period_seconds: int  # 1 or 60
    burst: int = 0       # per second, on top of a per-minute rate (0: none)

    def __str__(self) -> str:
        text = f"{self.requests}/{'s' if self.period_seconds == 1 else 'm'}"
        return f"{text} and {self.burst}/s" if self.burst else text

    def exceeds(self, bound: RateLimit) -> bool:
        """Whether this admits more requests than ``bound`` in some window. Both are sliding
        logs, so N/m admits all N within one second: this is looser if it admits more per
        second on average or more in one of its own periods (60/m is looser than 1/s: a burst
        of 60; 1/s is no looser than 60/m)."""
        return (self.requests * bound.period_seconds > bound.requests * self.period_seconds
                or self.requests > bound.requests)

    def within(self, bound: RateLimit) -> RateLimit:
        """The rate in force for a key whose own rate is this under ``bound`` (its workspace's,
        both parsed ``N/s`` or ``N/m``): whichever of the two admits no more than the other in
        every window. When neither does (a per-second and a per-minute rate that cross, e.g.
        10/s and 120/m: 600 a minute against 120 in one second), both at once: the per-minute
        rate with the per-second one as its ``burst`` (120/m and at most 10 in any second)."""
        if not self.exceeds(bound):
            return self
        if not bound.exceeds(self):
            return bound
        per_second, per_minute = (self, bound) if self.period_seconds == 1 else (bound, self)
        return RateLimit(per_minute.requests, 60, per_second.requests)


def parse_rate_limit(text: str) -> RateLimit:
    """``"5/s"`` → ``RateLimit(5, 1)``; ``"100/m"`` → ``RateLimit(100, 60)``.

    Raises ``ValueError`` with a sentence fit to show a user: the config loader (a plan's
    ``rate_limit``) and the admin API (a key's own ``rate_limit``) both show it as is.
    """
    match = RATE_LIMIT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        # quoted as errors.shown does: a key pasted here is not echoed back
        got = text if not isinstance(text, str) or len(text) <= 31 else text[:12] + "…"
        raise ValueError(f"a rate limit looks like '5/s' or '300/m' (requests per second or "
                         f"per minute), got {got!r}")
    digits = match.group(1).lstrip("0")
    if len(digits) > len(str(MAX_RATE)):  # before int(): past 4300 digits it raises, in
        raise ValueError(f"a rate limit needs between 1 and {MAX_RATE} requests, got a "  # its
                         f"number of {len(digits)} digits")  # own words (set_int_max_str...)
    requests = int(match.group(1))
    if not 1 <= requests <= MAX_RATE:
        raise ValueError(f"a rate limit needs between 1 and {MAX_RATE} requests, got {text!r}")
    return RateLimit(requests, 1 if match.group(2) == "s" else 60)


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_requests: int | None = None        # None = unlimited
    max_keys: int | None = None
    rate_limit: RateLimit | None = None


# the fields of a plan a workspace may override with limits of its own
LIMIT_FIELDS = ("monthly_requests", "max_keys", "rate_limit")


# --- where requests go ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Upstream:
    name: str
    url: str                                   # http://host:port[/base]
    timeout: float = 30.0
    # https:// only: PEM bundle of the CAs to trust for this upstream INSTEAD of the system
    # store (like nginx's proxy_ssl_trusted_certificate); None = the system store.
    ca_file: str | None = None
    max_connections: int = 100                 # open connections to it; more requests wait


@dataclass(frozen=True)
class Route:
    path: str                                  # glob: * one segment, ** the rest
    upstream: str | None = None                # None only for routes that are not forwarded
    methods: tuple[str, ...] = ()              # () = any method
    scopes: tuple[str, ...] = ()               # all required
    public: bool = False
    websocket: bool = False                    # a GET asking Upgrade: websocket is tunnelled


# --- what the store holds -------------------------------------------------------------------------

def whole_second(epoch: float) -> float:
    """An expiry as it is kept: on the second, as ``rfc3339`` shows it, so a key expires at the
    instant its ``expires_at`` shows (never later than the moment asked for)."""
    return float(math.floor(epoch))


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})",
                      re.ASCII)
"""RFC 3339's date-time (a space for the ``T`` too, as its section 5.6 allows): the shape, the
calendar is ``fromisoformat``'s to check."""


def parse_rfc3339(text: str) -> float:
    """RFC 3339 with a zone (``Z`` or offset) → epoch seconds. ValueError otherwise: also for the
    other ISO 8601 forms ``fromisoformat`` reads (week dates, basic format, hours only, ``,``
    fractions, ``+0100`` and seconds in offsets), which the OpenAPI document's ``date-time``
    refuses."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("not an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z")
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("timestamp needs a time zone, e.g. 2027-01-31T00:00:00Z")
    return dt.timestamp()


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    plan: str
    created_at: float
    rev: int = 0  # bumped on every change that affects authorisation (plan, limits, roles)
    # the workspace's own limits over its plan's (a custom deal): (field, value) pairs of
    # LIMIT_FIELDS, a value of None meaning unlimited; a field not given is the plan's. A tuple,
    # so a workspace stays hashable (the key cache shares equal workspaces).
    overrides: tuple[tuple[str, Any], ...] = ()

    def to_json(self, limits: Mapping[str, Any] | None = None) -> dict:
        """``limits``: the limits in force (plan and overrides merged)."""
        data = {"id": self.id, "name": self.name, "plan": self.plan,
                "created_at": rfc3339(self.created_at)}
        if limits is not None:
            data["limits"] = dict(limits)
            data["custom_limits"] = dict(self.overrides)
        return data


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored; ``hash`` is the argon2id hash of the secret and never leaves the store
    module except to be verified."""
    id: str
    workspace: str
    name: str
    description: str
    environment: str
    role: str | None
    scopes: tuple[str, ...]          # explicit scopes (role None) — effective scopes are computed
    hash: str
    prefix: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    rate_limit: str | None           # "N/s" | "N/m" | None (plan's)
    rev: int = 0                     # bumped on every change
    monthly_requests: int | None = None      # the key's own monthly cap (None: none)
    enabled: bool = True                     # False: refused (disabled_key) until enabled
    meta: str = "{}"                         # JSON object, as stored (never forwarded)
    allowed_ips: tuple[str, ...] | None = None   # CIDRs the key may be used from (None: any)
    # the key whose rate log and own month count this key's requests go to (None: its own).
    # A rotation's new key takes the old key's (its budget's, after an earlier rotation), so
    # the keys of one integration share one rate and one cap, during a grace too; set once at
    # creation, never changed, never shown
    budget: str | None = None
    # a rotation's grace that ends sooner than the key would have expired sets ``expires_at`` to
    # the grace's end and keeps the key's own expiry here (None: it had none), which a later
    # rotation of it copies the lifetime of; ``in_grace`` False: ``expires_at`` is its own (a
    # key stored before this field, or re-dated since). Never shown
    expiry_before_grace: float | None = None
    in_grace: bool = False

    @property
    def own_expires_at(self) -> float | None:
        """The key's own expiry, a rotation's grace apart: what its lifetime is counted to."""
        return self.expiry_before_grace if self.in_grace else self.expires_at

    @property
    def budget_id(self) -> str:
        """The key id its rate log and own month count are kept under."""
        return self.budget or self.id

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, effective_scopes: tuple[str, ...], now: float | None = None,
                used_this_month: int = 0) -> dict:
        return {"id": self.id, "workspace": self.workspace, "name": self.name,
                "description": self.description, "environment": self.environment,
                "role": self.role, "scopes": list(effective_scopes), "prefix": self.prefix,
                "created_at": rfc3339(self.created_at), "expires_at": rfc3339(self.expires_at),
                "last_used_at": rfc3339(self.last_used_at),
                "revoked_at": rfc3339(self.revoked_at), "rate_limit": self.rate_limit,
                "monthly_requests": self.monthly_requests, "used_this_month": used_this_month,
                "enabled": self.enabled, "meta": json.loads(self.meta or "{}"),
                "allowed_ips": None if self.allowed_ips is None else list(self.allowed_ips),
                "status": self.status(now)}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated proxy request acts as. The key cache's entry
    (``gateway.auth.CachedKey``) has the same four fields and ``has_scope``, and is what the
    pipeline hands on as the principal."""
    workspace: str
    key_id: str
    scopes: frozenset[str]
    plan: str

    def has_scope(self, scope: str) -> bool:
        return "ALL" in self.scopes or scope in self.scopes
