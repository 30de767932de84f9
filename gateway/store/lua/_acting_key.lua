-- Included (scripts.py) by the scripts a workspace's keys:admin key writes with: admin_add_key
-- (a create, a rotation), admin_update_key, admin_revoke_key and admin_delete_key. Such a call
-- is judged when its head arrives (the acting key authenticated, its scopes and limits read);
-- its body may come much later (Expect: 100-continue, a slow client: up to
-- server.timeouts.body), and a create or rotation waits its turn to hash. A key revoked,
-- disabled, re-dated or re-scoped meanwhile (each bumps its rev) may change nothing more.
-- hash: the acting key's hash   rev: its rev when the call was judged ('' = the operator:
-- nothing is checked)   now: epoch s   roles: kg:ws:{ws}:roles   grants: JSON list of the
-- scopes the call hands out or was judged to need (a key's binding, the scopes of a key it
-- loosens or extends).
-- True when the key is not what it was judged as: another rev (or gone), revoked, disabled or
-- expired; or bound to a workspace role that no longer grants keys:admin (or ALL) and each of
-- grants (a role edit changes no key's rev).
local function acting_key_changed(hash, rev, now, roles, grants)
  if rev == nil or rev == '' then return false end
  local acting = redis.call('HMGET', hash, 'rev', 'expires_at', 'role', 'revoked_at', 'enabled')
  local exp = tonumber(acting[2] or '')
  if (acting[1] or '0') ~= rev or (exp ~= nil and exp <= tonumber(now))
      or (acting[4] and acting[4] ~= '') or acting[5] == '0' then
    return true
  end
  local def = acting[3] and acting[3] ~= '' and redis.call('HGET', roles, acting[3])
  if def then
    local held = {}
    for _, s in ipairs(cjson.decode(def)) do held[s] = true end
    if not held['ALL'] then
      if not held['keys:admin'] then return true end
      for _, s in ipairs(cjson.decode(grants)) do
        if not held[s] then return true end
      end
    end
  end
  return false
end
