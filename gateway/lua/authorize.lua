-- The one round trip of a proxied request: confirm the cached key state is current, then
-- decide the per-key rate limit and the workspace's monthly quota, count, stamp last-used.
-- All KEYS share the workspace's hash tag, so this runs on one Redis Cluster slot.
--
-- KEYS[1] key hash      kg:key:{ws}:<id>
-- KEYS[2] workspace     kg:ws:{ws}
-- KEYS[3] month counter kg:usage:{ws}:<YYYY-MM>
-- KEYS[4] rate window   kg:rate:{ws}:<id>
-- ARGV[1] now, ms   ARGV[2] cached key rev   ARGV[3] cached workspace rev (missing rev = "0")
-- ARGV[4] mode: "count" (forward) or "check" (state only, counts nothing)
-- ARGV[5] rate limit N (0 = none)   ARGV[6] rate period, ms
-- ARGV[7] monthly limit (-1 = unlimited)   ARGV[8] month counter TTL, s
--
-- Returns one of
--   {"stale"}                                 the key or workspace changed (or is gone): the
--                                             caller re-reads it and decides again
--   {"ok", month_used}                        (mode "check")
--   {"rate", retry_after_ms, window_reset_ms}
--   {"quota", month_used}
--   {"ok", month_used, rate_remaining, window_reset_ms}
local k = redis.call('HMGET', KEYS[1], 'rev', 'id')
local w = redis.call('HMGET', KEYS[2], 'rev', 'id')
if not k[2] or not w[2] or (k[1] or '0') ~= ARGV[2] or (w[1] or '0') ~= ARGV[3] then
  return {'stale'}
end
local now = tonumber(ARGV[1])
if ARGV[4] == 'check' then
  return {'ok', tonumber(redis.call('GET', KEYS[3]) or '0')}
end

-- Sliding-window rate limit: the previous window's count weighted by how much of it still
-- overlaps the last `period`, plus this window's count. Stored as one hash: w, c, p.
local limit, period = tonumber(ARGV[5]), tonumber(ARGV[6])
local window, count, prev, rate_remaining, reset_ms = 0, 0, 0, -1, 0
if limit > 0 then
  window = math.floor(now / period)
  local st = redis.call('HMGET', KEYS[4], 'w', 'c', 'p')
  local w = tonumber(st[1])
  if w == window then
    count, prev = tonumber(st[2]), tonumber(st[3])
  elseif w == window - 1 then
    prev = tonumber(st[2])
  end
  local into = now - window * period
  local weighted = prev * (period - into) / period
  reset_ms = period - into
  if weighted + count + 1 > limit then
    -- when will the estimate have dropped enough for one more request?
    local retry = reset_ms
    if prev > 0 and count + 1 <= limit then
      local need = weighted + count + 1 - limit
      retry = math.ceil(need * period / prev)
    end
    return {'rate', retry, reset_ms}
  end
  count = count + 1
  rate_remaining = math.floor(limit - weighted - count)
  if rate_remaining < 0 then rate_remaining = 0 end
end

local quota = tonumber(ARGV[7])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if quota >= 0 and used >= quota then
  return {'quota', used}  -- refused: nothing counted, no rate consumed
end
if limit > 0 then
  redis.call('HSET', KEYS[4], 'w', window, 'c', count, 'p', prev)
  redis.call('PEXPIRE', KEYS[4], 2 * period)
end
used = redis.call('INCR', KEYS[3])
if used == 1 or redis.call('TTL', KEYS[3]) < 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[8])
end
redis.call('HSET', KEYS[1], 'last_used_at', string.format('%.3f', now / 1000))
return {'ok', used, rate_remaining, reset_ms}
