-- Change a key's fields, bump its rev (every gateway replica re-reads it on its next request;
-- not for a change of only its name, description and/or meta, see _new_rev.lua) and audit
-- it, in one step. Giving an expired key a new expiry makes it active again, so that
-- counts against the plan's key cap like a create.
-- KEYS[1] kg:key:{ws}:<id>   KEYS[2] kg:ws:{ws}:active   KEYS[3] kg:ws:{ws}:audit
-- KEYS[4] kg:ws:{ws}:roles   KEYS[5] kg:ws:{ws}   KEYS[6] kg:ws:{ws}:bindings
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
--         act with no scopes, so that is refused ({'unbound', role}; nothing written). Refused
--         too for a key this script finds active: the delete judged expiry by its replica's
--         clock, which may be ahead of this one's (it counted the key expired and went ahead;
--         re-dated here it lived on bound to a role nothing defines)
-- ARGV[10] when ARGV[2] is given: the workspace's plan and own limits ARGV[4] was worked out
--         from (_cap_basis.lua); a key brought back meets the cap as it is now, so a change of
--         either is 'stale_ws' (nothing written)
-- ARGV[11] the acting key's rev when its call was judged ('' = the operator) and ARGV[12] the
--         scopes its checks judged it to need (JSON list): a workspace admin key revoked,
--         disabled, changed or expired since, or whose workspace role no longer grants
--         keys:admin and those, changes nothing ('actor_changed'; _acting_key.lua). KEYS[7]:
--         the acting key's hash (the operator's: unread)
-- ARGV[13] the workspace's plan and own limits a new rate_limit was judged against (a
--         workspace admin key's: never above the plan's rate), joined as _cap_basis.lua has
--         them ('' = none judged): a change of either since is 'plan_changed', nothing written
-- ARGV[14..] field, value pairs
-- An active key given a later expiry (or none) needs that room too while the workspace is over
-- its cap ('over_limit'): the old key of a rotation's grace would otherwise keep it over.
-- Returns the key hash (HGETALL), nil when the key does not exist, 'limit', 'over_limit', 'stale',
-- 'stale_ws', 'no_role' (ARGV[8] is not defined; nothing written), 'actor_changed' (see
-- ARGV[11]), 'plan_changed' (see ARGV[13]) or {'unbound', role} (see ARGV[9]).
-- KEYS[8] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _acting_key.lua
-- include: _cap_basis.lua
-- include: _active_keys.lua
-- include: _bound_to_role.lua
-- include: _once.lua
local ran = once_ran(7)
if ran then return ran[1] end
local function update()
  local st = redis.call('HMGET', KEYS[1], 'id', 'revoked_at', 'rev', 'role')
  if not st[1] then return false end
  if acting_key_changed(KEYS[7], ARGV[11], ARGV[3], KEYS[4], ARGV[12]) then
    return 'actor_changed'
  end
  if (ARGV[13] or '') ~= '' and cap_basis_changed(KEYS[5], ARGV[13]) then return 'plan_changed' end
  if ARGV[7] ~= '' and (st[3] or '0') ~= ARGV[7] then return 'stale' end
  if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[4], ARGV[8]) == 0 then return 'no_role' end
  local revoked = st[2] and st[2] ~= ''
  -- the key is made live bound to a role (bound to another role than it had, or given a new
  -- expiry, which brings an expired key back): that role's counter is bumped, so a delete of it
  -- counting its keys meanwhile counts again (admin_set_role). Any new expiry, not only one that
  -- this script finds bringing the key back: the delete's count judged expiry by its own
  -- replica's clock, which may be ahead of this one's (and a key bound to the role that was
  -- active all along holds its delete up anyway). A change that leaves the key's role and
  -- expiry as they are (a PATCH naming the role the key has) binds nothing; nor does a new
  -- role for a key that has expired and is given no new expiry (it holds no delete up: a
  -- tenant moving a long-expired key between roles in a loop starved their deletes). Expired
  -- means more than LIVE_SKEW seconds ago: the deleting replica's clock may be behind this
  -- one's, and count the key as live.
  local LIVE_SKEW = 60
  local redated = ARGV[2] ~= ''
  if ARGV[2] ~= '' and not revoked then
    local now = tonumber(ARGV[3])
    local cur = redis.call('ZSCORE', KEYS[2], ARGV[1])
    local active = cur and (cur == 'inf' or tonumber(cur) > now)
    if ARGV[9] ~= '' then
      local bound = redis.call('HGET', KEYS[1], 'role')
      if bound and bound ~= '' and redis.call('HEXISTS', KEYS[4], bound) == 0
          and not cjson.decode(ARGV[9])[bound] then
        return {'unbound', bound}
      end
    end
    -- an active key given a later expiry (or none) while the workspace is over its cap (the
    -- old key of a rotation's grace, one over it; or a cap lowered since) would keep it over
    -- for good: it needs room under the cap, as a key brought back does ('over_limit')
    local later = active and (ARGV[2] == '+inf' and cur ~= 'inf'
                              or cur ~= 'inf' and ARGV[2] ~= '+inf'
                                 and tonumber(ARGV[2]) > tonumber(cur))
    if (not active or later) and cap_basis_changed(KEYS[5], ARGV[10]) then
      return 'stale_ws'
    end
    if tonumber(ARGV[4]) >= 0 and (not active or later) then
      local others = active_keys(KEYS[2], ARGV[3]) - (active and 1 or 0)
      if others >= tonumber(ARGV[4]) then return active and 'over_limit' or 'limit' end
    end
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  end
  if redated then  -- the key's expiry is the one given now, a grace it was in apart
    redis.call('HDEL', KEYS[1], 'own_expires_at')
  end
  if once_args >= 15 then
    local fields = {}
    for i = 14, once_args do fields[#fields + 1] = ARGV[i] end
    redis.call('HSET', KEYS[1], unpack(fields))
  end
  if not revoked then
    local now_key = redis.call('HMGET', KEYS[1], 'role', 'expires_at')
    local role = now_key[1] or ''
    local exp = tonumber(now_key[2] or '')
    if role ~= '' and (redated or (role ~= (st[4] or '')
                                   and (exp == nil or exp > tonumber(ARGV[3]) - LIVE_SKEW))) then
      bound_to_role(KEYS[5], KEYS[6], role)
    end
  end
  -- a change of its name, description and/or meta only, which no cached key holds, moves no
  -- rev (_new_rev.lua): every replica's cached key stays current
  if not redated and only_unrevised(14, once_args) then
    changed_unrevised(KEYS[1])
  else
    new_rev(KEYS[1])
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
  return redis.call('HGETALL', KEYS[1]), true
end
return once_answered(update())
