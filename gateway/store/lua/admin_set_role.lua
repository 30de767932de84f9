-- Define, replace or delete a workspace role; bump the workspace's rev so every key bound to
-- the role acts with its new scopes on its next request; audit it. One step.
-- A delete is refused while keys that are not revoked or expired (disabled ones included:
-- enabling one brings it back) are bound to the role and no configured role of the same name
-- would take its place: those keys would be left with no scopes. The caller counts them
-- before, in bounded steps (admin_role_users: a count over every key in this script held
-- Redis for as long as the workspace is big), having read the role's counter in
-- kg:ws:{ws}:bindings, which every script that makes a key live bound to that role bumps
-- (_bound_to_role.lua: admin_add_key, admin_update_key, admin_take_back): the delete goes
-- ahead only if it is unchanged, i.e. no key was bound to the role since the count began
-- ('stale': count again). Bindings to other roles leave it be. Nor did a replica of the build
-- before the per-role counters bind a key meanwhile (it bumps only the workspace's 'bindings'):
-- 'bindings' less this build's share of it, 'bindings_per_role', is unchanged too (see
-- _bound_to_role.lua; once no older replica runs, it never moves). And the scripts that bind a
-- key to a workspace role check it still exists in theirs, so no key is bound to a role
-- deleted meanwhile. The counter outlives the role (a delete, a PUT and a binding must never
-- bring it back to a value a delete under way read).
-- Each delete also bumps the role's delete generation, the field 'deleted:<role>' of
-- kg:ws:{ws}:bindings (no role name holds a ':'): a rotation records it on the old key
-- ('rotated_gen', admin_add_key) and its take-back gives the old key back only while it is
-- unchanged (admin_take_back): a role deleted and then defined again (another role under the
-- same name, say one granting ALL) never gets a key no delete counted.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:roles   KEYS[3] kg:ws:{ws}:audit
-- KEYS[4] kg:ws:{ws}:bindings
-- ARGV[1] 'put' | 'delete'   ARGV[2] role name   ARGV[3] scopes (JSON list; put only)
-- ARGV[4] audit entry (JSON)   ARGV[5] audit stream cap
-- ARGV[6] the role's counter when the count found no key using the role ('' = a configured
--         role of that name takes over the keys bound to it: nothing to check; delete only)
-- ARGV[7] with ARGV[6]: the workspace's 'bindings' less its 'bindings_per_role' then
-- Returns 'ok' | 'no_workspace' | 'not_found' (delete of a role the workspace does not have)
-- | 'stale' (delete: a key was bound to the role, or by an older replica to any role, since
-- the count; nothing written).
-- KEYS[5] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _once.lua
local ran = once_ran(4)
if ran then return ran[1] end
local function set_role()
  if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
  if ARGV[1] == 'put' then
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  else
    if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 'not_found' end
    if ARGV[6] ~= '' then
      local w = redis.call('HMGET', KEYS[1], 'bindings', 'bindings_per_role')
      if (redis.call('HGET', KEYS[4], ARGV[2]) or '0') ~= ARGV[6]
          or tonumber(w[1] or '0') - tonumber(w[2] or '0') ~= tonumber(ARGV[7]) then
        return 'stale'
      end
    end
    redis.call('HDEL', KEYS[2], ARGV[2])
    redis.call('HINCRBY', KEYS[4], 'deleted:' .. ARGV[2], 1)
  end
  new_rev(KEYS[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
  return 'ok', true
end
return once_answered(set_role())
