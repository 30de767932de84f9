"""The settings tree: what a keygate config file means, as frozen dataclasses.

Every other module codes against these; ``gateway.config.load_config`` is the one place that
builds them from YAML (it reads the accepted keys of each section from these fields). They live
outside the loader package so that reading a ``Config`` never imports the YAML reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .models import Plan, Route, Upstream


@dataclass(frozen=True)
class Timeouts:
    """Seconds a client may take (``server.timeouts``)."""
    header: float = 10.0   # from a connection's first byte of a request to its whole head
    body: float = 60.0     # the longest silence while a request body streams (then 408)
    idle: float = 75.0     # an idle keep-alive connection is closed after this


@dataclass(frozen=True)
class TLSConfig:
    """HTTPS on a listener: PEM files, the chain (leaf first) in ``cert_file``."""
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()      # IPs / CIDRs whose X-Forwarded-* are kept
    log_level: str = "info"                    # debug | info | warning | error
    access_log: str = "json"                   # json | text | off
    metrics_workspace_labels: bool = False     # per-workspace labels on request counters
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 10000               # open client connections, per process
    tls: TLSConfig | None = None               # HTTPS only on the proxy listener
    websocket_recheck: float = 10.0            # seconds between checks of open tunnels' keys


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    token_env: str = "KEYGATE_ADMIN_TOKEN"
    tls: TLSConfig | None = None               # HTTPS only on the admin listener


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str = "embedded"                # embedded | redis://… | rediss://… | unix://… | redis+sentinel://… | redis+cluster://… (gateway/redis_urls.py)
    data_dir: str = ".keygate-data"
    on_store_error: str = "closed"             # closed | open
    timeout: float = 2.0                       # seconds per store call before it counts as down


@dataclass(frozen=True)
class Argon2Config:
    # OWASP's argon2id floor (m=19 MiB, t=2, p=1) is plenty for a 190-bit random secret:
    # nobody brute-forces 2^190, the hash only has to make a stolen store useless, and a cheap
    # verify keeps cold-key latency and CPU-flood exposure low.
    time_cost: int = 2
    memory_cost: int = 19456                   # KiB
    parallelism: int = 1


@dataclass(frozen=True)
class FailureLimits:
    """Failed verifications tolerated per window before 429 too_many_failures. ``per_key`` is
    off (None) by default: key ids are public, so a per-key limit would let anyone lock a key
    out of a replica whose cache does not hold it yet."""
    per_ip: int = 20
    per_key: int | None = None
    window_seconds: int = 60


@dataclass(frozen=True)
class VerifyQueueLimits:
    """Verifications waiting for (or holding) a turn at argon2, per client IP and in total;
    past either, 503 overloaded."""
    per_ip: int = 256
    total: int = 4096


@dataclass(frozen=True)
class KeysConfig:
    prefix: str = "kg"
    environments: tuple[str, ...] = ("live", "test")
    headers: tuple[str, ...] = ("X-Api-Key",)  # besides Authorization: Bearer
    argon2: Argon2Config = field(default_factory=Argon2Config)
    cache_ttl: float = 300.0                   # seconds a verified secret stays verified in-process
    failures: FailureLimits = field(default_factory=FailureLimits)
    verify_queue: VerifyQueueLimits = field(default_factory=VerifyQueueLimits)


@dataclass(frozen=True)
class IdentityHeaders:
    workspace: str = "X-Workspace-Id"
    key_id: str = "X-Api-Key-Id"
    scopes: str = "X-Api-Scopes"
    plan: str = "X-Workspace-Plan"

    def names(self) -> tuple[str, ...]:
        return (self.workspace, self.key_id, self.scopes, self.plan)


@dataclass(frozen=True)
class IdentitySignature:
    """``identity_signature``: sign the identity sent upstream (gateway/signature.py)."""
    secret_env: str                            # env var holding the secret(s), comma-separated
    header: str = "X-Keygate-Signature"


@dataclass(frozen=True)
class TracingConfig:
    """``tracing``: export spans over OTLP/HTTP (needs the ``keygate[otel]`` extra)."""
    otlp_endpoint: str                         # http(s)://collector:4318[/v1/traces]
    service_name: str = "keygate"
    sample_ratio: float = 1.0                  # of traces keygate starts; a caller's flag wins


@dataclass(frozen=True)
class CorsConfig:
    """``cors``: answer browsers' CORS preflights and label responses for allowed origins
    (gateway/cors.py). Absent: keygate does nothing CORS-specific."""
    allow_origins: tuple[str, ...] | str       # "*", or origins as browsers send them
    allow_headers: tuple[str, ...] = ()        # besides Authorization, keys.headers,
                                               # Content-Type and X-Request-Id
    expose_headers: tuple[str, ...] = ()       # besides RateLimit*, Retry-After, X-Request-Id
    max_age: int = 600                         # seconds a browser may cache a preflight
    allow_credentials: bool = False            # cookies / HTTP auth; never with "*"


@dataclass(frozen=True)
class ConfigWarning:
    """A shape in a valid config that serves, but not as the operator likely means: ``text``
    is the line ``config check`` prints and ``serve`` logs (``file:line: field: warning:
    ...``); ``key`` says what it is about without line numbers, so that a reload logs only
    the warnings it brings in (not those that moved with an edit above them)."""
    text: str
    key: tuple = ()

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    plans: Mapping[str, Plan] = field(default_factory=lambda: {"default": Plan("default")})
    default_plan: str = "default"
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    identity_headers: IdentityHeaders = field(default_factory=IdentityHeaders)
    identity_signature: IdentitySignature | None = None
    tracing: TracingConfig | None = None
    cors: CorsConfig | None = None             # None: no CORS handling at all
    source: str = "<defaults>"                 # the file it came from, for messages
    # the scope catalogue (NAME: description); when given, keys, roles and routes may name
    # only these scopes (and ALL). None: any well-formed scope.
    scopes: Mapping[str, str] | None = None
    # what config check prints and serve logs, the file still being valid (file order)
    warnings: tuple[ConfigWarning, ...] = field(default=(), compare=False)

    def plan_of(self, name: str) -> Plan:
        """The plan a workspace is on. A stored plan name the config no longer has (renamed or
        removed) falls back to ``default_plan``, never to "unlimited"."""
        plan = self.plans.get(name)
        return plan if plan is not None else self.plans[self.default_plan]
