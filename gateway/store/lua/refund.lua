-- Take back one counted request that never reached the upstream: from each of its counters,
-- never below 0 and keeping each counter's TTL (one it lacks is set), and from the key's rate
-- log, so it spends none of the key's rate either.
-- KEYS[1] the key's rate log (kg:rate:{ws}:<id>)   ARGV[1] the request's member in it ("" or
--         "-": it had no rate limit, nothing to remove)
-- KEYS[2..n] the counters   ARGV[i] TTL of KEYS[i], seconds
-- Returns the first counter's new value.
if ARGV[1] ~= '' and ARGV[1] ~= '-' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local n
for i = 2, #KEYS do
  local m = redis.call('DECR', KEYS[i])
  if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i]) end
  n = n or m
end
return n
