"""Every error keygate answers with, and the one place that renders them.

    GatewayError                      status, code, message, headers
    ├── BadRequest (400)              bad_request, bad_path, key_in_url, ambiguous_key
    ├── Unauthorized (401)            missing_key, malformed_key, invalid_key, expired_key,
    │                                 revoked_key, disabled_key, unauthorized (admin)
    ├── Forbidden (403)               insufficient_scope, ip_not_allowed
    ├── NotFound (404)                no_route, not_found
    ├── MethodNotAllowed (405)        method_not_allowed (keygate's own endpoints)
    ├── RequestTimeout (408)          request_timeout (a request body stalled)
    ├── Conflict (409)                conflict, key_limit_reached
    ├── PayloadTooLarge (413)         body_too_large
    ├── TooManyRequests (429)         too_many_failures, rate_limited, quota_exceeded,
    │                                 key_quota_exceeded
    ├── NotImplemented_ (501)         not_implemented (a transfer coding other than chunked;
    │                                 the CONNECT method)
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

import asyncio
import json
from typing import Mapping

from aiohttp import web
from multidict import CIMultiDict

from .proxying.response import WholeResponse

REALM = 'Bearer realm="keygate"'


def _override(target: object, **given: object) -> None:
    """Set each given (not None) attribute on a class or an instance."""
    for name, value in given.items():
        if value is not None:
            setattr(target, name, value)


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    # Whether the upstream may have received the request before this error: only then does a
    # request count against the monthly quota (a request keygate refused itself never does).
    reached_upstream: bool = False

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None,
                          reached_upstream: bool | None = None, **kwargs) -> None:
        """Each kind of error names its status and default code in its class line."""
        super().__init_subclass__(**kwargs)
        _override(cls, status=status, code=code, reached_upstream=reached_upstream)

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: Mapping[str, str] | None = None,
                 reached_upstream: bool | None = None) -> None:
        """Everything about an error is said when it is made (none is changed after): a
        ``status`` of its own only where another component picked it (aiohttp's parser)."""
        super().__init__(message)
        self.message = message
        _override(self, status=status, code=code, reached_upstream=reached_upstream)
        self.headers: dict[str, str] = dict(headers or {})

    def body(self, request_id: str) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message,
                                     "request_id": request_id}}).encode()

    def response(self, request_id: str) -> web.Response:
        headers = CIMultiDict(self.headers)
        headers["X-Request-Id"] = request_id
        headers["Content-Type"] = "application/json"  # last, where content_type= put it
        return WholeResponse.of(self.status, self.body(request_id), headers)


class BadRequest(GatewayError, status=400, code="bad_request"):
    """Malformed on the wire or in its parts: ``bad_request``, ``bad_path``, ``key_in_url``,
    ``ambiguous_key``."""


class Unauthorized(GatewayError, status=401, code="unauthorized"):
    """No usable credential: ``missing_key``, ``malformed_key``, ``invalid_key``,
    ``expired_key``, ``revoked_key``, ``disabled_key``; ``unauthorized`` on the admin API."""


class Forbidden(GatewayError, status=403, code="insufficient_scope"):
    """A valid key that may not do this: ``insufficient_scope``, ``ip_not_allowed``."""


class NotFound(GatewayError, status=404, code="not_found"):
    """``no_route`` on the proxy, ``not_found`` on the admin API."""


class MethodNotAllowed(GatewayError, status=405, code="method_not_allowed"):
    """A method keygate's own endpoints do not take."""


class RequestTimeout(GatewayError, status=408, code="request_timeout"):
    """A request body stalled for ``server.timeouts.body``."""


class Conflict(GatewayError, status=409, code="conflict"):
    """The admin API's state forbids the change: ``conflict``, ``key_limit_reached``."""


class PayloadTooLarge(GatewayError, status=413, code="body_too_large"):
    """A body over ``server.max_body_bytes`` (see ``body_too_large``)."""


class TooManyRequests(GatewayError, status=429, code="rate_limited"):
    """``too_many_failures``, ``rate_limited``, ``quota_exceeded``, ``key_quota_exceeded``."""


class NotImplemented_(GatewayError, status=501, code="not_implemented"):
    """A transfer coding other than ``chunked``; the CONNECT method (no tunnels)."""


class BadGateway(GatewayError, status=502, code="upstream_unavailable",
                 reached_upstream=True):
    """The upstream failed; it may have received the request unless the connection could not
    be made (said when raised)."""


class ServiceUnavailable(GatewayError, status=503, code="store_unavailable"):
    """``store_unavailable``; ``overloaded`` from ``gateway.verify_queue``."""


class GatewayTimeout(GatewayError, status=504, code="upstream_timeout",
                     reached_upstream=True):
    """The upstream did not answer in time; it may have received the request unless it timed
    out connecting or waiting for a connection (said when raised)."""


class UploadSlotTimeout(GatewayTimeout, reached_upstream=False):
    """504 ``upstream_timeout`` to the client (SPEC), but keygate's own refusal, not the
    upstream's failure: an upload still streaming in found none of keygate's upload slots
    for it free within the upstream's timeout (slow clients hold them). Not counted in
    ``keygate_upstream_errors_total``."""


def shown(text: str, limit: int = 31) -> str:
    """A client's value as an error message may quote it: whole when shorter than a key's
    secret (32 characters), else its first 12 characters and an ellipsis, so a key pasted
    where it does not belong is never echoed back."""
    return text if len(text) <= limit else text[:12] + "…"


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


class BodyCutShort(BadRequest):
    """The request body will never arrive whole: the client closed the connection before
    sending all it declared, or the body's chunked framing broke. The client's doing, so a
    400, never keygate's 500 nor the upstream's 502, never counted (nothing whole reached the
    upstream), and the connection is closed after it (there is no next request to find)."""


def body_cut_short() -> BodyCutShort:
    return BodyCutShort("The request body did not arrive whole: the connection closed before "
                        "all of it was sent, or its chunked framing was broken.",
                        reached_upstream=False)


def client_closed(*, reached_upstream: bool = True) -> BadRequest:
    """The client closed its connection (or vanished) before the upstream's answer head came
    back: its upstream connection was closed (what nginx logs as 499). Nobody reads it: it is
    what the access log says (400 ``bad_request``, as for a client gone mid-body), and the
    request stays counted when it reached the upstream (``reached_upstream``: its whole
    request was sent; not when the client went before anything was)."""
    return BadRequest("The client closed the connection before the upstream answered.",
                      reached_upstream=reached_upstream)


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
    """The store is unreachable or failed; never shown to clients (they see 503).

    ``counted_late``: for a call that would have counted a request and was given up on
    while Redis may still have run it, a future that says whether it did (True: Redis
    counted the request after all), once its reply comes; cancelled if none ever does.
    None when nothing more can be learnt. ``rate_member``: that call's entry in the key's rate
    log, if it had a rate limit ("" otherwise), for taking back the rate it spent too.
    ``unsent``: the call never reached the store (no connection could be made), so it ran
    nothing there. ``answer``: the message of the 503 when it can say more than "nothing was
    changed or the change could not be confirmed" (an admin write taken back)."""
    counted_late: asyncio.Future[bool] | None = None
    rate_member: str = ""
    unsent: bool = False
    answer: str = ""


def describe(exc: BaseException) -> str:
    """An exception's class and message for a log line, e.g. ``ConnectionError: Error 111
    connecting to 127.0.0.1:6379. Connection refused.``. Redis and redis-py never put a password
    in an error message; a ``password=`` fragment is masked all the same."""
    import re
    text = str(exc).replace("\n", " ").strip()
    # redis-py's "No master found" lists each Sentinel as its client's whole repr (~1,500
    # characters each), which pushed the cause out of the line: the Sentinel's address instead
    text = re.sub(r"<redis\.[\w.]*Redis\(<.*?,host=([^,]*),port=(\d+),.*?\)>\)>\)>",
                  r"Sentinel \1:\2", text)
    text = re.sub(r"(password=)[^&\s]+", r"\1***", text, flags=re.I)
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


class ConfigError(Exception):
    """A config file is invalid. ``problems`` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
