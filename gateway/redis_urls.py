"""Store URLs for Redis Sentinel and Redis Cluster, parsed into redis-py asyncio clients.

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

import contextlib
import contextvars
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (URL_QUERY_ARGUMENT_PARSERS, SSLConnection,
                                      UnixDomainSocketConnection, parse_url)
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TOPOLOGY_SCHEMES = SENTINEL_SCHEMES + CLUSTER_SCHEMES
STANDALONE_SCHEMES = ("redis", "rediss", "unix")
# as messages list them (the TLS topology forms are the plain ones with rediss)
STORE_SCHEMES = STANDALONE_SCHEMES + ("redis+cluster", "redis+sentinel")
SENTINEL_PORT = 26379
REDIS_PORT = 6379
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


def parse_topology_url(url: str) -> TopologyURL:
    """Parse a Sentinel or Cluster URL. Raises ``ValueError`` with a sentence fit for a user
    (it never contains the password)."""
    scheme = scheme_of(url)
    if scheme not in TOPOLOGY_SCHEMES:
        raise ValueError(f"not a Sentinel or Cluster URL (scheme {scheme!r})")
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise ValueError(f"a {scheme}:// URL cannot have a '#' fragment")
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
    nodes = tuple(_node(h.strip(), default_port, scheme) for h in hostlist.split(","))
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"a {scheme}:// URL has a malformed query string") from None
    tls = scheme.startswith("rediss")
    allowed = (_SENTINEL_PARAMS if sentinel else ()) + (TLS_OPTIONS if tls else ())
    for name, values in params.items():
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
                                      if name in TLS_OPTIONS})
    segments = [unquote(s) for s in path.split("/")] if slash else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    kind = "sentinel" if sentinel else "cluster"
    if not sentinel:
        if segments not in ([], ["0"]):
            raise ValueError(f"a {scheme}:// URL takes no path (a cluster has database 0 "
                             "only)")
        return TopologyURL(kind, tls, nodes, username, password, ssl=ssl_options)
    if not segments or not segments[0]:
        raise ValueError(f"a {scheme}:// URL needs the master's name as its path, e.g. "
                         f"{scheme}://host:26379/mymaster")
    if len(segments) > 2:
        raise ValueError(f"a {scheme}:// URL's path is /<master-name>[/<db>]")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"a {scheme}:// URL's database must be a number, got "
                             f"{segments[1]!r}")
        db = int(segments[1])
    first = {name: values[0] for name, values in params.items()}
    return TopologyURL(kind, tls, nodes, username, password, segments[0], db,
                       first.get("sentinel_username") or None,
                       first.get("sentinel_password") or None, ssl_options)


def _plain_with_tls_options(scheme: str, name: str) -> str:
    tls_scheme = {"redis": "rediss", "redis+sentinel": "rediss+sentinel",
                  "redis+cluster": "rediss+cluster"}.get(scheme)
    use = f"use {tls_scheme}:// for TLS" if tls_scheme else "a unix socket has no TLS"
    return (f"a {scheme}:// URL connects without TLS, so it cannot take {name!r} ({use}; "
            "redis-py refuses ssl_* options on a plain connection)")


def _parse_tls_options(given: dict[str, str]) -> dict[str, Any]:
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
            shown = "" if name.endswith("password") else f", got {value[:64]!r}"
            raise ValueError(f"the URL's {name} is not a valid value{shown}") from None
    return options


def tls_context(options: dict[str, Any]) -> Any:
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
            raise ValueError(f"the URL's {name} names no readable file ({path})")
    path = options.get("ssl_ca_path")
    if path and not os.path.isdir(path):
        raise ValueError(f"the URL's ssl_ca_path names no directory ({path})")
    # the files first, each on its own, for a message that says which one is wrong
    probe = ssl.create_default_context()
    try:
        if options.get("ssl_certfile") or options.get("ssl_keyfile"):
            stage = "the TLS client certificate and key (ssl_certfile, ssl_keyfile)"
            probe.load_cert_chain(options.get("ssl_certfile"), options.get("ssl_keyfile"),
                                  options.get("ssl_password"))
        if options.get("ssl_ca_certs") or options.get("ssl_ca_path") or \
                options.get("ssl_ca_data"):
            stage = "the CA certificates (ssl_ca_certs, ssl_ca_path, ssl_ca_data)"
            probe.load_verify_locations(options.get("ssl_ca_certs"), options.get("ssl_ca_path"),
                                        options.get("ssl_ca_data"))
    except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or \
            exc.__class__.__name__
        raise ValueError(f"cannot load {stage} the URL names: {reason}") from None
    try:
        connection = SSLConnection(**{n: v for n, v in options.items() if n in TLS_OPTIONS})
    except _RedisError as exc:  # ssl_cert_reqs
        raise ValueError(f"the URL's ssl_cert_reqs must be none, optional or required "
                         f"({exc})") from None
    try:
        return connection.ssl_context.get()
    except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
        files = ", ".join(n for n in (*_TLS_FILES, "ssl_ca_data", "ssl_ca_path", "ssl_ciphers",
                                      "ssl_min_version") if options.get(n) is not None)
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"cannot set up TLS with the URL's options"
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
        return tls_context(self.ssl_options) if self.tls else None

    def __repr__(self) -> str:  # never print a password by accident
        return f"StandaloneURL({self.unix_path or f'{self.host}:{self.port}'}, db={self.db})"


_STANDALONE_OPTIONS: dict[bool, frozenset[str]] = {}


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
    try:
        options = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(str(exc).replace(url, redact(url))) from None
    if options.get("connection_class") is UnixDomainSocketConnection and not options.get("path"):
        raise ValueError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
    for name in ("socket_timeout", "socket_connect_timeout"):
        value = options.get(name)
        if value is not None and not 0 < value < math.inf:  # nan compares false
            raise ValueError(f"the URL's {name} must be a number of seconds above 0, "
                             f"got {value!r}")
    scheme = scheme_of(url)
    for name in options:
        if not name.startswith("ssl_"):
            if name not in _standalone_options(scheme == "unix"):
                raise ValueError(f"a {scheme}:// URL has an unknown query parameter {name!r} "
                                 "(redis-py's connection would refuse it at the first "
                                 "command)")
            continue
        if scheme != "rediss":
            raise ValueError(_plain_with_tls_options(scheme, name))
        if name not in TLS_OPTIONS:
            raise ValueError(f"a rediss:// URL has an unknown TLS option {name!r} (redis-py's "
                             f"TLS connection takes {', '.join(TLS_OPTIONS)})")
    return StandaloneURL(options)


def check_store_url(url: str) -> None:
    """Refuse a store URL no client could use, with a sentence fit for a config problem (never
    repeating a password). ``embedded`` is not a URL and is the caller's business."""
    scheme = scheme_of(url)
    if scheme in TOPOLOGY_SCHEMES:
        target = parse_topology_url(url)
        if target.tls:
            tls_context(target.ssl)  # the files it names are there and usable
        return
    if scheme not in STORE_SCHEMES:
        raise ValueError("must be 'embedded' or a URL with scheme "
                         f"{', '.join(s + '://' for s in STORE_SCHEMES)}"
                         + (f", got scheme '{scheme}'" if scheme else ""))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"not a valid {scheme}:// URL (bad host or port)") from None
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
    elif not parts.hostname:
        raise ValueError(f"a {scheme}:// URL needs a host")
    else:
        # The path is the database number. redis-py ignores a path that is not one, so a
        # typo would silently select database 0.
        db = parts.path.removeprefix("/")
        if db and not db.isdigit():
            raise ValueError(f"the path of a {scheme}:// URL is the database number (e.g. "
                             f"{scheme}://host:6379/0), got '{parts.path[:32]}'")
    parse_standalone_url(url).ssl_context()  # for rediss://, the files it names are usable


def standalone_client(url: str, *, timeout: float, decode_responses: bool) -> Redis:
    """A redis-py asyncio client for a standalone URL whose pool waits for a free connection
    instead of raising (see ``POOL_CONNECTIONS``). Dead pooled connections (a restart, a
    failover, ``CLIENT KILL``) are re-made by redis-py's retry on ``ConnectionError``."""
    parse_standalone_url(url)  # refuse what redis-py would refuse, with our message
    # The retry policy lives on the pool's connections (a client given a pool ignores its own).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=None, decode_responses=decode_responses,
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=_retry())
    return Redis.from_pool(pool)  # closing the client closes its pool


def _retry() -> Any:
    """One immediate retry of a command whose connection turned out dead. Commands are sent on
    a pooled connection that may have been closed by the server since it was last used; the
    retry runs on a fresh connection. A timeout is not retried (the command may have run)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError, ConnectionResetError,
                                                   BrokenPipeError))


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel-following pool, waiting for a free connection instead of raising."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_connections", POOL_CONNECTIONS)
        kwargs["timeout"] = None
        super().__init__(service_name, sentinel_manager, **kwargs)


def redact(url: str) -> str:
    """``url`` fit for messages: the password and any ``sentinel_password`` masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    if query:
        query = "&".join(p.split("=", 1)[0] + "=***" if p.split("=", 1)[0].endswith("password")
                         else p for p in query.split("&"))
    return f"{scheme}://{userinfo}{at}{hosts}{slash}{path}{q}{query}"


def _given(**credentials: str | None) -> dict[str, str]:
    """The credentials a URL gave; absent ones are not passed at all, so redis-py's own defaults
    apply to them."""
    return {name: value for name, value in credentials.items() if value is not None}


def topology_client(url: str, *, timeout: float, decode_responses: bool,
                    confirm_writes: bool = False) -> Any:
    """A redis-py asyncio client for a Sentinel or Cluster URL: a ``Redis`` on the current
    master (Sentinel) or a ``RedisCluster``. It connects lazily (the first command) and is
    closed with ``await client.aclose()``, which for Sentinel also closes the connections to
    the Sentinels. Raises ``ValueError`` on a bad URL.

    ``confirm_writes`` (the admin store's client): on Sentinel, the client can confirm that
    the writes of an operation ran on the node the Sentinels name as the master
    (``_ConfirmingSentinelMaster``); the per-request client does not (its class is unchanged)."""
    target = parse_topology_url(url)
    options: dict[str, Any] = dict(decode_responses=decode_responses, socket_timeout=timeout,
                                   socket_connect_timeout=timeout,
                                   **_given(username=target.username, password=target.password))
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode
        cls = _cluster_class()
        taken = inspect.signature(cls.__init__).parameters
        tls = {name: value for name, value in target.ssl.items() if name in taken}
        cluster = cls(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                      ssl=target.tls, max_connections=CLUSTER_NODE_CONNECTIONS, **tls, **options)
        if rest := {name: value for name, value in target.ssl.items() if name not in taken}:
            # TLS options RedisCluster does not take as arguments (ssl_ca_path, ssl_password in
            # redis-py 8.1) but every node's SSLConnection does: given to the connection
            # arguments of the seed nodes and of the nodes discovered later, as redis-py adds
            # its own later connection arguments
            cluster.nodes_manager.connection_kwargs.update(rest)
            for node in cluster.nodes_manager.startup_nodes.values():
                node.connection_kwargs.update(rest)
        cluster.try_again_for = timeout
        return cluster
    from redis.asyncio.sentinel import Sentinel
    # redis-py's default (10 retries with backoff) would hold a request for seconds against a
    # dead node. One immediate retry is what a failover needs: the first attempt fails on the
    # old master's dead connection, the retry reconnects via the Sentinels to the new one. A
    # timeout is not retried (``_retry``: the command may have run; Retry's default errors
    # include timeouts, and a refund that timed out ran twice when the master caught up).
    options["retry"] = _retry()
    # The Sentinels' clients likewise: every master connection made asks them for the master,
    # on a pooled connection the Sentinel may have closed (CLIENT KILL, a restart). Without a
    # retry that question failed, the Sentinel counted as not answering and, none left, a new
    # master connection raised MasterNotFoundError: 503 store_unavailable on a healthy group
    # (9-16 of ~2000 requests with keygate's connections killed at the Sentinel and the master).
    # A Sentinel that does not answer (a timeout) is still not retried: the next one is asked.
    sentinel_options: dict[str, Any] = dict(socket_timeout=timeout,
                                            socket_connect_timeout=timeout,
                                            retry=_retry(),
                                            **_given(username=target.sentinel_username,
                                                     password=target.sentinel_password))
    if target.tls:  # the same TLS options for the Sentinels and for the data nodes
        sentinel_options.update(ssl=True, **target.ssl)
        options.update(ssl=True, **target.ssl)
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)
    client = sentinel.master_for(target.service, db=target.db,
                                 redis_class=_ConfirmingSentinelMaster if confirm_writes
                                 else _SentinelMaster,
                                 connection_pool_class=_BlockingSentinelPool, **options)
    client._sentinel = sentinel
    return client


_CLUSTER: Any = None
_IN_COMMAND: Any = None  # a ContextVar: set while the cluster client runs a command
# The instant (time.monotonic()) after which the command this task sends can no longer do its
# work: the authorize script's deadline, for a counting call (``TopologyClient``). A command
# answered TRYAGAIN is not sent again past it (a copy run then answers only "late").
TRY_AGAIN_UNTIL: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "keygate_try_again_until", default=None)


def _cluster_class() -> Any:
    """redis-py's ``RedisCluster``, with its nodes' connections handed out most recently
    released first, and never while being closed.

    An ASK redirection (a slot being migrated) is followed by sending ``ASKING`` and then the
    command to the new owner, each through the node's pool; ``ASKING`` holds for the next
    command *on its connection* only. redis-py's node pool hands out the connection released
    longest ago, so with more than one idle connection (any load) the command went out on
    another connection without ``ASKING``: the new owner answered MOVED back to the old one,
    which answered ASK again, until redis-py gave up ("TTL exhausted") and a healthy cluster was
    reported unavailable. Handing out the most recently released connection gives the command
    the very connection ``ASKING`` was sent on (nothing runs in between: both are in one task,
    with no await between the release and the next acquire). The nodes also take their idle
    connections out of the free list while closing them (see ``disconnect_free_connections``).
    Nodes are made by redis-py's NodesManager, so each node this client sends a command to is
    given the subclass's behaviour as it is used (its layout is the same: the subclass adds no
    slots)."""
    global _CLUSTER, _IN_COMMAND
    if _CLUSTER is not None:
        return _CLUSTER
    import contextvars
    _IN_COMMAND = contextvars.ContextVar("keygate_cluster_command", default=False)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    import asyncio
    import time

    from redis.exceptions import TryAgainError

    class _TryAgain(Exception):
        """TRYAGAIN, carried past redis-py's redirection loop (which re-raises other
        exceptions as they are)."""

    class _RecentFirstNode(ClusterNode):
        __slots__ = ()

        def acquire_connection(self) -> Any:
            if self._free:
                return self._free.pop()
            return super().acquire_connection()

        async def disconnect_free_connections(self) -> None:
            # redis-py closes the idle connections (after one failed) while they stay in the
            # free list: a command that took one meanwhile found its writer gone (AttributeError,
            # not retried: a 503 from a healthy node). They leave the list while being closed,
            # and come back to be reconnected on their next use.
            idle = list(self._free)
            self._free.clear()
            try:
                await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
            finally:
                self._free.extend(idle)

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().execute_command(*args, **kwargs)
            except TryAgainError as exc:
                if not _IN_COMMAND.get():
                    raise
                # out of redis-py's redirection loop, which sends it again at most 16 times
                # (~0.4 s): the client's own command waits for the slot (see _Cluster)
                raise _TryAgain(str(exc)) from None

    def recent_first(node: Any) -> Any:
        if node is not None and type(node) is ClusterNode:
            node.__class__ = _RecentFirstNode
        return node

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class _Cluster(RedisCluster):
        # A timeout is not retried (README: the command may have run). redis-py retries it
        # (10 times by default, each after re-reading the slots): a node that stopped answering
        # held a request for ~11 store timeouts before its 503, and every copy of a command that
        # timed out ran when the node woke (a refund taken back several times). Connection
        # errors, CLUSTERDOWN and an uncovered slot are still retried: a failover needs that.
        ERRORS_ALLOW_RETRY = tuple(e for e in RedisCluster.ERRORS_ALLOW_RETRY
                                   if not issubclass(e, RedisTimeoutError))

        # Seconds a command answered TRYAGAIN is sent again for (topology_client: the store
        # timeout). TRYAGAIN is a multi-key command (every keygate script) in a slot being
        # migrated whose keys are not all on one node; Redis did not run it. redis-py sends it
        # again at most 16 times, 8 of them at once, ~0.4 s in all, then raises "TTL
        # exhausted": a workspace got 503 for as long as a reshard of its slot took beyond
        # that. It is now sent again every TRY_AGAIN_PAUSE until the slot is stable (MOVED/ASK
        # then route it) or the store timeout has passed since the command was first sent.
        try_again_for = 0.0
        TRY_AGAIN_PAUSE = 0.05

        # Times the slots are read again when a connection is closed under the read.
        INITIALIZE_ATTEMPTS = 3

        async def initialize(self, additional_startup_nodes_info: Any = None,
                             last_failed_node_name: Any = None) -> Any:
            """redis-py 8.1.0's, with two changes. After a connection error, a command's
            retry first reads the slots (CLUSTER SLOTS, COMMAND) again, and redis-py does that
            before its retry loop's ``try``: a connection closed under that read (``CLIENT
            KILL`` of every client, a node restarting) was the command's error, never retried,
            and answered 503 on a healthy cluster. Such a read is now made again, up to
            ``INITIALIZE_ATTEMPTS`` times. And a read that fails no longer closes every node's
            connections, which other commands were using (they failed in turn)."""
            if not self._initialize:
                return self
            if not self._lock:
                self._lock = asyncio.Lock()
            async with self._lock:
                for attempt in range(self.INITIALIZE_ATTEMPTS):
                    if not self._initialize:
                        break
                    try:
                        await self.nodes_manager.initialize(
                            additional_startup_nodes_info=additional_startup_nodes_info,
                            last_failed_node_name=last_failed_node_name)
                        await self.commands_parser.initialize(self.nodes_manager.default_node)
                        self._initialize = False
                    except RedisConnectionError:
                        if attempt == self.INITIALIZE_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.01 * 2 ** attempt)
            return self

        async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
            token = _IN_COMMAND.set(True)
            until = time.monotonic() + self.try_again_for
            deadline = TRY_AGAIN_UNTIL.get()
            if deadline is not None and deadline < until:  # past it, a copy is only "late"
                until = deadline
            try:
                while True:
                    try:
                        return await super()._execute_command(recent_first(target_node),
                                                              *args, **kwargs)
                    except _TryAgain as exc:
                        if time.monotonic() + self.TRY_AGAIN_PAUSE > until:
                            raise TryAgainError(str(exc)) from None
                        await asyncio.sleep(self.TRY_AGAIN_PAUSE)
                        if time.monotonic() >= until:  # the pause overran (a loaded machine)
                            raise TryAgainError(str(exc)) from None
            finally:
                _IN_COMMAND.reset(token)

        async def aclose(self) -> None:
            if not _IN_COMMAND.get():  # closing the client
                await super().aclose()
                return
            # redis-py closes the whole client to have the slots read again (every fifth MOVED,
            # CLUSTERDOWN, an uncovered slot): that cut every node's connections, in use ones
            # too, and the commands other requests had in flight on healthy nodes failed
            # (AttributeError, not retried: 503). The slots are read again all the same (before
            # the next command), but connections are closed only when idle or as they are
            # released, as redis-py itself does when the slots change.
            self._initialize = True
            for node in list(self.nodes_manager.nodes_cache.values()):
                node = recent_first(node)
                node.update_active_connections_for_reconnect()
                await node.disconnect_free_connections()

        def get_node(self, host: Any = None, port: Any = None,
                     node_name: Any = None) -> Any:
            # the ASK path looks its target up here
            return recent_first(super().get_node(host, port, node_name))

    _CLUSTER = _Cluster
    return _CLUSTER


# How often a Sentinel client asks the Sentinels which node is the master (one SENTINEL MASTERS
# per client and interval, in the background: nothing per command).
MASTER_CHECK_INTERVAL = 0.5


class _SentinelMaster(Redis):
    """The master of a Sentinel-monitored group; closing it also closes the Sentinel clients.

    redis-py asks the Sentinels for the master only when it opens a connection. After a failover
    the pooled connections still lead to the old master, and the old master takes writes until
    the Sentinels demote it, seconds later (a stalled one: only once it wakes), when its data is
    thrown away: keys created, revocations and counts made there were answered as done and then
    lost. So the client asks the Sentinels every ``MASTER_CHECK_INTERVAL`` in the background;
    idle connections to any other node are dropped and busy ones are closed as they are
    released, so every later command goes to the new master."""
    _sentinel: Any = None
    _watch: Any = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._watch is None:
            import asyncio
            self._watch = asyncio.ensure_future(self._follow_master())
        return await super().execute_command(*args, **options)

    async def _follow_master(self) -> None:
        import asyncio
        pool = self.connection_pool
        while True:
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
            try:
                master = await pool.get_master_address()
            except Exception:  # no Sentinel answers, or none knows a master: commands say so
                continue
            await self._move_off_all_but(master)

    async def _move_off_all_but(self, master: tuple[str, int]) -> None:
        """Drop the idle connections to any node but ``master``; close the busy ones as they
        are released."""
        import asyncio
        pool = self.connection_pool
        # No await from here to the gather: a connection is handed out synchronously, so none
        # changes hands while this looks. (Comparing with the address the pool knew would
        # miss a change a new connection learned first: redis-py then closes only the idle
        # connections, and the busy ones went back to the pool still on the old master.)
        stale = [c for c in pool._available_connections
                 if c.is_connected and (c.host, c.port) != master]
        if stale:
            pool._available_connections[:] = [c for c in pool._available_connections
                                              if c not in stale]
        for c in pool._in_use_connections:
            if c.is_connected and (c.host, c.port) != master:
                c.mark_for_reconnect()  # closed as it is released
        if stale:
            await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            import asyncio
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()


# The nodes (host, port) the commands of the admin operation under way ran on: a set while
# ``_ConfirmingSentinelMaster.writes_confirmed`` runs in this task, else None.
_RAN_ON: contextvars.ContextVar[set[tuple[str, int]] | None] = contextvars.ContextVar(
    "keygate_admin_ran_on", default=None)


class MasterNotConfirmed(RedisError):
    """An operation's writes ran on a node the Sentinels do not (or not all) name as the master,
    or no Sentinel answered: they may be thrown away with that node. The store answers 503
    ("the change could not be confirmed")."""


class _ConfirmingSentinelMaster(_SentinelMaster):
    """The admin store's Sentinel client: an operation run in ``writes_confirmed()`` succeeds
    only if, after its last command, the Sentinels still name the node its commands ran on as
    the master.

    The background check (``_SentinelMaster``) moves connections off a demoted master only up
    to ``MASTER_CHECK_INTERVAL`` after the Sentinels promote another node, and a command already
    in a stalled master's socket buffer runs there when it wakes, whatever the client does: the
    old master takes it (it is demoted only seconds later) and answers OK, then its data is
    thrown away. A key answered 201 was then unknown, a revocation answered 200 undone.

    So the node each command ran on is recorded (redis-py's ``_send_command_parse_response``,
    overridden: the one place the borrowed connection, so the node that answered, is known; a
    command sent again after a connection error is recorded where it finally ran), and once the
    operation is done every Sentinel is asked ``SENTINEL GET-MASTER-ADDR-BY-NAME`` and
    ``SENTINEL MASTER``. Confirmed only if at least one Sentinel answers, every one that answers
    names that one node, and none sees it down or is failing it over (``s_down``, ``o_down``,
    ``failover_in_progress``: the leader of a failover goes on naming the old master until the
    replica it promoted reports itself master, and a write may run on the old master meanwhile).

    The race: the write runs on node N at t1, the Sentinels are asked at t2 > t1. A write that
    ran on N after another node was promoted is refused, since from the promotion on the leading
    Sentinel either shows the failover under way or names the new master (so would every other
    Sentinel that answers once it has learnt the new configuration; one that has not, answering
    alone while the others are unreachable, is what can still confirm wrongly). A write that ran
    before the promotion is the replicas' business: lost if it had not reached the promoted
    replica (``min-replicas-to-write``), refused though it holds if the promotion came between
    t1 and t2 (503 says "could not be confirmed"; admin writes can be repeated). A refusal
    because a Sentinel names another node moves the idle connections there at once."""

    async def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any,
                                           **options: Any) -> Any:
        reply = await super()._send_command_parse_response(conn, command_name, *args, **options)
        nodes = _RAN_ON.get()
        if nodes is not None:
            nodes.add((conn.host, int(conn.port)))
        return reply

    @contextlib.asynccontextmanager
    async def writes_confirmed(self) -> Any:
        """Run the block's commands, then raise ``MasterNotConfirmed`` unless the Sentinels
        confirm the node they ran on as the master. Not confirmed when the block raises (the
        operation failed anyway). Nested: the outer block confirms the inner one's commands."""
        if _RAN_ON.get() is not None:
            yield
            return
        nodes: set[tuple[str, int]] = set()
        token = _RAN_ON.set(nodes)
        try:
            yield
        finally:
            _RAN_ON.reset(token)
        await self.confirm_master(nodes)

    async def confirm_master(self, nodes: set[tuple[str, int]]) -> None:
        if not nodes:
            return
        node, *others = sorted(nodes)
        for other in others:  # one node named in two forms (IP, hostname) is one node
            if not await _same_node(other, node):
                raise MasterNotConfirmed(f"an operation's commands ran on {len(nodes)} nodes "
                                         "(a failover while it ran)")
        import asyncio

        from redis.utils import str_if_bytes
        service = self.connection_pool.service_name

        async def ask(sentinel: Any) -> tuple[Any, Any]:
            # GET-MASTER-ADDR-BY-NAME names the promoted node as soon as a failover has promoted
            # it; MASTER's address changes only once the failover is over, and its flags tell
            # a failover under way (the old master then still named by address)
            try:
                return (await sentinel.sentinel_get_master_addr_by_name(service),
                        await sentinel.sentinel_master(service))
            except RedisConnectionError:
                # A pooled connection the Sentinel closed (CLIENT KILL, a restart, its idle
                # timeout) fails its first command, and the Sentinel clients do not retry:
                # asked once more, on a connection made again (a timeout is not a
                # ConnectionError: a Sentinel that does not answer is not waited for twice)
                return (await sentinel.sentinel_get_master_addr_by_name(service),
                        await sentinel.sentinel_master(service))

        answers = await asyncio.gather(*(ask(s) for s in self._sentinel.sentinels),
                                       return_exceptions=True)
        answers = [a for a in answers if isinstance(a, tuple) and a[0] and isinstance(a[1], dict)]
        if not answers:
            raise MasterNotConfirmed("no Sentinel answered which node is the master")
        for addr, state in answers:
            named = (str_if_bytes(addr[0]), int(addr[1]))
            if not await _same_node(named, node):
                await self._move_off_all_but(named)  # the later writes go there at once
                raise MasterNotConfirmed(f"the write ran on {node[0]}:{node[1]}, which a "
                                         f"Sentinel no longer names as the master "
                                         f"({named[0]}:{named[1]} is)")
            flags = state.get("flags", "")
            flags = set(flags.split(",")) if isinstance(flags, str) else set(flags)
            if flags & {"s_down", "o_down", "failover_in_progress"}:
                raise MasterNotConfirmed(f"the write ran on {node[0]}:{node[1]}, which a "
                                         f"Sentinel sees down or is failing over "
                                         f"({','.join(sorted(flags))})")


async def _same_node(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two (host, port) name one node. Sentinels of one group may name the master in
    different forms (one given its IP, another its hostname with ``announce-hostnames yes``,
    until a failover makes them agree): the same port and a resolved address in common is the
    same node. Resolved only when the forms differ (never for a different port)."""
    if a == b:
        return True
    if a[1] != b[1]:
        return False
    import asyncio
    import socket
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.gather(*(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                                       for host, port in (a, b)))
    except (OSError, UnicodeError):
        return False
    first, second = ({info[4][0] for info in infos} for infos in found)
    return bool(first & second)
