"""Every Redis call keygate makes lives in this module.

Data layout (``{ws}`` is a Redis Cluster hash tag: everything of one workspace shares a slot,
so the per-request script touches a single slot):

    kg:workspaces                 SET     workspace ids
    kg:ws:{ws}                    HASH    id, name, plan, created_at, rev
                                          (rev is bumped on any change that affects
                                          authorisation: plan change, workspace role edit)
    kg:ws:{ws}:keys               SET     key ids of the workspace
    kg:ws:{ws}:roles              HASH    role name -> JSON list of scopes
    kg:ws:{ws}:audit              STREAM  field "e" = JSON {at, actor, action, target, details},
                                          capped (MAXLEN ~ 10000)
    kg:key:{ws}:<id>              HASH    id, workspace, name, description, environment,
                                          role ("" = none), scopes (JSON list, explicit scopes),
                                          hash (argon2id of the secret), prefix,
                                          created_at, expires_at, revoked_at, last_used_at
                                          (epoch seconds as decimal strings, "" = null),
                                          rate_limit ("" = plan's), rev (bumped on every change)
    kg:keyid:<id>                 STRING  workspace id of key <id> (global index, own slot;
                                          read only on a key's first request in a process)
    kg:usage:{ws}:<YYYY-MM>       STRING  requests forwarded this month (always has a TTL)
    kg:rate:{ws}:<id>             STRING  GCRA theoretical arrival time, ms (always has a TTL)
    kg:fail:ip:<ip>               STRING  failed verifications in the window (TTL)
    kg:fail:key:<id>              STRING  failed verifications in the window (TTL)
"""

from __future__ import annotations


def ws_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}"


def ws_keys_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:keys"


def ws_roles_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:roles"


def ws_audit_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:audit"


def key_key(ws: str, key_id: str) -> str:
    return f"kg:key:{{{ws}}}:{key_id}"


def key_index_key(key_id: str) -> str:
    return f"kg:keyid:{key_id}"


def usage_key(ws: str, period: str) -> str:
    return f"kg:usage:{{{ws}}}:{period}"


def rate_key(ws: str, key_id: str) -> str:
    return f"kg:rate:{{{ws}}}:{key_id}"


def fail_ip_key(ip: str) -> str:
    return f"kg:fail:ip:{ip}"


def fail_key_key(key_id: str) -> str:
    return f"kg:fail:key:{key_id}"


WORKSPACES = "kg:workspaces"
