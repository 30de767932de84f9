-- Create a workspace unless its id is taken, and audit it, in one step.
-- KEYS[1] kg:ws:{ws}   KEYS[2] kg:ws:{ws}:audit
-- ARGV[1] audit entry (JSON)   ARGV[2] audit stream cap   ARGV[3..] field, value pairs
-- Returns 1 when created, 0 when the id is taken.
-- KEYS[3] and the last ARGV (a call that may be sent again): this call's marker
-- kg:once:{ws}:admin:<call-id> and how long it is kept, ms: a copy of a call that ran
-- answers as it did, doing nothing again (_once.lua)
-- include: _new_rev.lua
-- include: _once.lua
local ran = once_ran(2)
if ran then return ran[1] end
local function create()
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local fields = {}
  for i = 3, once_args do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
  new_rev(KEYS[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
  return 1, true
end
return once_answered(create())
