-- The one round trip of a proxied request: confirm the cached key state is current, then
-- decide the per-key rate limit and the workspace's monthly quota, count, stamp last-used.
-- All KEYS share the workspace's hash tag, so this runs on one Redis Cluster slot.
--
-- KEYS[1] key hash      kg:key:{ws}:<id>
-- KEYS[2] workspace     kg:ws:{ws}
-- KEYS[3] month counter kg:usage:{ws}:<YYYY-MM>
-- KEYS[4] rate log      kg:rate:{ws}:<id>  (sorted set of admitted request times, ms)
-- ARGV[1] now, ms   ARGV[2] cached key rev   ARGV[3] cached workspace rev (missing rev = "0")
-- ARGV[4] mode: "count" (forward) or "check" (state only, counts nothing)
-- ARGV[5] rate limit N (0 = none)   ARGV[6] rate period, ms
-- ARGV[7] monthly limit (-1 = unlimited)   ARGV[8] month counter TTL, s
-- ARGV[9] a member unique to this request (for the rate log)
-- ARGV[10] deadline in Redis's own clock (TIME), microseconds; "0" = none. Set a little
--          before the client gives up on the reply: a call that runs later than that (Redis
--          was paused, or the command sat in a socket buffer) has been answered 503 already,
--          so it counts nothing.
--
-- Returns one of
--   {"late"}                                  (mode "count") past the deadline: nothing done
--   {"stale"}                                 the key or workspace changed (or is gone): the
--                                             caller re-reads it and decides again
--   {"ok", month_used}                        (mode "check")
--   {"rate", retry_after_ms, retry_after_ms, month_used}
--   {"quota", month_used, rate_remaining, window_reset_ms}   (nothing counted, no rate used)
--   {"ok", month_used, rate_remaining, window_reset_ms}
local k = redis.call('HMGET', KEYS[1], 'rev', 'id')
local w = redis.call('HMGET', KEYS[2], 'rev', 'id')
if not k[2] or not w[2] or (k[1] or '0') ~= ARGV[2] or (w[1] or '0') ~= ARGV[3] then
  return {'stale'}
end
local now = tonumber(ARGV[1])
if ARGV[4] == 'count' and ARGV[10] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[10]) then
    return {'late'}
  end
end
if ARGV[4] == 'check' then
  return {'ok', tonumber(redis.call('GET', KEYS[3]) or '0')}
end

-- Per-key rate limit as a sliding log: a sorted set of the admitted requests' times in the
-- last `period`. Exact (never more than N in any window of `period`), and bursts up to N are
-- fine; memory is N entries per active key.
local limit, period = tonumber(ARGV[5]), tonumber(ARGV[6])
local rate_remaining, reset_ms, n = -1, 0, 0
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - period)
  n = redis.call('ZCARD', KEYS[4])
  if n >= limit then
    local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    local retry = tonumber(oldest[2]) + period - now
    return {'rate', retry, retry, tonumber(redis.call('GET', KEYS[3]) or '0')}
  end
  rate_remaining = limit - n - 1
end

local quota = tonumber(ARGV[7])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if quota >= 0 and used >= quota then
  -- refused: nothing counted, no rate consumed (so the rate has one more left than if admitted)
  if n > 0 then
    reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2]) + period - now
  end
  return {'quota', used, limit > 0 and limit - n or -1, reset_ms}
end
if limit > 0 then
  redis.call('ZADD', KEYS[4], now, ARGV[9])
  redis.call('PEXPIRE', KEYS[4], period)
  reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2]) + period - now
end
used = redis.call('INCR', KEYS[3])
if used == 1 or redis.call('TTL', KEYS[3]) < 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[8])
end
redis.call('HSET', KEYS[1], 'last_used_at', string.format('%.3f', now / 1000))
return {'ok', used, rate_remaining, reset_ms}
