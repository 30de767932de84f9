-- Create a key, or rotate one: create its replacement (same settings) and, in the same step,
-- revoke the old key now (no grace) or set it to expire at the end of the grace period.
-- One script for both, so a key is added to a workspace in exactly one way.
--
-- The plan's cap on active keys is checked in the same step as the creation, so concurrent
-- creates at the cap cannot both succeed. Rotating an active key without a grace never fails
-- on the cap (the new key replaces the old). With a grace both stay active for a while, so the
-- workspace may go one key over its cap, never more (else rotating the newest key again and
-- again, each time with a grace, would mint any number of active keys). Rotating an expired
-- key creates a key like any other, so the cap applies; so does rotating a key whose last
-- rotation's key is still active (its 'successor', or its 'rotated_to' when rotated before
-- that field was kept): the old key no longer stands alone for its integration, and replacing
-- it (in its grace) by one more live key left the workspace over its cap for good
-- ('successor_limit').
--
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] new key hash   KEYS[5] kg:ws:{ws}:audit   KEYS[6] kg:ws:{ws}:roles
-- KEYS[7] old key hash (rotation only; a create passes KEYS[8] here, unread)
-- KEYS[8] the acting key's hash (a workspace admin key's call; the operator's: unread)
-- KEYS[9] kg:ws:{ws}:undone:<new id>: set when the call was answered 503 and taken back
--         (admin_take_back): this script, run late (it sat in a stalled Redis's buffers),
--         then adds nothing ('undone')
-- KEYS[10] kg:ws:{ws}:bindings: the new key's role's counter is bumped (_bound_to_role.lua)
-- A rotation's new key shares the old key's rate log and month count (its field 'budget', in
-- the field pairs): it goes on in the old key's rate window and from its count, never a fresh
-- one, and during a grace the two keys spend one budget.
-- ARGV[1] now (epoch s)   ARGV[2] max active keys (-1 = unlimited)
-- ARGV[3] the new key's expiry as a score ('+inf' = never)   ARGV[4] new key id
-- ARGV[5] audit entry (JSON)   ARGV[6] audit stream cap
-- ARGV[7] old key id ('' = create, not rotate)   ARGV[8] end of grace (epoch s; '' = revoke now)
-- ARGV[9] the old key's rev the new key's fields were copied from (the copy is refused as
--         'stale' if the key changed since: the caller re-reads and tries again; so is a copy
--         whose name, description or meta the key no longer has, which moves no rev)
-- ARGV[10] the workspace role the new key is bound to, when no configured role of that name
--         stands behind it ('' = none): it must still exist, checked in this step, since a
--         role delete refuses while keys use it (admin_set_role) and must see this key
-- ARGV[11] the workspace's plan and own limits ARGV[2] was worked out from (_cap_basis.lua):
--         a change of either is 'stale_ws'. Not the workspace's rev: creates and rotations
--         made stale by role changes gave up (503) under a stream of them
-- ARGV[12] the acting key's rev when its call was judged ('' = the operator): the key must
--         still have it and not have expired (_acting_key.lua), else 'actor_changed' and
--         nothing is written. A create or rotation waits its turn to hash between the judging
--         and here (seconds behind a burst): a key revoked, disabled or re-scoped meanwhile
--         mints nothing more
-- ARGV[13] with ARGV[12]: the scopes the new key gets (JSON list): when the acting key is
--         bound to a role the workspace defines, that role must still grant it keys:admin (or
--         ALL) and each of them, else 'actor_changed' (a role edit changes no key's rev)
-- ARGV[14..] new key's field, value pairs
-- Returns 'ok' | 'no_workspace' | 'stale_ws' | 'no_role' (ARGV[10] is not defined) |
-- 'collision' (new key id taken) | 'limit' (cap reached) | 'actor_changed' (see ARGV[12]) and,
-- rotating, 'not_found' | 'revoked' | 'stale' | 'grace_limit' (grace asked, workspace
-- already over its cap) | 'successor_limit' (the key's last successor is active and the
-- workspace is at its cap) | 'undone' (see KEYS[9]). 'ok' as well when the new key is there
-- already with this call's hash: a resend of a call that ran (see below).
-- A grace that ends before the old key would have expired keeps its own expiry in
-- 'own_expires_at' ('' = none; set once, by the first such grace; a new expiry given to the
-- key removes it: admin_update_key). A take-back giving the key its expiry back leaves it: it
-- then holds that same expiry.
-- A rotation marks the old key 'successor' = the new id (kept through later changes) and
-- 'rotated_to' = the new id (any later change clears it, see _new_rev.lua): admin_take_back
-- gives it back as it was only while that mark stands. With it, 'rotated_gen': the delete
-- generation of the key's role then (its 'deleted:<role>' in KEYS[10], admin_set_role): a
-- take-back gives the key back only while no delete of the role came since (a role deleted
-- and defined again is another role).
-- KEYS[11] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _acting_key.lua
-- include: _cap_basis.lua
-- include: _active_keys.lua
-- include: _bound_to_role.lua
-- include: _once.lua
local ran = once_ran(10)
if ran then return ran[1] end
local function add()
  if redis.call('EXISTS', KEYS[9]) == 1 then return 'undone' end
  -- This very call ran already: its connection died after Redis ran it and before the answer
  -- came, and redis-py sent it again on a fresh connection. The new key's hash (its secret's,
  -- salted: no other call has it) is there: the first run's outcome is the answer. (Run again,
  -- a rotation found the old key changed -- by itself -- and, revoked, was refused: the new key
  -- stood, its token never shown, the old key revoked; a create made a second key.)
  -- Kept beside the call's marker (_once.lua): it holds for a call without one, and for a
  -- copy that comes after the marker expired.
  local made = redis.call('HGET', KEYS[4], 'hash')
  if made then
    for i = 14, once_args - 1, 2 do
      if ARGV[i] == 'hash' then
        if ARGV[i + 1] == made then return 'ok' end
        break
      end
    end
  end
  if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
  if acting_key_changed(KEYS[8], ARGV[12], ARGV[1], KEYS[6], ARGV[13]) then
    return 'actor_changed'
  end
  if cap_basis_changed(KEYS[1], ARGV[11]) then return 'stale_ws' end
  if ARGV[10] ~= '' and redis.call('HEXISTS', KEYS[6], ARGV[10]) == 0 then return 'no_role' end
  local rotating = ARGV[7] ~= ''
  local old_exp = nil
  local old_exp_field = ''
  local old_role = ''
  local old_successor = ''
  if rotating then
    local old = redis.call('HMGET', KEYS[7], 'id', 'revoked_at', 'expires_at', 'rev', 'role',
                           'successor', 'rotated_to')
    if not old[1] then return 'not_found' end
    if old[2] and old[2] ~= '' then return 'revoked' end
    if (old[4] or '0') ~= ARGV[9] then return 'stale' end
    -- nor a copy of a name, description or meta edited since: such an edit moves no rev
    -- (_new_rev.lua), and the new key would carry what it replaced
    local now_has = redis.call('HMGET', KEYS[7], 'name', 'description', 'meta')
    local stored = {name = now_has[1] or '', description = now_has[2] or '',
                    meta = (now_has[3] or '') ~= '' and now_has[3] or '{}'}  -- as read
    for i = 14, once_args - 1, 2 do
      if UNREVISED[ARGV[i]] and stored[ARGV[i]] ~= ARGV[i + 1] then return 'stale' end
    end
    old_exp = tonumber(old[3] or '')
    old_exp_field = old[3] or ''
    old_role = old[5] or ''
    old_successor = old[6] or old[7] or ''
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then return 'collision' end
  local now = tonumber(ARGV[1])
  local active = active_keys(KEYS[3], ARGV[1])
  local replaces_active = rotating and not (old_exp ~= nil and old_exp <= now)
  local max = tonumber(ARGV[2])
  if not replaces_active and max >= 0 and active >= max then
    return 'limit'
  end
  if replaces_active and old_successor ~= '' and max >= 0 and active >= max then
    local score = redis.call('ZSCORE', KEYS[3], old_successor)
    if score and (score == 'inf' or tonumber(score) > now) then return 'successor_limit' end
  end
  if replaces_active and ARGV[8] ~= '' and max >= 0 and active > max then
    return 'grace_limit'
  end

  if rotating then
    if ARGV[8] == '' then
      redis.call('HSET', KEYS[7], 'revoked_at', ARGV[1])
      redis.call('ZREM', KEYS[3], ARGV[7])
    elseif replaces_active then
      local grace_end = tonumber(ARGV[8])
      if old_exp == nil or grace_end < old_exp then
        -- the key's own expiry ('' = none), kept from before its first such grace: a later
        -- rotation copies its lifetime, not created_at -> the grace's end
        if redis.call('HEXISTS', KEYS[7], 'own_expires_at') == 0 then
          redis.call('HSET', KEYS[7], 'own_expires_at', old_exp_field)
        end
        redis.call('HSET', KEYS[7], 'expires_at', ARGV[8])
        redis.call('ZADD', KEYS[3], ARGV[8], ARGV[7])
      end
    end
    new_rev(KEYS[7])
    redis.call('HSET', KEYS[7], 'successor', ARGV[4], 'rotated_to', ARGV[4], 'rotated_gen',
               old_role ~= '' and redis.call('HGET', KEYS[10], 'deleted:' .. old_role) or '0')
  end

  local fields = {}
  for i = 14, once_args do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[4], unpack(fields))
  new_rev(KEYS[4])
  redis.call('SADD', KEYS[2], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  local role = redis.call('HGET', KEYS[4], 'role')
  if role and role ~= '' then  -- a delete of that role counting its keys meanwhile counts again
    bound_to_role(KEYS[1], KEYS[10], role)
  end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
  return 'ok', true
end
return once_answered(add())
