-- Change a workspace's name, plan and/or own limits, bump its rev (cached authorisations
-- re-read it on their next request; not for a change of its name only, see _new_rev.lua),
-- and audit it, in one step.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:audit
-- ARGV[1] audit entry (JSON)   ARGV[2] audit stream cap
-- ARGV[3] limits: '' = unchanged, 'null' = drop every override, else a JSON object merged
--         into the stored overrides (its nulls stay: null = unlimited)
-- ARGV[4..] field, value pairs
-- Returns the workspace hash (HGETALL), or nil when it does not exist.
-- KEYS[3] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _once.lua
local ran = once_ran(2)
if ran then return ran[1] end
local function update()
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  if once_args >= 5 then
    local fields = {}
    for i = 4, once_args do fields[#fields + 1] = ARGV[i] end
    redis.call('HSET', KEYS[1], unpack(fields))
  end
  if ARGV[3] == 'null' then
    redis.call('HDEL', KEYS[1], 'limits')
  elseif ARGV[3] ~= '' then
    local cur = redis.call('HGET', KEYS[1], 'limits')
    local merged = {}
    if cur and cur ~= '' then merged = cjson.decode(cur) end
    for name, value in pairs(cjson.decode(ARGV[3])) do merged[name] = value end
    -- not cjson.encode(merged): it writes numbers with 14 significant digits (123456789012345
    -- became 1.2345678901234e+14); whole numbers are written whole (decoded exactly: < 2^53)
    local parts = {}
    for name, value in pairs(merged) do
      local text
      if type(value) == 'number' and value == math.floor(value) and math.abs(value) < 2^53 then
        text = string.format('%d', value)
      else
        text = cjson.encode(value)
      end
      parts[#parts + 1] = cjson.encode(name) .. ':' .. text
    end
    redis.call('HSET', KEYS[1], 'limits', '{' .. table.concat(parts, ',') .. '}')
  end
  if ARGV[3] == '' and only_unrevised(4, once_args) then  -- its name only (_new_rev.lua)
    changed_unrevised(KEYS[1])
  else
    new_rev(KEYS[1])
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
  return redis.call('HGETALL', KEYS[1]), true
end
return once_answered(update())
