-- Add to counters, giving each one that has no TTL yet its own: failed verifications (one
-- call per counter on a Cluster, where the counters live in different slots). Not for the
-- fail-open ledger, whose writes may be sent twice: lua/ledger_write.lua.
-- KEYS[1..n] the counters   ARGV[1] how many to add   ARGV[i + 1] TTL of KEYS[i], seconds
-- Returns the first counter's new value.
local n
for i = 1, #KEYS do
  local m = redis.call('INCRBY', KEYS[i], ARGV[1])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
  n = n or m
end
return n
