-- Readiness (RequestStore.ready): can this connection write, as the authorize script does
-- when it counts a request? A read-only replica refuses the write (READONLY), a Redis full
-- under maxmemory with noeviction refuses it (OOM): either way no request could be counted,
-- so the gateway is not ready. PING and SCRIPT LOAD answer in both cases.
-- KEYS[1] kg:ready   (the key lives one second)
redis.call('SET', KEYS[1], '1', 'PX', 1000)
return 1
