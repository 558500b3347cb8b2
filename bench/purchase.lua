-- POST /api/purchase {"item_id": ITEM_ID} as JSON, without a cookie:
-- every request is a new shopper. ITEM_ID comes from the environment.
-- wrk -t2 -c500 -d10s -s bench/purchase.lua http://127.0.0.1:P/api/purchase
local item = os.getenv("ITEM_ID") or "1"
wrk.method = "POST"
wrk.body = '{"item_id": ' .. item .. '}'
wrk.headers["Content-Type"] = "application/json"

local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "report.lua")

function done(summary, latency, requests)
   report(summary, latency)
end
