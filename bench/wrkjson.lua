-- Shared by bench/location.lua and bench/offer_flow.lua (loaded with dofile): the threads (each
-- numbered in its global `tid`), and the line "WRKJSON {...}" they print at the end of a wrk run
-- and benchlib.run_wrk parses: wrk's own figures (requests, socket errors, latency percentiles in
-- microseconds), then the script's members.
local M = { threads = {} }

-- wrk's setup(thread), in the main state: numbers the threads and keeps them for done()
function M.setup(thread)
  thread:set("tid", #M.threads)
  table.insert(M.threads, thread)
end

function M.escape(s)
  return (s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end))
end

-- `members`: the script's own JSON members, comma-separated, without braces
function M.write(summary, latency, members)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},%s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), members))
end

return M
