-- Change a key's fields, bump its rev (every gateway replica re-reads it on its next request)
-- and audit it, in one step. Giving an expired key a new expiry makes it active again, so that
-- counts against the plan's key cap like a create.
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:active   KEYS[3] kg:ws:{ws}:audit
-- KEYS[4] kg:ws:{ws}:roles   KEYS[5] kg:ws:{ws}
-- ARGV[1] key id   ARGV[2] new expiry score ('' = unchanged, '+inf' = never; never in the past)
-- ARGV[3] now   ARGV[4] max active keys (-1 = unlimited)
-- ARGV[5] audit entry (JSON)   ARGV[6] audit stream cap
-- ARGV[7] the rev the change was judged on: if the key's rev is another, nothing is written
--         and 'stale' is returned ('' = write whatever the rev)
-- ARGV[8] the workspace role the key is being bound to, when no configured role of that name
--         stands behind it ('' = none): it must still exist, checked in this step, since a
--         role delete refuses while keys use it (admin_set_role) and must see this binding
-- ARGV[9] when the change gives a new expiry and leaves the binding as it is: the configured
--         role names (JSON object, name -> true), else ''. A new expiry makes an expired key
--         active again, and an expired key does not hold up a role delete (admin_set_role):
--         brought back bound to a role neither the workspace nor the config defines, it would
--         act with no scopes, so that is refused ({'unbound', role}; nothing written)
-- ARGV[10] when ARGV[2] is given: the workspace's plan and own limits ARGV[4] was worked out
--         from (_cap_basis.lua); a key brought back meets the cap as it is now, so a change of
--         either is 'stale_ws' (nothing written)
-- ARGV[11..] field, value pairs
-- Returns the key hash (HGETALL), nil when the key does not exist, 'limit', 'stale',
-- 'stale_ws', 'no_role' (ARGV[8] is not defined; nothing written) or {'unbound', role} (see
-- ARGV[9]).
-- Included (scripts.py) by every admin script that changes a key or a workspace.
-- A new rev: Redis's clock in microseconds, or one more than the rev when that is not above it.
-- Never a value a replica may have cached: a backup restored, or a failover to a replica that
-- missed the last writes, takes revs back, and a counter would then hand out again the rev of
-- a lost change (a replica would take its cached state as current: a revoke unseen).
-- Any change also clears a key's 'rotated_to' mark (admin_add_key, admin_take_back): a rotation
-- answered 503 gives the old key back as it was only while nothing else has changed it since.
local function new_rev(hash)
  redis.call('HDEL', hash, 'rotated_to')
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local cur = tonumber(redis.call('HGET', hash, 'rev') or '0')
  if cur and cur >= tonumber(stamp) then
    redis.call('HINCRBY', hash, 'rev', 1)
  else
    redis.call('HSET', hash, 'rev', stamp)
  end
end
-- Included (scripts.py) by the scripts that meet the plan's cap on active keys: admin_add_key
-- and admin_update_key. The cap they are given was worked out from the workspace's plan and
-- own limits as stored, joined by a newline (admin_keys._capped_workspace, `basis`); the
-- script runs later (a create waits its turn to hash between the read and here), so either
-- may have changed: then the caller answers 'stale_ws' and reads the cap again. Not the
-- workspace's rev: a role PUT bumps that and changes no cap.
local function cap_basis_changed(ws_hash, basis)
  local stored = redis.call('HMGET', ws_hash, 'plan', 'limits')
  return (stored[1] or '') .. '\n' .. (stored[2] or '') ~= basis
end
-- The workspace's active keys now: the members of its active set (kg:ws:{ws}:active) whose
-- score (expiry) is after `now`. Keys that expired leave the set here, at most 100 per call
-- (revoked ones left it when revoked): removing all of them at once, after a batch of keys
-- expired together, held the shared Redis for as long as the batch is big (~50 ms for
-- 20,000), and every replica's per-request call with it. Those still there count for
-- nothing: the count is of the scores after `now` (O(log n)).
local function active_keys(zset, now)
  local expired = redis.call('ZCOUNT', zset, '-inf', now)
  if expired > 0 then
    redis.call('ZREMRANGEBYRANK', zset, 0, math.min(expired, 100) - 1)
  end
  return redis.call('ZCOUNT', zset, '(' .. now, '+inf')
end
local st = redis.call('HMGET', KEYS[1], 'id', 'revoked_at', 'rev')
if not st[1] then return false end
if ARGV[7] ~= '' and (st[3] or '0') ~= ARGV[7] then return 'stale' end
if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[4], ARGV[8]) == 0 then return 'no_role' end
local revoked = st[2] and st[2] ~= ''
-- the key is made live bound to a role (bound to one, or an expired key brought back): the
-- workspace's 'bindings' is bumped, so a role delete counting its keys meanwhile counts again
-- (admin_set_role)
local binds = false
if ARGV[2] ~= '' and not revoked then
  local now = tonumber(ARGV[3])
  local cur = redis.call('ZSCORE', KEYS[2], ARGV[1])
  local active = cur and (cur == 'inf' or tonumber(cur) > now)
  if not active and ARGV[9] ~= '' then
    local bound = redis.call('HGET', KEYS[1], 'role')
    if bound and bound ~= '' and redis.call('HEXISTS', KEYS[4], bound) == 0
        and not cjson.decode(ARGV[9])[bound] then
      return {'unbound', bound}
    end
  end
  if not active and cap_basis_changed(KEYS[5], ARGV[10]) then return 'stale_ws' end
  if not active and tonumber(ARGV[4]) >= 0 then
    if active_keys(KEYS[2], ARGV[3]) >= tonumber(ARGV[4]) then return 'limit' end
  end
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  binds = not active
end
if #ARGV >= 12 then
  local fields = {}
  for i = 11, #ARGV do
    fields[#fields + 1] = ARGV[i]
    if (i - 11) % 2 == 0 and ARGV[i] == 'role' and ARGV[i + 1] ~= '' then binds = true end
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if binds and not revoked then
  local role = redis.call('HGET', KEYS[1], 'role')
  if role and role ~= '' then redis.call('HINCRBY', KEYS[5], 'bindings', 1) end
end
new_rev(KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
return redis.call('HGETALL', KEYS[1])
