-- Change a workspace's name, plan and/or own limits, bump its rev (cached authorisations
-- re-read it on their next request), and audit it, in one step.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:audit
-- ARGV[1] audit entry (JSON)   ARGV[2] audit stream cap
-- ARGV[3] limits: '' = unchanged, 'null' = drop every override, else a JSON object merged
--         into the stored overrides (its nulls stay: null = unlimited)
-- ARGV[4..] field, value pairs
-- Returns the workspace hash (HGETALL), or nil when it does not exist.
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
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV >= 5 then
  local fields = {}
  for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if ARGV[3] == 'null' then
  redis.call('HDEL', KEYS[1], 'limits')
elseif ARGV[3] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'limits')
  local merged = {}
  if cur and cur ~= '' then merged = cjson.decode(cur) end
  for name, value in pairs(cjson.decode(ARGV[3])) do merged[name] = value end
  redis.call('HSET', KEYS[1], 'limits', cjson.encode(merged))
end
new_rev(KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
return redis.call('HGETALL', KEYS[1])
