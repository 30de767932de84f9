"""keygate's configuration: ``load_config`` reads a YAML file into ``gateway.settings.Config``.

- ``loader``: ``load_config``, ``check_config``, ``servable_problems`` and the top-level walk;
- ``nodes``: a generic line-numbered reader of the composed YAML tree (``${ENV}`` expansion,
  mappings, problems as ``file:line: field: message``);
- ``schema``: typed field readers and sections read into dataclasses by their fields;
- ``service``, ``access``, ``routing``: keygate's sections (listeners and store; keys, scopes,
  plans, roles and identity; upstreams and routes).

The settings dataclasses live in ``gateway.settings`` and the shared records and vocabulary in
``gateway.models``; they are re-exported here because "the config" is where callers look.
"""

from ..errors import ConfigError
from ..models import (HTTP_METHODS, NAME_RE, RESERVED_PATH, SCOPE_RE, Plan, RateLimit, Route,
                      Upstream, parse_rate_limit)
from ..settings import (AdminConfig, Argon2Config, Config, FailureLimits, IdentityHeaders,
                        IdentitySignature, KeysConfig, ServerConfig, StoreConfig, Timeouts,
                        TLSConfig, TracingConfig, VerifyQueueLimits)
from .loader import check_config, load_admin_section, load_config, servable_problems
from .service import server_context

__all__ = [
    "AdminConfig", "Argon2Config", "Config", "ConfigError", "FailureLimits", "HTTP_METHODS",
    "IdentityHeaders", "IdentitySignature", "KeysConfig", "NAME_RE", "Plan", "RESERVED_PATH",
    "RateLimit", "Route", "SCOPE_RE", "ServerConfig", "StoreConfig", "TLSConfig", "Timeouts",
    "TracingConfig", "Upstream", "VerifyQueueLimits", "check_config", "load_admin_section",
    "load_config",
    "parse_rate_limit", "servable_problems", "server_context",
]
