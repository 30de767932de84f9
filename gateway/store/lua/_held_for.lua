-- Included (scripts.py) by ledger_write.lua and recount.lua: which counters of a slot get
-- requests that were served while their count could not reach this store (held in a
-- replica's fail-open ledger, or counted on a master this one replaced).
-- The requests were forwarded: the workspace's month and day counters get them whenever the
-- workspace that is here now is the one that served them. It is not when it is gone, nor when
-- it was created after them (Redis lost keygate's data, and the workspace was created again
-- with that id: it must not inherit another's usage). Told apart by its created_at, which a
-- creation sets and nothing else changes:
--  * the key is here and was created at or after the workspace: key ids are never reused, so
--    the requests were the key's, in this workspace (no clock compared but the admin API's);
--  * else (the key deleted meanwhile, or rotated and then deleted) the workspace was created
--    no later than HELD_SKEW seconds after `since`, the earliest of the requests by the clock
--    of the replica that served them. HELD_SKEW allows for that clock being behind the admin
--    API's: hosts under NTP differ by milliseconds, and a workspace Redis lost cannot be
--    created again so soon after the requests (Redis must be back, and someone create it).
-- The key's day counter only while the key is here. The budget's month counter (shared by the
-- keys of a rotation) while the key or the budget's own key is here, or the counter is: a
-- rotation's new key goes on counting on it after the old one is deleted.
-- ws kg:ws:{ws}   key kg:key:{ws}:<id>   budget_key kg:key:{ws}:<budget>
-- budget_counter kg:kusage:{ws}:<budget>:<month>
-- Returns nil when nothing is to be written, else {month, budget month, day, key day}: which of
-- Slot.counters() are, and whether the key is here (the 4th).
local HELD_SKEW = 2
local function held_for(ws, key, budget_key, budget_counter, since)
  local w = redis.call('HMGET', ws, 'id', 'created_at')
  if not w[1] then return nil end
  local created = tonumber(w[2] or '') or 0
  local k = redis.call('HMGET', key, 'id', 'created_at')
  local key_here = k[1] and true or false
  local key_created = tonumber(k[2] or '')
  local ours = key_here and key_created ~= nil and key_created >= created
  if not ours and created > since + HELD_SKEW then return nil end
  local budget = key_here or redis.call('EXISTS', budget_key, budget_counter) > 0
  return {true, budget, true, key_here}
end
