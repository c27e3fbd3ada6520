-- lib/outbox.lua: one attempt's usage record into the ledger outbox.

-- Append one attempt's usage record to the ledger outbox. The record is
-- packed into one field, r: the values in the order of PACKED_FIELDS in
-- src/ledger.rs joined by tabs (the worker id last), and e: the error text.
-- One field instead of 21 makes this XADD several times cheaper; tenant,
-- queue and kind are validated names and the rest are numbers, so no value
-- but the last can hold a tab. b: how charge() priced a tenant with price
-- steps (charge_note, lib/limits.lua; absent for everyone else, so older
-- readers and records are unaffected).
local function outbox(id, job, a, enq, started, finished, run_ms, cost)
  local T = '\t'
  local r = id .. T .. job.attempts .. T .. job.tenant ..
    T .. job.queue .. T .. (job.kind or '') .. T .. a.outcome .. T .. enq .. T .. started ..
    T .. finished .. T .. math.max(0, started - (tonumber(job.ready_at) or enq)) .. T ..
    run_ms .. T .. (a.cpu_ms or '') .. T .. (a.peak_rss or '') .. T .. (a.exit_code or '') ..
    T .. (a.signal or '') .. T .. (a.api_calls or '') .. T .. (a.input_tokens or '') .. T ..
    (a.output_tokens or '') .. T .. cost .. T .. (job.worker or '')
  if charge_note then
    redis.call('XADD', k('outbox'), '*', 'r', r, 'e', a.error or '', 'b', charge_note)
    charge_note = nil
  else
    redis.call('XADD', k('outbox'), '*', 'r', r, 'e', a.error or '')
  end
end
