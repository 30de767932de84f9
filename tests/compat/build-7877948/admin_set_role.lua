-- Define, replace or delete a workspace role; bump the workspace's rev so every key bound to
-- the role acts with its new scopes on its next request; audit it. One step.
-- A delete is refused while keys that are not revoked or expired (disabled ones included:
-- enabling one brings it back) are bound to the role and no configured role of the same name
-- would take its place: those keys would be left with no scopes. The caller counts them
-- before, in bounded steps (admin_role_users: a count over every key in this script held
-- Redis for as long as the workspace is big), having read the workspace's field 'bindings',
-- which every script that makes a key live bound to a role bumps (admin_add_key,
-- admin_update_key, admin_take_back): the delete goes ahead only if it is unchanged, i.e. no
-- key was bound to a role since the count began ('stale': count again). And the scripts that
-- bind a key to a workspace role check it still exists in theirs, so no key is bound to a
-- role deleted meanwhile.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:roles   KEYS[3] kg:ws:{ws}:audit
-- ARGV[1] 'put' | 'delete'   ARGV[2] role name   ARGV[3] scopes (JSON list; put only)
-- ARGV[4] audit entry (JSON)   ARGV[5] audit stream cap
-- ARGV[6] the workspace's 'bindings' when the count found no key using the role ('' = a
--         configured role of that name takes over the keys bound to it: nothing to check;
--         delete only)
-- Returns 'ok' | 'no_workspace' | 'not_found' (delete of a role the workspace does not have)
-- | 'stale' (delete: a key was bound to a role since the count; nothing written).
-- Included (scripts.py) by every admin script that changes a key or a workspace.
-- A new rev: Redis's clock in microseconds, or one more than the rev when that is not above it.
-- Never a value a replica may have cached: a backup restored, or a failover to a replica that
-- missed the last writes, takes revs back, and a counter would then hand out again the rev of
-- a lost change (a replica would take its cached state as current: a revoke unseen).
-- Any change also clears a key's 'rotated_to' mark (admin_add_key, admin_take_back): a rotation
-- answered 503 gives the old key back as it was only while nothing else has changed it since.
local function new_rev(hash)
  redis.call('HDEL', hash, 'rotated_to')
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local cur = tonumber(redis.call('HGET', hash, 'rev') or '0')
  if cur and cur >= tonumber(stamp) then
    redis.call('HINCRBY', hash, 'rev', 1)
  else
    redis.call('HSET', hash, 'rev', stamp)
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
if ARGV[1] == 'put' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
else
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 'not_found' end
  if ARGV[6] ~= '' and (redis.call('HGET', KEYS[1], 'bindings') or '0') ~= ARGV[6] then
    return 'stale'
  end
  redis.call('HDEL', KEYS[2], ARGV[2])
end
new_rev(KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
return 'ok'
