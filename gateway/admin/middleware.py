"""Who may call the admin listener, and how every answer of it is shaped.

:func:`error_middleware` wraps every admin-listener handler: errors become SPEC's JSON body
(anything unexpected a generic 500, logged and never shown), every answer carries
``X-Request-Id``, and everything under ``/admin/`` is authenticated (:func:`identify`),
confined (:func:`confine`), checked for unknown query parameters and logged once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
import uuid
from typing import Awaitable, Callable

from aiohttp import web

from ..accesslog import TARGET_MAX, cut_target, mask_secret, mask_target
from ..config import Config
from ..proxying.server import EXPECTATION, answer_and_close, continue_if_expected
from ..errors import (BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound,
                      NotImplemented_, RequestTimeout, ServiceUnavailable, StoreError,
                      Unauthorized, body_cut_short, body_too_large, shown)
from ..store import WORKSPACE_ID_RE
from ..tokens import adoptable_request_id
from .api import QUERY_PARAMS, WORKSPACE_ADMIN_ROUTES
from .keyops import OPERATOR_ACTOR, Actor
from .throttle import OperatorThrottle
from .validate import check_query

log = logging.getLogger("keygate.admin")

_ADMIN_REALM = 'Bearer realm="keygate-admin"'
OPENAPI_PATH = "/admin/v1/openapi.json"
UNAUTHENTICATED = frozenset({OPENAPI_PATH})
"""Paths under /admin/ that need no operator token (SPEC: the OpenAPI document)."""

MAX_BODY = 1024 ** 2
"""The largest request body the admin API takes, in bytes (its JSON is small): the admin
app's ``client_max_size``; a body declared larger is refused from its head."""

ACTOR = web.RequestKey("actor", Actor)
"""Who the call acts as, set on the request once it is authenticated."""
OPERATOR_TOKEN = web.RequestKey("operator_token", str)
"""The operator token, set on the operator's requests alone: what their bodies may not hold
(``validate.refuse_operator_token``, checked as the handler parses the body)."""

KeyAuthenticator = Callable[[str, web.BaseRequest], Awaitable[Actor]]
"""Token → the acting workspace key: verified, not expired or revoked, holding ``keys:admin``
(the proxy pipeline's own authenticate + authorise, so the failure throttle, the verification
cache and the revision checks are the same ones). Raises the proxy's ``GatewayError``s."""

_TOKEN_SHAPE = re.compile(r"[a-z0-9]{1,10}_[A-Za-z0-9]{1,32}_[A-Za-z0-9]{50}")
"""Shaped like an API key (``<prefix>_<env>_<50 base62>``): checked as one, not as the operator
token. The pipeline then checks the prefix, environment and checksum in force. The console's
``looksLikeKey`` (console/app.js) holds the same pattern (then asks the API which it is)."""


STRONG_TOKEN_LENGTH = 32
"""An operator token shorter than this is reported weak at start (``secrets.token_urlsafe(24)``,
``keygate demo``'s, is 32 characters; the docs' ``token_urlsafe(32)`` is 43)."""
STRONG_TOKEN_DISTINCT = 8
"""Nor may it be made of fewer distinct characters (``aaaa...``, ``abab...``, ``012345...``
repeated): a random hex token of 32 characters has fewer than 8 in under one in a million."""


def operator_token_weakness(token: str) -> str | None:
    """Why ``token`` (the operator token, blanks around it ignored as the check ignores them)
    is easy to guess, or None. The reason never holds the token, nor its length."""
    token = token.strip()
    if len(token) < STRONG_TOKEN_LENGTH:
        return f"shorter than {STRONG_TOKEN_LENGTH} characters"
    if len(set(token)) < STRONG_TOKEN_DISTINCT:
        return f"made of fewer than {STRONG_TOKEN_DISTINCT} distinct characters"
    return None


def loggable_target(raw_path: str, prefix: str | tuple[str, ...], operator_token: str) -> str:
    """A raw admin request target fit for a log: API keys masked (``mask_target``) and so is
    the operator token, which a script may paste into the URL (``?token=...``): where it shows
    as sent it is replaced by ``***``; a path or query that holds it only once percent-decoded
    is withheld whole. Then cut to ``ADMIN_TARGET_MAX`` bytes (``accesslog.cut_target``):
    the JSON line holds it twice (its message and ``path``) and must fit in one atomic
    write to a stderr pipe the workers share.

    Looked for in the whole target first (a token may hold a ``?``), and decoded both ways: a
    ``+`` is a plus in a path and a space in a query, and a reader decodes either way."""
    return cut_target(_masked(raw_path, prefix, operator_token), limit=ADMIN_TARGET_MAX)


ADMIN_TARGET_MAX = TARGET_MAX // 2  # the admin line writes its target twice


def _masked(raw_path: str, prefix: str | tuple[str, ...], operator_token: str) -> str:
    return mask_secret(mask_target(raw_path, prefix), operator_token.strip())


def request_id_of(request: web.BaseRequest, operator_token: str = "") -> str:
    """The client's ``X-Request-Id`` when it is a sane token (never one holding the operator
    token), else a fresh one."""
    rid = request.headers.get("X-Request-Id")
    if adoptable_request_id(rid, operator_token.strip()):
        return rid
    return uuid.uuid4().hex


def check_operator(request: web.BaseRequest, config: Config, expected: str) -> None:
    """The operator token (read from ``config.admin.token_env`` when the app is made), compared
    in constant time. With the variable unset or empty every call is refused: the admin API
    never runs open."""
    if not expected.strip():
        raise Unauthorized(f"The admin API is disabled: the environment variable "
                           f"{config.admin.token_env} holding the operator token is not set "
                           "on the gateway.", headers={"WWW-Authenticate": _ADMIN_REALM})
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("Send the operator token as 'Authorization: Bearer <token>'.",
                           headers={"WWW-Authenticate": _ADMIN_REALM})
    # aiohttp decodes header bytes with surrogateescape: encode the same way (a strict encode
    # of a non-UTF-8 header would raise); both sides without surrounding blanks (a token file
    # written on Windows leaves a '\r' in the variable).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given_bytes, expected.strip().encode("utf-8", "surrogateescape")):
        raise Unauthorized("The operator token is not valid.",
                           headers={"WWW-Authenticate": _ADMIN_REALM + ', error="invalid_token"'})


async def identify(request: web.BaseRequest, config: Config, expected: str,
                   authenticate_key: KeyAuthenticator | None,
                   throttle: OperatorThrottle | None = None, client: str = "") -> Actor:
    """The operator, or a workspace admin key; 401 ``unauthorized`` for anything else, 400
    ``bad_request`` for more than one ``Authorization`` (which one counts is not for keygate
    to guess: a proxy in front may judge another, as the proxy listener's ``ambiguous_key``).

    With ``throttle``, a token that may be the operator's is compared only once ``client``
    (the address the failure throttle counts) is admitted, and a wrong one is counted: over
    ``keys.failures.per_ip`` it is 429 ``too_many_failures``, the right token too (see
    gateway/admin/throttle.py). A token shaped like an API key goes to ``authenticate_key``,
    the proxy pipeline's steps, with its own failure throttle."""
    if len(request.headers.getall("Authorization", ())) > 1:
        raise BadRequest("Send one Authorization header; this request has more than one.",
                         headers={"WWW-Authenticate": _ADMIN_REALM + ', error="invalid_request"'})
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given, operator_token = given.strip(), expected.strip()
    bearer = scheme.lower() == "bearer"
    key_shaped = authenticate_key is not None and bearer and _TOKEN_SHAPE.fullmatch(given)
    # a key of any prefix (a reload may change it), that cannot be the operator token
    if key_shaped and not _TOKEN_SHAPE.fullmatch(operator_token):
        return await _as_key(authenticate_key, given, request)
    if not operator_token or not bearer or not given:
        check_operator(request, config, expected)  # 401, and no guess to count
    if throttle is not None:
        await throttle.admit(client)  # before the comparison: 429 whatever the token
    if hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                           operator_token.encode("utf-8", "surrogateescape")):
        return OPERATOR_ACTOR
    if key_shaped:  # an operator token shaped like a key (the admission above was for it):
        # the guess was compared with it, so whatever the key path answers but a key, it is
        # counted here too (the key path's own count does not stop the comparison above)
        return await _as_key(authenticate_key, given, request, throttle, client)
    if throttle is not None:
        await throttle.failed(client)
    raise Unauthorized("The operator token is not valid.",
                       headers={"WWW-Authenticate": _ADMIN_REALM + ', error="invalid_token"'})


async def _as_key(authenticate_key: KeyAuthenticator, token: str, request: web.BaseRequest,
                  count: OperatorThrottle | None = None, client: str = "") -> Actor:
    """``token`` as a workspace admin key; with ``count``, a refusal of any kind is counted
    as a wrong operator token of ``client`` too (the token was compared with the operator's)."""
    try:
        return await authenticate_key(token, request)
    except Unauthorized as exc:  # malformed/invalid/expired/revoked: the admin API's code
        if count is not None:
            await count.failed(client)
        raise Unauthorized(exc.message, headers={
            "WWW-Authenticate": _ADMIN_REALM + ', error="invalid_token"'}) from None
    except GatewayError:  # the key path's own 429 or a 503: a wrong operator token all the same
        if count is not None:
            await count.failed(client)
        raise


def confine(request: web.Request, actor: Actor) -> None:
    """A workspace admin reaches its own workspace's listed routes only. Another workspace
    reads as 404 exactly like one that does not exist (existence is not disclosed); an
    operator-only route of its own workspace (or no workspace) is 403."""
    if actor.is_operator:
        return
    resource = getattr(request.match_info.route, "resource", None)
    if resource is None:  # no such route (404) or method (405): the router answers
        return
    ws = request.match_info.get("ws")
    if ws is not None and ws != actor.workspace:
        shown_ws = ws if WORKSPACE_ID_RE.fullmatch(ws) else shown(ws)  # as the store says it
        raise NotFound(f"There is no workspace '{shown_ws}'.")
    method = "GET" if request.method == "HEAD" else request.method
    if (method, resource.canonical) not in WORKSPACE_ADMIN_ROUTES:
        raise Forbidden("Only the operator token may use this endpoint; a workspace key "
                        "manages the keys of its own workspace.")


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("No such admin endpoint.")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(f"Method not allowed here; use {allow or 'another method'}.",
                                headers={"Allow": allow} if allow else None)
    if exc.status == 413:
        return body_too_large(MAX_BODY)
    # any other refusal of aiohttp's (a malformed request) keeps the status aiohttp chose
    return GatewayError(exc.reason or "Request refused.", code="bad_request", status=exc.status)


async def read_whole_body(request: web.BaseRequest, within: float) -> bytes:
    """A declared body (small JSON, at most aiohttp's 1 MiB), read whole: it must all be here
    within ``within`` (``server.timeouts.body``), else 408 ``request_timeout``, as a stalled
    body is on the way to an upstream. Read once, it is kept: a later ``read()`` or ``json()``
    takes it from memory.

    A body with a ``Content-Encoding`` is a 400: JSON is taken as sent (the listeners do not
    decode bodies), so a compressed one would only read as "not valid JSON"; this says why."""
    codings = [c.strip().lower() for value in request.headers.getall("Content-Encoding", ())
               for c in value.split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise BadRequest("The request body has a Content-Encoding; send the JSON uncompressed, "
                         "without one.")
    try:
        async with asyncio.timeout(within):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {within:g} seconds.") \
            from None
    except ConnectionError:  # the client ended the connection mid-body (aiohttp's "Connection
        raise body_cut_short() from None  # lost"): not keygate's 500


def error_middleware(config: Config, *, authenticate: bool = True,
                     authenticate_key: KeyAuthenticator | None = None,
                     client_address: Callable[[web.BaseRequest], str] | None = None,
                     throttle: OperatorThrottle | None = None,
                     current: Callable[[], Config] | None = None,
                     key_prefixes: Callable[[], str | tuple[str, ...]] | None = None
                     ) -> Callable:
    """Errors → SPEC's JSON body; anything unexpected → a generic 500 (logged, never shown);
    ``X-Request-Id`` on every response; auth for everything under ``/admin/``: the operator
    token, or (with ``authenticate_key``) a workspace admin key, confined by :func:`confine`;
    with ``throttle``, wrong operator tokens are bounded per connection peer (never a
    forwarded address: ``client_address`` is what the log names).

    The operator token is read from the environment here, once: changing the variable takes a
    restart (as with every other setting). ``current``: the config in force, which a reload
    swaps (``config`` without it); the log masks keys of its ``keys.prefix``, or of every
    prefix ``key_prefixes`` gives (those the gateway has used since start)."""
    expected = os.environ.get(config.admin.token_env, "")
    if current is None:
        def current() -> Config:
            return config
    if key_prefixes is None:
        def key_prefixes() -> str | tuple[str, ...]:
            return current().keys.prefix

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        rid = request_id_of(request, expected)
        started, actor = time.perf_counter(), "-"
        # a client that waits for 100 Continue before it sends its body (AdminRunner leaves
        # that answer to this middleware: it is sent once the caller is admitted). Any
        # expectation counts: one refused 417 below (a list holding 100-continue, two fields,
        # one unknown, an empty one) may have been met with a 100 by a proxy in front, the body
        # held back: an Expect field sent, whatever it holds, as the proxy listener judges it
        held_back = request.body_exists and EXPECTATION in request
        try:
            if request.method == "CONNECT":
                # aiohttp's parser ends a CONNECT at its head and, once it is answered, reads
                # what follows (the body it declared) as the next request: refused, and the
                # connection closed unread (below)
                raise NotImplemented_("CONNECT is not supported: keygate opens no tunnels.")
            if request.get(EXPECTATION, "").strip().lower() not in ("", "100-continue"):
                raise GatewayError("The only expectation the admin API meets is "
                                   "'Expect: 100-continue'.", code="bad_request", status=417)
            if authenticate and request.path.startswith("/admin/") \
                    and request.path not in UNAUTHENTICATED:
                # the connection's peer, not the client server.trusted_proxies reads: a
                # trusted address (127.0.0.1 for an nginx on the host) reaching the listener
                # itself would get a fresh budget per forged X-Forwarded-For
                caller = await identify(request, config, expected, authenticate_key,
                                        throttle, request.remote or "unknown")
                # "operator" or the acting key's id, for the log: a key refused by confine
                # (an operator-only route, another workspace) is logged as itself too
                actor = caller.key_id
                confine(request, caller)
                request[ACTOR] = caller
                resource = getattr(request.match_info.route, "resource", None)
                if resource is not None:  # HEAD is GET without the body: its parameters
                    method = "GET" if request.method == "HEAD" else request.method
                    check_query(request.query, QUERY_PARAMS.get(
                        (method, getattr(resource, "canonical", "")), ()))
                if request.body_exists:  # before the handler, whose reads then wait on nothing
                    if (request.content_length or 0) > MAX_BODY:  # not asked for, nor read
                        raise body_too_large(MAX_BODY)
                    if held_back:
                        await continue_if_expected(request)
                        held_back = False
                    await read_whole_body(request, config.server.timeouts.body)
                if caller.is_operator:  # the handler's parse_body refuses a body holding it
                    request[OPERATOR_TOKEN] = expected
            response = await handler(request)
        except GatewayError as err:
            response = err.response(rid)
        except StoreError as exc:
            log.warning("store unavailable during %s %s (request %s): %s", request.method,
                        loggable_target(request.raw_path, key_prefixes(), expected), rid,
                        exc)
            response = ServiceUnavailable(
                exc.answer or "The key store is unavailable; nothing was changed or the "
                "change could not be confirmed.").response(rid)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _from_http_exception(exc).response(rid)
        except Exception:
            log.exception("unexpected error in %s %s (request %s)", request.method,
                          loggable_target(request.raw_path, key_prefixes(), expected), rid)
            response = GatewayError("An internal error occurred.").response(rid)
        response.headers["X-Request-Id"] = rid
        if response.status == 413 or held_back and not request.content.is_eof():
            # the rest of a body over the limit is not worth reading; and a body held back for
            # a 100 Continue never sent may follow or not (RFC 9110 10.1.1): the next bytes
            # are never read as a request (nor as that body). Closed the lingering way.
            response.force_close()
        if request.path.startswith("/admin/") and request.path not in UNAUTHENTICATED:
            # a new key's token, key listings, usage: no browser, proxy or CDN keeps a copy
            response.headers.setdefault("Cache-Control", "no-store")
            log_admin_call(request, response.status, rid, actor, time.perf_counter() - started,
                           key_prefixes(),
                           client_address(request) if client_address else request.remote,
                           operator_token=expected)
        if response.status in (408, 501):  # the rest is not worth waiting for, or not ours
            response.force_close()
            await answer_and_close(request, response)
        return response

    return middleware


def log_admin_call(request: web.Request, status: int, rid: str, actor: str,
                   elapsed: float, prefix: str | tuple[str, ...], client: str | None,
                   operator_token: str = "") -> None:
    """One line per admin API call: who (``operator``, or ``-`` when the token was refused),
    what, the answer, from where (in the message too: a text log has nothing else). Never a
    header value, so never a token; keys and the operator token in the target are masked
    (:func:`loggable_target`)."""
    target = loggable_target(request.raw_path, prefix, operator_token)
    log.info("admin %s %s %d %s %s", request.method, target, status, actor, client or "-",
             extra={"request_id": rid, "method": request.method, "path": target,
                    "status": status, "actor": actor, "client": client,
                    "duration_ms": round(elapsed * 1000, 3)})
