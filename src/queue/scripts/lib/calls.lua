-- lib/calls.lua: repeated worker calls answer as the first did.

-- A worker's last call of each kind (claim, complete, release) and its
-- reply, so that the same call repeated after a lost reply (the worker
-- retries with the same call id) answers as the first did instead of
-- acting twice: hash B:calls:<worker>, fields <kind> = the call id and
-- <kind>:r = the reply; it expires an hour after the worker's last call.
-- An empty call id opts out.
local function remembered(worker, kind, call)
  if call == '' then return nil end
  local v = redis.call('HMGET', k('calls', worker), kind, kind .. ':r')
  if v[1] == call then return v[2] end
  return nil
end
local function remember(worker, kind, call, reply)
  if call == '' then return end
  local key = k('calls', worker)
  redis.call('HSET', key, kind, call, kind .. ':r', reply)
  redis.call('PEXPIRE', key, 3600000)
end
