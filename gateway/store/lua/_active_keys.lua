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
