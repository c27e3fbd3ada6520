-- progress.lua: a running attempt's progress report, as a job event.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  job id
-- ARGV[2]  attempt token (the attempt number claim handed out)
-- ARGV[3]  the report: JSON text (the worker parsed it from the task's
--          `{"progress": ...}` line, bounded its size and its rate)
-- Returns  1 when published; 0 when that attempt is no longer running (it
--          ended, was reaped or cancelled): a late report changes nothing.
-- Invariant: fenced by attempt like a completion, so a report never lands
--          after the job's end or under another attempt's number. The latest
--          report is also kept on the job (field progress) for readers that
--          poll.

local id, token, report = ARGV[1], ARGV[2], ARGV[3]
local jk = k('job', id)
local v = redis.call('HMGET', jk, 'state', 'attempts', 'tenant', 'queue')
if v[1] ~= 'running' or v[2] ~= token then return 0 end
redis.call('HSET', jk, 'progress', report)
feed(v[3], v[4], id, 'progress', 'attempt', token, 'progress', report)
flush_feed()
return 1
