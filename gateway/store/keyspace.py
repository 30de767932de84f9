"""Every Redis key keygate uses, and what each holds.

``{ws}`` is a Redis Cluster hash tag: everything of one workspace shares a slot, so the
per-request script and every admin script touch a single slot.

    kg:workspaces                 SET     workspace ids (added before the workspace hash is
                                          created, so it may name an id whose creation failed;
                                          listings skip those)
    kg:ws:{ws}                    HASH    id, name, plan, created_at, rev,
                                          limits (JSON object of the workspace's own limits
                                          over its plan's; absent = none)
                                          (rev is bumped on any change that affects
                                          authorisation: plan change, limits, workspace role
                                          edit; not by a change of the name only, which no
                                          cached workspace holds: lua/_new_rev.lua),
                                          bindings (a count bumped each time a key is made
                                          live bound to a role, any role: what the role deletes
                                          of builds before kg:ws:{ws}:bindings check; absent
                                          = 0), bindings_per_role (how many of those bumps
                                          this build's scripts made: 'bindings' less it moves
                                          only while a replica of such a build binds keys, and
                                          a role delete then counts again; absent = 0)
    kg:ws:{ws}:keys               SET     key ids of the workspace
    kg:ws:{ws}:active             ZSET    key ids not revoked, score = expires_at (+inf = never);
                                          entries whose score has passed are trimmed by the
                                          create and re-dating scripts, 100 a call
                                          (_active_keys.lua); ZCOUNT of the scores after now
                                          = active keys, what the plan's max_keys caps
    kg:ws:{ws}:roles              HASH    role name -> JSON list of scopes
    kg:ws:{ws}:bindings           HASH    role name -> a count bumped each time a key is made
                                          live bound to that role (created, rotated, re-bound,
                                          re-dated from expiry or given back bound to it:
                                          _bound_to_role.lua): a role delete counts the role's
                                          keys in steps, then deletes only if the role's count
                                          is unchanged. Kept when the role is deleted (absent
                                          = 0); never read on the request path.
                                          And deleted:<role> (no role name holds a ':'): the
                                          role's delete generation, bumped by each delete of
                                          it; a rotation records it on the old key
                                          (rotated_gen), and its take-back gives the old key
                                          back only while it is unchanged (absent = 0)
    kg:ws:{ws}:undone:<id>        STRING  "1": the create or rotation that made key <id> was
                                          answered 503 (its reply lost) and is taken back; its
                                          script, should it run late, adds nothing (TTL: a day)
    kg:ws:{ws}:audit              STREAM  field "e" = JSON {at, actor, action, target, details},
                                          capped (MAXLEN ~ 10000)
    kg:key:{ws}:<id>              HASH    id, workspace, name, description, environment,
                                          role ("" = none), scopes (JSON list, explicit scopes),
                                          hash (argon2id of the secret), prefix (the
                                          token up to and including the key id; up to 0.2.0
                                          its first 20 characters: completed on read),
                                          created_at, expires_at, revoked_at, last_used_at
                                          (epoch seconds as decimal strings, "" = null),
                                          rate_limit ("" = plan's), monthly_requests (the key's
                                          own cap, "" = none), enabled ("0" = disabled),
                                          meta (JSON object), allowed_ips (JSON list, "" = any),
                                          budget (a rotation's new key: the key id whose
                                          kg:rate and kg:kusage it uses; absent = its own),
                                          rotated_to (the id of the key its last rotation
                                          made, until its next change: what lets a rotation
                                          answered 503 give it back, see admin_take_back),
                                          rotated_gen (with rotated_to: its role's delete
                                          generation then, see kg:ws:{ws}:bindings),
                                          successor (the id of the key its last rotation
                                          made, kept through later changes: while that key
                                          is active, rotating this one again meets the cap
                                          as a create does, see admin_add_key),
                                          own_expires_at (a rotation's grace set expires_at
                                          to its end, sooner: the key's own expiry, "" =
                                          none, whose lifetime a later rotation copies;
                                          absent = expires_at is its own),
                                          rev (bumped on every change but one of only name,
                                          description and/or meta, which no cached key
                                          holds: lua/_new_rev.lua; such a change clears
                                          rotated_to and rotated_gen all the same)
                                          (a bumped rev is Redis's TIME in µs, or +1 when that
                                          is not above it: a restore or failover that takes
                                          revs back never hands a cached one out again)
    kg:gone:{ws}:<id>             HASH    a deleted key (DELETE .../keys/{id}: revoked or
                                          expired): what answering its token needs, its
                                          kg:key hash renamed, without name, description,
                                          meta and last_used_at, and with deleted_at (epoch
                                          seconds). In no listing, count or cap, and no admin
                                          call finds it; its token is still answered
                                          revoked_key or expired_key, never as a failed guess
    kg:keyid:<id>                 STRING  workspace id of key <id> (global index, own slot;
                                          read only on a key's first request in a process;
                                          kept when the key is deleted: kg:gone:{ws}:<id>).
                                          Written (SET NX, which also catches id collisions)
                                          *before* the key's script runs and deleted if the
                                          script refuses, so a key never exists without its
                                          index; a crash in between leaves at worst an index
                                          entry pointing at no key, which reads as unknown.
    kg:usage:{ws}:<YYYY-MM>       STRING  requests forwarded this month (always has a TTL)
    kg:kusage:{ws}:<id>:<YYYY-MM> STRING  the key's requests forwarded this month (TTL); <id>
                                          is the key's budget (shared by rotated keys)
    kg:daily:{ws}:<YYYY-MM-DD>    STRING  requests forwarded that UTC day (TTL: 100 days)
    kg:kdaily:{ws}:<id>:<YYYY-MM-DD>
                                  STRING  the key's requests forwarded that UTC day (TTL)
    kg:write:{ws}:<write-id>      STRING  "1": a write of a process's fail-open ledger (requests
                                          counted while the store was down) that has run, so
                                          a copy of it run again adds nothing (TTL: an hour,
                                          renewed by each copy). Not made for a write the
                                          store dropped: a count whose workspace is gone or
                                          was created after it (lost data,
                                          lua/_held_for.lua), or a take-back with no counter
                                          left; neither makes any counter
    kg:once:{ws}:<request-id>     STRING  Sentinel and Cluster only: the answer of a request's
                                          authorize call that counted it ("used,rate_remaining,
                                          reset_ms,0,key_used"), so a copy of the call sent
                                          again after its connection died counts nothing;
                                          for a refund, "1": a copy takes back nothing
                                          (TTL: request.once_ttl_ms, from the store timeout)
    kg:once:{ws}:admin:<call-id>  STRING  an admin write's answer (JSON, [answer]): its script ran,
                                          so a copy sent again after its connection died does
                                          nothing and answers the same (lua/_once.lua; every
                                          client, a standalone one too; TTL: as above; a
                                          take-back's, every try of it naming one: 10 min
                                          more, as long as it is tried)
    kg:once:{kg:fail:...}:<id>    STRING  Sentinel and Cluster only: "1", a failed
                                          verification's count has run (the counter's whole
                                          name as the hash tag: the counter's slot), so a
                                          copy sent again counts nothing (TTL: as above)
    kg:rate:{ws}:<id>             ZSET    the key's rate log (<id>: its budget, as above): one
                                          member per request admitted
                                          in the last rate period, score = its time in ms
                                          (a sliding log; expires one period after the last)
    kg:rate:{ws}:<id>:own         ZSET    the same for the key's calls to keygate's own
                                          /_keygate/ endpoints (OWN_CALLS_RATE)
    kg:fail:ip:<ip>               STRING  failed verifications in the window (TTL)
    kg:fail:key:<id>              STRING  failed verifications in the window (TTL)
    kg:fail:operator:<ip>         STRING  wrong operator tokens on the admin listener in the
                                          window (TTL)
    kg:ready                      STRING  "1", written by each readiness check of the
                                          per-request connection (TTL: 1 s)
    kg:prefixes                   ZSET    every keys.prefix a keygate has served with on this
                                          store, score = when one last recorded it (ms; at its
                                          start, at a reload that changes it, every minute):
                                          tokens of each are refused in URLs and masked in logs
                                          by every process, however recently started

Every multi-step change is one Lua script (``gateway/store/lua/``) on the workspace's slot:
the change, the ``rev`` bump and the audit entry happen together or not at all. The global
entries (``kg:workspaces``, ``kg:keyid:<id>``, ``kg:fail:*``) live in other slots, so they are
written on their own; the first two are written first and are allowed to name something that
does not exist (readers treat that as absent).
"""

from __future__ import annotations

WORKSPACES = "kg:workspaces"
PREFIXES = "kg:prefixes"


def ws_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}"


def ws_keys_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:keys"


def ws_active_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:active"


def ws_roles_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:roles"


def ws_bindings_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:bindings"


def ws_audit_key(ws: str) -> str:
    return f"kg:ws:{{{ws}}}:audit"


def undone_key(ws: str, key_id: str) -> str:
    return f"kg:ws:{{{ws}}}:undone:{key_id}"


def key_key(ws: str, key_id: str) -> str:
    return f"kg:key:{{{ws}}}:{key_id}"


def ready_key() -> str:
    return "kg:ready"


def gone_key_key(ws: str, key_id: str) -> str:
    """A deleted key's record, kept for answering its token (the module's table)."""
    return f"kg:gone:{{{ws}}}:{key_id}"


def key_index_key(key_id: str) -> str:
    return f"kg:keyid:{key_id}"


def usage_key(ws: str, period: str) -> str:
    return f"kg:usage:{{{ws}}}:{period}"


def key_usage_key(ws: str, key_id: str, period: str) -> str:
    return f"kg:kusage:{{{ws}}}:{key_id}:{period}"


def daily_key(ws: str, day: str) -> str:
    return f"kg:daily:{{{ws}}}:{day}"


def key_daily_key(ws: str, key_id: str, day: str) -> str:
    return f"kg:kdaily:{{{ws}}}:{key_id}:{day}"


def rate_key(ws: str, key_id: str) -> str:
    return f"kg:rate:{{{ws}}}:{key_id}"


def own_calls_rate_key(ws: str, key_id: str) -> str:
    return f"kg:rate:{{{ws}}}:{key_id}:own"


def write_key(ws: str, write_id: str) -> str:
    return f"kg:write:{{{ws}}}:{write_id}"


def once_key(ws: str, request_id: str) -> str:
    return f"kg:once:{{{ws}}}:{request_id}"


def fail_ip_key(ip: str) -> str:
    return f"kg:fail:ip:{ip}"


def fail_key_key(key_id: str) -> str:
    return f"kg:fail:key:{key_id}"


def fail_operator_key(ip: str) -> str:
    return f"kg:fail:operator:{ip}"
