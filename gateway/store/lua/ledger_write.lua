-- Write one of the fail-open ledger's writes (gateway/ledger.py) to a slot's counters, once
-- however often it is sent: a write the client gave up on may still run (Redis was paused
-- with it in its socket buffer, or its reply was lost) while the ledger sends it again.
-- Counts (ARGV[1] > 0) go to the counters _held_for.lua names: none when the workspace is gone
-- or was created after the requests were served (Redis lost keygate's data: restarted without
-- persistence, FLUSHDB, an older backup restored; a workspace created again with that id must
-- not inherit them), and then nothing is made, not even the write's id; the workspace's
-- but not the key's when only the key is gone (deleted meanwhile: its requests were
-- forwarded all the same, and count toward the workspace's quota). A take-back
-- (ARGV[1] < 0; ARGV[3] is when the requests it takes back were counted) follows the same
-- rule: it lowers only counters the count it takes back was written to (never those of a
-- workspace created after it, whose usage it is not), and of those only counters that exist:
-- one that is gone has nothing to take back, and is not made (with none left, neither is its
-- id).
-- KEYS[1] the write's id   kg:write:{ws}:<id>   (in the workspace's slot, like the rest)
-- KEYS[2] the workspace   kg:ws:{ws}   KEYS[3] the key   kg:key:{ws}:<id>
-- KEYS[4] the budget's key   kg:key:{ws}:<budget>
-- KEYS[5..8] the counters (Slot.counters(): month, the budget's month, day, the key's day)
-- ARGV[1] requests to add (negative: requests taken back; a counter never goes below 0)
-- ARGV[2] how long the id is kept, s   ARGV[3] the earliest of the requests (epoch s, the
-- serving replica's clock)   ARGV[i - 1] TTL of KEYS[i], s (i >= 5)
-- Returns 1 when it wrote, 0 when this write had already run (nothing done again), -1 when
-- nothing was written for the workspace (gone, or created after the requests) and -2 when
-- only the key's counters were not (the key is gone).
-- include: _held_for.lua
-- A copy of a write that ran answers so before anything is judged: what was there when it ran
-- may be gone now (the key deleted, the data lost), and its requests were written all the same.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])  -- a copy is still arriving: keep the id as long again
  return 0
end
local n = tonumber(ARGV[1])
local write = held_for(KEYS[2], KEYS[3], KEYS[4], KEYS[6], tonumber(ARGV[3]))
if not write then return -1 end
local key_here = write[4]
if n < 0 then
  for i = 1, 4 do write[i] = write[i] and redis.call('EXISTS', KEYS[i + 4]) == 1 end
  if not (write[1] or write[2] or write[3] or write[4]) then
    return 1  -- a take-back with none of its counters left: nothing to do, nothing made
  end
end
redis.call('SET', KEYS[1], 1, 'EX', ARGV[2])
for i = 5, #KEYS do
  if write[i - 4] then
    local m = redis.call('INCRBY', KEYS[i], n)
    if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i - 1]) end
  end
end
if not key_here then return -2 end
return 1
