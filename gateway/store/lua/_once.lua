-- Included (scripts.py) by every admin script that writes, to make a call that is sent again
-- run once. redis-py sends a command again, on a fresh connection, when the connection it was
-- sent on died before the reply came (a CLIENT KILL, a proxy's or a load balancer's reset:
-- gateway.redis_urls._retry, up to 3 times): Redis may have run it already, its reply lost.
-- Such a call names one key more than the script's own, its last: kg:once:{ws}:admin:<call-id>
-- (an id no other call has, in the workspace's slot), and its last ARGV is how long that key
-- is kept, ms (longer than redis-py goes on sending the call again). The first run records
-- there what it answered; a copy of the call finds it and gives the same answer, doing
-- nothing again. A call that names the script's own keys only runs every time, as before.
local once_key = nil
local once_args = #ARGV  -- the ARGV the script itself reads (its field pairs end there)

-- {answer} when a copy of this call ran already (its answer in a table: it may be nil), else
-- nil. own: how many KEYS the script itself names.
local function once_ran(own)
  if #KEYS > own then
    once_key, once_args = KEYS[own + 1], #ARGV - 1
    local ran = redis.call('GET', once_key)
    if ran then return cjson.decode(ran) end
  end
  return nil
end

-- Returns answer and, when the script changed something (wrote: true) and the call names a
-- key for that, records it as this call's. A refusal (nothing written: no such key, a
-- conflict, a cap reached) records nothing: a copy of it is refused again the same way, which
-- is its answer, and the script stays one that writes nothing. Redis at maxmemory with
-- noeviction refuses a script's first write that may grow memory (OOM): a refusal that
-- recorded its answer was answered 503 there instead of its 404 or 409. Once the script has
-- written (any write command), Redis lets it finish: a change records its answer as it did.
-- cjson's limits on what is recorded: a number is written with 14 significant digits (an
-- integer >= 1e14 comes back rounded), and a table with holes (a sparse array) comes back
-- with cjson.null in them (or is refused, very sparse: a script error). No script answers
-- those today (hashes, strings, 0/1, false); one that would must answer them as strings.
local function once_answered(answer, wrote)
  if once_key and wrote then
    redis.call('SET', once_key, cjson.encode({answer}), 'PX', ARGV[#ARGV])
  end
  return answer
end
