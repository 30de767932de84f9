"""Signed identity: an HMAC the upstream can check, so it trusts keygate and not the network.

With ``identity_signature: {secret_env: NAME}`` every forwarded request carries (default header
``X-Keygate-Signature``)::

    t=<unix seconds>,v1=<hex HMAC-SHA256(secret, message)>

    message = t "\\n" method "\\n" target "\\n" request_id "\\n" workspace "\\n" key_id
              "\\n" scopes "\\n" plan                                    (UTF-8)

``target`` is the path and query exactly as forwarded (the upstream's own request line),
``request_id`` the forwarded ``X-Request-Id``, and the identity fields the values of the
identity headers as forwarded (``scopes`` space-separated, as in ``X-Api-Scopes``); a public
route signs them as empty strings.

The secret may be a comma-separated list, so it can be rotated without downtime: keygate signs
with the first, ``verify`` accepts any. Roll out ``new,old`` to the upstreams, then to keygate,
then drop ``old``.

This module has no dependency beyond the standard library: an upstream can vendor it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Iterable, Mapping

DEFAULT_HEADER = "X-Keygate-Signature"
DEFAULT_IDENTITY_HEADERS = ("X-Workspace-Id", "X-Api-Key-Id", "X-Api-Scopes", "X-Workspace-Plan")


def secrets_of(secret: str | bytes | Iterable[str | bytes]) -> list[bytes]:
    """The secrets a setting names: a comma-separated string (blanks ignored) or a list."""
    if isinstance(secret, (str, bytes)):
        parts: Iterable[str | bytes] = (secret.split(b",") if isinstance(secret, bytes)
                                        else secret.split(","))
    else:
        parts = secret
    out = []
    for part in parts:
        part = part.strip()
        if part:
            out.append(part.encode("utf-8") if isinstance(part, str) else part)
    return out


def message(t: int | str, method: str, target: str, request_id: str, workspace: str,
            key_id: str, scopes: str, plan: str) -> bytes:
    """The exact bytes that are signed."""
    return "\n".join((str(t), method, target, request_id, workspace, key_id, scopes,
                      plan)).encode("utf-8", "surrogateescape")


def sign(secret: str | bytes, method: str, target: str, request_id: str, workspace: str = "",
         key_id: str = "", scopes: str = "", plan: str = "", *, t: int | None = None) -> str:
    """The header value ``t=...,v1=...``, signed with ``secret`` (the first of a list)."""
    keys = secrets_of(secret)
    if not keys:
        raise ValueError("no signing secret")
    t = int(time.time()) if t is None else int(t)
    digest = hmac.new(keys[0], message(t, method, target, request_id, workspace, key_id,
                                       scopes, plan), hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive) in a multidict or a plain mapping."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        try:
            return list(getall(name, ()))
        except TypeError:
            pass
    lname = name.lower()
    return [v for k, v in headers.items() if k.lower() == lname]


def _one(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value; ``""`` when absent; None when repeated (which never verifies: an
    application reading the other copy would act on a value that was not signed)."""
    values = _all(headers, name)
    if len(values) > 1:
        return None
    return values[0] if values else ""


def parse(value: str) -> tuple[int, list[str]] | None:
    """``(t, [v1 digests])`` from a header value, or None when it is not well formed."""
    t: int | None = None
    digests: list[str] = []
    for item in value.split(","):
        name, eq, v = item.strip().partition("=")
        if not eq:
            return None
        if not v.isascii():  # keygate writes ASCII only; str.isdigit() takes '²' and '١'
            return None
        if name == "t":
            if t is not None or not v.isdigit() or len(v) > 12:
                return None
            t = int(v)
        elif name == "v1":
            digests.append(v)
    if t is None or not digests:
        return None
    return t, digests


def verify(headers: Mapping[str, str], method: str, target: str,
           secret: str | bytes | Iterable[str | bytes], max_age: float = 300, *,
           header: str = DEFAULT_HEADER,
           identity_headers: tuple[str, str, str, str] = DEFAULT_IDENTITY_HEADERS,
           request_id_header: str = "X-Request-Id", now: float | None = None) -> bool:
    """True when ``headers`` carry a valid keygate signature for this request.

    ``headers`` is the request's header mapping (aiohttp's ``request.headers``, Starlette's,
    Flask's, or a plain dict: names are matched case-insensitively); ``method`` and ``target``
    (path and query exactly as the request line had it, percent-encoding untouched: e.g.
    ``request.raw_path`` in aiohttp, ``request.environ["RAW_URI"]`` in Flask under gunicorn or
    werkzeug's server, ``REQUEST_URI`` under uWSGI; not Flask's ``request.full_path``, which is
    percent-decoded and ends a path without a query in ``?``) come from the request line. ``secret`` is the shared secret, or a comma-separated list / list of them.

    False when the header is missing or malformed, older than ``max_age`` seconds (or more than
    ``max_age`` in the future: clocks drift both ways), signed with none of the secrets, or
    when any signed header is repeated. Comparison is constant-time."""
    value = _one(headers, header)
    if not value:
        return False
    parsed = parse(value)
    if parsed is None:
        return False
    t, digests = parsed
    now = time.time() if now is None else now
    if abs(now - t) > max_age:
        return False
    fields = [_one(headers, request_id_header)]
    fields.extend(_one(headers, name) for name in identity_headers)
    if any(f is None for f in fields):
        return False
    signed = message(t, method, target, *fields)  # type: ignore[arg-type]
    ok = False
    for key in secrets_of(secret):
        expected = hmac.new(key, signed, hashlib.sha256).hexdigest().encode()
        for digest in digests:
            # no early exit: constant time; ASCII (parse made sure) as bytes
            ok |= hmac.compare_digest(expected, digest.encode("ascii"))
    return ok
