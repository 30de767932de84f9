-- Included (scripts.py) by every admin script that changes a key or a workspace.
-- A new rev: Redis's clock in microseconds, or one more than the rev when that is not above it.
-- Never a value a replica may have cached: a backup restored, or a failover to a replica that
-- missed the last writes, takes revs back, and a counter would then hand out again the rev of
-- a lost change (a replica would take its cached state as current: a revoke unseen).
-- Any change also clears a key's 'rotated_to' mark and its 'rotated_gen' (admin_add_key,
-- admin_take_back): a rotation answered 503 gives the old key back as it was only while
-- nothing else has changed it since.
-- A change of only what no cached key or workspace holds (UNREVISED: a key's name,
-- description and meta, a workspace's name; the answers that show them read them from the
-- store) moves no rev, only clears those marks (changed_unrevised): every request of the key
-- at every replica met the moved rev, read the key again and checked again, and a key whose
-- meta a script kept editing had its requests re-read it again and again, until some were
-- answered 503. What a request is decided on is all in the rev: its scopes or role, expiry,
-- revoked, enabled, limits, allowed_ips, and a workspace's plan, limits and roles.
local UNREVISED = {name = true, description = true, meta = true}
local function changed_unrevised(hash)
  redis.call('HDEL', hash, 'rotated_to', 'rotated_gen')
end
local function new_rev(hash)
  changed_unrevised(hash)
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local cur = tonumber(redis.call('HGET', hash, 'rev') or '0')
  if cur and cur >= tonumber(stamp) then
    redis.call('HINCRBY', hash, 'rev', 1)
  else
    redis.call('HSET', hash, 'rev', stamp)
  end
end
-- Whether the field, value pairs ARGV[first..last] change only UNREVISED fields.
local function only_unrevised(first, last)
  for i = first, last - 1, 2 do
    if not UNREVISED[ARGV[i]] then return false end
  end
  return true
end
