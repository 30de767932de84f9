-- The one round trip of a proxied request: confirm the cached key state is current, then
-- decide the per-key rate limit, the workspace's monthly quota and the key's own monthly cap,
-- count (month and day, workspace and key), stamp last-used.
-- All KEYS share the workspace's hash tag, so this runs on one Redis Cluster slot.
--
-- KEYS[1] key hash      kg:key:{ws}:<id>
-- KEYS[2] workspace     kg:ws:{ws}
-- KEYS[3] month counter kg:usage:{ws}:<YYYY-MM>
-- KEYS[4] rate log      kg:rate:{ws}:<id>  (sorted set of admitted request times, ms;
--                       mode "spend": kg:rate:{ws}:<id>:own, the key's /_keygate/ calls)
-- KEYS[5] key's month counter   kg:kusage:{ws}:<id>:<YYYY-MM>
-- KEYS[6] workspace day counter kg:daily:{ws}:<YYYY-MM-DD>
-- KEYS[7] key's day counter     kg:kdaily:{ws}:<id>:<YYYY-MM-DD>
-- ARGV[1..9] are the same for every request of a key in a day (the client encodes them once):
-- ARGV[1] cached key rev   ARGV[2] cached workspace rev (missing rev = "0")
-- ARGV[3] mode: "count" (forward), "check" (state only, counts nothing), "use" (as "check",
--         and a current key's last_used_at is stamped: the admin listener's key calls),
--         "spend" (as "use", within the rate limit ARGV[4..5] over KEYS[4], one taken from
--         it, no quota judged nor anything counted: the proxy listener's /_keygate/
--         endpoints, whose calls have a log and a bound of their own) or "peek"
--         (state, rate and quotas judged as "count" would, nothing counted and no rate used:
--         a request refused after them, a body over max_body_bytes)
-- ARGV[4] rate limit N (0 = none)   ARGV[5] rate period, ms
-- ARGV[6] monthly limit (-1 = unlimited)   ARGV[7] the key's own monthly cap (-1 = none)
-- ARGV[8] day counter TTL, s
-- ARGV[9] a cap per second on top of a per-minute rate (0 = none): the key's own rate and its
--         workspace's when neither is within the other (see RateLimit.within), e.g. 50/m
--         under a 2/s plan is at most 50 a minute and at most 2 in any one second
-- ARGV[10..13] change with every request:
-- ARGV[10] now, ms   ARGV[11] month counter TTL, s
-- ARGV[12] a member unique to this request (for the rate log)
-- ARGV[13] deadline in Redis's own clock (TIME), microseconds; "0" = none. Set a little
--          before the client gives up on the reply: a call that runs later than that (Redis
--          was paused, or the command sat in a socket buffer) has been answered 503 already,
--          so it counts nothing.
-- Sentinel and Cluster only (redis-py sends a call again when its connection dies, which it
-- may do after Redis ran the call): a call in mode "count" also has
-- KEYS[8] this request's marker  kg:once:{ws}:<request-id>   ARGV[14] its TTL, ms
-- A call that counts sets the marker to its answer; a copy of the call that finds it answers
-- the same without doing anything, so a request is counted once however often it is sent.
--
-- Returns {"late"} (mode "count": past the deadline, nothing done), or
-- {outcome, month_used, rate_remaining, reset_ms, retry_ms, key_used} with outcome
--   "stale"      the key or workspace changed (or is gone): the caller re-reads it and decides
--                again (the other fields are 0)
--   "ok"         admitted and counted (mode "count"), admitted within the own-calls log (mode
--                "spend"), judged admissible (mode "peek"), or the state is current ("check",
--                "use")
--   "rate"       the rate log KEYS[4] is full (the key's rate limit, its per-second cap ARGV[9],
--                or in mode "spend" its own calls' bound): retry_ms until one more is admitted
--   "quota"      the workspace's month is used up (nothing counted, no rate used)
--   "key_quota"  the key's own monthly cap is used up (nothing counted, no rate used)
-- rate_remaining is -1 when no rate limit applies. Mode "spend" reads no counter: month_used
-- and key_used are 0 (keygate's own endpoints judge no quota and answer no RateLimit fields).
if KEYS[8] then
  local done = redis.call('GET', KEYS[8])
  if done then
    local r = {'ok'}
    for v in string.gmatch(done, '[^,]+') do r[#r + 1] = tonumber(v) end
    return r
  end
end
local k = redis.call('HMGET', KEYS[1], 'rev', 'id', 'last_used_at')
local w = redis.call('HMGET', KEYS[2], 'rev', 'id')
if not k[2] or not w[2] or (k[1] or '0') ~= ARGV[1] or (w[1] or '0') ~= ARGV[2] then
  return {'stale', 0, 0, 0, 0, 0}
end
local now = tonumber(ARGV[10])
-- last_used_at is kept to the second (what the admin API shows) and written only when that
-- second is later than the stored one: a busy key writes it once a second, not once a
-- request, and it never moves back (a replica's clock a little behind another's).
local function stamp()
  local second = math.floor(now / 1000)
  if (tonumber(k[3]) or 0) < second then
    redis.call('HSET', KEYS[1], 'last_used_at', second)
  end
end
if ARGV[3] == 'count' and ARGV[13] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[13]) then
    return {'late'}
  end
end
local spend = ARGV[3] == 'spend'  -- reads no counter (see "Returns")
local key_cap = tonumber(ARGV[7])
local key_used = 0
if key_cap >= 0 and not spend then key_used = tonumber(redis.call('GET', KEYS[5]) or '0') end
if ARGV[3] == 'check' or ARGV[3] == 'use' then
  if ARGV[3] == 'use' then
    stamp()
  end
  return {'ok', tonumber(redis.call('GET', KEYS[3]) or '0'), -1, 0, 0, key_used}
end

-- Per-key rate limit as a sliding log: a sorted set of the admitted requests' times in the
-- last `period`. Exact (never more than N in any window of `period`), and bursts up to N are
-- fine; memory is N entries per active key. With a cap per second besides (ARGV[9]), the same
-- log's last second holds at most that many too.
local limit, period = tonumber(ARGV[4]), tonumber(ARGV[5])
local rate_remaining, reset_ms, n = -1, 0, 0
local left, burst, b = -1, 0, 0  -- left: admitted before either window is full
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - period)
  n = redis.call('ZCARD', KEYS[4])
  if n >= limit then
    -- until one more fits: the entry whose leaving leaves limit - 1 (n - limit, 0-based). The
    -- oldest only when n = limit: a log can hold more than a lowered limit (a plan downgrade,
    -- a key's rate PATCHed, a reload), and the oldest's leaving then admits nothing.
    local due = redis.call('ZRANGE', KEYS[4], n - limit, n - limit, 'WITHSCORES')
    local retry = tonumber(due[2]) + period - now
    return {'rate', spend and 0 or tonumber(redis.call('GET', KEYS[3]) or '0'), 0, retry,
            retry, key_used}
  end
  left = limit - n
  burst = tonumber(ARGV[9])
  if burst > 0 then
    b = redis.call('ZCOUNT', KEYS[4], string.format('(%d', now - 1000), '+inf')
    if b >= burst then  -- until the last second holds burst - 1: its entry n - burst leaves
      -- it (the oldest of the last second's only when b = burst; a lowered cap leaves more)
      local due = redis.call('ZRANGE', KEYS[4], n - burst, n - burst, 'WITHSCORES')
      local retry = tonumber(due[2]) + 1000 - now
      return {'rate', spend and 0 or tonumber(redis.call('GET', KEYS[3]) or '0'), 0, retry,
              retry, key_used}
    end
    if burst - b < left then left = burst - b else burst = 0 end  -- burst > 0: it binds
  end
  rate_remaining = left - 1
end
if spend then
  if limit > 0 then
    redis.call('ZADD', KEYS[4], now, ARGV[12])
    redis.call('PEXPIRE', KEYS[4], period)
  end
  stamp()
  return {'ok', 0, -1, 0, 0, 0}
end

local quota = tonumber(ARGV[6])
local used = nil  -- the month's count: read only where a quota is judged or it is answered
if quota >= 0 then used = tonumber(redis.call('GET', KEYS[3]) or '0') end
local refused = nil
if quota >= 0 and used >= quota then
  refused = 'quota'
elseif key_cap >= 0 and key_used >= key_cap then
  refused = 'key_quota'
end
if used == nil and (refused or ARGV[3] == 'peek') then
  used = tonumber(redis.call('GET', KEYS[3]) or '0')
end
if refused then
  -- refused: nothing counted, no rate consumed (so the rate has one more left than if admitted)
  if b > 0 and burst > 0 then
    reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], n - b, n - b, 'WITHSCORES')[2]) + 1000 - now
  elseif n > 0 then
    reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2]) + period - now
  end
  return {refused, used, left, reset_ms, 0, key_used}
end
if ARGV[3] == 'peek' then
  return {'ok', used, left, 0, 0, key_used}
end
if limit > 0 then
  redis.call('ZADD', KEYS[4], now, ARGV[12])
  redis.call('PEXPIRE', KEYS[4], period)
  if burst > 0 then  -- the cap per second binds: its window resets first
    reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], n - b, n - b, 'WITHSCORES')[2]) + 1000 - now
  else
    reset_ms = tonumber(redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2]) + period - now
  end
end
used = redis.call('INCR', KEYS[3])
if used == 1 or redis.call('TTL', KEYS[3]) < 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[11])
end
-- The key's month and both days: every writer of these counters sets the TTL in the script
-- that creates them, so a first count (1) is the only moment one can lack it.
key_used = redis.call('INCR', KEYS[5])
if key_used == 1 then redis.call('EXPIRE', KEYS[5], ARGV[11]) end
if redis.call('INCR', KEYS[6]) == 1 then redis.call('EXPIRE', KEYS[6], ARGV[8]) end
if redis.call('INCR', KEYS[7]) == 1 then redis.call('EXPIRE', KEYS[7], ARGV[8]) end
stamp()
if KEYS[8] then
  redis.call('SET', KEYS[8], string.format('%d,%d,%d,0,%d', used, rate_remaining, reset_ms,
                                           key_used), 'PX', ARGV[14])
end
return {'ok', used, rate_remaining, reset_ms, 0, key_used}
