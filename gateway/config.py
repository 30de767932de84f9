"""keygate's configuration: YAML in, frozen dataclasses out.

The dataclasses below are the contract every other module codes against; ``load_config``
parses and validates a file into them. (Loader and validation: see below.)

The loader walks the *composed* YAML node tree (``yaml.compose``) rather than the constructed
Python objects, so every value keeps its line number: each problem reads
``config.yaml:14: routes[2].upstream: unknown upstream 'crm2' (known: crm)``. Every problem in
the file is collected before ``ConfigError`` is raised, so one ``keygate config check`` run
shows them all.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class RateLimit:
    """``N/s`` or ``N/m``: ``requests`` per ``period_seconds``."""
    requests: int
    period_seconds: int  # 1 or 60

    def __str__(self) -> str:
        return f"{self.requests}/{'s' if self.period_seconds == 1 else 'm'}"


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
    source: str = "<defaults>"                 # the file it came from, for messages
    # the scope catalogue (NAME: description); when given, keys, roles and routes may name
    # only these scopes (and ALL). None: any well-formed scope.
    scopes: Mapping[str, str] | None = None

    def plan_of(self, name: str) -> Plan:
        """The plan a workspace is on. A stored plan name the config no longer has (renamed or
        removed) falls back to ``default_plan``, never to "unlimited"."""
        plan = self.plans.get(name)
        return plan if plan is not None else self.plans[self.default_plan]


# =============================================================================================
# Loader
# =============================================================================================

RATE_LIMIT_RE = re.compile(r"\s*([0-9]+)\s*/\s*([sm])\s*")
SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # plan, role and upstream names
PREFIX_RE = re.compile(r"[a-z0-9]{1,10}")
ENVIRONMENT_RE = re.compile(r"[a-z0-9]{1,16}")
HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_REF_RE = re.compile(r"\$\$|\$\{([^}]*)\}")
ENV_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", re.DOTALL)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
RESERVED_PATH = "/_keygate/"
MAX_RATE = 10**9

# Headers an operator may not claim as identity headers: the gateway sets or strips these itself.
RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "proxy-authenticate", "host", "content-length",
    "content-type", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
})


def parse_rate_limit(text: str) -> RateLimit:
    """``"5/s"`` → ``RateLimit(5, 1)``; ``"100/m"`` → ``RateLimit(100, 60)``.

    Raises ``ValueError`` with a sentence fit to show a user (the admin API reuses it for a
    key's own ``rate_limit``).
    """
    match = RATE_LIMIT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"a rate limit looks like '5/s' or '300/m' (requests per second or "
                         f"per minute), got {text!r}")
    requests = int(match.group(1))
    if not 1 <= requests <= MAX_RATE:
        raise ValueError(f"a rate limit needs between 1 and {MAX_RATE} requests, got {text!r}")
    return RateLimit(requests, 1 if match.group(2) == "s" else 60)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML config file; ``None`` means all defaults.

    Raises ``ConfigError`` carrying every problem found, one line each:
    ``<file>:<line>: <field path>: <what is wrong>``.
    """
    if path is None:
        return Config()
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read {source}: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"cannot read {source}: not UTF-8 text "
                           f"(bad byte at offset {exc.start})"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}" if mark is not None else "1"
        what = exc.problem or exc.context or "invalid YAML"
        col = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError([f"{source}:{line}: invalid YAML: {what}{col}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}:1: invalid YAML: {exc}"]) from None
    reader = _Reader(source)
    config = reader.config(root)
    if reader.problems:
        raise ConfigError(reader.sorted_problems())
    return config


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The TLS context of an HTTPS listener: the ``ssl`` module's server defaults, TLS 1.2 at
    least. Raises ``ssl.SSLError`` / ``OSError`` when the files are not a matching pair."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def check_config(path: str | os.PathLike[str] | None) -> list[str]:
    """Every problem in the file, one line each; ``[]`` when it is fine."""
    try:
        load_config(path)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def servable_problems(config: Config) -> list[str]:
    """What makes a valid config unfit to serve with: no routes means a gateway that can
    forward nothing (usually an empty file, or a file that is not the one meant).
    ``keygate serve`` and ``keygate config check`` refuse it; tests build such configs freely."""
    if not config.routes:
        return [f"{config.source}: routes: no routes are defined, so the gateway would answer "
                "every request 404 no_route; add at least one route (see "
                "docs/configuration.md#routes)"]
    return []


# --- the node walker -----------------------------------------------------------------------------

class _Bad:
    """Marks a value that failed validation (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()
Node = yaml.Node

_TAG_NAMES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
}


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _known(choices: Any) -> str:
    names = ", ".join(str(c) for c in choices)
    return f"(known: {names})" if names else "(none defined)"


class _Reader:
    """Turns a composed node tree into a ``Config``, recording problems as it goes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[int, int, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()
        self.catalogue: dict[str, str] | None = None  # top-level 'scopes', read first

    # --- bookkeeping --------------------------------------------------------------------------

    def fail(self, node: Node | None, path: str, message: str) -> Any:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append((line, len(self.problems),
                              f"{self.source}:{line}: {path or 'top level'}: {message}"))
        return BAD

    def sorted_problems(self) -> list[str]:
        return [text for _, _, text in sorted(self.problems)]

    # --- generic shapes -----------------------------------------------------------------------

    def describe(self, node: Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")

    def scalar(self, node: Node, path: str) -> Any:
        """The Python value of a scalar node, after ``${ENV}`` expansion."""
        if not isinstance(node, yaml.ScalarNode):
            return self.fail(node, path, f"expected a single value, got {self.describe(node)}")
        if "$" in node.value and node.tag == "tag:yaml.org,2002:str":
            expanded = self.expand(node, path)
            if expanded is BAD:
                return BAD
            if expanded != node.value:
                # An unquoted ``port: ${PORT}`` should become an int, as if the value had been
                # written there; a quoted one stays a string.
                tag = (self._resolver.resolve(yaml.ScalarNode, expanded, (True, False))
                       if node.style is None else node.tag)
                node = yaml.ScalarNode(tag, expanded, node.start_mark, node.end_mark, node.style)
        try:
            return self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            return self.fail(node, path, f"cannot read this value: {exc}")

    def expand(self, node: Node, path: str) -> Any:
        """``${VAR}``, ``${VAR:-default}`` (unset or empty), ``${VAR-default}``, ``$$`` = ``$``."""
        failed = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal failed
            if match.group(0) == "$$":
                return "$"
            body = ENV_BODY_RE.fullmatch(match.group(1))
            if body is None:
                failed = True
                self.fail(node, path, f"bad environment reference '{match.group(0)}' "
                                      "(use ${NAME} or ${NAME:-default})")
                return ""
            name, operator, default = body.groups()
            value = os.environ.get(name)
            if operator == ":-" and not value:
                return default
            if operator == "-" and value is None:
                return default
            if value is None:
                failed = True
                self.fail(node, path, f"environment variable {name} is not set "
                                      f"(set it, or write ${{{name}:-default}})")
                return ""
            return value

        result = ENV_REF_RE.sub(substitute, node.value)
        return BAD if failed else result

    def mapping(self, node: Node | None, path: str,
                allowed: tuple[str, ...] | None = None) -> list[tuple[str, Node, Node]] | None:
        """(key, key node, value node) in file order; unknown and duplicate keys reported.

        ``None`` (absent or ``key:`` with nothing after it) is returned as an empty list.
        """
        if node is None or (isinstance(node, yaml.ScalarNode)
                            and node.tag == "tag:yaml.org,2002:null"):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping, got {self.describe(node)}")
            return None
        explicit = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
        try:
            # YAML merge keys (``<<: *defaults``): flatten_mapping puts the merged pairs first.
            self._constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.fail(node, path, f"bad merge key: {getattr(exc, 'problem', exc)}")
            return None
        merged = node.value[:len(node.value) - len(explicit)]
        explicit_keys = {k.value for k, _ in explicit if isinstance(k, yaml.ScalarNode)}
        entries: dict[str, tuple[str, Node, Node]] = {}
        for key_node, value_node in merged:  # later merges win; explicit keys win over all
            if isinstance(key_node, yaml.ScalarNode) and key_node.value not in explicit_keys:
                entries[key_node.value] = (key_node.value, key_node, value_node)
        seen: dict[str, Node] = {}
        for key_node, value_node in explicit:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, path, f"a key must be a plain name, got "
                                          f"{self.describe(key_node)}")
                continue
            key = key_node.value
            if key in seen:
                self.fail(key_node, sub, f"duplicate key (first given on line "
                                         f"{seen[key].start_mark.line + 1})")
                continue
            seen[key] = key_node
            entries[key] = (key, key_node, value_node)
        result = []
        for key, key_node, value_node in entries.values():
            if allowed is not None and key not in allowed:
                if not path and key.startswith("x-"):
                    continue  # top-level x-* keys hold YAML anchors, as in docker compose
                sub = f"{path}.{key}" if path else key
                hint = _suggest(key, allowed) or f" (allowed: {', '.join(allowed)})"
                self.fail(key_node, sub, f"unknown key '{key}'{hint}")
                continue
            result.append((key, key_node, value_node))
        return result

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list, got {self.describe(node)}")
            return None
        return list(node.value)

    # --- typed scalars ------------------------------------------------------------------------

    def string(self, node: Node, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "", choices: tuple[str, ...] | None = None,
               nullable: bool = False) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            return self.fail(node, path, f"expected a string, got {self.describe_value(value)}")
        if choices is not None and value not in choices:
            return self.fail(node, path, f"must be one of {', '.join(choices)}, got "
                                         f"'{value}'{_suggest(value, choices)}")
        if not value:
            return self.fail(node, path, "must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            return self.fail(node, path, f"'{value}' is not {what}")
        return value

    def integer(self, node: Node, path: str, *, minimum: int | None = None,
                maximum: int | None = None, nullable: bool = False) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            extra = " or null (unlimited)" if nullable else ""
            return self.fail(node, path, f"expected an integer{extra}, got "
                                         f"{self.describe_value(value)}")
        return self.in_range(node, path, value, minimum, maximum)

    def number(self, node: Node, path: str, *, minimum: float | None = None,
               positive: bool = False) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.fail(node, path, f"expected a number of seconds, got "
                                         f"{self.describe_value(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            return self.fail(node, path, f"must be a finite number, got {value}")
        if positive and value <= 0:
            return self.fail(node, path, f"must be greater than 0, got {value}")
        if minimum is not None and value < minimum:
            return self.fail(node, path, f"must be at least {minimum}, got {value}")
        return float(value)

    def boolean(self, node: Node, path: str) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if not isinstance(value, bool):
            return self.fail(node, path, f"expected true or false, got "
                                         f"{self.describe_value(value)}")
        return value

    def in_range(self, node: Node, path: str, value: int, minimum: int | None,
                 maximum: int | None) -> Any:
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            return self.fail(node, path, f"must be between {minimum} and {maximum}, got {value}")
        if minimum is not None and value < minimum:
            return self.fail(node, path, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            return self.fail(node, path, f"must be at most {maximum}, got {value}")
        return value

    @staticmethod
    def describe_value(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return f"a boolean ({'true' if value else 'false'})"
        if isinstance(value, int):
            return f"an integer ({value})"
        if isinstance(value, float):
            return f"a number ({value})"
        if isinstance(value, str):
            shown = value if len(value) <= 40 else value[:37] + "..."
            return f"a string ('{shown}')"
        return f"a {type(value).__name__}"

    def string_list(self, node: Node, path: str,
                    item: Callable[[Node, str], Any]) -> Any:
        items = self.sequence(node, path)
        if items is None:
            return BAD
        values = [item(child, f"{path}[{i}]") for i, child in enumerate(items)]
        return BAD if any(v is BAD for v in values) else values

    # --- sections -----------------------------------------------------------------------------

    def section(self, node: Node | None, path: str, cls: type,
                fields: Mapping[str, Callable[[Node, str], Any]],
                required: Mapping[str, str] | None = None, **fixed: Any) -> Any:
        """A flat mapping of known fields into ``cls``; bad or absent fields keep defaults.

        ``required`` maps a field that must be given to a hint shown when it is missing.
        """
        entries = self.mapping(node, path, tuple(fields))
        if entries is None:
            return cls(**fixed)
        given = {key for key, _, _ in entries}
        for key, hint in (required or {}).items():
            if key not in given:
                self.fail(node, f"{path}.{key}", f"required {hint}".rstrip())
        kwargs = dict(fixed)
        for key, _key_node, value_node in entries:
            value = fields[key](value_node, f"{path}.{key}")
            if value is not BAD:
                kwargs[key] = value
        return cls(**kwargs)

    def config(self, root: Node | None) -> Config:
        top = self.mapping(root, "", TOP_LEVEL_KEYS)
        if top is None:
            return Config(source=self.source)
        nodes = {key: (key_node, value_node) for key, key_node, value_node in top}

        def value(key: str) -> Node | None:
            return nodes[key][1] if key in nodes else None

        server = self.server(value("server"))
        admin = self.section(value("admin"), "admin", AdminConfig, {
            "host": self.text, "port": self.port,
            "token_env": lambda n, p: self.string(n, p, pattern=ENV_NAME_RE,
                                                  what="an environment variable name"),
            "tls": self.tls,
        })
        store = self.store(value("store"))
        keys = self.keys(value("keys"))
        self.catalogue = self.scope_catalogue(value("scopes")) if "scopes" in nodes else None
        plans, default_plan = self.plans(nodes.get("plans"), nodes.get("default_plan"))
        roles = self.roles(value("roles"))
        upstreams = self.upstreams(value("upstreams"))
        routes = self.routes(value("routes"), upstreams)
        identity = self.identity_headers(value("identity_headers"), keys)
        signature = self.identity_signature(value("identity_signature"), keys, identity)
        tracing = self.tracing(value("tracing"))
        wildcard = ("0.0.0.0", "::", "")
        if server.port == admin.port and (server.host == admin.host or server.host in wildcard
                                          or admin.host in wildcard):
            self.fail(self.child(value("admin"), "port") or self.child(value("server"), "port")
                      or root, "admin.port", f"the admin listener cannot share port "
                                             f"{admin.port} with the proxy listener")
        return Config(server=server, admin=admin, store=store, keys=keys, plans=plans,
                      default_plan=default_plan, roles=roles, upstreams=upstreams,
                      routes=routes, identity_headers=identity, identity_signature=signature,
                      tracing=tracing, source=self.source, scopes=self.catalogue)

    def text(self, node: Node, path: str) -> Any:
        return self.string(node, path)

    def port(self, node: Node, path: str) -> Any:
        return self.integer(node, path, minimum=1, maximum=65535)

    def server(self, node: Node | None) -> ServerConfig:
        return self.section(node, "server", ServerConfig, {
            "host": self.text,
            "port": self.port,
            "workers": lambda n, p: self.integer(n, p, minimum=1, maximum=1024),
            "max_body_bytes": lambda n, p: self.integer(n, p, minimum=1),
            "trusted_proxies": self.trusted_proxies,
            "log_level": lambda n, p: self.string(
                n, p, choices=("debug", "info", "warning", "error")),
            "access_log": lambda n, p: self.string(n, p, choices=("json", "text", "off")),
            "metrics_workspace_labels": self.boolean,
            "timeouts": lambda n, p: self.section(n, p, Timeouts, {
                "header": lambda n2, p2: self.number(n2, p2, positive=True),
                "body": lambda n2, p2: self.number(n2, p2, positive=True),
                "idle": lambda n2, p2: self.number(n2, p2, positive=True),
            }),
            "max_connections": lambda n, p: self.integer(n, p, minimum=1, maximum=1_000_000),
            "tls": self.tls,
        })

    def tls(self, node: Node, path: str) -> Any:
        """``{cert_file, key_file}``, both read and matched now: a renewal that left a key
        behind, or a file the gateway may not read, is a config problem, not a failed
        handshake later."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return None
        entries = self.mapping(node, path, ("cert_file", "key_file"))
        if entries is None:
            return BAD
        given = {key: value_node for key, _, value_node in entries}
        files: dict[str, str] = {}
        for name in ("cert_file", "key_file"):
            if name not in given:
                self.fail(node, f"{path}.{name}", "required (a PEM file)")
                continue
            file_name = self.string(given[name], f"{path}.{name}")
            if file_name is BAD:
                continue
            try:
                with open(file_name, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                self.fail(given[name], f"{path}.{name}",
                          f"cannot read '{file_name}': {exc.strerror or exc}")
                continue
            files[name] = file_name
        if len(files) != 2:
            return BAD
        try:
            server_context(files["cert_file"], files["key_file"])
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or "not PEM"
            if reason == "KEY_VALUES_MISMATCH":
                return self.fail(given["key_file"], f"{path}.key_file",
                                 f"'{files['key_file']}' does not match the certificate in "
                                 f"'{files['cert_file']}'")
            return self.fail(node, path, f"'{files['cert_file']}' and '{files['key_file']}' are "
                                         f"not a PEM certificate and its private key ({reason})")
        except (OSError, ValueError) as exc:
            return self.fail(node, path, f"cannot load the certificate: {exc}")
        return TLSConfig(files["cert_file"], files["key_file"])

    def trusted_proxies(self, node: Node, path: str) -> Any:
        def network(child: Node, sub: str) -> Any:
            text = self.string(child, sub)
            if text is BAD:
                return BAD
            try:
                ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                return self.fail(child, sub, f"'{text}' is not an IP address or CIDR network "
                                             "(e.g. 10.0.0.0/8)")
            return text.strip()
        values = self.string_list(node, path, network)
        return BAD if values is BAD else tuple(values)

    def store(self, node: Node | None) -> StoreConfig:
        return self.section(node, "store", StoreConfig, {
            "redis_url": self.redis_url,
            "data_dir": self.text,
            "on_store_error": lambda n, p: self.string(n, p, choices=("closed", "open")),
            "timeout": lambda n, p: self.number(n, p, positive=True),
        })

    def redis_url(self, node: Node, path: str) -> Any:
        # The URL may carry a password (often via ${ENV}): messages show its scheme only.
        url = self.string(node, path)
        if url is BAD or url == "embedded":
            return url
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
            # Sentinel / Cluster: host lists and /<master-name>; gateway.redis_urls knows them
            # (its messages never repeat a password).
            from .redis_urls import parse_topology_url
            try:
                parse_topology_url(url)
            except ValueError as exc:
                return self.fail(node, path, str(exc))
            return url
        if scheme not in REDIS_SCHEMES:
            return self.fail(node, path, "must be 'embedded' or a URL with scheme "
                                         f"{', '.join(s + '://' for s in REDIS_SCHEMES)}"
                                         + (f", got scheme '{scheme}'" if scheme else ""))
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return self.fail(node, path, f"not a valid {scheme}:// URL (bad host or port)")
        if scheme == "unix":
            if not parts.path:
                return self.fail(node, path, "a unix:// URL needs a socket path, e.g. "
                                             "unix:///run/redis.sock")
        elif not parts.hostname:
            return self.fail(node, path, f"a {scheme}:// URL needs a host")
        elif scheme in ("redis", "rediss"):
            # The path is the database number (redis-py reads it as such and refuses anything
            # else at connect time, too late for "the gateway never starts on a bad config").
            # Sentinel/Cluster paths mean other things (gateway.redis_urls).
            db = parts.path.removeprefix("/")
            if db and not db.isdigit():
                return self.fail(node, path, f"the path of a {scheme}:// URL is the database "
                                             f"number (e.g. {scheme}://host:6379/0), got "
                                             f"'{parts.path[:32]}'")
        return url

    def keys(self, node: Node | None) -> KeysConfig:
        keys = self.section(node, "keys", KeysConfig, {
            "prefix": lambda n, p: self.string(
                n, p, pattern=PREFIX_RE, what="a valid key prefix (1-10 of a-z, 0-9)"),
            "environments": self.environments,
            "headers": self.credential_headers,
            "argon2": lambda n, p: self.section(n, p, Argon2Config, {
                "time_cost": lambda n2, p2: self.integer(n2, p2, minimum=1, maximum=100),
                "memory_cost": lambda n2, p2: self.integer(n2, p2, minimum=8,
                                                           maximum=4 * 1024 * 1024),
                "parallelism": lambda n2, p2: self.integer(n2, p2, minimum=1, maximum=64),
            }),
            "cache_ttl": lambda n, p: self.number(n, p, minimum=0),
            "failures": lambda n, p: self.section(n, p, FailureLimits, {
                "per_ip": lambda n2, p2: self.integer(n2, p2, minimum=1),
                "per_key": lambda n2, p2: self.integer(n2, p2, minimum=1, nullable=True),
                "window_seconds": lambda n2, p2: self.integer(n2, p2, minimum=1),
            }),
            "verify_queue": lambda n, p: self.section(n, p, VerifyQueueLimits, {
                "per_ip": lambda n2, p2: self.integer(n2, p2, minimum=1),
                "total": lambda n2, p2: self.integer(n2, p2, minimum=1),
            }),
        })
        if keys.argon2.memory_cost < 8 * keys.argon2.parallelism:
            argon2_node = self.child(node, "argon2")
            self.fail(argon2_node or node, "keys.argon2.memory_cost",
                      f"argon2 needs memory_cost >= 8 x parallelism "
                      f"({8 * keys.argon2.parallelism}), got {keys.argon2.memory_cost}")
        return keys

    def child(self, node: Node | None, key: str) -> Node | None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    return value_node
        return None

    def environments(self, node: Node, path: str) -> Any:
        values = self.string_list(node, path, lambda n, p: self.string(
            n, p, pattern=ENVIRONMENT_RE, what="a valid environment name (1-16 of a-z, 0-9)"))
        if values is BAD:
            return BAD
        if not values:
            return self.fail(node, path, "at least one environment is required")
        if len(set(values)) != len(values):
            return self.fail(node, path, "lists an environment twice")
        return tuple(values)

    def header_name(self, node: Node, path: str) -> Any:
        name = self.string(node, path, pattern=HEADER_RE, what="a valid HTTP header name")
        if name is BAD:
            return BAD
        if name.lower() == "authorization":
            return self.fail(node, path, "Authorization is always read as 'Bearer <key>'; "
                                         "list only other headers here")
        return name

    def credential_headers(self, node: Node, path: str) -> Any:
        values = self.string_list(node, path, self.header_name)
        if values is BAD:
            return BAD
        if len({_header_key(v) for v in values}) != len(values):
            return self.fail(node, path, "lists the same header twice")
        return tuple(values)

    def plans(self, plans_entry: tuple[Node, Node] | None,
              default_entry: tuple[Node, Node] | None) -> tuple[dict[str, Plan], str]:
        default_node = default_entry[1] if default_entry else None
        default = (self.string(default_node, "default_plan")
                   if default_node is not None else None)
        if plans_entry is None:
            plans = {"default": Plan("default")}
        else:
            plans_node = plans_entry[1]
            entries = self.mapping(plans_node, "plans")
            plans = {}
            for name, key_node, value_node in entries or []:
                path = f"plans.{name}"
                if not NAME_RE.fullmatch(name):
                    self.fail(key_node, path, f"'{name}' is not a valid plan name "
                                              "(a letter or digit, then letters, digits, _ . -)")
                plans[name] = self.section(value_node, path, Plan, {
                    "monthly_requests": lambda n, p: self.integer(n, p, minimum=0,
                                                                  nullable=True),
                    "max_keys": lambda n, p: self.integer(n, p, minimum=0, nullable=True),
                    "rate_limit": self.rate_limit,
                }, name=name)
            if entries is not None and not entries:
                self.fail(plans_node, "plans", "at least one plan is required "
                                               "(or leave 'plans' out for one unlimited plan)")
            if not plans:
                plans = {"default": Plan("default")}
        if default is BAD:
            return plans, next(iter(plans))
        if default is None:
            return plans, next(iter(plans))
        if default not in plans:
            self.fail(default_node, "default_plan", f"unknown plan '{default}'"
                                                    f"{_suggest(default, plans)} {_known(plans)}")
            return plans, next(iter(plans))
        return plans, default

    def rate_limit(self, node: Node, path: str) -> Any:
        text = self.scalar(node, path)
        if text is None or text is BAD:
            return text
        if not isinstance(text, str):
            return self.fail(node, path, f"expected a rate like '5/s' or '300/m', got "
                                         f"{self.describe_value(text)}")
        try:
            return parse_rate_limit(text)
        except ValueError as exc:
            return self.fail(node, path, str(exc))

    def scope(self, node: Node, path: str) -> Any:
        value = self.string(node, path, pattern=SCOPE_RE,
                            what="a valid scope (like 'people:read', or ALL)")
        catalogue = self.catalogue
        if isinstance(value, str) and catalogue is not None and value != "ALL" \
                and value not in catalogue:
            return self.fail(node, path, f"scope '{value}' is not in the scope catalogue "
                                         f"(top-level 'scopes'){_suggest(value, catalogue)}")
        return value

    def scope_catalogue(self, node: Node | None) -> dict[str, str] | None:
        """Top-level ``scopes: {NAME: description}``."""
        if node is None or (isinstance(node, yaml.ScalarNode)
                            and node.tag == "tag:yaml.org,2002:null"):
            return None
        catalogue: dict[str, str] = {}
        for name, key_node, value_node in self.mapping(node, "scopes") or []:
            path = f"scopes.{name}"
            if not SCOPE_RE.fullmatch(name) or name == "ALL":
                self.fail(key_node, path, f"'{name}' is not a valid scope name (like "
                                          "'people:read'; ALL is built in)")
                continue
            description = self.string(value_node, path, nullable=True)
            if description is not BAD:
                catalogue[name] = description or ""
        return catalogue

    def scopes(self, node: Node, path: str) -> Any:
        values = self.string_list(node, path, self.scope)
        return BAD if values is BAD else tuple(dict.fromkeys(values))

    def roles(self, node: Node | None) -> dict[str, tuple[str, ...]]:
        roles: dict[str, tuple[str, ...]] = {}
        for name, key_node, value_node in self.mapping(node, "roles") or []:
            path = f"roles.{name}"
            if not NAME_RE.fullmatch(name):
                self.fail(key_node, path, f"'{name}' is not a valid role name "
                                          "(a letter or digit, then letters, digits, _ . -)")
            scopes = self.scopes(value_node, path)
            if scopes is not BAD:
                roles[name] = scopes
        return roles

    def upstreams(self, node: Node | None) -> dict[str, Upstream]:
        upstreams: dict[str, Upstream] = {}
        for name, key_node, value_node in self.mapping(node, "upstreams") or []:
            path = f"upstreams.{name}"
            if not NAME_RE.fullmatch(name):
                self.fail(key_node, path, f"'{name}' is not a valid upstream name "
                                          "(a letter or digit, then letters, digits, _ . -)")
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag != \
                    "tag:yaml.org,2002:null":
                url = self.upstream_url(value_node, path)  # shorthand: `crm: http://...`
                upstream = Upstream(name, url if url is not BAD else "")
            else:
                upstream = self.section(value_node, path, Upstream, {
                    "url": self.upstream_url,
                    "timeout": lambda n, p: self.number(n, p, positive=True),
                    "ca_file": self.ca_file,
                    "max_connections": lambda n, p: self.integer(n, p, minimum=1,
                                                                 maximum=100_000),
                }, required={"url": "(e.g. http://127.0.0.1:9000)"}, name=name, url="")
                if upstream.ca_file is not None and upstream.url \
                        and urlsplit(upstream.url).scheme != "https":
                    self.fail(self.child(value_node, "ca_file"), f"{path}.ca_file",
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
        try:
            with open(name, "rb"):
                pass
        except OSError as exc:
            return self.fail(node, path, f"cannot read '{name}': {exc.strerror or exc}")
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
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return self.fail(node, path, f"'{url}' is not a valid URL (bad host or port)")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return self.fail(node, path, f"'{url}' must be an http:// or https:// URL with a "
                                         "host, e.g. http://127.0.0.1:9000")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            return self.fail(node, path, f"'{url}' must not have a query or fragment")
        return url

    def routes(self, node: Node | None, upstreams: Mapping[str, Upstream]) -> tuple[Route, ...]:
        if node is None or (isinstance(node, yaml.ScalarNode)
                            and node.tag == "tag:yaml.org,2002:null"):
            return ()
        items = self.sequence(node, "routes")
        routes: list[Route] = []
        for i, item in enumerate(items or []):
            path = f"routes[{i}]"
            entries = self.mapping(item, path, ROUTE_KEYS)
            if entries is None:
                continue
            fields = {key: value_node for key, _, value_node in entries}
            kwargs: dict[str, Any] = {}
            if "path" in fields:
                route_path = self.route_path(fields["path"], f"{path}.path")
                if route_path is not BAD:
                    kwargs["path"] = route_path
            else:
                self.fail(item, f"{path}.path", "required (e.g. /people/**)")
            if "methods" in fields:
                methods = self.methods(fields["methods"], f"{path}.methods")
                if methods is not BAD:
                    kwargs["methods"] = methods
            if "upstream" in fields:
                name = self.string(fields["upstream"], f"{path}.upstream")
                if name is not BAD:
                    if name not in upstreams:
                        self.fail(fields["upstream"], f"{path}.upstream",
                                  f"unknown upstream '{name}'{_suggest(name, upstreams)} "
                                  f"{_known(upstreams)}")
                    kwargs["upstream"] = name
            # no upstream: a verify-only route (answered by /_keygate/v1/verify, never forwarded)
            if "scopes" in fields:
                scopes = self.scopes(fields["scopes"], f"{path}.scopes")
                if scopes is not BAD:
                    kwargs["scopes"] = scopes
            if "public" in fields:
                public = self.boolean(fields["public"], f"{path}.public")
                if public is not BAD:
                    kwargs["public"] = public
            if kwargs.get("public") and kwargs.get("scopes"):
                self.fail(fields["scopes"], f"{path}.scopes",
                          "a public route cannot require scopes (no key is checked)")
            routes.append(Route(**{"path": "/", **kwargs}))
        return tuple(routes)

    def route_path(self, node: Node, path: str) -> Any:
        text = self.string(node, path)
        if text is BAD:
            return BAD
        if not text.startswith("/"):
            return self.fail(node, path, f"'{text}' must start with /")
        if text.startswith(RESERVED_PATH) or text == RESERVED_PATH.rstrip("/"):
            return self.fail(node, path, f"'{text}' is under {RESERVED_PATH}, which keygate "
                                         "reserves for itself")
        if any(c in text for c in "?#;\\") or any(ord(c) <= 32 or ord(c) >= 127 for c in text):
            # Requests are matched on the raw path and refused when not canonical, so a route
            # with any of these could never match.
            return self.fail(node, path, f"'{text}' contains a character not allowed in a "
                                         "route path (space, control, non-ASCII, ?, #, ; or \\; "
                                         "percent-encode non-ASCII)")
        segments = text[1:].split("/")
        for index, segment in enumerate(segments):
            last = index == len(segments) - 1
            if segment == "" and not last:
                return self.fail(node, path, f"'{text}' has an empty segment (//)")
            if segment in (".", ".."):
                return self.fail(node, path, f"'{text}' has a '{segment}' segment; requests "
                                             "with dot-segments are refused, so it never matches")
            if "*" in segment and segment not in ("*", "**"):
                return self.fail(node, path, f"'{text}': '*' and '**' must be a whole segment "
                                             f"(got '{segment}')")
            if segment == "**" and not last:
                return self.fail(node, path, f"'{text}': '**' may only be the last segment")
            if re.search(r"%(?![0-9A-Fa-f]{2})", segment):
                return self.fail(node, path, f"'{text}' has a bad percent-escape")
            for escape in re.findall(r"%[0-9A-Fa-f]{2}", segment):
                char = chr(int(escape[1:], 16))
                if char.isascii() and (char.isalnum() or char in "-._~/\\%"):
                    return self.fail(node, path, f"'{text}' has '{escape}'; requests with it "
                                                 "are refused as non-canonical, so it never "
                                                 "matches")
        return text

    def methods(self, node: Node, path: str) -> Any:
        def method(child: Node, sub: str) -> Any:
            name = self.string(child, sub)
            if name is BAD:
                return BAD
            if name.upper() not in HTTP_METHODS:
                return self.fail(child, sub, f"'{name}' is not an HTTP method "
                                             f"({', '.join(HTTP_METHODS)})")
            return name.upper()
        values = self.string_list(node, path, method)
        if values is BAD:
            return BAD
        if not values:
            return self.fail(node, path, "is empty; leave 'methods' out to allow any method")
        return tuple(dict.fromkeys(values))

    def identity_headers(self, node: Node | None, keys: KeysConfig) -> IdentityHeaders:
        def identity(child: Node, sub: str) -> Any:
            name = self.header_name(child, sub)
            if name is BAD:
                return BAD
            if name.lower() in RESERVED_HEADERS:
                return self.fail(child, sub, f"'{name}' is a header keygate manages itself")
            return name
        fields = ("workspace", "key_id", "scopes", "plan")
        headers = self.section(node, "identity_headers", IdentityHeaders,
                               {f: identity for f in fields})
        seen: dict[str, str] = {}
        credential = {_header_key(h): h for h in keys.headers}
        for f in fields:
            name = getattr(headers, f)
            where = self.child(node, f) or node
            if _header_key(name) in seen:
                self.fail(where, f"identity_headers.{f}",
                          f"'{name}' is already used for identity_headers.{seen[_header_key(name)]}")
            elif _header_key(name) in credential:
                self.fail(where, f"identity_headers.{f}",
                          f"'{name}' is a credential header (keys.headers)")
            seen[_header_key(name)] = f
        return headers

    def identity_signature(self, node: Node | None, keys: KeysConfig,
                           identity: IdentityHeaders) -> IdentitySignature | None:
        if node is None or self.describe(node) == "null":
            return None

        def secret_env(child: Node, sub: str) -> Any:
            name = self.string(child, sub, pattern=ENV_NAME_RE, what="an environment variable name")
            if name is BAD:
                return BAD
            if not os.environ.get(name, "").replace(",", "").strip():
                return self.fail(child, sub, f"environment variable {name} is not set (it holds "
                                             "the signing secret)")
            return name

        def header(child: Node, sub: str) -> Any:
            name = self.header_name(child, sub)
            if name is BAD:
                return BAD
            taken = {_header_key(h) for h in identity.names() + keys.headers}
            if name.lower() in RESERVED_HEADERS or _header_key(name) in taken:
                return self.fail(child, sub, f"'{name}' is already a header keygate sets, "
                                             "strips or reads")
            return name
        return self.section(node, "identity_signature", IdentitySignature,
                            {"secret_env": secret_env, "header": header},
                            required={"secret_env": "(the environment variable holding the "
                                                    "secret)"}, secret_env="")

    def tracing(self, node: Node | None) -> TracingConfig | None:
        if node is None or self.describe(node) == "null":
            return None

        def endpoint(child: Node, sub: str) -> Any:
            url = self.string(child, sub)
            if url is BAD:
                return BAD
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return self.fail(child, sub, "must be an http:// or https:// URL of an OTLP/HTTP "
                                             "receiver, e.g. http://otel-collector:4318")
            return url
        import importlib.util
        try:
            installed = all(importlib.util.find_spec(m) is not None for m in (
                "opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"))
        except ModuleNotFoundError:
            installed = False
        if not installed:
            self.fail(node, "tracing", "exporting spans needs OpenTelemetry: install "
                                       "keygate with the extra, pip install 'keygate[otel]'")
        return self.section(node, "tracing", TracingConfig, {
            "otlp_endpoint": endpoint,
            "service_name": lambda n, p: self.string(n, p, pattern=re.compile(r"\S.{0,127}"),
                                                     what="a service name (1-128 characters)"),
            "sample_ratio": self.ratio,
        }, required={"otlp_endpoint": "(the OTLP/HTTP receiver's URL)"}, otlp_endpoint="")

    def ratio(self, node: Node, path: str) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value <= 1:
            return self.fail(node, path, f"expected a number from 0 to 1, got "
                                         f"{self.describe_value(value)}")
        return float(value)


def _header_key(name: str) -> str:
    """Header identity as a spoofer sees it: case-insensitive, ``_`` = ``-``."""
    return name.lower().replace("_", "-")


TOP_LEVEL_KEYS = ("server", "admin", "store", "keys", "plans", "default_plan", "roles",
                  "upstreams", "routes", "identity_headers", "identity_signature", "tracing",
                  "scopes")
ROUTE_KEYS = ("path", "methods", "upstream", "scopes", "public")
