-- wrk script: replay pre-signed webhook POSTs, one line per request ("<signature>\t<json body>").
-- Each wrk thread starts at its own offset so threads do not send the same bodies.
-- done() prints one machine-readable line, "BENCH {json}", with p50/p90/p95/p99 (wrk's own
-- --latency table has no p95) and every error class wrk counts.
local requests = {}
local idx = 0

local counter = 0
local threads = {}

function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
  threads[#threads + 1] = thread
end

function init(args)
  local path, file = args[1], args[2]
  for line in io.lines(file) do
    local sig, body = line:match("^([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["X-Hub-Signature-256"] = sig,
    }, body)
  end
  idx = (tonumber(offset) or 0) * math.floor(#requests / 2)
end

function request()
  idx = idx % #requests + 1
  return requests[idx]
end

function done(summary, latency, requests)
  local e = summary.errors
  local function ms(p) return latency:percentile(p) / 1000.0 end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_s":%.3f,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"non_2xx":%d,"timeouts":%d,"p50_ms":%.2f,"p90_ms":%.2f,"p95_ms":%.2f,'
      .. '"p99_ms":%.2f,"max_ms":%.2f,"mean_ms":%.2f}\n',
    summary.requests, summary.duration / 1e6, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, ms(50), ms(90), ms(95), ms(99), latency.max / 1000.0, latency.mean / 1000.0))
end
