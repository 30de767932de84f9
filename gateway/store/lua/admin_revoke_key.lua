-- Revoke a key for good: stamp revoked_at, bump its rev (every replica refuses it on its next
-- request), drop it from the active set, audit it. Revoking a revoked key changes nothing.
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:active   KEYS[3] kg:ws:{ws}:audit
-- ARGV[1] key id   ARGV[2] now   ARGV[3] audit entry (JSON)   ARGV[4] audit stream cap
-- Returns the key hash (HGETALL), or nil when the key does not exist.
-- A new rev: Redis's clock in microseconds, or one more than the rev when that is not above it.
-- Never a value a replica may have cached: a backup restored, or a failover to a replica that
-- missed the last writes, takes revs back, and a counter would then hand out again the rev of
-- a lost change (a replica would take its cached state as current: a revoke unseen).
local function new_rev(hash)
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local cur = tonumber(redis.call('HGET', hash, 'rev') or '0')
  if cur and cur >= tonumber(stamp) then
    redis.call('HINCRBY', hash, 'rev', 1)
  else
    redis.call('HSET', hash, 'rev', stamp)
  end
end
local st = redis.call('HMGET', KEYS[1], 'id', 'revoked_at')
if not st[1] then return false end
if not st[2] or st[2] == '' then
  redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2])
  new_rev(KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
