-- Take back one counted request that never reached the upstream: from each of its counters
-- that exists, never below 0 and keeping each counter's TTL (one it lacks is set), and from
-- the key's rate log, so it spends none of the key's rate either. A counter that is gone
-- (Redis lost keygate's data: restarted without persistence, FLUSHDB, an older backup
-- restored; or it expired) holds no count to take back and is not made again; with none
-- left, nothing is written at all (not even the marker below).
-- KEYS[1] the key's rate log (kg:rate:{ws}:<id>)   ARGV[1] the request's member in it ("" or
--         "-": it had no rate limit, nothing to remove)
-- KEYS[2..n] the counters   ARGV[i] TTL of KEYS[i], seconds
-- Sentinel and Cluster only (redis-py sends a call again when its connection dies, which it
-- may do after Redis ran the call): ARGV[n + 1] is "once", KEYS[n] is then not a counter but
-- this refund's marker (kg:once:{ws}:<id>) and ARGV[n] its TTL, ms. The first copy to run
-- sets the marker and takes the request back; a copy that finds it does nothing.
-- Returns the first counter's new value (0: none was there).
local last = #KEYS
local marked = ARGV[last + 1] == 'once'
if marked then last = last - 1 end
if ARGV[1] ~= '' and ARGV[1] ~= '-' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if last < 2 or redis.call('EXISTS', unpack(KEYS, 2, last)) == 0 then return 0 end
if marked and not redis.call('SET', KEYS[last + 1], '1', 'NX', 'PX', ARGV[last + 1]) then
  return tonumber(redis.call('GET', KEYS[2]) or '0')  -- a copy: already taken back
end
local n
for i = 2, last do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local m = redis.call('DECR', KEYS[i])
    if m < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[i]) end
    n = n or m
  end
end
return n or 0
