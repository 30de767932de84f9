"""Who may do what: ``keys``, ``scopes`` (the catalogue), ``plans``, ``roles`` and the
identity sent upstream (``identity_headers``, ``identity_signature``)."""

from __future__ import annotations

import os
import re
from typing import Any

from ..models import (HOP_BY_HOP, HOST_OVERRIDE, METHOD_OVERRIDE_HEADERS, NAME_RE, PATH_OVERRIDE,
                      ROLE_NAME_HINT, ROLE_NAME_RE, SCHEME_OVERRIDE, SCOPE_RE, Plan, header_key,
                      parse_rate_limit)
from ..signature import secrets_of
from ..settings import (Argon2Config, FailureLimits, IdentityHeaders, IdentitySignature,
                        KeysConfig, VerifyQueueLimits)
from .nodes import BAD, Node, child, describe_value, is_null, known, suggest
from .schema import SchemaReader

PREFIX_RE = re.compile(r"[a-z0-9]{1,10}")
ENVIRONMENT_RE = re.compile(r"[a-z0-9]{1,16}")
HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token

# Header names (as header_key spells them: "_" read as "-", as WSGI/CGI upstreams do) that no
# identity or signature header may take: keygate sets them, or HTTP gives them a meaning
# (an identity header named Expect makes the upstream answer 417), or upstreams read them as
# the request's method, path or host (an identity header named X-HTTP-Method-Override or
# X-Original-URL made every request another method or path than the one keygate authorised),
# or its scheme (X-Scheme).
# Built from the lists the proxy's header rules use (gateway.models), so none drifts apart.
RESERVED_HEADERS = frozenset({
    "authorization", "host", "content-length", "content-type", "x-request-id",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "expect",
    "traceparent", "tracestate",
}) | HOP_BY_HOP | PATH_OVERRIDE | HOST_OVERRIDE | SCHEME_OVERRIDE | {
    header_key(h) for h in METHOD_OVERRIDE_HEADERS}
MAX_WINDOW_SECONDS = 100 * 365 * 86400  # keys.failures.window_seconds
# Bytes of the secret keygate signs with (identity_signature): one signed request lets anyone
# try secrets offline at HMAC speed, so a short or guessable one is as good as none
MIN_SIGNING_SECRET = 32
_NAME_HINT = "(a letter or digit, then letters, digits, _ . -)"


class AccessSections(SchemaReader):
    """Keys, scopes, plans, roles and identity headers."""

    catalogue: dict[str, str] | None = None  # top-level 'scopes', read before any scope

    def keys(self, node: Node | None) -> KeysConfig:
        def at_least_1(n: Node, p: str) -> Any:
            return self.integer(n, p, minimum=1)
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
                "per_ip": at_least_1,
                "per_key": lambda n2, p2: self.integer(n2, p2, minimum=1, nullable=True),
                # a century at most: Redis refuses an expiry past ~2^63 ms ('invalid expire
                # time'), which made every failed verification a 503
                "window_seconds": lambda n2, p2: self.integer(n2, p2, minimum=1,
                                                              maximum=MAX_WINDOW_SECONDS),
            }),
            "verify_queue": lambda n, p: self.section(n, p, VerifyQueueLimits, {
                "per_ip": at_least_1, "total": at_least_1}),
        })
        if keys.argon2.memory_cost < 8 * keys.argon2.parallelism:
            self.fail(child(node, "argon2") or node, "keys.argon2.memory_cost",
                      f"argon2 needs memory_cost >= 8 x parallelism "
                      f"({8 * keys.argon2.parallelism}), got {keys.argon2.memory_cost}")
        return keys

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

    def credential_header(self, node: Node, path: str) -> Any:
        """One of ``keys.headers``: keygate reads a key from it and strips it before forwarding,
        so not one HTTP frames a request with or keygate sets (a key read from Host or
        Content-Length took that header from every request forwarded)."""
        name = self.header_name(node, path)
        if name is not BAD and header_key(name) in RESERVED_HEADERS:
            return self.fail(node, path, f"'{name}' is a header keygate manages itself or HTTP "
                                         "gives a meaning; a key cannot be read from it")
        return name

    def credential_headers(self, node: Node, path: str) -> Any:
        values = self.string_list(node, path, self.credential_header)
        if values is BAD:
            return BAD
        if len({header_key(v) for v in values}) != len(values):
            return self.fail(node, path, "lists the same header twice")
        return tuple(values)

    def named(self, key_node: Node, path: str, name: str, what: str) -> None:
        """Plan and upstream names share one syntax (role names are slugs)."""
        if not NAME_RE.fullmatch(name):
            self.fail(key_node, path, f"'{name}' is not a valid {what} name {_NAME_HINT}")

    # --- scopes -------------------------------------------------------------------------------

    def scope_catalogue(self, node: Node | None) -> dict[str, str] | None:
        """Top-level ``scopes: {NAME: description}``."""
        if is_null(node):
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

    def scope(self, node: Node, path: str) -> Any:
        value = self.string(node, path, pattern=SCOPE_RE,
                            what="a valid scope (like 'people:read', or ALL)")
        catalogue = self.catalogue
        if isinstance(value, str) and catalogue is not None and value != "ALL" \
                and value not in catalogue:
            return self.fail(node, path, f"scope '{value}' is not in the scope catalogue "
                                         f"(top-level 'scopes'){suggest(value, catalogue)}")
        return value

    def scopes(self, node: Node, path: str) -> Any:
        values = self.string_list(node, path, self.scope)
        return BAD if values is BAD else tuple(dict.fromkeys(values))

    # --- plans and roles ----------------------------------------------------------------------

    def plans(self, plans_node: Node | None, default_node: Node | None,
              ) -> tuple[dict[str, Plan], str]:
        """``plans`` (absent: one unlimited plan, ``default``) and ``default_plan`` (absent:
        the first plan)."""
        default = self.string(default_node, "default_plan") if default_node is not None else None
        plans: dict[str, Plan] = {}
        if plans_node is not None:
            entries = self.mapping(plans_node, "plans")
            for name, key_node, value_node in entries or []:
                path = f"plans.{name}"
                self.named(key_node, path, name, "plan")
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
        if default is BAD or default is None:
            return plans, next(iter(plans))
        if default not in plans:
            self.fail(default_node, "default_plan", f"unknown plan '{default}'"
                                                    f"{suggest(default, plans)} {known(plans)}")
            return plans, next(iter(plans))
        return plans, default

    def rate_limit(self, node: Node, path: str) -> Any:
        text = self.scalar(node, path)
        if text is None or text is BAD:
            return text
        if not isinstance(text, str):
            return self.fail(node, path, f"expected a rate like '5/s' or '300/m', got "
                                         f"{describe_value(text)}")
        try:
            return parse_rate_limit(text)
        except ValueError as exc:
            return self.fail(node, path, str(exc))

    def roles(self, node: Node | None) -> dict[str, tuple[str, ...]]:
        roles: dict[str, tuple[str, ...]] = {}
        for name, key_node, value_node in self.mapping(node, "roles") or []:
            path = f"roles.{name}"
            if not ROLE_NAME_RE.fullmatch(name):
                self.fail(key_node, path, f"'{name}' is not a valid role name ({ROLE_NAME_HINT})")
            scopes = self.scopes(value_node, path)
            if scopes is not BAD:
                roles[name] = scopes
        return roles

    # --- the identity sent upstream -----------------------------------------------------------

    def identity_headers(self, node: Node | None, keys: KeysConfig) -> IdentityHeaders:
        def identity(value_node: Node, sub: str) -> Any:
            name = self.header_name(value_node, sub)
            if name is BAD:
                return BAD
            if header_key(name) in RESERVED_HEADERS:
                return self.fail(value_node, sub, f"'{name}' is a header keygate manages itself")
            return name
        fields = ("workspace", "key_id", "scopes", "plan")
        headers = self.section(node, "identity_headers", IdentityHeaders,
                               {f: identity for f in fields})
        seen: dict[str, str] = {}
        credential = {header_key(h) for h in keys.headers}
        for f in fields:
            name = getattr(headers, f)
            where = child(node, f) or node
            if header_key(name) in seen:
                self.fail(where, f"identity_headers.{f}",
                          f"'{name}' is already used for identity_headers.{seen[header_key(name)]}")
            elif header_key(name) in credential:
                self.fail(where, f"identity_headers.{f}",
                          f"'{name}' is a credential header (keys.headers)")
            seen[header_key(name)] = f
        return headers

    def identity_signature(self, node: Node | None, keys: KeysConfig,
                           identity: IdentityHeaders) -> IdentitySignature | None:
        if is_null(node):
            return None

        def secret_env(value_node: Node, sub: str) -> Any:
            name = self.env_name(value_node, sub)
            if name is BAD:
                return BAD
            secrets = secrets_of(os.environ.get(name, ""))
            if not secrets:
                return self.fail(value_node, sub, f"environment variable {name} is not set (it "
                                                  "holds the signing secret)")
            if len(secrets[0]) < MIN_SIGNING_SECRET:  # the one keygate signs with
                return self.fail(value_node, sub, f"the signing secret in {name} is "
                                                  f"{len(secrets[0])} bytes; at least "
                                                  f"{MIN_SIGNING_SECRET} random bytes are needed "
                                                  "(openssl rand -hex 32)")
            return name

        def header(value_node: Node, sub: str) -> Any:
            name = self.header_name(value_node, sub)
            if name is BAD:
                return BAD
            taken = {header_key(h) for h in identity.names() + keys.headers}
            if header_key(name) in RESERVED_HEADERS or header_key(name) in taken:
                return self.fail(value_node, sub, f"'{name}' is already a header keygate sets, "
                                                  "strips or reads")
            return name
        signature = self.section(node, "identity_signature", IdentitySignature,
                                 {"secret_env": secret_env, "header": header},
                                 required={"secret_env": "(the environment variable holding "
                                                         "the secret)"}, secret_env="")
        if child(node, "header") is None:
            # the default name is the header keygate signs in as much as a written one: an
            # identity or credential header of that name left the upstream two of them (the
            # workspace id and the signature), and every signature check failed
            fields = ("workspace", "key_id", "scopes", "plan")
            users = {header_key(getattr(identity, f)): f"identity_headers.{f}"
                     for f in reversed(fields)}
            users.update({header_key(h): "keys.headers" for h in keys.headers
                          if header_key(h) not in users})
            user = users.get(header_key(signature.header))
            if user is not None:
                self.fail(node, "identity_signature.header",
                          f"'{signature.header}' (the default) is already a header keygate "
                          f"sets, strips or reads ({user}); set identity_signature.header to "
                          "another name")
        return signature
