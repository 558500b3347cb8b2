-- Plain GETs of the URL given to wrk; prints the same JSON line.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "report.lua")

function done(summary, latency, requests)
   report(summary, latency)
end
