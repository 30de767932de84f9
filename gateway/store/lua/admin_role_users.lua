-- One step of a role delete's count (admin_set_role): of the keys of one SSCAN step over the
-- workspace's key set, those bound to the role and not revoked or expired (disabled ones
-- included: enabling one brings it back). One call reads about ARGV[3] keys, never the whole
-- set: a script runs as one step, and the count over every key of a big workspace, in the
-- delete's own script, held the shared Redis for as long as it ran (~0.4 s at 50,000 keys).
-- KEYS[1] kg:ws:{ws}:keys   ARGV[1] the key hash name up to the key id ('kg:key:{ws}:')
-- ARGV[2] the SSCAN cursor ('0' to start)   ARGV[3] SSCAN's COUNT   ARGV[4] role name
-- ARGV[5] now (epoch s)
-- Returns {next cursor ('0': done), {ids of this step's keys bound to the role}} (an id may
-- come in two steps: SSCAN's rule when the set grows meanwhile).
local scan = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local now = tonumber(ARGV[5])
local using = {}
for _, id in ipairs(scan[2]) do
  local k = redis.call('HMGET', ARGV[1] .. id, 'role', 'revoked_at', 'expires_at')
  if k[1] == ARGV[4] and (not k[2] or k[2] == '') then
    local exp = tonumber(k[3] or '')
    if exp == nil or exp > now then using[#using + 1] = id end
  end
end
return {scan[1], using}
