-- Alertmanager webhook bodies (version 4) for wrk, shaped like what Alertmanager 0.25 sends:
-- one group (alertname + service) of N alerts that differ by instance and fingerprint.
-- bench/loadgen/src/main.rs builds the same shape for the open-loop runs.
local M = {}

M.path = "/webhook/alertmanager"
M.token = os.getenv("BENCH_TOKEN") or "bench-webhook-token"

function M.headers()
  return {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. M.token,
    ["User-Agent"] = "Alertmanager/0.25.0",
  }
end

local ALERT = '{"status":"firing","labels":{"alertname":"HighErrorRate","env":"prod",'
  .. '"instance":"10.0.%d.%d:8080","job":"%s","service":"%s","severity":"critical"},'
  .. '"annotations":{"description":"5xx ratio above 5%% on %s for the last 5 minutes",'
  .. '"runbook_url":"https://runbooks.example.com/%s/high-error-rate","summary":"%s high error rate"},'
  .. '"startsAt":"%s","endsAt":"0001-01-01T00:00:00Z",'
  .. '"generatorURL":"http://prometheus.example.com:9090/graph?g0.expr=job%%3A5xx_ratio%%3Arate5m+%%3E+0.05&g0.tab=1",'
  .. '"fingerprint":"%s"}'

function M.alert(i, service, starts_at, fingerprint)
  return string.format(ALERT, math.floor(i / 256) % 256, i % 256, service, service,
    service, service, service, starts_at, fingerprint)
end

local NOTIFICATION = '{"receiver":"rollback-responder","status":"firing","alerts":[%s],'
  .. '"groupLabels":{"alertname":"HighErrorRate","service":"%s"},'
  .. '"commonLabels":{"alertname":"HighErrorRate","env":"prod","job":"%s","service":"%s","severity":"critical"},'
  .. '"commonAnnotations":{},"externalURL":"http://alertmanager.example.com:9093","version":"4",'
  .. '"groupKey":"{}:{alertname=\\"HighErrorRate\\", service=\\"%s\\"}","truncatedAlerts":0}'

function M.notification(service, alerts)
  return string.format(NOTIFICATION, table.concat(alerts, ","), service, service, service, service)
end

-- Prints one machine-readable line for bench/run.sh (latencies in microseconds).
function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end

return M
