"""Workspace self-service on the proxy listener: ``/_keygate/v1/keys...`` for a key holding
``keys:admin`` (the pipeline checked that).

It serves the rows of the admin API's table under ``/admin/v1/workspaces/{ws}/keys`` that a
workspace admin may call, with ``{ws}`` fixed to the acting key's own workspace and the key's
own scopes and expiry as the bound (:class:`keyops.KeyOps`): no second router, so the two
listeners cannot drift apart. Raises ``GatewayError``s; the pipeline renders them.
"""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..errors import MethodNotAllowed, NotFound, PayloadTooLarge
from ..models import Principal
from ..proxying.server import continue_if_expected
from ..store import Store
from .api import KEYS, ROUTES, Call, Endpoint
from .keyops import Actor
from .middleware import read_whole_body
from .validate import check_query

SELF_SERVICE_PREFIX = "/_keygate/v1/keys"

SELF_SERVICE_ROUTES: tuple[tuple[Endpoint, tuple[str, ...]], ...] = tuple(
    (e, tuple(e.path[len(KEYS):].split("/")[1:]))   # the path's segments after the prefix
    for e in ROUTES if e.workspace_admin and (e.path == KEYS or e.path.startswith(KEYS + "/")))
"""The table rows self-service serves, with their path segments below the prefix."""


def segments(rest: str) -> list[str] | None:
    """The raw segments of the path after the prefix (``rest``), as sent: an empty one (a
    trailing slash) matches no endpoint, as on the admin listener's router and in the OpenAPI
    document. None when ``rest`` is not below the prefix (``/_keygate/v1/keysX``)."""
    if rest and not rest.startswith("/"):
        return None
    return rest[1:].split("/") if rest else []


def _match(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    """The ``{name}`` parameters when ``parts`` (raw, undecoded segments) fit ``pattern``."""
    if len(pattern) != len(parts):
        return None
    params = {}
    for want, part in zip(pattern, parts):
        if want.startswith("{"):
            params[want.strip("{}")] = part
        elif want != part:
            return None
    return params


async def handle_self_service(request: web.BaseRequest, principal: Principal, store: Store,
                       config: Config) -> web.Response:
    """One ``/_keygate/v1/keys...`` call: 404 for a path the table does not have, 405 (with
    ``Allow``) for a method it does not take there (HEAD is GET without the body), 400 for a
    query parameter it does not take, else the table's handler, acting as the key."""
    path = request.rel_url.raw_path
    rest = path[len(SELF_SERVICE_PREFIX):] if path.startswith(SELF_SERVICE_PREFIX) else None
    parts = None if rest is None else segments(rest)
    if parts is None:
        raise NotFound("No such endpoint.")
    routes = [(e, params) for e, pattern in SELF_SERVICE_ROUTES
              if "" not in parts and (params := _match(pattern, parts)) is not None]
    if not routes:
        raise NotFound("No such endpoint.")
    acting = await store.require_key(principal.workspace, principal.key_id)
    method = "GET" if request.method == "HEAD" else request.method  # as the admin listener
    chosen = next(((e, params) for e, params in routes if e.method == method), None)
    if chosen is None:  # before the query: as the admin listener's router, 405 comes first
        methods = [e.method for e, _ in routes]
        allow = [m for e in methods for m in (("GET", "HEAD") if e == "GET" else (e,))]
        raise MethodNotAllowed(f"Use {' or '.join(methods)} here.",
                               headers={"Allow": ", ".join(allow)})
    check_query(request.query, chosen[0].query)

    async def body() -> bytes:
        if (request.content_length or 0) > request.client_max_size:  # known from the head:
            raise PayloadTooLarge("The request body is too large for a key endpoint.")  # not
        if request.body_exists:  # asked for; else the wait below is a 408 for a body never
            await continue_if_expected(request)  # asked for (a client gone: body_cut_short)
        try:  # aiohttp caps it (1 MiB) with an HTTPException the pipeline does not render
            return await read_whole_body(request, config.server.timeouts.body)
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge("The request body is too large for a key endpoint.") from None

    endpoint, params = chosen
    # the rev its scopes were judged at (the pipeline hands on the cached key as the principal)
    actor = Actor(principal.key_id, principal.workspace, principal.scopes, acting.expires_at,
                  getattr(principal, "rev", acting.rev))
    response = await endpoint.handler(Call(store, config, actor,
                                           {"ws": principal.workspace, **params}, request.query,
                                           body, known_workspace=principal.workspace,
                                           connected=lambda: request.transport is not None))
    response.headers["Cache-Control"] = "no-store"  # a new key's token: no cache keeps a copy
    return response
