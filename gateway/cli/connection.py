"""Which admin API a remote command talks to, and with which operator token.

The admin URL is the first of ``--admin-url``, ``--config``'s admin listener,
``$KEYGATE_ADMIN_URL`` and :data:`DEFAULT_ADMIN_URL`; the token is the config's ``token_env``
variable (with ``--config``), else ``$KEYGATE_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse

from .client import CliError

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


def admin_url(text: str) -> str:
    """The admin URL as given, if it is an http(s) URL with a host (and a port, a path
    prefix), no user or password, query or fragment; else ValueError, whose message never
    repeats a password (what precedes the last '@' is masked before any is built)."""
    shown = _masked(text)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # "Invalid IPv6 URL", a netloc NFKC changes: its message repeats it
        raise ValueError(f"'{shown}' is not an http(s) URL with a host") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'{shown}' is not an http(s) URL")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"{shown!r} holds blanks or control characters")
    if "@" in parts.netloc:
        raise ValueError(f"'{shown}' names a user or password; the admin API takes the "
                         "operator token (KEYGATE_ADMIN_TOKEN), not credentials in its URL")
    if not text.isascii():
        # urllib sends neither: a UnicodeEncodeError in the request line or Host header
        raise ValueError(f"'{shown}' is not ASCII; give the host in its ASCII form "
                         "(xn--... for an international name) and percent-encode the path")
    host_problem = _host_problem(parts.hostname or "")
    if host_problem:
        raise ValueError(f"'{shown}' {host_problem}")
    if parts.query or parts.fragment or text.rstrip().endswith(("?", "#")):
        raise ValueError(f"'{shown}' has a query or fragment; give the admin listener's "
                         "address only, e.g. http://127.0.0.1:8081")
    try:
        parts.port  # a port that is not a number from 0 to 65535 raises ValueError here
    except ValueError:
        raise ValueError(f"'{shown}' does not have a valid port (a number from 1 to 65535)") \
            from None
    if parts.port == 0:
        raise ValueError(f"'{shown}' does not have a valid port (a number from 1 to 65535)")
    return text


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _masked(text: str) -> str:
    """``text`` with everything up to its last '@' (a user and password, wherever urlsplit
    would put them: ``admin:pw@host``, ``http:/admin:pw@host``) shown as ``***``; a leading
    ``scheme://`` is kept."""
    if "@" not in text:
        return text
    scheme = _SCHEME.match(text)
    return (scheme.group() if scheme else "") + "***@" + text.rpartition("@")[2]


def _host_problem(host: str) -> str | None:
    """What keeps ``host`` (a URL's, brackets taken off) from being looked up, or None: a
    name's labels are 1 to 63 characters, 253 in all (the idna codec refuses the rest in
    getaddrinfo with a UnicodeError)."""
    if not host:
        return "has no host"
    if ":" in host:  # an IPv6 address, which urlsplit found between brackets
        return None
    name = host[:-1] if host.endswith(".") else host  # one trailing dot: the root
    if len(name) > 253:
        return "has a host name over 253 characters"
    if any(not 1 <= len(label) <= 63 for label in name.split(".")):
        return "has a host name with an empty label or one over 63 characters"
    return None


def connection(args: argparse.Namespace) -> tuple[str, str | None, str | None, str]:
    """(admin URL, token, certificate file, the variable the token came from): --admin-url,
    then --config, then the environment, then the default; the token from the config's
    token_env when --config is given; the config's ``admin.tls.cert_file`` when the URL is
    the config's (the listener serving it is trusted with it, ``client.listener_contexts``),
    else None."""
    url = token = cert_file = None
    source = "KEYGATE_ADMIN_TOKEN"
    if getattr(args, "config", None):
        url, token, cert_file, token_env = admin_from_config(args.config)
        if token:
            source = token_env
    token = token or os.environ.get("KEYGATE_ADMIN_TOKEN")
    if args.admin_url:
        url, cert_file = args.admin_url, None
    url = url or os.environ.get("KEYGATE_ADMIN_URL") or DEFAULT_ADMIN_URL
    return url, token, cert_file, source


def admin_from_config(path: str) -> tuple[str, str | None, str | None, str]:
    """(admin URL, operator token, certificate file, ``admin.token_env``) for the gateway a
    config file describes: its admin listener's address (a wildcard host is reached on
    loopback), the token from the variable its ``admin.token_env`` names, and with
    ``admin.tls`` its certificate file.

    Only the admin section is read, and of its ``tls`` only ``cert_file``
    (``load_admin_section``): the CLI's user usually may not read the listener's private key,
    and a file with problems elsewhere (say, one ``keygate reload`` is about to refuse) still
    names the admin listener."""
    from ..config import load_admin_section
    from ..errors import ConfigError
    try:
        admin = load_admin_section(path)
    except ConfigError as exc:
        raise CliError("\n".join(exc.problems)) from None
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(admin.host, admin.host)
    if ":" in host:
        host = f"[{host}]"
    tls = admin.tls
    return (f"{'https' if tls else 'http'}://{host}:{admin.port}",
            os.environ.get(admin.token_env), tls.cert_file if tls else None, admin.token_env)
