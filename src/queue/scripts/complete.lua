-- complete.lua: record the end of one or more running attempts (fenced ack).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  worker id
-- ARGV[2]  call id: the same call repeated (a retry after a lost reply)
--          returns the first reply and changes nothing ("" opts out)
-- ARGV[3..] fifteen fields per attempt, repeated:
--          id, token (the attempt number handed out by claim), outcome
--          (succeeded|failed|timed_out|memory_exceeded), permanent (0|1),
--          error, result (JSON text or ""), exit_code, signal, run_ms, cpu_ms,
--          peak_rss_bytes, api_calls, input_tokens, output_tokens, backoff_ms
-- Returns  { events, status1, status2, ... }: events is a space-separated
--          list such as "quota_80:acme quota_100:acme" (may be empty); one
--          status per attempt, in order: the job's new state (succeeded,
--          delayed, ready, dead, or cancelled: the job was cancelled while
--          this attempt ran, see below), or "refused" when the lease is no longer
--          this attempt's (it expired and the job was handed to another worker,
--          or the job is gone): a fenced-out completion changes nothing.
--          An attempt named twice in one call is applied once; the second
--          gets the first one's status.
-- Invariant: in one atomic step the tenant slot is released, the outcome is
--          recorded, the retry or dead-letter is scheduled and the ledger
--          record is appended to the outbox stream, so none can happen without
--          the others. An attempt cancel.lua marked (job field cancel = this
--          attempt) closes as "cancelled" whatever outcome is reported (the
--          worker killed it: no retry, not dead-lettered; its record bills
--          the reported run time, CPU and peak RSS), unless the outcome is
--          succeeded: a task that finished before the kill keeps its success
--          (finish_attempt in lib/attempt.lua). Its slot was held until now,
--          so a tenant's cap is never overrun by a dying process.

local worker, call = ARGV[1], ARGV[2]
local again = remembered(worker, 'complete', call)
if again then return cjson.decode(again) end
local N, FIRST = 15, 2
local now = now_ms()
local out = { '' }
-- Load every job first so the tenants' counters and sched scores can be read
-- with one command per kind, not one per job.
local jobs, tenants, by_queue = {}, {}, {}
local first_of = {} -- "id/attempt" -> offset of its first mention
local first_at = {} -- offset -> offset of the first mention of its attempt
for o = FIRST, #ARGV - N, N do
  local id, token = ARGV[o + 1], ARGV[o + 2]
  local attempt_key = id .. '/' .. token
  local job = not first_of[attempt_key] and load_job(id)
  first_of[attempt_key] = first_of[attempt_key] or o
  first_at[o] = first_of[attempt_key]
  if job and job.state == 'running' and job.attempts == token then
    jobs[o] = job
    if not by_queue[job.queue] then by_queue[job.queue] = {} end
    by_queue[job.queue][#by_queue[job.queue] + 1] = job.tenant
    tenants[#tenants + 1] = job.tenant
  end
end
prefetch(tenants)
for q, ts in pairs(by_queue) do prefetch_sched(q, ts) end
local status_at = {} -- offset -> status
for o = FIRST, #ARGV - N, N do
  local job = jobs[o]
  local first = first_at[o]
  if first ~= o then
    out[#out + 1] = status_at[first]
  elseif not job then
    out[#out + 1] = 'refused'
  else
    out[#out + 1] = finish_attempt(ARGV[o + 1], job, {
      outcome = ARGV[o + 3], permanent = ARGV[o + 4] == '1', error = ARGV[o + 5],
      result = ARGV[o + 6], exit_code = ARGV[o + 7], signal = ARGV[o + 8],
      run_ms = tonumber(ARGV[o + 9]), cpu_ms = ARGV[o + 10], peak_rss = ARGV[o + 11],
      api_calls = ARGV[o + 12], input_tokens = ARGV[o + 13], output_tokens = ARGV[o + 14],
      backoff_ms = tonumber(ARGV[o + 15]) or 0,
    }, now)
  end
  status_at[o] = out[#out]
end
finish()
out[1] = table.concat(events, ' ')
remember(worker, 'complete', call, cjson.encode(out))
return out
