-- extend.lua: extend the leases of a worker's running attempts (heartbeat).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  lease duration in ms, counted from now (Redis server time)
-- ARGV[2..] pairs: id, token
-- Returns  id, token, why for each attempt the worker must kill at once,
--          flat: why is "lost" when that token no longer holds the lease
--          (expired and reaped, or finished elsewhere), "cancel" when the
--          job was cancelled while this attempt runs (cancel.lua marked it;
--          the fallback for a worker that missed the wake-channel message,
--          within a third of the lease). A cancelled attempt's lease is still
--          extended: it holds its slot until the worker's completion closes
--          it as cancelled (complete.lua).
-- Invariant: only the current holder (matching attempt token) can extend a
--          lease, and deadlines come from the Redis clock, never a worker's.

local lease_ms = tonumber(ARGV[1])
local now = now_ms()
local lost = {}
for i = 2, #ARGV - 1, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local v = redis.call('HMGET', k('job', id), 'state', 'attempts', 'cancel')
  if v[1] == 'running' and v[2] == token then
    redis.call('ZADD', k('leases'), 'XX', now + lease_ms, id)
    redis.call('HSET', k('job', id), 'hb', now)
    if v[3] == token then
      lost[#lost + 1] = id
      lost[#lost + 1] = token
      lost[#lost + 1] = 'cancel'
    end
  else
    lost[#lost + 1] = id
    lost[#lost + 1] = token
    lost[#lost + 1] = 'lost'
  end
end
return lost
