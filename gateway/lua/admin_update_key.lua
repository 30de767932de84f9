-- Change a key's fields, bump its rev (every gateway replica re-reads it on its next request)
-- and audit it, in one step.
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:active   KEYS[3] kg:ws:{ws}:audit
-- ARGV[1] key id   ARGV[2] new expiry score ('' = unchanged, '+inf' = never)
-- ARGV[3] audit entry (JSON)   ARGV[4] audit stream cap   ARGV[5..] field, value pairs
-- Returns the key hash (HGETALL), or nil when the key does not exist.
local st = redis.call('HMGET', KEYS[1], 'id', 'revoked_at')
if not st[1] then return false end
if #ARGV >= 6 then
  local fields = {}
  for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if ARGV[2] ~= '' and (not st[2] or st[2] == '') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
return redis.call('HGETALL', KEYS[1])
