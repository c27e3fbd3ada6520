-- lib/time.lua: Redis's clock and the calendar (months, UTC).

-- Redis server time in ms, read once per script call: every deadline and
-- timestamp that decides ownership comes from here, never a worker's clock.
-- The marker line below is where builds with the `test-clock` feature put
-- the simulation test's clock (src/queue/scripts.rs); in every other build
-- it stays a comment, so production scripts cannot be steered.
local now_cached = nil
local function now_ms()
  if not now_cached then
    local t = redis.call('TIME')
    now_cached = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- @test-clock
  end
  return now_cached
end
-- The same as a string: numbers passed to redis.call are formatted with
-- sprintf each time, which costs more than the command itself.
local now_text = nil
local function now_str()
  if not now_text then now_text = tostring(now_ms()) end
  return now_text
end

-- Calendar month (UTC) of a ms timestamp: "YYYY-MM", and the ms at which the
-- next month starts (civil-from-days, Howard Hinnant's algorithm).
local function days_to_civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400 + ((m <= 2) and 1 or 0)
  return y, m
end
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function month_of(ms)
  local y, m = days_to_civil(math.floor(ms / 86400000))
  return string.format('%04d-%02d', y, m)
end
local function next_month_ms(ms)
  local y, m = days_to_civil(math.floor(ms / 86400000))
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return days_from_civil(y, m) * 86400000
end
