-- Add to counters, giving each one that has no TTL yet its own: failed verifications (one
-- call per counter on a Cluster, where the counters live in different slots). Not for the
-- fail-open ledger, whose writes may be sent twice: lua/ledger_write.lua.
-- KEYS[1..n] the counters   ARGV[1] how many to add   ARGV[i + 1] TTL of KEYS[i], seconds
-- Sentinel and Cluster only (redis-py sends a call again when its connection dies, which it
-- may do after Redis ran the call): ARGV[#KEYS + 2] is "once", KEYS[#KEYS] is then not a
-- counter but this call's marker (kg:once:{<counter>}:<id>, in the counters' slot) and
-- ARGV[#KEYS + 1] its TTL, ms. The first copy to run sets the marker and adds; a copy that
-- finds it adds nothing.
-- Returns the first counter's new value.
local last = #KEYS
if ARGV[last + 2] == 'once' then
  if not redis.call('SET', KEYS[last], '1', 'NX', 'PX', ARGV[last + 1]) then
    return tonumber(redis.call('GET', KEYS[1]) or '0')  -- a copy: already added
  end
  last = last - 1
end
local n
for i = 1, last do
  local m = redis.call('INCRBY', KEYS[i], ARGV[1])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
  n = n or m
end
return n
