-- Included (scripts.py) by every admin script that changes a key or a workspace.
-- A new rev: Redis's clock in microseconds, or one more than the rev when that is not above it.
-- Never a value a replica may have cached: a backup restored, or a failover to a replica that
-- missed the last writes, takes revs back, and a counter would then hand out again the rev of
-- a lost change (a replica would take its cached state as current: a revoke unseen).
-- Any change also clears a key's 'rotated_to' mark and its 'rotated_gen' (admin_add_key,
-- admin_take_back): a rotation answered 503 gives the old key back as it was only while
-- nothing else has changed it since.
local function new_rev(hash)
  redis.call('HDEL', hash, 'rotated_to', 'rotated_gen')
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local cur = tonumber(redis.call('HGET', hash, 'rev') or '0')
  if cur and cur >= tonumber(stamp) then
    redis.call('HINCRBY', hash, 'rev', 1)
  else
    redis.call('HSET', hash, 'rev', stamp)
  end
end
