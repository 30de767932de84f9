"""The process's own sections: ``server`` and ``admin`` (listeners, TLS), ``store`` and
``tracing``."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..redis_urls import check_store_url
from ..settings import (AdminConfig, ConfigWarning, ServerConfig, StoreConfig, Timeouts,
                        TLSConfig, TracingConfig)
from ..trust import as_network
from .nodes import BAD, Node, child, is_null, one_line
from .schema import SchemaReader

SERVICE_NAME_RE = re.compile(r"\S.{0,127}")
MAX_WORKERS = 1024  # server.workers, and serve --workers which overrides it
_OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


class EncryptedKey(ValueError):
    """The private key is encrypted with a pass phrase, which keygate has no setting for."""


def _no_pass_phrase() -> bytes:
    # Without a password argument OpenSSL prompts on the terminal for one: `config check`,
    # `serve` and every reload (the listener's context is built in the event loop) would wait
    # there for ever.
    raise EncryptedKey("the private key is encrypted with a pass phrase")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The TLS context of an HTTPS listener: the ``ssl`` module's server defaults, TLS 1.2 at
    least. Raises ``ssl.SSLError`` / ``OSError`` when the files are not a matching pair,
    ``EncryptedKey`` when the key needs a pass phrase."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file, password=_no_pass_phrase)
    return context


class ServiceSections(SchemaReader):
    """Listeners, the store and span export. ``client``: the file is read by a client of its
    admin listener (``load_admin_section``), which needs no private key."""

    def __init__(self, source: str, client: bool = False) -> None:
        super().__init__(source)
        self.client = client

    def host(self, node: Node, path: str) -> Any:
        """A listener's address: no name or address has a space or a control character (a
        stray newline or carriage return from an env file), which binding fails on at start."""
        value = self.string(node, path)
        if value is not BAD and value.startswith("[") and value.endswith("]"):
            # a URL's spelling of an IPv6 address: no listener can bind it as written
            return self.fail(node, path, f"'{value}' is an IPv6 address in a URL's brackets; "
                                         f"write it without them ('{value[1:-1]}')")
        if value is BAD or value.isprintable() and not any(c.isspace() for c in value):
            return value
        return self.fail(node, path, f"'{value}' is not a host name or IP address (it has a "
                                     "space or control character)")

    def port(self, node: Node, path: str) -> Any:
        return self.integer(node, path, minimum=1, maximum=65535)

    def server(self, node: Node | None) -> ServerConfig:
        return self.section(node, "server", ServerConfig, {
            "host": self.host,
            "port": self.port,
            "workers": lambda n, p: self.integer(n, p, minimum=1, maximum=MAX_WORKERS),
            "max_body_bytes": lambda n, p: self.integer(n, p, minimum=1),
            "trusted_proxies": self.trusted_proxies,
            "log_level": lambda n, p: self.string(
                n, p, choices=("debug", "info", "warning", "error")),
            "access_log": lambda n, p: self.string(n, p, choices=("json", "text", "off")),
            "metrics_workspace_labels": self.boolean,
            "timeouts": lambda n, p: self.section(n, p, Timeouts, {
                "header": self.seconds, "body": self.seconds, "idle": self.seconds}),
            "max_connections": lambda n, p: self.integer(n, p, minimum=1, maximum=1_000_000),
            "tls": self.tls,
            # an extension key (docs/websocket.md): one store round trip per key with tunnels
            # open, each time; an hour at most, or revocation would no longer reach them
            "websocket_recheck": lambda n, p: self.number(n, p, minimum=1, maximum=3600),
        })

    def admin(self, node: Node | None) -> AdminConfig:
        return self.section(node, "admin", AdminConfig, {
            "host": self.host, "port": self.port, "token_env": self.env_name, "tls": self.tls})

    def tls(self, node: Node, path: str) -> Any:
        """``{cert_file, key_file}``, both read and matched now: a renewal that left a key
        behind, or a file the gateway may not read, is a config problem, not a failed
        handshake later."""
        if is_null(node):
            return None
        entries = self.mapping(node, path, ("cert_file", "key_file"))
        if entries is None:
            return BAD
        given = {key: value_node for key, _, value_node in entries}
        if self.client:
            return self._client_tls(node, path, given)
        files: dict[str, str] = {}
        for name in ("cert_file", "key_file"):
            if name not in given:
                self.fail(node, f"{path}.{name}", "required (a PEM file)")
                continue
            file_name = self.string(given[name], f"{path}.{name}")
            if file_name is BAD:
                continue
            if not self.readable_file(given[name], f"{path}.{name}", file_name):
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
        except EncryptedKey:
            return self.fail(given["key_file"], f"{path}.key_file",
                             f"'{files['key_file']}' is encrypted with a pass phrase; keygate "
                             "reads an unencrypted PEM key (openssl pkey -in KEY -out NEW)")
        except (OSError, ValueError) as exc:
            return self.fail(node, path, f"cannot load the certificate: {exc}")
        return TLSConfig(files["cert_file"], files["key_file"])

    def _client_tls(self, node: Node, path: str, given: dict[str, Node]) -> Any:
        """``tls`` as a client of the listener reads it: the certificate file it pins, read
        (``gateway.cli.client.listener_contexts`` checks it is PEM); the key is not its to
        read (its user usually may not), and its absence is for serve to refuse."""
        if "cert_file" not in given:
            return self.fail(node, f"{path}.cert_file", "required (a PEM file)")
        cert_file = self.string(given["cert_file"], f"{path}.cert_file")
        if cert_file is BAD or not self.readable_file(given["cert_file"], f"{path}.cert_file",
                                                      cert_file):
            return BAD
        return TLSConfig(cert_file, "")

    def trusted_proxies(self, node: Node, path: str) -> Any:
        def network(child: Node, sub: str) -> Any:
            text = self.string(child, sub)
            if text is BAD:
                return BAD
            try:
                net = ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                return self.fail(child, sub, f"'{text}' is not an IP address or CIDR network "
                                             "(e.g. 10.0.0.0/8)")
            net = as_network(str(net))
            if net.prefixlen == 0:  # served as written, but every client is then a proxy
                self.warnings.append(ConfigWarning(one_line(
                    f"{self.source}:{child.start_mark.line + 1}: {sub}: warning: '{text}' "
                    f"trusts every IPv{net.version} peer: any client then names its own address in "
                    "X-Forwarded-For (the failure throttle, allowed_ips, the access log) and "
                    "passes X-Forwarded-*, X-Real-IP and the other headers kept from trusted "
                    "proxies to the upstream; list the balancers' addresses instead"),
                    ("trust-everyone", text.strip())))
            return text.strip()
        values = self.string_list(node, path, network)
        return BAD if values is BAD else tuple(values)

    def store(self, node: Node | None) -> StoreConfig:
        store = self.section(node, "store", StoreConfig, {
            "redis_url": self.redis_url,
            "data_dir": self.text,
            "on_store_error": lambda n, p: self.string(n, p, choices=("closed", "open")),
            "timeout": self.seconds,
        })
        if store.redis_url == "embedded" and not self.client:
            # what `serve` would stop on when it starts the store: said here, so that `config
            # check` (and a reload) refuse the file serve cannot start with (a relative data_dir
            # is read from the current directory, as serve reads it)
            from ..store.embedded import data_dir_problem
            if problem := data_dir_problem(store.data_dir):
                self.fail(child(node, "data_dir") or child(node, "redis_url") or node,
                          "store.data_dir", problem)
        return store

    def redis_url(self, node: Node, path: str) -> Any:
        # The URL may carry a password (often via ${ENV}): gateway.redis_urls' messages never
        # repeat it.
        url = self.string(node, path)
        if url is BAD or url == "embedded":
            return url
        try:
            check_store_url(url)
        except ValueError as exc:
            return self.fail(node, path, str(exc))
        return url

    def otlp_endpoint(self, node: Node, path: str) -> Any:
        url = self.string(node, path)
        if url is BAD:
            return BAD
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return self.fail(node, path, "must be an http:// or https:// URL of an OTLP/HTTP "
                                         "receiver, e.g. http://otel-collector:4318")
        return url

    def tracing(self, node: Node | None) -> TracingConfig | None:
        if is_null(node):
            return None
        try:
            installed = all(importlib.util.find_spec(m) is not None for m in _OTEL_MODULES)
        except ModuleNotFoundError:
            installed = False
        if not installed:
            self.fail(node, "tracing", "exporting spans needs OpenTelemetry: install "
                                       "keygate with the extra, pip install 'keygate[otel]'")
        return self.section(node, "tracing", TracingConfig, {
            "otlp_endpoint": self.otlp_endpoint,
            "service_name": lambda n, p: self.string(n, p, pattern=SERVICE_NAME_RE,
                                                     what="a service name (1-128 characters)"),
            "sample_ratio": self.ratio,
        }, required={"otlp_endpoint": "(the OTLP/HTTP receiver's URL)"}, otlp_endpoint="")
