-- Included (scripts.py) by the scripts that make a key live bound to a role: created or rotated
-- bound to it (admin_add_key), re-bound to it or brought back from expiry bound to it
-- (admin_update_key), given back bound to it by a take-back (admin_take_back). A delete of the
-- role counts its keys in bounded steps and then goes ahead only if the role's own counter is
-- unchanged (admin_set_role): only a binding to *that* role makes it count again, never one to
-- another role or a change that leaves a key's role as it is (one workspace-wide counter let a
-- tenant re-PATCHing its keys hold every role delete up for good).
-- bindings: kg:ws:{ws}:bindings (role name -> count)
-- The workspace's own 'bindings' is bumped too: what the role deletes of builds before the
-- per-role counters check (they share the Redis during a rolling deploy).
local function bound_to_role(ws_hash, bindings, role)
  redis.call('HINCRBY', bindings, role, 1)
  redis.call('HINCRBY', ws_hash, 'bindings', 1)
end
