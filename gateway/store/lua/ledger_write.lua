-- Write one of the fail-open ledger's writes (gateway/ledger.py) to a slot's counters, once
-- however often it is sent: a write the client gave up on may still run (Redis was paused
-- with it in its socket buffer, or its reply was lost) while the ledger sends it again.
-- Counts (ARGV[1] > 0) are written only while the workspace and the key they were counted for
-- are in the store: a Redis that lost keygate's data (restarted without persistence, FLUSHDB,
-- an older backup restored) would otherwise get counters for a workspace it no longer holds,
-- which a workspace created again with that id would inherit (and another workspace of that
-- id holds none of the old one's keys: key ids are never reused). Such a write is dropped,
-- nothing made, not even its id. A take-back (ARGV[1] < 0) only lowers counters that exist:
-- one that is gone has nothing to take back, and is not made (with none left, neither is its
-- id).
-- KEYS[1] the write's id   kg:write:{ws}:<id>   (in the workspace's slot, like the rest)
-- KEYS[2] the workspace   kg:ws:{ws}   KEYS[3] the key   kg:key:{ws}:<id>
-- KEYS[4..n] the counters
-- ARGV[1] requests to add (negative: requests taken back; a counter never goes below 0)
-- ARGV[2] how long the id is kept, s   ARGV[i - 1] TTL of KEYS[i], s (i >= 4)
-- Returns 1 when it wrote, 0 when this write had already run (nothing done again), -1 when
-- the workspace is gone and -2 when the key is (nothing done: counts only).
local n = tonumber(ARGV[1])
if n > 0 then
  if redis.call('HEXISTS', KEYS[2], 'id') == 0 then return -1 end
  if redis.call('HEXISTS', KEYS[3], 'id') == 0 then return -2 end
elseif redis.call('EXISTS', unpack(KEYS, 4, #KEYS)) == 0 then
  return 1  -- a take-back with none of its counters left: nothing to do, nothing made
end
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])  -- a copy is still arriving: keep the id as long again
  return 0
end
for i = 4, #KEYS do
  if n > 0 or redis.call('EXISTS', KEYS[i]) == 1 then
    local m = redis.call('INCRBY', KEYS[i], n)
    if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i - 1]) end
  end
end
return 1
