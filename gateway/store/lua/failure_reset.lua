-- When a failed-verification counter resets: its PTTL, milliseconds (-2: gone). One call per
-- counter (on a Cluster the counters live in different slots); run only when a request is
-- refused for failures, to answer its Retry-After.
-- A counter whose reset lies past the window in force (the window was lowered by a reload)
-- or that has no TTL is given the window: an address over its limit records no failures, so
-- nothing else would ever bring its lock-out within the window it is told.
-- KEYS[1] the counter   ARGV[1] the window in force, ms
local ms = redis.call('PTTL', KEYS[1])
local window = tonumber(ARGV[1])
if ms == -1 or ms > window then
  redis.call('PEXPIRE', KEYS[1], window)
  return window
end
return ms
