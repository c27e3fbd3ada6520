-- lib/events.lua: what a script reports besides its answer.

-- Events for the worker to log and export (quota thresholds, rate alerts),
-- returned by the scripts that produce them.
local events = {}
local function event(s) events[#events + 1] = s end
