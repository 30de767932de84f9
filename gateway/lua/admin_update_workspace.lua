-- Change a workspace's name and/or plan, bump its rev (cached authorisations re-read it on
-- their next request), and audit it, in one step.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:audit
-- ARGV[1] audit entry (JSON)   ARGV[2] audit stream cap   ARGV[3..] field, value pairs
-- Returns the workspace hash (HGETALL), or nil when it does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV >= 4 then
  local fields = {}
  for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
return redis.call('HGETALL', KEYS[1])
