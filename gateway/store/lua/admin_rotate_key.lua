-- Replace a key by a new one with the same settings, in one step: the new key is created and
-- the old one revoked now (no grace) or set to expire at the end of the grace period.
-- Rotating an active key without a grace never fails on the plan's key cap (the new key
-- replaces the old). With a grace both stay active for a while, so the workspace may go one
-- key over its cap, never more (else rotating the newest key again and again, each time with a
-- grace, would mint any number of active keys). Rotating an expired key creates a key like any
-- other, so the cap applies.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] old key hash   KEYS[5] new key hash   KEYS[6] kg:ws:{ws}:audit
-- ARGV[1] now   ARGV[2] max active keys (-1 = unlimited)   ARGV[3] new key's expiry score
-- ARGV[4] new key id   ARGV[5] old key id   ARGV[6] end of grace (epoch s; '' = revoke now)
-- ARGV[7] audit entry (JSON)   ARGV[8] audit stream cap
-- ARGV[9] the old key's rev the new key's fields were copied from (the copy is refused as
--         'stale' if the key changed since: the caller re-reads and tries again)
-- ARGV[10..] new key's field, value pairs
-- Returns 'ok' | 'no_workspace' | 'not_found' | 'revoked' | 'collision' | 'stale' | 'limit'
-- (expired key, cap reached) | 'grace_limit' (grace asked, workspace already over its cap).
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
local old = redis.call('HMGET', KEYS[4], 'id', 'revoked_at', 'expires_at', 'rev')
if not old[1] then return 'not_found' end
if old[2] and old[2] ~= '' then return 'revoked' end
if (old[4] or '0') ~= ARGV[9] then return 'stale' end
if redis.call('EXISTS', KEYS[5]) == 1 then return 'collision' end
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local old_exp = tonumber(old[3] or '')
local expired = old_exp ~= nil and old_exp <= now
local max = tonumber(ARGV[2])
if expired and max >= 0 and redis.call('ZCARD', KEYS[3]) >= max then return 'limit' end
if not expired and ARGV[6] ~= '' and max >= 0 and redis.call('ZCARD', KEYS[3]) > max then
  return 'grace_limit'
end

if ARGV[6] == '' then
  redis.call('HSET', KEYS[4], 'revoked_at', ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[5])
elseif not expired then
  local grace_end = tonumber(ARGV[6])
  if old_exp == nil or grace_end < old_exp then
    redis.call('HSET', KEYS[4], 'expires_at', ARGV[6])
    redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
  end
end
redis.call('HINCRBY', KEYS[4], 'rev', 1)

local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[5], unpack(fields))
redis.call('HINCRBY', KEYS[5], 'rev', 1)
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'e', ARGV[7])
return 'ok'
