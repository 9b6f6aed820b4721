-- wrk script: "repeated notifications". A fixed set of groups re-sent over and over, as
-- Alertmanager does on group_interval/repeat_interval, from HA peers and on retries. After the
-- warm-up has stored them once, every alert is a duplicate. Args: ALERTS_PER_REQUEST [GROUPS]
--   wrk -t1 -c16 -d10s -s bench/repeated.lua http://127.0.0.1:PORT -- 10 10
package.path = "bench/lua/?.lua;" .. package.path
local P = require("payload")

local requests, next_one = {}, 0
function init(args)
  local n_alerts = tonumber(args[1] or "10")
  local groups = tonumber(args[2] or "10")
  local headers = P.headers()
  for g = 1, groups do
    local service = "svc-" .. (g - 1)
    local alerts = {}
    for i = 1, n_alerts do
      alerts[i] = P.alert(i, service, "2026-01-01T00:00:00.000Z", string.format("%08x%08x", g, i))
    end
    requests[g] = wrk.format("POST", P.path, headers, P.notification(service, alerts))
  end
end

function request()
  next_one = next_one % #requests + 1
  return requests[next_one]
end

done = P.done
