-- Count again, on a master that replaced another (Sentinel), the requests whose counting calls
-- ran on the old one and never reached this one: each call's marker (kg:once:{ws}:<id>, set
-- by lua/authorize.lua in the same script as its counts, so replicated with them or not at
-- all) says whether it did. A missing marker is set (a copy of the call, or of this script,
-- then counts nothing) and its request counted. Every KEYS is in the workspace's slot.
-- Only while the workspace and the key are on this master: one that lost them (promoted
-- before it had synced, or restored from an older backup) gets no counters for them, which a
-- workspace created again with that id would inherit. Nothing is written then.
-- KEYS[1..4] the counters: month, the key's month, day, the key's day
-- KEYS[5] the workspace kg:ws:{ws}   KEYS[6] the key kg:key:{ws}:<id>
-- KEYS[7..n] markers of calls counted on the old master, all of these counters
-- ARGV[1] a marker's TTL, ms   ARGV[2..5] TTL of KEYS[1..4], s
-- Returns how many requests it counted; negative: minus how many it would have counted, the
-- workspace or the key being gone.
if redis.call('HEXISTS', KEYS[5], 'id') == 0 or redis.call('HEXISTS', KEYS[6], 'id') == 0 then
  local gone = 0
  for i = 7, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then gone = gone + 1 end
  end
  return -gone
end
local n = 0
for i = 7, #KEYS do
  -- the value a copy of the call then answers with (lua/authorize.lua: used, rate remaining,
  -- reset, retry, key used): nothing to report, no rate limit judged
  if redis.call('SET', KEYS[i], '0,-1,0,0,0', 'NX', 'PX', ARGV[1]) then n = n + 1 end
end
if n > 0 then
  for i = 1, 4 do
    redis.call('INCRBY', KEYS[i], n)
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i + 1]) end
  end
end
return n
