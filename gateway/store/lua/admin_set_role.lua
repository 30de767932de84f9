-- Define, replace or delete a workspace role; bump the workspace's rev so every key bound to
-- the role acts with its new scopes on its next request; audit it. One step.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:roles   KEYS[3] kg:ws:{ws}:audit
-- ARGV[1] 'put' | 'delete'   ARGV[2] role name   ARGV[3] scopes (JSON list; put only)
-- ARGV[4] audit entry (JSON)   ARGV[5] audit stream cap
-- Returns 'ok' | 'no_workspace' | 'not_found' (delete of a role the workspace does not have).
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
if ARGV[1] == 'put' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
elseif redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then
  return 'not_found'
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
return 'ok'
