"""Every error keygate answers with, and the one place that renders them.

    GatewayError                      status, code, message, headers
    ├── BadRequest (400)              bad_request, bad_path, key_in_url, ambiguous_key
    ├── Unauthorized (401)            missing_key, malformed_key, invalid_key, expired_key,
    │                                 revoked_key, unauthorized (admin)
    ├── Forbidden (403)               insufficient_scope
    ├── NotFound (404)                no_route, not_found
    ├── MethodNotAllowed (405)        method_not_allowed (keygate's own endpoints)
    ├── RequestTimeout (408)          request_timeout (a request body stalled)
    ├── Conflict (409)                conflict, key_limit_reached
    ├── PayloadTooLarge (413)         body_too_large
    ├── TooManyRequests (429)         too_many_failures, rate_limited, quota_exceeded
    ├── NotImplemented_ (501)         not_implemented (a transfer coding other than chunked)
    ├── BadGateway (502)              upstream_unavailable
    ├── ServiceUnavailable (503)      store_unavailable, overloaded (gateway.verify_queue)
    └── GatewayTimeout (504)          upstream_timeout

    StoreError                        the store could not be reached or answered garbage;
                                      raised by gateway.store, turned into 503 by the pipeline.
    ConfigError                       a config file is wrong; carries every problem found.

Error bodies are always ``{"error": {"code", "message", "request_id"}}`` and never hold stack
traces, store errors, hashes or tokens.
"""

from __future__ import annotations

import json
from typing import Mapping

from aiohttp import web

REALM = 'Bearer realm="keygate"'


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    # Whether the upstream may have received the request before this error: only then does a
    # request count against the monthly quota (a request keygate refused itself never does).
    reached_upstream: bool = False

    def __init__(self, message: str, *, code: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 reached_upstream: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reached_upstream is not None:
            self.reached_upstream = reached_upstream
        self.headers: dict[str, str] = dict(headers or {})

    def body(self, request_id: str) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message,
                                     "request_id": request_id}}).encode()

    def response(self, request_id: str) -> web.Response:
        headers = dict(self.headers)
        headers["X-Request-Id"] = request_id
        return web.Response(status=self.status, body=self.body(request_id),
                            content_type="application/json", headers=headers)


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class Forbidden(GatewayError):
    status, code = 403, "insufficient_scope"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(GatewayError):
    status, code = 408, "request_timeout"


class Conflict(GatewayError):
    status, code = 409, "conflict"


class PayloadTooLarge(GatewayError):
    status, code = 413, "body_too_large"


class TooManyRequests(GatewayError):
    status, code = 429, "rate_limited"


class NotImplemented_(GatewayError):
    status, code = 501, "not_implemented"


class BadGateway(GatewayError):
    status, code = 502, "upstream_unavailable"
    reached_upstream = True   # unless the connection could not be made (said when raised)


class ServiceUnavailable(GatewayError):
    status, code = 503, "store_unavailable"


class GatewayTimeout(GatewayError):
    status, code = 504, "upstream_timeout"
    reached_upstream = True   # unless it timed out connecting or waiting for a connection


def shown(text: str, limit: int = 31) -> str:
    """A client's value as an error message may quote it: whole when shorter than a key's
    secret (32 characters), else its first 12 characters and an ellipsis, so a key pasted
    where it does not belong is never echoed back."""
    return text if len(text) <= limit else text[:12] + "…"


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


# --- the proxy's RFC 6750 401/400/403 flavours -------------------------------------------------

def missing_key() -> Unauthorized:
    return Unauthorized("No API key was sent. Send it as 'Authorization: Bearer <key>'.",
                        code="missing_key", headers={"WWW-Authenticate": REALM})


def invalid_token(code: str, message: str) -> Unauthorized:
    """malformed_key, invalid_key, expired_key, revoked_key."""
    return Unauthorized(message, code=code,
                        headers={"WWW-Authenticate": REALM + ', error="invalid_token"'})


def ambiguous_key(message: str) -> BadRequest:
    return BadRequest(message, code="ambiguous_key",
                      headers={"WWW-Authenticate": REALM + ', error="invalid_request"'})


def insufficient_scope(needed: str) -> Forbidden:
    return Forbidden(f"This key lacks the scope '{needed}' that this route requires.",
                     headers={"WWW-Authenticate":
                              REALM + f', error="insufficient_scope", scope="{needed}"'})


class StoreError(Exception):
    """The store is unreachable or failed; never shown to clients (they see 503)."""


def describe(exc: BaseException) -> str:
    """An exception's class and message for a log line, e.g. ``ConnectionError: Error 111
    connecting to 127.0.0.1:6379. Connection refused.``. Redis and redis-py never put a password
    in an error message; a ``password=`` fragment is masked all the same."""
    import re
    text = str(exc).replace("\n", " ").strip()
    text = re.sub(r"(password=)[^&\s]+", r"\1***", text, flags=re.I)
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


class ConfigError(Exception):
    """A config file is invalid. ``problems`` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
