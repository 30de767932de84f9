-- Count again, on a master that replaced another (Sentinel), the requests whose counting calls
-- ran on the old one and never reached this one: each call's marker (kg:once:{ws}:<id>, set
-- by lua/authorize.lua in the same script as its counts, so replicated with them or not at
-- all) says whether it did. A missing marker is set (a copy of the call, or of this script,
-- then counts nothing) and its request counted. Every KEYS is in the workspace's slot.
-- Into the counters _held_for.lua names: none when this master lacks the workspace or holds
-- one created after the requests (it lost data: promoted before it had synced, or restored
-- from an older backup; a workspace created again with that id must not inherit them), and
-- then nothing is written; the workspace's but not the key's when only the key is gone
-- (deleted meanwhile: its requests were forwarded all the same).
-- KEYS[1..4] the counters: month, the budget's month, day, the key's day
-- KEYS[5] the workspace kg:ws:{ws}   KEYS[6] the key kg:key:{ws}:<id>
-- KEYS[7] the budget's key kg:key:{ws}:<budget>
-- KEYS[8..n] markers of calls counted on the old master, all of these counters
-- ARGV[1] a marker's TTL, ms   ARGV[2..5] TTL of KEYS[1..4], s
-- ARGV[6] when the earliest of those calls started (epoch s, the calling replica's clock)
-- Returns how many requests it counted; negative: minus how many it would have counted, the
-- workspace being gone (or another).
-- include: _held_for.lua
local write = held_for(KEYS[5], KEYS[6], KEYS[7], KEYS[2], tonumber(ARGV[6]))
if not write then
  local gone = 0
  for i = 8, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then gone = gone + 1 end
  end
  return -gone
end
local n = 0
for i = 8, #KEYS do
  -- the value a copy of the call then answers with (lua/authorize.lua: used, rate remaining,
  -- reset, retry, key used): nothing to report, no rate limit judged
  if redis.call('SET', KEYS[i], '0,-1,0,0,0', 'NX', 'PX', ARGV[1]) then n = n + 1 end
end
if n > 0 then
  for i = 1, 4 do
    if write[i] then
      redis.call('INCRBY', KEYS[i], n)
      if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
    end
  end
end
return n
