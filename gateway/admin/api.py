"""The admin API's endpoints: module-level handlers and the one table that routes them.

The operator token reaches every endpoint. A ``keys:admin`` key of a workspace reaches the rows
marked ``workspace_admin``, confined to its own workspace (``middleware.confine``); every other
row, and any route added outside the table, stays operator-only. The same rows under
``/admin/v1/workspaces/{ws}/keys`` are what self-service serves on the proxy listener
(``self_service.py``), with ``{ws}`` fixed to the acting key's workspace.

A handler takes a :class:`Call` (who acts, the path's parameters, the query, the body) rather
than an ``aiohttp`` request, so the same handler answers both listeners. Handlers read
``store.config`` on each call: a reload swaps it (gateway/reload.py).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from ..config import Config
from ..errors import BadRequest
from ..store import UNSET, Store
from .keyops import TURN_EVERY, Actor, KeyOps
from .listing import LIST_PARAMS
from .validate import (MAX_NAME, check_catalogue, parse_audit_limit, parse_body, parse_days,
                       parse_limits, parse_plan, parse_role_name, parse_scopes, parse_text,
                       parse_workspace_id, refuse_operator_token_in_path)


@dataclass(frozen=True)
class Call:
    """One call of an endpoint in :data:`ROUTES`, from whichever listener it came."""
    store: Store
    config: Config
    actor: Actor
    params: Mapping[str, str]   # the path's {ws}, {key}, {name}
    query: Mapping[str, str]
    body: Callable[[], Awaitable[bytes]]
    known_workspace: str | None = None
    """A workspace already known to exist (self-service: the acting key's own)."""
    connected: Callable[[], bool] = lambda: True
    """Whether the caller is still there to read the answer (its connection is open): a create
    or rotation whose caller has gone writes nothing, as no one would ever see its token."""
    operator_token: str = field(default="", repr=False)
    """The operator's calls only: the operator token, which their bodies may not hold
    (``validate.refuse_operator_token``). Empty for a workspace key's calls."""

    async def workspace(self) -> str:
        """The path's workspace; 404 ``not_found`` when there is no such workspace."""
        ws = self.params["ws"]
        if ws != self.known_workspace:
            await self.store.require_workspace(ws)
        return ws

    async def keys(self) -> KeyOps:
        """The key operations of the path's workspace (which must exist), as the actor."""
        return KeyOps(self.store, self.config, await self.workspace(), self.actor,
                      self.connected, self.operator_token)


Handler = Callable[[Call], Awaitable[web.Response]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json")


async def listing_response(body: dict[str, Any]) -> web.Response:
    """``json_response(body)`` for a listing of any length (``items`` first): the items are
    encoded ``TURN_EVERY`` at a time, the event loop (the proxy's too) getting a turn between
    them. The bytes are ``json.dumps``'s."""
    items = body["items"]
    out = bytearray(b'{"items": [')
    for start in range(0, len(items), TURN_EVERY):
        if start:
            out += b", "
            await asyncio.sleep(0)
        out += json.dumps(items[start:start + TURN_EVERY])[1:-1].encode()
    rest = json.dumps({name: value for name, value in body.items() if name != "items"})
    out += b"]}" if rest == "{}" else b"], " + rest[1:].encode()
    return web.Response(body=out, content_type="application/json")


# --- workspaces, usage, scopes, roles, audit -----------------------------------------------------

async def create_workspace(call: Call) -> web.Response:
    data = parse_body(await call.body(), ("id", "name", "plan"), call.config.keys,
                      call.operator_token, call.store.key_prefixes_known)
    name = parse_text(data, "name", MAX_NAME, required=True)
    ws = parse_workspace_id(data["id"]) if "id" in data else None
    plan = parse_plan(data, call.config) or call.config.default_plan
    workspace = await call.store.create_workspace(ws, name, plan)
    return json_response(call.store.workspace_json(workspace), 201)


async def list_workspaces(call: Call) -> web.Response:
    store = call.store
    if not call.actor.is_operator:  # a workspace admin sees its own workspace only
        own = await store.require_workspace(call.actor.workspace)
        return json_response({"items": [store.workspace_json(own)]})
    return json_response({"items": [store.workspace_json(w)
                                    for w in await store.list_workspaces()]})


async def read_workspace(call: Call) -> web.Response:
    return json_response(call.store.workspace_json(
        await call.store.require_workspace(call.params["ws"])))


async def patch_workspace(call: Call) -> web.Response:
    ws = await call.workspace()
    data = parse_body(await call.body(), ("name", "plan", "limits"), call.config.keys,
                      call.operator_token, call.store.key_prefixes_known)
    if not data:
        raise BadRequest("Nothing to change; send 'name', 'plan' and/or 'limits'.")
    name = parse_text(data, "name", MAX_NAME)
    limits = parse_limits(data["limits"]) if "limits" in data else UNSET
    workspace = await call.store.update_workspace(ws, name=name, limits=limits,
                                                  plan=parse_plan(data, call.config))
    return json_response(call.store.workspace_json(workspace))


async def usage(call: Call) -> web.Response:
    return json_response(await call.store.usage(call.params["ws"]))


async def workspace_daily(call: Call) -> web.Response:
    days = parse_days(call.query)
    ws = await call.workspace()
    return json_response({"items": await call.store.daily_usage(ws, days)})


async def scopes(call: Call) -> web.Response:
    config = call.config
    if config.scopes is not None:
        return json_response({"items": [{"name": n, "description": d}
                                        for n, d in config.scopes.items()]})
    # no catalogue: the scopes the config's routes and roles name, undescribed
    used = dict.fromkeys(s for route in config.routes for s in route.scopes)
    used.update(dict.fromkeys(s for role in config.roles.values() for s in role))
    return json_response({"items": [{"name": n, "description": None} for n in sorted(used)]})


async def list_roles(call: Call) -> web.Response:
    ws = await call.workspace()
    own = await call.store.workspace_roles(ws)
    items = [{"name": n, "scopes": list(s), "source": "workspace"}
             for n, s in sorted(own.items())]
    items += [{"name": n, "scopes": list(s), "source": "config"}
              for n, s in sorted(call.config.roles.items()) if n not in own]
    return json_response({"items": items})


async def put_role(call: Call) -> web.Response:
    # the name is stored and listed: the operator token is refused there as in a body (the
    # only path segment an endpoint stores; workspace ids on create come in the body)
    refuse_operator_token_in_path(call.params["name"], call.operator_token)
    name = parse_role_name(call.params["name"], "name")
    data = parse_body(await call.body(), ("scopes",), call.config.keys,
                      call.operator_token, call.store.key_prefixes_known)
    if "scopes" not in data:
        raise BadRequest("The field 'scopes' is required.")
    scopes = parse_scopes(data["scopes"])
    check_catalogue(scopes, call.config)
    await call.store.put_role(call.params["ws"], name, scopes)
    return json_response({"name": name, "scopes": list(scopes), "source": "workspace"})


async def delete_role(call: Call) -> web.Response:
    # unknown fields are a 400 here too, before the delete
    parse_body(await call.body(), (), operator_token=call.operator_token)
    ws, name = call.params["ws"], call.params["name"]
    scopes = (await call.store.workspace_roles(ws)).get(name, ())
    await call.store.delete_role(ws, name)
    return json_response({"name": name, "scopes": list(scopes), "source": "workspace"})


async def audit(call: Call) -> web.Response:
    ws = await call.workspace()
    return json_response({"items": await call.store.audit(ws, parse_audit_limit(call.query))})


# --- keys (the rows self-service serves too) -----------------------------------------------------

async def list_keys(call: Call) -> web.Response:
    return await listing_response(await (await call.keys()).list(call.query))


async def create_key(call: Call) -> web.Response:
    ops = await call.keys()
    return json_response(await ops.create(await call.body()), 201)


async def read_key(call: Call) -> web.Response:
    return json_response(await (await call.keys()).read(call.params["key"]))


async def patch_key(call: Call) -> web.Response:
    ops = await call.keys()
    return json_response(await ops.patch(call.params["key"], await call.body()))


async def delete_key(call: Call) -> web.Response:
    ops = await call.keys()
    # unknown fields are a 400 here too, before the delete
    parse_body(await call.body(), (), operator_token=call.operator_token)
    return json_response(await ops.delete(call.params["key"]))


async def revoke_key(call: Call) -> web.Response:
    ops = await call.keys()
    return json_response(await ops.revoke(call.params["key"], await call.body()))


async def rotate_key(call: Call) -> web.Response:
    ops = await call.keys()
    return json_response(await ops.rotate(call.params["key"], await call.body()), 201)


async def key_daily(call: Call) -> web.Response:
    return json_response(await (await call.keys()).daily(call.params["key"], call.query))


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str                               # an aiohttp pattern, as the router's ``canonical``
    handler: Handler
    workspace_admin: bool = False           # a keys:admin key may call it, in its workspace
    query: tuple[str, ...] = ()             # the query parameters it takes; any other is a 400


WORKSPACES = "/admin/v1/workspaces"
KEYS = WORKSPACES + "/{ws}/keys"

ROUTES: tuple[Endpoint, ...] = (
    Endpoint("POST", WORKSPACES, create_workspace),
    Endpoint("GET", WORKSPACES, list_workspaces, workspace_admin=True),  # its own only
    Endpoint("GET", WORKSPACES + "/{ws}", read_workspace, workspace_admin=True),
    Endpoint("PATCH", WORKSPACES + "/{ws}", patch_workspace),
    # the order within one path is the order of self-service's `Allow`
    Endpoint("GET", KEYS, list_keys, workspace_admin=True, query=LIST_PARAMS),
    Endpoint("POST", KEYS, create_key, workspace_admin=True),
    Endpoint("GET", KEYS + "/{key}", read_key, workspace_admin=True),
    Endpoint("PATCH", KEYS + "/{key}", patch_key, workspace_admin=True),
    Endpoint("DELETE", KEYS + "/{key}", delete_key, workspace_admin=True),
    Endpoint("POST", KEYS + "/{key}/revoke", revoke_key, workspace_admin=True),
    Endpoint("POST", KEYS + "/{key}/rotate", rotate_key, workspace_admin=True),
    Endpoint("GET", KEYS + "/{key}/usage/daily", key_daily, workspace_admin=True,
             query=("days",)),
    Endpoint("GET", WORKSPACES + "/{ws}/usage", usage, workspace_admin=True),
    Endpoint("GET", WORKSPACES + "/{ws}/usage/daily", workspace_daily, workspace_admin=True,
             query=("days",)),
    Endpoint("GET", "/admin/v1/scopes", scopes),
    Endpoint("GET", WORKSPACES + "/{ws}/roles", list_roles, workspace_admin=True),
    Endpoint("PUT", WORKSPACES + "/{ws}/roles/{name}", put_role),
    Endpoint("DELETE", WORKSPACES + "/{ws}/roles/{name}", delete_role),
    Endpoint("GET", WORKSPACES + "/{ws}/audit", audit, query=("limit",)),
)
"""Every endpoint of the admin API (the OpenAPI document, the probes, ``/metrics``, the
reload and the console are registered beside it: none takes a workspace key)."""

WORKSPACE_ADMIN_ROUTES = frozenset((e.method, e.path) for e in ROUTES if e.workspace_admin)
"""What a ``keys:admin`` key may call on the admin API: its workspace's key endpoints (those
self-service offers on the proxy listener) and the reads the console needs. Anything else is
for the operator: workspace creation and plans, role definitions, the audit, reloads."""

QUERY_PARAMS: Mapping[tuple[str, str], tuple[str, ...]] = {
    (e.method, e.path): e.query for e in ROUTES if e.query}
"""The query parameters each admin endpoint takes; any other is a 400."""
