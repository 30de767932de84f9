-- A key as the cold path needs it, in one round trip: the key's record, its workspace's record
-- and, for a key bound to a role, the workspace's definition of that role. All three share the
-- workspace's hash tag, so this is one slot under Cluster too.
-- KEYS[1] the key's hash   KEYS[2] the workspace's hash   KEYS[3] the workspace's roles hash
-- KEYS[4] the key's record once deleted (kg:gone:{ws}:<id>, with a deleted_at field), read
-- when KEYS[1] does not exist: its token is answered as before the delete
-- Returns {key fields (flat HGETALL), workspace fields, the role's scopes JSON or false}.
local key = redis.call('HGETALL', KEYS[1])
if #key == 0 and KEYS[4] then key = redis.call('HGETALL', KEYS[4]) end
local role = false
for i = 1, #key, 2 do
  if key[i] == 'role' and key[i + 1] ~= '' then
    role = redis.call('HGET', KEYS[3], key[i + 1])
  end
end
return {key, redis.call('HGETALL', KEYS[2]), role}
