-- Write one of the fail-open ledger's writes (gateway/ledger.py) to a slot's counters, once
-- however often it is sent: a write the client gave up on may still run (Redis was paused
-- with it in its socket buffer, or its reply was lost) while the ledger sends it again.
-- KEYS[1] the write's id   kg:write:{ws}:<id>   (in the workspace's slot, like the counters)
-- KEYS[2..n] the counters
-- ARGV[1] requests to add (negative: requests taken back; a counter never goes below 0)
-- ARGV[2] how long the id is kept, s   ARGV[i + 1] TTL of KEYS[i], s (i >= 2)
-- Returns 1 when it counted, 0 when this write had already run (nothing done again).
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])  -- a copy is still arriving: keep the id as long again
  return 0
end
for i = 2, #KEYS do
  local m = redis.call('INCRBY', KEYS[i], ARGV[1])
  if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
end
return 1
