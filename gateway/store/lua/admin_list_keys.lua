-- What a key listing orders and filters by, of every key of a workspace, in one call: a page
-- of a listing then reads only its own keys' records (HGETALL each, argon2 hash and all), not
-- every record of the workspace. The key hashes share the set's slot ({ws}).
-- KEYS[1] kg:ws:{ws}:keys   ARGV[1] the key hash name up to the key id ('kg:key:{ws}:')
-- Returns a JSON array with one [id, name, created_at, expires_at, revoked_at, last_used_at]
-- (as stored, "" = none) for each key of the set whose record exists.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'id', 'name', 'created_at', 'expires_at',
                       'revoked_at', 'last_used_at')
  if f[1] and f[1] ~= '' then
    for i = 2, 6 do
      if not f[i] then f[i] = '' end
    end
    out[#out + 1] = f
  end
end
if #out == 0 then return '[]' end  -- cjson would encode an empty table as {}
return cjson.encode(out)
