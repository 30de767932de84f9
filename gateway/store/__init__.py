"""Everything keygate keeps in Redis.

* ``keyspace`` -- every key name, and the layout: what each key holds.
* ``admin`` (with ``admin_base``, ``admin_keys``) -- :class:`Store`, the admin operations and
  usage reports, on redis-py; ``records`` -- the hashes as ``models`` records.
* ``request`` -- :class:`RequestStore`, the per-request calls, over one client seam
  (``clients``): the lean RESP client (``resp``) for one server, redis-py for a topology.
* ``lua/`` -- every script run on Redis (``scripts`` loads them).
* ``embedded`` -- the bundled redis-server (``store.redis_url: embedded``).
"""

from .admin import Store
from .admin_base import OPERATOR
from .keyspace import (WORKSPACES, daily_key, fail_ip_key, fail_key_key, key_daily_key,
                       key_index_key, key_key, key_usage_key, rate_key, usage_key, ws_active_key,
                       ws_audit_key, ws_key, ws_keys_key, ws_roles_key)
from .records import (STATUSES, UNSET, WORKSPACE_ID_RE, NewKey, effective_scopes_of,
                      key_from_hash, slug_from_name, workspace_from_hash)
from .request import Decision, RequestStore, Slot

__all__ = ["Store", "OPERATOR", "WORKSPACES", "daily_key", "fail_ip_key", "fail_key_key",
           "key_daily_key", "key_index_key", "key_key", "key_usage_key", "rate_key",
           "usage_key", "ws_active_key", "ws_audit_key", "ws_key", "ws_keys_key", "ws_roles_key",
           "STATUSES", "UNSET", "WORKSPACE_ID_RE", "NewKey", "effective_scopes_of",
           "key_from_hash", "slug_from_name", "workspace_from_hash", "Decision", "RequestStore",
           "Slot"]
