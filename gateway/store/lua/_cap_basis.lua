-- Included (scripts.py) by the scripts that meet the plan's cap on active keys: admin_add_key
-- and admin_update_key (which also checks with it the plan a new rate_limit was judged by).
-- The cap they are given was worked out from the workspace's plan and own limits as stored,
-- joined by a newline (admin_keys._capped_workspace, `basis`); the script runs later (a
-- create waits its turn to hash between the read and here), so either may have changed: then
-- the caller answers 'stale_ws' and reads the cap again. Not the workspace's rev: a role PUT
-- bumps that and changes no cap.
local function cap_basis_changed(ws_hash, basis)
  local stored = redis.call('HMGET', ws_hash, 'plan', 'limits')
  return (stored[1] or '') .. '\n' .. (stored[2] or '') ~= basis
end
