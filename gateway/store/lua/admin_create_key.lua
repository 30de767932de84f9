-- Create a key if the workspace's plan allows one more active key: the check and the
-- creation are one step, so concurrent creates at the cap cannot both succeed.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:keys   KEYS[3] kg:ws:{ws}:active
-- KEYS[4] kg:key:{ws}:<id>   KEYS[5] kg:ws:{ws}:audit
-- ARGV[1] now (epoch s)   ARGV[2] max active keys (-1 = unlimited)
-- ARGV[3] the key's expiry as a score ('+inf' = never)   ARGV[4] key id
-- ARGV[5] audit entry (JSON)   ARGV[6] audit stream cap   ARGV[7..] field, value pairs
-- Returns 'ok' | 'no_workspace' | 'collision' (key id taken) | 'limit'.
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_workspace' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'collision' end
-- keys that expired leave the active set (revoked ones left it when revoked)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local max = tonumber(ARGV[2])
if max >= 0 and redis.call('ZCARD', KEYS[3]) >= max then return 'limit' end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('HINCRBY', KEYS[4], 'rev', 1)
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
return 'ok'
