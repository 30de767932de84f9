-- Included (scripts.py) by the scripts that make a key live bound to a role: created or rotated
-- bound to it (admin_add_key), re-bound to it or brought back from expiry bound to it
-- (admin_update_key), given back bound to it by a take-back (admin_take_back). A delete of the
-- role counts its keys in bounded steps and then goes ahead only if the role's own counter is
-- unchanged (admin_set_role): only a binding to *that* role makes it count again, never one to
-- another role or a change that leaves a key's role as it is (one workspace-wide counter let a
-- tenant re-PATCHing its keys hold every role delete up for good).
-- bindings: kg:ws:{ws}:bindings (role name -> count)
-- Replicas of the build before these counters may share the Redis (a rolling deploy): their
-- scripts bump only the workspace's own 'bindings', on a binding to any role, and their role
-- deletes check only that. So it is bumped here too (their deletes see this build's bindings),
-- and so is 'bindings_per_role', the share of 'bindings' this build's scripts made: a delete of
-- this build also checks 'bindings' minus 'bindings_per_role', which moves only when an older
-- replica binds a key (to any role: it cannot say which), and never for this build's bindings
-- to other roles.
local function bound_to_role(ws_hash, bindings, role)
  redis.call('HINCRBY', bindings, role, 1)
  redis.call('HINCRBY', ws_hash, 'bindings', 1)
  redis.call('HINCRBY', ws_hash, 'bindings_per_role', 1)
end
