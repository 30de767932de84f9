-- One step of a key listing's read: what a listing orders and filters by, of the keys of one
-- SSCAN step over the workspace's key set. A page of a listing then reads only its own keys'
-- records (HGETALL each, argon2 hash and all). One call reads about ARGV[3] keys, never the
-- whole set: a script runs as one step, and one over every key of a big workspace held the
-- shared Redis (and every replica's per-request call) for as long as it ran (~0.4 s at
-- 50,000 keys). The key hashes share the set's slot ({ws}).
-- KEYS[1] kg:ws:{ws}:keys   ARGV[1] the key hash name up to the key id ('kg:key:{ws}:')
-- ARGV[2] the SSCAN cursor ('0' to start)   ARGV[3] SSCAN's COUNT
-- Returns {next cursor ('0': done), JSON array}: one [id, name, created_at, expires_at,
-- revoked_at, last_used_at, rotated_to] (as stored, "" = none) for each key of this step whose
-- record exists. An id may come in two steps (SSCAN's rule when the set grows meanwhile), or
-- none if added meanwhile: 'rotated_to' names the key a rotation made, which the listing then
-- reads if its steps missed it (a rotated key is never listed revoked without it).
local scan = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local out = {}
for _, id in ipairs(scan[2]) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'id', 'name', 'created_at', 'expires_at',
                       'revoked_at', 'last_used_at', 'rotated_to')
  if f[1] and f[1] ~= '' then
    for i = 2, 7 do
      if not f[i] then f[i] = '' end
    end
    out[#out + 1] = f
  end
end
if #out == 0 then return {scan[1], '[]'} end  -- cjson would encode an empty table as {}
return {scan[1], cjson.encode(out)}
