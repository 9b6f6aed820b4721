-- wrk script: "new alerts". Every request carries alerts never seen before: a fingerprint and a
-- startsAt unique to this wrk process, thread and request, so the service must store every one
-- durably before it answers. Args (after --): ALERTS_PER_REQUEST [SERVICES]
--   wrk -t1 -c16 -d10s -s bench/new_alerts.lua http://127.0.0.1:PORT -- 10 10
package.path = "bench/lua/?.lua;" .. package.path
local P = require("payload")

local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local n_alerts, n_services, salt, req, headers = 10, 10, "", 0, nil
function init(args)
  n_alerts = tonumber(args[1] or "10")
  n_services = tonumber(args[2] or "10")
  -- Distinct per wrk process (warm-up and measurement are two processes on one database).
  math.randomseed(os.time())
  salt = string.format("%08x%02x", (os.time() * 1000 + math.random(0, 999)) % 0xffffffff, tid or 0)
  headers = P.headers()
end

function request()
  req = req + 1
  local service = "svc-" .. (req % n_services)
  local starts_at = os.date("!%Y-%m-%dT%H:%M:%S", os.time()) .. string.format(".%09dZ", req % 1000000000)
  local alerts = {}
  for i = 1, n_alerts do
    alerts[i] = P.alert(i, service, starts_at, string.format("%s%08x%03x", salt, req, i))
  end
  return wrk.format("POST", P.path, headers, P.notification(service, alerts))
end

done = P.done
