-- When a failed-verification counter resets: its PTTL, milliseconds (-2: gone, -1: no TTL).
-- One call per counter (on a Cluster the counters live in different slots); run only when
-- a request is refused for failures, to answer its Retry-After.
-- KEYS[1] the counter
return redis.call('PTTL', KEYS[1])
