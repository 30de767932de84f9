-- Take back one counted request that never reached the upstream from each of its counters,
-- never below 0 and keeping each counter's TTL (one it lacks is set).
-- KEYS[1..n] the counters   ARGV[i] TTL of KEYS[i], seconds
-- Returns the first counter's new value.
local n
for i = 1, #KEYS do
  local m = redis.call('DECR', KEYS[i])
  if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i]) end
  n = n or m
end
return n
