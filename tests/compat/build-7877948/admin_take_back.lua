-- Take back a create or rotation whose caller was answered 503: its script was sent, its reply
-- lost (Redis stalled, restarted or timed out between running it and answering), so it may
-- have run, and the new key's token was never shown to anyone. A key nobody holds must not
-- stay active (it counts against the cap and is listed), and a rotation without a grace must
-- not leave the old key revoked (the integration's only token) for a token nobody got.
-- KEYS[1] new key hash   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] kg:ws:{ws}:audit   KEYS[5] kg:ws:{ws}:undone:<new id>
-- KEYS[6] old key hash (rotation; a create passes KEYS[1] here, unread)
-- KEYS[7] kg:ws:{ws} (its 'bindings' bumped when the old key given back is bound to a role:
--         see admin_set_role)
-- ARGV[1] new key id   ARGV[2] audit entry (JSON)   ARGV[3] audit stream cap
-- ARGV[4] old key id ('' = a create)   ARGV[5] seconds the 'undone' mark is kept
-- ARGV[6] the old key's expires_at before the rotation ('' = none)
-- The 'undone' mark is set first, whatever is found: the add script, should it run after
-- this one (it sat in a stalled Redis's buffers), then adds nothing. The old key is given back
-- (not revoked, its expiry as before) only while it still carries the rotation's mark
-- 'rotated_to' = the new id: a revoke or any other change since (a person acting on the 503)
-- is never undone.
-- Returns 'absent' (the add script had not run) | 'removed' | 'restored' (rotation: the old
-- key given back too).
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
redis.call('SET', KEYS[5], '1', 'EX', ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 0 then return 'absent' end
local restored = false
if ARGV[4] ~= '' and redis.call('HGET', KEYS[6], 'rotated_to') == ARGV[1] then
  redis.call('HSET', KEYS[6], 'revoked_at', '', 'expires_at', ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[6] == '' and '+inf' or ARGV[6], ARGV[4])
  new_rev(KEYS[6])
  local role = redis.call('HGET', KEYS[6], 'role')
  if role and role ~= '' then redis.call('HINCRBY', KEYS[7], 'bindings', 1) end
  restored = true
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
if restored then return 'restored' end
return 'removed'
