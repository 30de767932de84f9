-- Revoke a key for good: stamp revoked_at, bump its rev (every replica refuses it on its next
-- request), drop it from the active set, audit it. Revoking a revoked key changes nothing,
-- except that it clears the mark of a rotation to be taken back (see below).
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:active   KEYS[3] kg:ws:{ws}:audit
-- ARGV[1] key id   ARGV[2] now   ARGV[3] audit entry (JSON)   ARGV[4] audit stream cap
-- KEYS[4] the acting key's hash (the operator's: unread)   KEYS[5] kg:ws:{ws}:roles
-- ARGV[5] the acting key's rev when its call was judged ('' = the operator): a workspace admin
--         key revoked, disabled, changed or expired since, or whose workspace role no longer
--         grants keys:admin, revokes nothing ('actor_changed'; _acting_key.lua)
-- Returns the key hash (HGETALL), nil when the key does not exist, or 'actor_changed'.
-- KEYS[6] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _acting_key.lua
-- include: _once.lua
local ran = once_ran(5)
if ran then return ran[1] end
local function revoke()
  local st = redis.call('HMGET', KEYS[1], 'id', 'revoked_at')
  if not st[1] then return false end
  if acting_key_changed(KEYS[4], ARGV[5], ARGV[2], KEYS[5], '[]') then
    return 'actor_changed'
  end
  if not st[2] or st[2] == '' then
    redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2])
    new_rev(KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
  else
    -- revoked by a rotation answered 503 that is to be taken back (admin_take_back): revoked
    -- now by a caller who was answered, it stays revoked
    redis.call('HDEL', KEYS[1], 'rotated_to')
  end
  return redis.call('HGETALL', KEYS[1]), true
end
return once_answered(revoke())
