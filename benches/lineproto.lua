-- wrk script: POSTs Influx line protocol, 1000 lines per request, 400 series (host_0..host_399,
-- region r0..r3), 2 fields (usage, idle), timestamps advancing 1 s per 400 lines (ns precision,
-- built as strings so no precision is lost). Stops sending after BENCH_REQUESTS responses
-- (wrk itself still runs for its -d duration, so rates come from timed runs without a limit).
local series = 400
local lines_per_req = 1000
local base_s = tonumber(os.getenv("BENCH_BASE_S"))
local limit = tonumber(os.getenv("BENCH_REQUESTS") or "1000000000")
local path = os.getenv("BENCH_PATH")
-- Measurements the series are spread over (cpu, or cpu0..cpuN-1): each field of each
-- measurement is a metric of its own in Shoal, so a request touches 2 * N shards.
local measurements = tonumber(os.getenv("BENCH_MEASUREMENTS") or "1")

local prefixes, values = {}, {}
for i = 0, series - 1 do
  local name = measurements > 1 and string.format("cpu%d", i % measurements) or "cpu"
  prefixes[i] = string.format("%s,host=host_%d,region=r%d usage=", name, i, i % 4)
end
for v = 0, 999 do
  values[v] = string.format("%d.%d,idle=%d.%d ", v % 100, v % 10, (v * 7) % 100, (v * 3) % 10)
end

local n = 0
local responses = 0
local bad = 0

request = function()
  local t = {}
  for j = 1, lines_per_req do
    local k = n + j - 1
    local s = base_s + math.floor(k / series)
    t[j] = prefixes[k % series] .. values[(k * 37) % 1000] .. s .. "000000000"
  end
  n = n + lines_per_req
  return wrk.format("POST", path, { ["Content-Type"] = "text/plain" }, table.concat(t, "\n"))
end

response = function(status, headers, body)
  responses = responses + 1
  if status ~= 204 and status ~= 200 then
    bad = bad + 1
    if bad < 3 then io.stderr:write("status " .. status .. ": " .. body .. "\n") end
  end
  if responses >= limit then wrk.thread:stop() end
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d non2xx=%d p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, summary.duration, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
