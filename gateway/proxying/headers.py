"""Header hygiene at the edge, both ways: what of the client's request goes upstream, and what
of the upstream's response comes back. Pure: no I/O, nothing but header lists in and out.

Request headers, in one pass over the client's headers:

- hop-by-hop headers (``Connection``, ``Keep-Alive``, ``Proxy-Connection``, ``TE``,
  ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authorization``,
  ``Proxy-Authenticate``) and every header ``Connection`` names are dropped. The headers keygate
  sets are added after this filtering, so ``Connection`` can never remove one of them; nor
  can it remove the ``X-Forwarded-*``, ``Forwarded`` and ``FROM_PROXIES`` headers a trusted
  proxy sends (a balancer passing on its client's ``Connection: X-Forwarded-For`` would
  otherwise have the upstream see the balancer as the client keygate judged by the chain);
- keygate's credential headers (``config.keys.headers``) are dropped, and ``Authorization``
  when it is the ``Bearer`` credential (on a public route, only when it carries a keygate token,
  as text or in ``Basic`` credentials, or is ``Bearer`` and a mistyped one: an upstream doing
  its own auth still gets its own ``Authorization``);
- client-sent identity headers are dropped whatever their case, however often repeated, and
  in the ``_`` spelling (``X_Workspace_Id``) that CGI/WSGI-style upstreams read as the same
  header, or with any other punctuation (``X.Workspace.Id``), which lighttpd's CGI, FastCGI
  and SCGI also hand over as ``HTTP_X_WORKSPACE_ID``; so are the identity header names
  earlier configs of this process set (a reload renamed them). All header-name comparisons here map
  every punctuation character (``_``, ``.``, ``+``, ...) to ``-`` (``models.header_key``);
- ``X-Forwarded-*`` and ``Forwarded`` from the client are dropped unless the peer is in
  ``server.trusted_proxies`` (``gateway.trust``: the same decision the failure throttle
  makes); from a trusted peer they are kept and the peer is appended to ``X-Forwarded-For``
  (its ``X-Forwarded-Proto``/``-Host`` are kept when present), except their ``_`` and other
  punctuated spellings (``X_Forwarded_For``, ``X.Forwarded.For``): a proxy never writes
  those, it passes on the client's. The other headers upstreams read the client's address
  from (``CLIENT_ADDRESS``: ``X-Real-IP``, ``True-Client-IP``, ``CF-Connecting-IP``, ...)
  follow the same rule, passed as sent from a trusted peer: from anyone else they would be a
  forged address. So do ``X-Original-URL``, ``X-Rewrite-URL`` and ``X-Original-URI``
  (``PATH_OVERRIDE``), which some upstreams route by instead of the request line: from anyone
  else they would name another path than the one keygate authorised; and ``X-Original-Host``,
  ``X-Host`` and ``X-HTTP-Host-Override`` (``HOST_OVERRIDE``), which some build URLs or pick
  a virtual host by: from anyone else they would be the client's choice of host; and
  ``X-Scheme``, ``X-Url-Scheme``, ``Front-End-Https`` and ``X-ARR-SSL``
  (``SCHEME_OVERRIDE``), which some read the scheme from before ``X-Forwarded-Proto``: from
  anyone else they would contradict the scheme keygate sends. And
  so do the headers authenticating proxies name the signed-in user in (``AUTH_USER``:
  ``X-Remote-User``, ``Remote-User``, ``X-Auth-Request-User``, ``X-WEBAUTH-USER``, ...),
  which an upstream behind such a proxy believes from keygate's address: from anyone else
  they would sign the client in as whoever it names;
- a method-override header (``X-HTTP-Method-Override``, ``X-HTTP-Method``,
  ``X-Method-Override``) spelled with punctuation other than ``-`` and ``_``
  (``X.HTTP.Method.Override``) is dropped: the pipeline authorises the method the ``-`` and
  ``_`` spellings name (``gateway.overrides``), and lighttpd reads the others as the same;
- ``Host`` is the upstream's host (like nginx's default ``proxy_set_header Host $proxy_host``):
  the client's ``Host`` goes to ``X-Forwarded-Host``;
- ``Expect`` is not forwarded (keygate answers ``100-continue`` itself), nor
  ``Content-Length`` (the upstream writer frames the body), nor the client's ``X-Request-Id``,
  ``traceparent``, ``tracestate`` or signature header (under its configured name and the
  default one): keygate sets its own after this filtering;
- everything else passes as sent, in order, repeats included.

Identity headers carry store data: a value with a control character is refused rather than
allowed to split the upstream request head.

Response headers: hop-by-hop and ``Connection``-named ones are dropped, and so are keygate's
identity headers and signature header (configured names and the default one, any case, the
punctuated spellings too) that an upstream echoes back: those are keygate's word to the
upstream, never the client's. The rest pass (repeats such as ``Set-Cookie`` included).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterable, Sequence

from multidict import CIMultiDict, CIMultiDictProxy, istr

from ..config import Config
from ..cors import CorsPolicy
from ..models import (HOP_BY_HOP, HOST_OVERRIDE, PATH_OVERRIDE, SCHEME_OVERRIDE, Principal,
                      header_key, plain_header_name)
from ..signature import DEFAULT_HEADER as SIGNATURE_HEADER
from ..overrides import HEADERS as OVERRIDE_HEADERS
from ..routes import query_has_token
from ..tokens import BODY_LEN, alternation
from ..trust import TrustedProxies

_HOP_BY_HOP_BYTES = frozenset(n.encode() for n in HOP_BY_HOP)
# Control characters a header value may not carry (RFC 9110 5.5: HTAB is the only one allowed):
# CR/LF would split the lean client's request head, NUL and the rest get it refused upstream.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Basic credentials as base64 in either alphabet (RFC 4648 sections 4 and 5), padding aside
_MISTYPED: dict[str | tuple[str, ...], re.Pattern] = {}


def _mistyped_token(prefix: str | tuple[str, ...]) -> re.Pattern:
    """``<prefix>_<env>_`` (of the prefix, or of any of several) and at least a key id and
    secret's worth (44) of base62."""
    pattern = _MISTYPED.get(prefix)
    if pattern is None:
        pattern = _MISTYPED[prefix] = re.compile(alternation(prefix) +
                                                 r"_[A-Za-z0-9]+_[0-9A-Za-z]{44}")
    return pattern


_NOT_B64 = re.compile(r"[^A-Za-z0-9+/_-]")
# A base64 run long enough to decode to a whole token (a one-letter prefix and environment
# at the least, "p_e_" + 50): a shorter one cannot hold one, and a value of thousands of tiny
# runs ("Basic a,a,a,...") cost the loop a decoding each, ~5 ms for 8 KiB
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{%d,}" % -(-4 * (BODY_LEN + 4) // 3))


_norm = header_key  # header names compared as a spoofer sees them

# Headers upstreams take the client's address from besides X-Forwarded-For (nginx's
# real_ip_header, CDNs', frameworks'): trusted only as a trusted proxy sends them (_norm names).
# Beyond nginx's and the CDNs' own: what common client-IP libraries read (django-ipware's
# HTTP_CLIENT_IP, HTTP_X_FORWARDED, HTTP_FORWARDED_FOR; npm request-ip's x-forwarded,
# forwarded-for, do-connecting-ip, x-appengine-user-ip, cf-pseudo-ipv4; Java stacks'
# Proxy-Client-IP, WL-Proxy-Client-IP) and other platforms' (Fly, Akamai); and what a hop
# between keygate and the upstream passes on from keygate as sent while the application
# reads it as the client's: an Envoy sidecar (Istio) keeps X-Envoy-External-Address from an
# internal peer and documents it for applications; CloudFront-Viewer-Address, Azure Front
# Door's X-Azure-ClientIP and X-Azure-SocketIP, ingress-nginx's X-Original-Forwarded-For.
CLIENT_ADDRESS = frozenset({"x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
                            "fastly-client-ip", "x-cluster-client-ip", "client-ip",
                            "x-forwarded", "forwarded-for", "proxy-client-ip",
                            "wl-proxy-client-ip", "x-originating-ip", "x-remote-ip",
                            "x-remote-addr", "do-connecting-ip", "fly-client-ip",
                            "x-appengine-user-ip", "cf-connecting-ipv6", "cf-pseudo-ipv4",
                            "akamai-client-ip", "x-envoy-external-address",
                            "cloudfront-viewer-address", "x-azure-clientip",
                            "x-azure-socketip", "x-original-forwarded-for"})
# Headers an authenticating proxy in front of an upstream names the signed-in user in, which
# the upstream believes from the address it trusts (keygate's): oauth2-proxy's X-Forwarded-*
# and X-Auth-Request-*, Authelia's Remote-*, Apache/nginx auth modules' and Kubernetes'
# request-header X-Remote-User/-Group, Grafana's (auth.proxy) and Gitea's X-WEBAUTH-*,
# authentik's, Vouch's, and what cloud identity-aware proxies hand the application (Google
# IAP, AWS ALB, Cloudflare Access, Azure App Service): from anyone but a trusted proxy (an auth
# proxy in front of keygate) they would sign the client in as whoever it names. Their signed
# JWT assertions, which an application verifies, and API clients' own credential headers
# (X-Auth-Token, Swift's X-Auth-User) are not among them.
AUTH_USER = frozenset({"x-remote-user", "remote-user", "x-remote-group", "remote-groups",
                       "remote-email", "remote-name", "x-forwarded-user",
                       "x-forwarded-email", "x-forwarded-preferred-username",
                       "x-forwarded-groups", "x-forwarded-access-token",
                       "x-auth-request-user", "x-auth-request-email",
                       "x-auth-request-preferred-username", "x-auth-request-groups",
                       "x-auth-request-access-token", "x-webauth-user", "x-webauth-email",
                       "x-webauth-fullname", "x-authentik-username", "x-authentik-groups",
                       "x-authentik-email", "x-authentik-name", "x-authentik-uid",
                       "x-vouch-user", "x-goog-authenticated-user-email",
                       "x-goog-authenticated-user-id", "x-amzn-oidc-identity",
                       "x-amzn-oidc-data", "x-amzn-oidc-accesstoken",
                       "cf-access-authenticated-user-email", "x-ms-client-principal",
                       "x-ms-client-principal-name", "x-ms-client-principal-id",
                       "x-ms-client-principal-idp"})
# Passed as sent from a trusted proxy only, beside X-Forwarded-* and Forwarded (_norm names).
# The verify-mode examples in docs/verify/ clear the same names (tests/test_verify_docs.py
# derives what each must clear from this set).
FROM_PROXIES = CLIENT_ADDRESS | PATH_OVERRIDE | AUTH_USER | HOST_OVERRIDE | SCHEME_OVERRIDE
# Method-override headers (gateway.overrides) in their _norm names. The pipeline authorises a
# request as the method their "-" and "_" spellings name; any other punctuation (lighttpd
# hands X.HTTP.Method.Override to PHP as HTTP_X_HTTP_METHOD_OVERRIDE too) is dropped here.
_METHOD_OVERRIDE = frozenset(h.lower() for h in OVERRIDE_HEADERS)
_NOT_DASH_OR_UNDERSCORE = re.compile(r"[!#$%&'*+.^`|~]")


def _unjudged_override(lname: str, name: str) -> bool:
    """Whether header ``name`` (``lname`` its _norm) is a method override in a spelling the
    pipeline did not judge."""
    return lname in _METHOD_OVERRIDE and _NOT_DASH_OR_UNDERSCORE.search(name) is not None

# What passed_on does with a header of a name: pass it, drop it, or look at the peer
# (X-Forwarded-*, Forwarded, CLIENT_ADDRESS) or the value (Authorization).
_PASS, _DROP, _FORWARDED, _AUTHZ = object(), object(), object(), object()
_KINDS_MAX = 1024  # header names remembered (a client inventing names only refills it)
_NAME_KEPT_MAX = 64  # longer names are not remembered: the memos stay under ~100 KB
_CONNECTION, _HOST = istr("Connection"), istr("Host")
_IDENTITIES_MAX = 4096  # principals whose identity header values are kept formatted


class RequestHeaderRules:
    """The request-header rules of one config (see the module docstring)."""

    def __init__(self, config: Config, retired: Iterable[str] = (),
                 prefixes: Iterable[str] = ()) -> None:
        """``retired``: header names of keygate's own that earlier configs of this process
        had (identity headers it set, credential headers it read keys from: a reload renamed
        them), dropped from requests as the current ones are; ``prefixes``: the key
        prefixes earlier configs used, whose tokens are as much keygate's to drop (a key of a
        prefix a reload replaced is still a live secret)."""
        ident = config.identity_headers
        self.identity = tuple(ident.names())  # workspace, key id, scopes, plan
        # every identity header name set and credential header name read in this process's
        # life, this config's included (_norm names): the next config's rules are handed them
        # as ``retired``
        self.own_names = frozenset(_norm(n) for n in (*retired, *self.identity,
                                                      *config.keys.headers))
        signing = config.identity_signature
        self.sign_header = signing.header if signing else SIGNATURE_HEADER
        self.sign_secret: bytes | None = None  # set by the Forwarder that reads the secret
        # the config's one CORS policy (gateway.cors): forward labels the upstream's answers
        # with it, the pipeline keygate's own and answers preflights; None, the common case,
        # costs a check
        self.cors = None if config.cors is None else CorsPolicy(config.cors, config.keys.headers)
        # the body limits a request is forwarded under, with its header rules: a request in
        # flight through a reload keeps the ones it was checked with
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.timeouts.body
        # Dropped from every request whatever the route (names normalised with _norm).
        always = set(HOP_BY_HOP)
        # the names earlier configs had too: an upstream still reading an old identity name
        # while it moves to the new one must never read a client's copy, and a token sent in
        # a credential header a reload retired (a client not yet moved) is still a live secret
        always.update(self.own_names)
        always.update(("host", "expect", "content-length", "x-request-id", "traceparent",
                       "tracestate"))
        # the default name too: an upstream still checking it must never read a client's copy
        always.update((_norm(self.sign_header), _norm(SIGNATURE_HEADER)))
        self._drop = frozenset(always)
        # Dropped from every response (normalised with _norm, as bytes): what keygate sends
        # the upstream about the caller, should the upstream echo it back. Response header
        # names as the upstream sent them -> as passed on (None: dropped), for this config.
        self.response_drop = frozenset(_norm(n).encode("latin-1") for n in (
            *self.identity, self.sign_header, SIGNATURE_HEADER))
        self.response_names: dict[bytes, str | None] = {}
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        # every key prefix used since start, this config's included: one string while no
        # reload changed it (as it always cost), else a tuple (one regex alternation)
        used = list(dict.fromkeys((*prefixes, config.keys.prefix)))
        self.prefixes = tuple(used)
        self._prefix: str | tuple[str, ...] = used[0] if len(used) == 1 else self.prefixes
        self._kinds: dict[str, object] = {}  # header name as sent -> _PASS, _DROP, ...
        self._identities: dict[tuple, tuple[str, str, str, str]] = {}  # checked, formatted

    def passed_on(self, headers: CIMultiDictProxy[str], peer: str | None, scheme: str,
                  principal: Principal | None) -> list[tuple[str, str]]:
        """The client's headers that go upstream, then ``X-Forwarded-For``/``-Proto``/``-Host``
        for this hop."""
        connection = headers.getall(_CONNECTION, None)
        if connection:
            named = {_norm(t.strip()) for v in connection for t in v.split(",") if t.strip()}
            if named:
                return self.passed_on_by_rule(headers, peer, scheme, principal, named)
        # Each header name, as sent, is judged once (kinds, bounded): most requests' headers
        # then cost a dict lookup each instead of a normalisation and five comparisons.
        kinds = self._kinds
        out: list[tuple[str, str]] = []
        trusted = None
        for name, value in headers.items():
            kind = kinds.get(name)
            if kind is None:
                kind = self._kind(name)
            if kind is _PASS:
                out.append((name, value))
            elif kind is _AUTHZ:
                if not self._credential(value, principal):
                    out.append((name, value))
            elif kind is _FORWARDED:  # the client's own X-Forwarded-*, Forwarded, X-Real-IP...
                if trusted is None:
                    trusted = self.trusted.is_trusted(peer)
                if trusted:  # kept and extended: by the rules
                    return self.passed_on_by_rule(headers, peer, scheme, principal)
        out.append(("X-Forwarded-For", peer or "unknown"))
        out.append(("X-Forwarded-Proto", scheme))
        host = headers.get(_HOST)
        if host is not None:
            out.append(("X-Forwarded-Host", host))
        return out

    def _credential(self, value: str, principal: Principal | None) -> bool:
        """Whether an ``Authorization`` value is keygate's to drop. On a keyed route it is
        the Bearer credential keygate checked (any whitespace after the scheme: RFC 9110
        allows HTAB). On a public route the upstream's own credentials pass, but never a
        keygate token: not as ``Bearer <token>``, nor inside any other value (``Token
        <token>``, ``Bearer <token> x``, a ``Basic`` user or password), percent-encoded or
        not."""
        parts = value.split(None, 1)
        if principal is not None:
            return bool(parts) and parts[0].lower() == "bearer"
        prefix = self._prefix
        if query_has_token(value, prefix):
            return True
        if len(parts) == 2 and parts[0].lower() == "bearer" and \
                _mistyped_token(prefix).match(parts[1]):
            # a keygate token with its key id and secret intact but a checksum that fails
            # (cut short, a character too many): meant for keygate, and as good as the token
            # to whoever reads it, since the checksum is computed from the rest
            return True
        if len(parts) == 2 and parts[0].lower() == "basic":
            # decoded as leniently as any upstream might: padding optional, either alphabet,
            # the whole value and each base64 run in it ("Basic a, Basic b")
            text = parts[1]
            for run in (_NOT_B64.sub("", text), *_B64_RUN.findall(text)):
                if len(run) % 4 == 1:  # a stray last character: lenient decoders drop it
                    run = run[:-1]
                try:
                    decoded = base64.b64decode(run + "=" * (-len(run) % 4), altchars=b"-_")
                except (binascii.Error, ValueError):
                    continue
                if query_has_token(decoded.decode("latin-1"), prefix):
                    return True
        return False

    def _kind(self, name: str) -> object:
        lname = _norm(name)
        if lname in self._drop or _unjudged_override(lname, name):
            kind = _DROP
        elif lname.startswith("x-forwarded-") or lname == "forwarded" or \
                lname in FROM_PROXIES:
            kind = _FORWARDED
        elif lname == "authorization":
            kind = _AUTHZ
        else:
            kind = _PASS
        if len(name) <= _NAME_KEPT_MAX:  # invented long names: judged each time, not kept
            if len(self._kinds) >= _KINDS_MAX:
                self._kinds.clear()
            self._kinds[name] = kind
        return kind

    def passed_on_by_rule(self, headers: CIMultiDictProxy[str], peer: str | None,
                          scheme: str, principal: Principal | None,
                          named: frozenset[str] | set[str] = frozenset()
                          ) -> list[tuple[str, str]]:
        """``passed_on`` applying the rules header by header: for a request whose
        ``Connection`` names headers (``named``), and the reference the fast path is tested
        against."""
        trusted = self.trusted.is_trusted(peer)
        drop = self._drop
        out: list[tuple[str, str]] = []
        xff: list[str] = []
        xf_proto = xf_host = None
        for name, value in headers.items():
            lname = _norm(name)
            if lname in drop or _unjudged_override(lname, name):
                continue
            if lname.startswith("x-forwarded-") or lname == "forwarded" or \
                    lname in FROM_PROXIES:
                # never dropped for being named in Connection: the chain (and address, host,
                # user) keygate judged the client by must reach the upstream as it read them;
                # from anyone else they are dropped anyway and keygate sets its own
                # a trusted proxy vouches for the ones it writes: never an "_" (or other
                # punctuated) spelling, which it passes on from the client and which
                # gateway.trust does not read either
                if not trusted or not plain_header_name(name):
                    continue
                if lname == "x-forwarded-for":
                    xff.append(value)
                    continue
                if lname == "x-forwarded-proto":
                    xf_proto = value
                elif lname == "x-forwarded-host":
                    xf_host = value
            elif lname in named:
                continue
            elif lname == "authorization":
                if self._credential(value, principal):
                    continue
            out.append((name, value))
        xff.append(peer or "unknown")
        out.append(("X-Forwarded-For", ", ".join(xff)))
        if xf_proto is None:
            out.append(("X-Forwarded-Proto", scheme))
        if xf_host is None:
            host = headers.get("Host")
            if host is not None:
                out.append(("X-Forwarded-Host", host))
        return out

    def identity_values(self, principal: Principal | None) -> tuple[str, str, str, str]:
        """Workspace, key id, scopes and plan as sent upstream (and signed): empty for a public
        route. Raises ``ValueError`` for a value with a control character."""
        if principal is None:
            return ("", "", "", "")
        who = (principal.workspace, principal.key_id, principal.scopes, principal.plan)
        values = self._identities.get(who)  # the same for every request of a key
        if values is None:
            values = (who[0], who[1], " ".join(sorted(who[2])), who[3])
            # store data: never let it split the request head (one search for all four)
            if _CTL.search("|".join(values)) is not None:
                raise ValueError("identity value with a control character")
            if len(self._identities) >= _IDENTITIES_MAX:
                self._identities.clear()
            self._identities[who] = values
        return values


class NotUtf8Headers(CIMultiDict):
    """Response headers of which a value is not UTF-8 (decoded with surrogateescape): they
    must be written by ``gateway.proxying.response.raw_header_block`` to keep those bytes."""


def response_headers(raw: Sequence[tuple[bytes, bytes]],
                     rules: RequestHeaderRules) -> CIMultiDict[str]:
    """The upstream's response headers (as parsed) that go back to the client, keygate's
    identity and signature headers of ``rules``' config dropped too; a ``NotUtf8Headers``
    when a value is not UTF-8."""
    names = rules.response_names
    out: CIMultiDict[str] = CIMultiDict()
    named: set[bytes] | None = None
    not_utf8 = False
    for raw_name, raw_value in raw:
        name = names.get(raw_name, _UNSEEN)
        if name is _UNSEEN:
            name = _response_name(raw_name, rules)
        if name is None:  # hop-by-hop, or keygate's own
            if raw_name.lower() == b"connection":
                named = named or set()
                named.update(t.strip().lower() for t in raw_value.split(b",") if t.strip())
            continue
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:  # obs-text (Latin-1, say): kept as the bytes it was
            value = raw_value.decode("utf-8", "surrogateescape")
            not_utf8 = True
        out.add(name, value)
    if named and not named <= _HOP_BY_HOP_BYTES:  # Connection names more than hop-by-hop
        out = CIMultiDict((k, v) for k, v in out.items()
                          if k.encode("latin-1").lower() not in named)
    if not_utf8:
        out = NotUtf8Headers(out)
    return out


_RESPONSE_NAMES_MAX = 1024  # response header names remembered per config (response_names)
_UNSEEN = object()


def _response_name(raw_name: bytes, rules: RequestHeaderRules) -> str | None:
    lname = raw_name.lower()
    dropped = lname in _HOP_BY_HOP_BYTES or \
        _norm(raw_name.decode("latin-1")).encode("latin-1") in rules.response_drop
    name = None if dropped else raw_name.decode("latin-1")
    if len(raw_name) <= _NAME_KEPT_MAX:
        names = rules.response_names
        if len(names) >= _RESPONSE_NAMES_MAX:
            names.clear()
        names[raw_name] = name
    return name
