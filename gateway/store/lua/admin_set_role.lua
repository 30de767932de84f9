-- Define, replace or delete a workspace role; bump the workspace's rev so every key bound to
-- the role acts with its new scopes on its next request; audit it. One step.
-- A delete is refused while keys that are not revoked or expired (disabled ones included:
-- enabling one brings it back) are bound to the role and no configured role of the same name
-- would take its place: those keys would be left with no scopes. The count and the delete are
-- one step, and the scripts that bind a key to a workspace role check it still exists in
-- theirs (admin_add_key, admin_update_key), so no key is bound to a role deleted meanwhile.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:roles   KEYS[3] kg:ws:{ws}:audit
-- KEYS[4] kg:ws:{ws}:keys (delete only; the key hashes read are kg:key:{ws}:<id>, same slot)
-- ARGV[1] 'put' | 'delete'   ARGV[2] role name   ARGV[3] scopes (JSON list; put only)
-- ARGV[4] audit entry (JSON)   ARGV[5] audit stream cap
-- ARGV[6] now (epoch s; delete only)   ARGV[7] '1' when a configured role of that name takes
--         over the keys bound to it (delete only: nothing to check), else '0'
-- ARGV[8] the key hash name up to the key id ('kg:key:{ws}:'; delete only)
-- Returns 'ok' | 'no_workspace' | 'not_found' (delete of a role the workspace does not have)
-- | {'in_use', n} (delete refused: n keys still use the role; nothing written).
-- include: _new_rev.lua
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
if ARGV[1] == 'put' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
else
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 'not_found' end
  if ARGV[7] ~= '1' then
    local now = tonumber(ARGV[6])
    local using = 0
    for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
      local k = redis.call('HMGET', ARGV[8] .. id, 'role', 'revoked_at', 'expires_at')
      if k[1] == ARGV[2] and (not k[2] or k[2] == '') then
        local exp = tonumber(k[3] or '')
        if exp == nil or exp > now then using = using + 1 end
      end
    end
    if using > 0 then return {'in_use', using} end
  end
  redis.call('HDEL', KEYS[2], ARGV[2])
end
new_rev(KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
return 'ok'
