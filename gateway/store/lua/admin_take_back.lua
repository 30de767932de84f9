-- Take back a create or rotation whose caller was answered 503: its script was sent, its reply
-- lost (Redis stalled, restarted or timed out between running it and answering), so it may
-- have run, and the new key's token was never shown to anyone. A key nobody holds must not
-- stay active (it counts against the cap and is listed), and a rotation without a grace must
-- not leave the old key revoked (the integration's only token) for a token nobody got.
-- KEYS[1] new key hash   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] kg:ws:{ws}:audit   KEYS[5] kg:ws:{ws}:undone:<new id>
-- KEYS[6] old key hash (rotation; a create passes KEYS[1] here, unread)
-- KEYS[7] kg:ws:{ws}   KEYS[8] kg:ws:{ws}:bindings (the old key given back bound to a role
--         bumps that role's counter: _bound_to_role.lua, admin_set_role; and its field
--         'deleted:<role>', the role's delete generation, is read)
-- KEYS[9] kg:ws:{ws}:roles
-- ARGV[1] new key id   ARGV[2] audit entry (JSON)   ARGV[3] audit stream cap
-- ARGV[4] old key id ('' = a create)   ARGV[5] seconds the 'undone' mark is kept
-- ARGV[6] the old key's expires_at before the rotation ('' = none)
-- ARGV[7] the configured role names (JSON object, name -> true)
-- ARGV[8] the audit entry written instead of ARGV[2] when the old key is not given back
-- The 'undone' mark is set first, whatever is found: the add script, should it run after
-- this one (it sat in a stalled Redis's buffers), then adds nothing. The old key is given back
-- (not revoked, its expiry as before) only while it still carries the rotation's mark
-- 'rotated_to' = the new id: a revoke or any other change since (a person acting on the 503)
-- is never undone. Nor is it given back bound to a role neither the workspace (KEYS[9]) nor
-- the config (ARGV[7]) defines any more: a role may be deleted while its only keys are the
-- revoked old key and the new one (revoked by a person acting on the 503, or past a grace),
-- and given back it would be a live key bound to a role that nothing defines and no delete
-- counted: no scopes now, and whatever scopes a later role of that name gets. Nor when the
-- workspace deleted the role since the rotation and defined it again (its delete generation,
-- 'deleted:<role>' in KEYS[8], is not the 'rotated_gen' the rotation recorded; admin_set_role):
-- that is another role (say one granting ALL), which no one bound the key to and no delete
-- counted it against. A configured role of that name takes over the key whatever the
-- workspace did (a delete of a role shadowing a configured one needs no count). It stays as
-- the rotation left it (revoked, or expiring at the grace's end), its mark cleared.
-- Returns 'absent' (the add script had not run) | 'removed' | 'restored' (rotation: the old
-- key given back too) | 'kept' (rotation: the new key removed, the old key not given back,
-- its role gone).
-- KEYS[10] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _bound_to_role.lua
-- include: _once.lua
local ran = once_ran(9)
if ran then return ran[1] end
local function take_back()
  redis.call('SET', KEYS[5], '1', 'EX', ARGV[5])
  if redis.call('EXISTS', KEYS[1]) == 0 then return 'absent', true end
  local outcome = 'removed'
  if ARGV[4] ~= '' and redis.call('HGET', KEYS[6], 'rotated_to') == ARGV[1] then
    local old = redis.call('HMGET', KEYS[6], 'role', 'rotated_gen')
    local role = old[1] or ''
    if role ~= '' and not cjson.decode(ARGV[7])[role]
        and (redis.call('HEXISTS', KEYS[9], role) == 0
             or (redis.call('HGET', KEYS[8], 'deleted:' .. role) or '0') ~= (old[2] or '0')) then
      redis.call('HDEL', KEYS[6], 'rotated_to', 'rotated_gen', 'successor')
      outcome = 'kept'
    else
      redis.call('HSET', KEYS[6], 'revoked_at', '', 'expires_at', ARGV[6])
      redis.call('HDEL', KEYS[6], 'successor')
      redis.call('ZADD', KEYS[3], ARGV[6] == '' and '+inf' or ARGV[6], ARGV[4])
      new_rev(KEYS[6])
      if role ~= '' then bound_to_role(KEYS[7], KEYS[8], role) end
      outcome = 'restored'
    end
  end
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  local entry = outcome == 'kept' and ARGV[8] or ARGV[2]
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'e', entry)
  return outcome, true
end
return once_answered(take_back())
