-- Record a key prefix a keygate serves with, and answer those recorded (Store.key_prefixes_seen).
-- KEYS[1] kg:prefixes (ZSET, score: when a keygate last recorded the prefix, ms)
-- ARGV[1] the prefix   ARGV[2] now (ms)   ARGV[3] at most this many answered
-- Returns {how many recorded prefixes a config could write, {the most recent of them first,
-- at most ARGV[3]}}. Only what a config could write (1-10 of a-z0-9) is answered: a member
-- someone else wrote (not UTF-8, a regex's metacharacters, a long name) is never read by the
-- client, whose replies are decoded, nor made part of its masks. The first 1000 members by
-- recency are looked at.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local most = tonumber(ARGV[3])
local valid, out = 0, {}
for _, p in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, 999)) do
  if #p <= 10 and string.match(p, '^[a-z0-9]+$') then
    valid = valid + 1
    if #out < most then out[#out + 1] = p end
  end
end
return {valid, out}
