-- Delete a key that is revoked or expired (never an active one), and audit it, in one step:
-- the key leaves the workspace's key set and active set, and its hash becomes KEYS[5], the
-- deleted key's record (no admin call reads it): what answering its token needs, so that its
-- token is still answered revoked_key or expired_key (read_key.lua), not as an unknown key's
-- failed guess. Every replica that cached it re-reads it on its next request (the authorize
-- script reads it as stale).
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] kg:ws:{ws}:audit   KEYS[5] kg:gone:{ws}:<id>
-- ARGV[1] key id   ARGV[2] now   ARGV[3] audit entry (JSON)   ARGV[4] audit stream cap
-- KEYS[6] the acting key's hash (the operator's: unread)   KEYS[7] kg:ws:{ws}:roles
-- ARGV[5] the acting key's rev when its call was judged ('' = the operator): a workspace admin
--         key revoked, disabled, changed or expired since, or whose workspace role no longer
--         grants keys:admin, deletes nothing ('actor_changed'; _acting_key.lua)
-- Returns the key hash as it was (HGETALL), nil when it does not exist, 'active' or
-- 'actor_changed'.
-- KEYS[8] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _acting_key.lua
-- include: _once.lua
local ran = once_ran(7)
if ran then return ran[1] end
local function delete()
  local h = redis.call('HGETALL', KEYS[1])
  if #h == 0 then return false end
  if acting_key_changed(KEYS[6], ARGV[5], ARGV[2], KEYS[7], '[]') then
    return 'actor_changed'
  end
  local st = redis.call('HMGET', KEYS[1], 'revoked_at', 'expires_at')
  local revoked = st[1] and st[1] ~= ''
  local exp = tonumber(st[2] or '')
  if not revoked and (exp == nil or exp > tonumber(ARGV[2])) then return 'active' end
  redis.call('RENAME', KEYS[1], KEYS[5])
  redis.call('HDEL', KEYS[5], 'name', 'description', 'meta', 'last_used_at', 'rotated_to',
             'rotated_gen', 'successor')
  redis.call('HSET', KEYS[5], 'deleted_at', ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
  return h, true
end
return once_answered(delete())
