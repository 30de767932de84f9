"""Store URLs: every form ``store.redis_url`` takes, parsed and checked, and the standalone
redis-py client (the Sentinel and Cluster clients are ``gateway.redis_topology``'s).

Standalone URLs (``redis://``, ``rediss://``, ``unix://``) are redis-py's own forms, read by
redis-py's own parser (``parse_standalone_url``). ``check_store_url`` is the rule for every form
``store.redis_url`` may take, so the config loader refuses at load what a client could never
connect with. The two topology forms:

``redis+sentinel://[user:pass@]host1:26379[,host2:26379...]/<master-name>[/<db>][?sentinel_username=U&sentinel_password=P]``
    The hosts are the Sentinels (port defaults to 26379); ``<master-name>`` is the monitored
    master's name (``sentinel monitor <master-name> ...``); ``<db>`` the database number
    (default 0). ``user:pass@`` are the credentials of the *data nodes* (the master the
    Sentinels point at), exactly as in ``redis://``; omit them if the data nodes need none.
    Sentinels that require a password of their own (``requirepass`` in sentinel.conf) get it
    from ``sentinel_password`` (and ``sentinel_username`` for an ACL user); by default nothing
    is sent to the Sentinels. Every connection asks the Sentinels which node is the master,
    so after a failover the next connection goes to the promoted master (redis-py's
    ``SentinelConnectionPool``); a demoted master answering READONLY drops its connections.

``redis+cluster://[user:pass@]host:port[,host:port...]``
    Seed nodes of a Redis Cluster (port defaults to 6379; one reachable seed is enough, the
    rest of the cluster is discovered). A path, if any, must be ``/`` or ``/0``: a cluster has
    database 0 only. ``user:pass@`` are the credentials of every cluster node.

``rediss+sentinel://`` and ``rediss+cluster://`` are the same over TLS: for Sentinel, to the
Sentinels and to the data nodes; for Cluster, to the seeds and to every node discovered. They
take the ``ssl_*`` query options a ``rediss://`` URL takes (``TLS_OPTIONS``: those of redis-py's
``SSLConnection``, e.g. ``ssl_ca_certs`` for a private CA, ``ssl_certfile``/``ssl_keyfile``
for a client certificate, ``ssl_cert_reqs``, ``ssl_check_hostname``, ``ssl_min_version``),
converted as redis-py's own URL parser converts them and applied to every connection of the
URL; Sentinel's two options may sit beside them. Without them a TLS URL verifies against the
system's CAs, with the host name checked, as redis-py does.

The TLS rules shared by every form: an ``ssl_*`` option on a plain URL (``redis://``,
``unix://``, ``redis+…://``) is refused, since redis-py would fail on it at the first command
(a plain connection takes no TLS options), as is an ``ssl_*`` name redis-py does not know; a
topology URL that gives an option twice is refused (a ``rediss://`` URL, read by redis-py,
takes the first). ``check_store_url`` builds the TLS context, so a CA or certificate file that
is missing or unusable is a config problem, not a failure at the first store call.
``tls_context`` is that context as redis-py builds it: the per-request client uses it too, so
both store clients trust and verify alike.

Hosts may be names, IPv4 addresses or bracketed IPv6 addresses (``[::1]:26379``). User,
password and master name are percent-decoded. Error messages never repeat a password.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (URL_QUERY_ARGUMENT_PARSERS, SSLConnection,
                                      UnixDomainSocketConnection, parse_url)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TOPOLOGY_SCHEMES = SENTINEL_SCHEMES + CLUSTER_SCHEMES
STANDALONE_SCHEMES = ("redis", "rediss", "unix")
# as messages list them (the TLS topology forms are the plain ones with rediss)
STORE_SCHEMES = STANDALONE_SCHEMES + ("redis+cluster", "redis+sentinel")
SENTINEL_PORT = 26379
REDIS_PORT = 6379
# The highest database number a URL may select: Redis's own ceiling for ``databases`` (a
# C int); SELECT of any number past the server's ``databases`` is refused at every connect
MAX_DB = 2**31 - 1
_SENTINEL_PARAMS = ("sentinel_username", "sentinel_password")
# The TLS options of redis-py's TLS connection (``SSLConnection``): those a ``rediss://`` URL's
# query may give, taken by the TLS topology forms too.
TLS_OPTIONS = tuple(name for name in inspect.signature(SSLConnection.__init__).parameters
                    if name.startswith("ssl_"))
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class TopologyURL:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL (see the module docstring)."""
    kind: str                               # "sentinel" | "cluster"
    tls: bool
    nodes: tuple[tuple[str, int], ...]      # Sentinels, or cluster seed nodes
    username: str | None = None             # data nodes' credentials
    password: str | None = None
    service: str | None = None              # Sentinel: the master's name
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: dict[str, Any] = field(default_factory=dict)  # TLS options, as redis-py parses them
    # the query gives a password option: a problem quotes no value beside it (_quiet)
    quiet: bool = False

    def __repr__(self) -> str:  # never print a password by accident
        return (f"TopologyURL({self.kind}, tls={self.tls}, nodes={self.nodes}, "
                f"service={self.service!r}, db={self.db})")


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def is_topology_url(url: str) -> bool:
    return scheme_of(url) in TOPOLOGY_SCHEMES


def _node(text: str, default_port: int, scheme: str) -> tuple[str, int]:
    if not text:
        raise ValueError(f"a {scheme}:// URL has an empty host in its host list")
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"a {scheme}:// URL has a bad host or port ({text!r})") from None
    if not host or parts.username is not None or parts.path or parts.query:
        raise ValueError(f"a {scheme}:// URL has a bad host ({text!r})")
    return host, port or default_port


def _misplaced_at(scheme: str, where: str) -> ValueError:
    """The problem of a URL whose user name or password has an unencoded '/', '?' or '#'
    (base64 secrets have '/'): the user info ended early, and what followed that character
    would be read as a host, path or query, and quoted in the message refusing it. This
    says what to do and quotes no part of the URL."""
    part = "master name" if "sentinel" in scheme else "path"
    return ValueError(f"a {scheme}:// URL has an @ after its {where}: percent-encode any /, ?, "
                      f"# or @ in its user name, password or {part} (as %2F, %3F, %23, %40)")


def _password_in_query(query: str, known) -> bool:
    """Whether an '@' in the query of a URL with no user info is the end of a password with
    an unencoded '?': a part without '=' or with a name no option has. An '@' in the value of
    a known option (``password=p@ss``) is no such thing."""
    if "@" not in query:
        return False
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if not eq or unquote(name) not in known:
            return True
    return False


def _password_given(names) -> bool:
    """Whether the query gives a password option (password, sentinel_password, ssl_password):
    a name after it that no option has may then be the rest of a password whose '&' was not
    percent-encoded, and is not shown (``_beside_password``)."""
    return any(unquote_plus(n).endswith("password") for n in names)


# what a problem says in place of a value of the URL's query that may be a piece of a password
# (one given beside a password option whose '&' was not percent-encoded)
_QUIET = " (not quoted: beside a password option, it may be a piece of the password)"


def _beside_password(scheme: str) -> ValueError:
    return ValueError(f"a {scheme}:// URL has a query option it cannot take beside a password "
                      "option (not named: it may be the rest of a password): percent-encode "
                      "any & or = in a password as %26, %3D")


def parse_topology_url(url: str) -> TopologyURL:
    """Parse a Sentinel or Cluster URL. Raises ``ValueError`` with a sentence fit for a user
    (it never contains the password)."""
    for unsafe in "\t\r\n":  # dropped anywhere, as redis-py's parser (urllib's) drops them
        url = url.replace(unsafe, "")  # from redis:// URLs: a secret file's last line break
    scheme = scheme_of(url)
    if scheme not in TOPOLOGY_SCHEMES:
        raise ValueError(f"not a Sentinel or Cluster URL (scheme {scheme!r})")
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise ValueError(f"a {scheme}:// URL cannot have a # fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None  # "name@host": a user name, as in redis-py
    sentinel = scheme in SENTINEL_SCHEMES
    default_port = SENTINEL_PORT if sentinel else REDIS_PORT
    tls = scheme.startswith("rediss")
    allowed = (_SENTINEL_PARAMS if sentinel else ()) + (TLS_OPTIONS if tls else ())
    # An '@' past the host list: a user name or password with a '/' or '?' in it ended the
    # host list early (see _misplaced_at)
    if "@" in path or _password_in_query(query, allowed + TLS_OPTIONS):
        raise _misplaced_at(scheme, "host list")
    try:
        nodes = tuple(_node(h.strip(), default_port, scheme) for h in hostlist.split(","))
    except ValueError:
        if not at and "@" in query:
            raise _misplaced_at(scheme, "host list") from None
        raise
    secret = _password_given(pair.partition("=")[0] for pair in query.split("&"))
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        if secret:
            raise _beside_password(scheme) from None
        raise ValueError(f"a {scheme}:// URL has a malformed query string") from None
    for name, values in params.items():
        if secret and name not in allowed and name not in TLS_OPTIONS \
                and not name.endswith("password"):  # a password option is named, known or not
            raise _beside_password(scheme)
        if name in TLS_OPTIONS and not tls:
            raise ValueError(_plain_with_tls_options(scheme, name))
        if name not in allowed:
            hint = ("only sentinel_username, sentinel_password and the ssl_* options of "
                    "rediss:// are understood" if sentinel and tls
                    else f"only {', '.join(allowed)} are understood" if allowed
                    else "only the ssl_* options of rediss:// are understood" if tls
                    else "it takes no query parameters")
            raise ValueError(f"a {scheme}:// URL has an unknown query parameter {name!r} "
                             f"({hint})")
        if len(values) > 1:
            raise ValueError(f"a {scheme}:// URL gives {name!r} more than once")
    ssl_options = _parse_tls_options({name: values[0] for name, values in params.items()
                                      if name in TLS_OPTIONS}, quote=not secret)
    segments = [unquote(s) for s in path.split("/")] if slash else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    kind = "sentinel" if sentinel else "cluster"
    if not sentinel:
        if segments not in ([], ["0"]):
            raise ValueError(f"a {scheme}:// URL takes no path (a cluster has database 0 "
                             "only)")
        return TopologyURL(kind, tls, nodes, username, password, ssl=ssl_options, quiet=secret)
    if not segments or not segments[0]:
        raise ValueError(f"a {scheme}:// URL needs the name of the master as its path, e.g. "
                         f"{scheme}://host:26379/mymaster")
    if len(segments) > 2:
        raise ValueError(f"the path of a {scheme}:// URL is /<master-name>[/<db>]")
    db = 0
    if len(segments) == 2:
        if not (segments[1].isascii() and segments[1].isdigit()) or int(segments[1]) > MAX_DB:
            raise ValueError(f"the database of a {scheme}:// URL must be a number from 0 to "
                             f"{MAX_DB}, got {segments[1][:32]!r}")
        db = int(segments[1])
    first = {name: values[0] for name, values in params.items()}
    return TopologyURL(kind, tls, nodes, username, password, segments[0], db,
                       first.get("sentinel_username") or None,
                       first.get("sentinel_password") or None, ssl_options, secret)


def _plain_with_tls_options(scheme: str, name: str) -> str:
    tls_scheme = {"redis": "rediss", "redis+sentinel": "rediss+sentinel",
                  "redis+cluster": "rediss+cluster"}.get(scheme)
    use = f"use {tls_scheme}:// for TLS" if tls_scheme else "a unix socket has no TLS"
    return (f"a {scheme}:// URL connects without TLS, so it cannot take {name!r} ({use}; "
            "redis-py refuses ssl_* options on a plain connection)")


def _parse_tls_options(given: dict[str, str], *, quote: bool = True) -> dict[str, Any]:
    """The ssl_* query options of a TLS URL, converted as redis-py's ``parse_url`` converts
    them (``URL_QUERY_ARGUMENT_PARSERS``: ``ssl_check_hostname`` a boolean, ``ssl_min_version``
    a number...). A blank value is no value, as in redis-py."""
    options: dict[str, Any] = {}
    for name, value in given.items():
        if value == "":
            continue
        parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            options[name] = parser(value) if parser else value
        except (TypeError, ValueError):
            shown = "" if not quote or name.endswith("password") else f", got {value[:64]!r}"
            raise ValueError(f"{name} of the URL is not a valid value{shown}") from None
    return options


class _EncryptedKey(Exception):
    pass


def _no_pass_phrase() -> bytes:
    # Without a password OpenSSL asks for one on the terminal: config check and serve would
    # wait at that prompt for ever (and redis-py would ask again at its first connection).
    raise _EncryptedKey


def tls_context(options: dict[str, Any], *, quote: bool = True) -> Any:
    """The ``ssl.SSLContext`` redis-py's ``SSLConnection`` builds from these ssl_* options (its
    own defaults for the rest: the certificate and the host name verified, the system's CAs and
    ``ssl_ca_certs`` trusted), so the per-request client and redis-py verify alike; building it
    is also the load-time check of the files the options name. Raises ``ValueError`` with a
    sentence fit for a user (never ``ssl_password``)."""
    import ssl

    from redis.exceptions import RedisError as _RedisError
    for name in _TLS_FILES:
        path = options.get(name)
        if path and not os.path.isfile(path):
            raise ValueError(f"{name} of the URL names no readable file"
                             + (f" ({path})" if quote else _QUIET))
    path = options.get("ssl_ca_path")
    if path and not os.path.isdir(path):
        raise ValueError("ssl_ca_path of the URL names no directory"
                         + (f" ({path})" if quote else _QUIET))
    # the files first, each on its own, for a message that says which one is wrong
    probe = ssl.create_default_context()
    try:
        if options.get("ssl_certfile") or options.get("ssl_keyfile"):
            stage = "the TLS client certificate and key (ssl_certfile, ssl_keyfile)"
            password = options.get("ssl_password")
            probe.load_cert_chain(options.get("ssl_certfile"), options.get("ssl_keyfile"),
                                  _no_pass_phrase if password is None else password)
        if options.get("ssl_ca_certs") or options.get("ssl_ca_path") or \
                options.get("ssl_ca_data"):
            stage = "the CA certificates (ssl_ca_certs, ssl_ca_path, ssl_ca_data)"
            probe.load_verify_locations(options.get("ssl_ca_certs"), options.get("ssl_ca_path"),
                                        options.get("ssl_ca_data"))
    except _EncryptedKey:
        raise ValueError("ssl_keyfile of the URL is encrypted with a pass phrase: give it as "
                         "ssl_password (or name an unencrypted key)") from None
    except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or \
            exc.__class__.__name__
        raise ValueError(f"cannot load {stage} the URL names: {reason}") from None
    try:
        connection = SSLConnection(**{n: v for n, v in options.items() if n in TLS_OPTIONS})
    except _RedisError as exc:  # ssl_cert_reqs
        raise ValueError("ssl_cert_reqs of the URL must be none, optional or required"
                         + (f" ({exc})" if quote else _QUIET)) from None
    try:
        return connection.ssl_context.get()
    except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
        files = ", ".join(n for n in (*_TLS_FILES, "ssl_ca_data", "ssl_ca_path", "ssl_ciphers",
                                      "ssl_min_version") if options.get(n) is not None)
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"cannot set up TLS with the options of the URL"
                         f"{f' ({files})' if files else ''}: {reason}") from None


# How many connections one process opens to one Redis node at most. Past it, a store call
# waits for a free connection (it is never refused: redis-py 8's default pool raises
# ``MaxConnectionsError`` past 100, which a burst of admin calls turned into 503s while Redis
# was fine). The wait itself is bounded by the calls ahead of it, each bounded by the store
# timeout. Cluster pools cannot wait, so theirs is large (a node's maxclients is 10000).
POOL_CONNECTIONS = 64
CLUSTER_NODE_CONNECTIONS = 2048


@dataclass(frozen=True)
class StandaloneURL:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL as redis-py itself reads it
    (``redis.asyncio.connection.parse_url``): the one parse both store clients use, so every
    option (``password`` in the query of a ``unix://`` URL, ``ssl_ca_certs``, ``db``...) means
    the same on the admin path and on the per-request path."""
    options: dict[str, Any]
    # the query gives a password option: a problem quotes no value beside it (_quiet)
    quiet: bool = False

    @property
    def unix_path(self) -> str | None:
        return self.options.get("path") if self.is_unix else None

    @property
    def is_unix(self) -> bool:
        return self.options.get("connection_class") is UnixDomainSocketConnection

    @property
    def tls(self) -> bool:
        return self.options.get("connection_class") is SSLConnection

    @property
    def host(self) -> str:
        return self.options.get("host") or "localhost"

    @property
    def port(self) -> int:
        return int(self.options.get("port") or REDIS_PORT)

    @property
    def db(self) -> int:
        return int(self.options.get("db") or 0)

    def option_seconds(self, name: str, default: float) -> float:
        """A timeout option of the URL (``socket_timeout``, ``socket_connect_timeout``),
        which wins over ``default`` as it does in redis-py."""
        value = self.options.get(name)
        return default if value is None else float(value)

    @property
    def username(self) -> str | None:
        return self.options.get("username") or None

    @property
    def password(self) -> str | None:
        return self.options.get("password") or None

    @property
    def ssl_options(self) -> dict[str, Any]:
        return {name: value for name, value in self.options.items() if name in TLS_OPTIONS}

    def ssl_context(self) -> Any:
        """The TLS context of a ``rediss://`` URL: the one redis-py's ``SSLConnection`` builds
        from the same options (``tls_context``); None for plain URLs."""
        return tls_context(self.ssl_options, quote=not self.quiet) if self.tls else None

    def __repr__(self) -> str:  # never print a password by accident
        return f"StandaloneURL({self.unix_path or f'{self.host}:{self.port}'}, db={self.db})"


_STANDALONE_OPTIONS: dict[bool, frozenset[str]] = {}
# The query options of a standalone URL whose value is text as given; the others it may give
# are those redis-py's URL parser converts (URL_QUERY_ARGUMENT_PARSERS: db, protocol, the
# timeouts...). Every other name a connection takes is an object (retry, connection_class,
# credential_provider...) or a part of the URL (host, port, path): given as text, it failed at
# the first command, or made config check and serve die with a traceback.
TEXT_OPTIONS = ("client_name", "username", "password", "lib_name", "lib_version")
# what keygate's two clients set themselves: its code reads the replies so
_KEYGATE_SETS = ("encoding", "encoding_errors", "decode_responses")


def tls_files_state(ca_certs: str | None, certfile: str | None, keyfile: str | None,
                    ca_path: str | None) -> tuple:
    """What the TLS files a URL names look like now: each one's inode, size and modification
    time (``ssl_ca_path``: its directory's), None for one that cannot be read. A few ``stat``
    calls, made when a connection is made, never per command. A change means the files were
    rotated in place (a new CA beside the old one, a renewed client certificate, a Kubernetes
    Secret's volume swapping its symlink): a connection made after it reads them again."""
    state = []
    for path in (ca_certs, certfile, keyfile, ca_path):
        if path:
            try:
                st = os.stat(path)
                state.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                state.append(None)
        else:
            state.append(())
    return tuple(state)


class FreshTLS:
    """A redis-py TLS connection that reads its certificate files again when they changed
    since it last connected. redis-py builds a connection's ``SSLContext`` once and keeps it
    for the connection object's life, reconnections included: a CA or client certificate
    rotated in place was never taken, and once Redis presented a certificate of the new CA
    every connection failed (503 store_unavailable) until keygate was restarted."""

    _tls_files: tuple | None = None

    def _connection_arguments(self) -> Any:
        tls = self.ssl_context  # type: ignore[attr-defined]
        state = tls_files_state(tls.ca_certs, tls.certfile, tls.keyfile, tls.ca_path)
        if state != self._tls_files:
            tls.context = None  # built again from the files by the next get()
            self._tls_files = state
        return super()._connection_arguments()  # type: ignore[misc]


class FreshSSLConnection(FreshTLS, SSLConnection):
    """``SSLConnection`` with ``FreshTLS``."""


def fresh_tls(connection_class: type) -> type:
    """``connection_class`` with ``FreshTLS`` when it is a TLS connection (else itself)."""
    if not issubclass(connection_class, SSLConnection) or issubclass(connection_class, FreshTLS):
        return connection_class
    if connection_class is SSLConnection:
        return FreshSSLConnection
    fresh = _FRESH.get(connection_class)
    if fresh is None:
        fresh = _FRESH[connection_class] = type(f"Fresh{connection_class.__name__}",
                                                (FreshTLS, connection_class), {})
    return fresh


_FRESH: dict[type, type] = {}

def _standalone_options(unix: bool = False) -> frozenset[str]:
    """The names a standalone URL's query may give: redis-py's ``parse_url`` hands each one to
    the connection pool, which passes what it does not take itself to the connection class
    (an unknown one is a TypeError there). The pool's own (``max_connections``, ``timeout``)
    and the arguments of the URL's connection class: a socket's (``unix://``) takes no
    ``host``, ``port`` or ``socket_keepalive``, a TCP one (``redis://``, ``rediss://``) no
    ``path``."""
    if unix not in _STANDALONE_OPTIONS:
        from redis.asyncio.connection import AbstractConnection, Connection
        names = {"connection_class", "max_connections", "timeout"}
        for cls in (AbstractConnection, UnixDomainSocketConnection if unix else Connection):
            names.update(n for n, p in inspect.signature(cls.__init__).parameters.items()
                         if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self")
        _STANDALONE_OPTIONS[unix] = frozenset(names)
    return _STANDALONE_OPTIONS[unix]


def parse_standalone_url(url: str) -> StandaloneURL:
    """Parse a standalone URL exactly as redis-py does. Raises ``ValueError`` (no password in
    the message) on a URL redis-py would refuse."""
    scheme = scheme_of(url)
    # The names the query itself gives, every part read (parse_qs, redis-py's reading, drops
    # a part without '=': ``password=Kq7&Wv8zz`` is the password Kq7&Wv8zz with its '&' not
    # encoded, which redis-py reads as Kq7; the rest would be shown by every message)
    try:
        query = urlsplit(url).query
    except ValueError:
        query = ""  # (redis-py's parse says what is wrong)
    pairs = [pair for pair in query.split("&") if pair]
    given = {unquote_plus(pair.partition("=")[0]) for pair in pairs}
    secret = _password_given(given)
    if secret and any("=" not in pair for pair in pairs):
        raise _beside_password(scheme)
    try:
        options = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(str(exc).replace(url, redact(url))) from None
    if options.get("connection_class") is UnixDomainSocketConnection and not options.get("path"):
        raise ValueError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")

    def got(value: Any) -> str:  # beside a password option, a value may be a piece of it
        return _QUIET if secret else f", got {value!r}"
    for name in ("socket_timeout", "socket_connect_timeout"):
        value = options.get(name)
        if value is not None and not 0 < value < math.inf:  # nan compares false
            raise ValueError(f"{name} of the URL must be a number of seconds above 0"
                             + got(value))
    protocol = options.get("protocol")
    if protocol is not None and protocol not in (2, 3):
        raise ValueError("protocol of the URL must be 2 or 3 (RESP2 or RESP3)" + got(protocol))
    db = options.get("db")
    if db is not None and not 0 <= db <= MAX_DB:  # Redis's SELECT refuses any other
        raise ValueError(f"db of the URL must be a database number from 0 to {MAX_DB}"
                         + got(db))
    known = _standalone_options(scheme == "unix")
    for name in options:
        if secret and name not in known and name not in TLS_OPTIONS \
                and not name.endswith("password"):  # a password option is named, known or not
            raise _beside_password(scheme)
        if not name.startswith("ssl_"):
            if name not in _standalone_options(scheme == "unix"):
                raise ValueError(f"a {scheme}:// URL has an unknown query parameter {name!r} "
                                 "(redis-py's connection would refuse it at the first "
                                 "command)")
            if name in given and name not in URL_QUERY_ARGUMENT_PARSERS \
                    and name not in TEXT_OPTIONS:
                raise ValueError(
                    f"a {scheme}:// URL cannot take {name!r}: "
                    + ("keygate's clients set it themselves, to read Redis's replies as they do"
                       if name in _KEYGATE_SETS else
                       "it is a part of the URL itself" if name in ("host", "port", "path",
                                                                    "connection_class") else
                       "redis-py's connection takes an object there, which a URL cannot give"))
            continue
        if scheme != "rediss":
            raise ValueError(_plain_with_tls_options(scheme, name))
        if name not in TLS_OPTIONS:
            raise ValueError(f"a rediss:// URL has an unknown TLS option {name!r} (redis-py's "
                             f"TLS connection takes {', '.join(TLS_OPTIONS)})")
    return StandaloneURL(options, secret)


def check_store_url(url: str) -> None:
    """Refuse a store URL no client could use, with a sentence fit for a config problem (never
    repeating a password). ``embedded`` is not a URL and is the caller's business."""
    scheme = scheme_of(url)
    if scheme in TOPOLOGY_SCHEMES:
        target = parse_topology_url(url)
        if target.tls:
            tls_context(target.ssl, quote=not target.quiet)  # the files it names are usable
        return
    if scheme not in STORE_SCHEMES:
        raise ValueError("must be embedded or a URL with scheme "
                         f"{', '.join(s + '://' for s in STORE_SCHEMES)}"
                         + (f", got scheme '{scheme}'" if scheme else ""))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"not a valid {scheme}:// URL (bad host or port)") from None
    # A user name or password with a '/', '?' or '#' in it ended the host early (digits
    # after its ':' read as a port): the path, query or fragment would hold the rest of it
    # (see _misplaced_at). redis-py ignores a fragment: one is never meant.
    if "#" in url:
        raise ValueError(f"a {scheme}:// URL cannot have a # fragment (redis-py ignores "
                         "it): percent-encode a # in its user name or password as %23")
    # (with user info before it too: ``redis://u:Kq@Zt9?Wv8@host/0`` is password Kq@Zt9?Wv8,
    # which redis-py reads as password Kq and host zt9)
    # (a unix:// URL with nothing before its path has no user info to misplace: an '@' there
    # is the socket path's own, unix:///run/redis@6379/redis.sock)
    if ("@" in parts.path and (scheme != "unix" or parts.netloc)) or _password_in_query(
            parts.query, _standalone_options(scheme == "unix") | set(TLS_OPTIONS)):
        raise _misplaced_at(scheme, "host")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
    elif not parts.hostname:
        raise ValueError(f"a {scheme}:// URL needs a host")
    else:
        # The path is the database number. redis-py ignores a path that is not one, so a
        # typo would silently select database 0.
        db = parts.path.removeprefix("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(f"the path of a {scheme}:// URL is the database number (e.g. "
                             f"{scheme}://host:6379/0), got '{parts.path[:32]}'")
    parse_standalone_url(url).ssl_context()  # for rediss://, the files it names are usable


# redis-py's connections send CLIENT SETINFO LIB-NAME and LIB-VER after AUTH, pipelined, on
# every connect. Redis before 7.2 (the bundled one is 6.2) refuses both: two error replies in
# the errors an operator watches for every (re)connection, which come in storms (a restart,
# CLIENT KILL, a failover). And on a Cluster under repeated CLIENT KILL, a connection whose
# server had answered them (CLIENT LIST: cmd=client, nothing pending) still waited for the
# replies until the store timeout: a 503 from a healthy node (~1 run in 5 of 40 kills in 2 s;
# none in 36 runs without SETINFO; the cause inside redis-py was not pinned down). keygate's
# connections skip it (CLIENT LIST then shows no lib-name on Redis 7.2+).
NO_SETINFO: dict[str, Any] = {"driver_info": None}


def standalone_client(url: str, *, timeout: float, decode_responses: bool) -> Redis:
    """A redis-py asyncio client for a standalone URL whose pool waits for a free connection
    instead of raising (see ``POOL_CONNECTIONS``). Dead pooled connections (a restart, a
    failover, ``CLIENT KILL``) are re-made by redis-py's retry on ``ConnectionError``."""
    parse_standalone_url(url)  # refuse what redis-py would refuse, with our message
    # The retry policy lives on the pool's connections (a client given a pool ignores its own).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=None, decode_responses=decode_responses,
        socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=_retry(timeout, loading_retries=0 if scheme_of(url) == "unix" else 1),
        **NO_SETINFO)
    # (set after: from_url lets the URL's scheme choose the class over any argument)
    pool.connection_class = fresh_tls(pool.connection_class)  # rotated TLS files: FreshTLS
    return Redis.from_pool(pool)  # closing the client closes its pool


# Times a command whose connection died is sent again, each on a fresh connection (``_retry``).
CONNECTION_RETRIES = 3


class _ConnectionRetry(Retry):
    """redis-py's retry loop, without backoff, bounded in time too: no retry begins once
    ``within`` seconds have passed since the first failure."""

    def __init__(self, retries: int, within: float, supported_errors: tuple,
                 loading_retries: int) -> None:
        super().__init__(NoBackoff(), retries, supported_errors=supported_errors)
        self._within = within
        self._loading_retries = loading_retries

    async def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None,
                              with_failure_count: bool = False) -> Any:
        failures, loading, give_up_at = 0, 0, 0.0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    await fail(error, failures)
                else:
                    await fail(error)
                if failures == 1:
                    give_up_at = time.monotonic() + self._within
                # LOADING (redis-py makes it a ConnectionError) is a live Redis's answer: sent
                # again at once to the same server it is LOADING again, after another chunk
                loading += isinstance(error, BusyLoadingError)
                if (failures > self._retries or time.monotonic() >= give_up_at
                        or loading > self._loading_retries):
                    raise error


def _retry(within: float, *, loading_retries: int = CONNECTION_RETRIES) -> Any:
    """Immediate retries of a command whose connection turned out dead (closed, reset,
    refused), each on a fresh connection: up to ``CONNECTION_RETRIES``, none begun once
    ``within`` seconds (the store timeout) have passed since the first failure. Commands are
    sent on a pooled connection the server may have closed since it was last used, and a
    server closing connections in rounds (CLIENT KILL, a proxy) may close the fresh one too:
    with one retry, a healthy Redis answered such commands 503 (a request or an admin read in
    a few hundred under a storm of kills). A timeout is not retried (the command may have run).
    A LOADING answer is retried ``loading_retries`` times at most: a Redis loading its data set
    answers only between the chunks it loads, and each retry on the same server waited for
    another (serve's first PING learnt of the load four chunks late, and a chunk past the
    store timeout on a retry read as "cannot reach"). A unix socket is the same server every
    time (none); a host name may lead a fresh connection elsewhere (a Service, a managed
    Redis's primary endpoint after a failover, the demoted primary resyncing: one); behind
    Sentinels a fresh connection asks them for the master again (as for a dead connection).
    A command that does not fail costs what redis-py's own loop costs."""
    return _ConnectionRetry(CONNECTION_RETRIES, within,
                            (RedisConnectionError, ConnectionResetError, BrokenPipeError),
                            loading_retries)


def redact(url: str) -> str:
    """``url`` fit for messages: the password and any ``sentinel_password`` masked, on one
    line (tabs and line breaks dropped, as the URL's parsers drop them)."""
    for unsafe in "\t\r\n":
        url = url.replace(unsafe, "")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _userinfo_end(rest)
    userinfo, at = (rest[:end], "@") if end >= 0 else ("", "")
    rest = rest[end + 1:]
    rest, q, query = rest.partition("?")
    hosts, slash, path = rest.partition("/")
    if any(c in userinfo for c in "/?#@"):  # a user info with unencoded characters: all of
        userinfo = "***"                     # it may be password (the user name too)
    elif at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    if query:  # a name as the query is read: percent-decoded (pass%77ord is the password)
        query = "&".join(p.split("=", 1)[0] + "=***"
                         if unquote_plus(p.split("=", 1)[0]).endswith("password")
                         else p for p in query.split("&"))
    return f"{scheme}://{userinfo}{at}{hosts}{slash}{path}{q}{query}"


def _known_option(name: str) -> bool:
    """Whether ``name`` (as written in a query) is an option some store URL takes."""
    name = unquote_plus(name)
    return (name.endswith("password") or name in _SENTINEL_PARAMS or name in TLS_OPTIONS
            or name in _standalone_options(False) or name in _standalone_options(True))


def _userinfo_end(rest: str) -> int:
    """Where the user info of a URL (what follows ``scheme://``) ends: the index of its '@',
    -1 when it has none. That is the last '@' that is not inside the value of a query option
    (``?password=p@ss``): a user info whose password has an unencoded '/', '?' or '#' runs
    past where a parser ends the host (``Kq@Zt9?Wv8@host``), and all of it is masked."""
    end = rest.rfind("@")
    while end >= 0:
        before = rest[:end]
        if before.startswith("/"):  # no host, a socket path (unix:///run/a@b.sock)
            return -1
        cut = max(before.rfind("?"), before.rfind("&"))
        if cut < 0:
            return end
        name, eq, _ = before[cut + 1:].partition("=")
        if not (eq and _known_option(name)):
            return end
        end = rest.rfind("@", 0, cut)  # inside an option's value: the one before
    return -1


def _given(**credentials: str | None) -> dict[str, str]:
    """The credentials a URL gave; absent ones are not passed at all, so redis-py's own defaults
    apply to them."""
    return {name: value for name, value in credentials.items() if value is not None}
