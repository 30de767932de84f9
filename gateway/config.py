"""keygate's configuration: YAML in, frozen dataclasses out.

The dataclasses below are the contract every other module codes against; ``load_config``
parses and validates a file into them. (Loader and validation: see below.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class RateLimit:
    """``N/s`` or ``N/m``: ``requests`` per ``period_seconds``."""
    requests: int
    period_seconds: int  # 1 or 60

    def __str__(self) -> str:
        return f"{self.requests}/{'s' if self.period_seconds == 1 else 'm'}"


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


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    token_env: str = "KEYGATE_ADMIN_TOKEN"


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str = "embedded"                # embedded | redis://… | rediss://… | unix://… | redis+cluster://…
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
    """Failed verifications tolerated per window before 429 too_many_failures."""
    per_ip: int = 20
    per_key: int = 10
    window_seconds: int = 60


@dataclass(frozen=True)
class KeysConfig:
    prefix: str = "kg"
    environments: tuple[str, ...] = ("live", "test")
    headers: tuple[str, ...] = ("X-Api-Key",)  # besides Authorization: Bearer
    argon2: Argon2Config = field(default_factory=Argon2Config)
    cache_ttl: float = 300.0                   # seconds a verified secret stays verified in-process
    failures: FailureLimits = field(default_factory=FailureLimits)


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_requests: int | None = None        # None = unlimited
    max_keys: int | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str                                   # http://host:port[/base]
    timeout: float = 30.0


@dataclass(frozen=True)
class Route:
    path: str                                  # glob: * one segment, ** the rest
    upstream: str | None = None                # None only for routes that are not forwarded
    methods: tuple[str, ...] = ()              # () = any method
    scopes: tuple[str, ...] = ()               # all required
    public: bool = False


@dataclass(frozen=True)
class IdentityHeaders:
    workspace: str = "X-Workspace-Id"
    key_id: str = "X-Api-Key-Id"
    scopes: str = "X-Api-Scopes"
    plan: str = "X-Workspace-Plan"

    def names(self) -> tuple[str, ...]:
        return (self.workspace, self.key_id, self.scopes, self.plan)


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
    source: str = "<defaults>"                 # the file it came from, for messages
