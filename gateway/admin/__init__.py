"""The admin API (admin listener), workspace self-service (``keys:admin`` keys, proxy listener
``/_keygate/v1/keys...``) and the web console (``/console/``).

The admin API answers the operator token everywhere, and a ``keys:admin`` key of a workspace on
that workspace's key routes and the reads the console needs, with exactly the self-service
rules: it is the one API the console uses for both kinds of people. Where things are:

    api.py           module-level handlers and the one route table (``ROUTES``)
    self_service.py  the table's workspace-admin key rows, served on the proxy listener
    keyops.py        the key operations both share, bounded by who acts (``Actor``)
    validate.py      body and field parsers; every refusal names the field
    listing.py       a key listing's filters, order and cursors
    middleware.py    authentication, confinement to a workspace, error bodies, request ids
    throttle.py      wrong operator tokens, bounded per client IP (the failure throttle)
    listener.py      the admin listener's app: the table, probes, the OpenAPI document
    console.py       the console's static files (console/) and their headers
    openapi.py       the OpenAPI document (its schemas in openapi_schemas.py)

A workspace key may touch only its own workspace (anything else reads as 404, never 403, so
existence is not disclosed) and never mint a key wider than itself (its effective scopes),
longer-lived, or above the plan's rate limit. The store trusts what it is given.
"""

from .api import WORKSPACE_ADMIN_ROUTES
from .keyops import Actor
from .listener import create_admin_app
from .middleware import KeyAuthenticator, error_middleware
from .self_service import SELF_SERVICE_PREFIX, handle_self_service

__all__ = ["WORKSPACE_ADMIN_ROUTES", "Actor", "create_admin_app", "KeyAuthenticator",
           "error_middleware", "SELF_SERVICE_PREFIX", "handle_self_service"]
