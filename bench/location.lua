-- wrk script for bench/location_wrk.py: location fixes from many drivers, or GET /health/.
--
--   wrk -t2 -c32 -d20s -s bench/location.lua http://127.0.0.1:PORT -- fixes DRIVERS_FILE THREADS
--   wrk -t2 -c32 -d10s -s bench/location.lua http://127.0.0.1:PORT -- health
--
-- DRIVERS_FILE: one driver a line, "<uuid> <api token> <lat> <lon>". Thread k of THREADS takes
-- the lines i with i % THREADS == k and posts their fixes in turn (round robin), so a driver is
-- posted again only after every other driver of its thread was; each fix carries the wall clock
-- in microseconds as recordedAt, bumped past the driver's previous one, so every fix is newer
-- than the last and should be accepted. Responses with "accepted":false (the server found an
-- older-or-equal fix: only possible if a driver's previous fix was still in flight) are counted.
--
-- done() prints one line "WRKJSON {...}" that location_wrk.py parses: requests, duration, socket
-- errors, latency percentiles (microseconds), status counts and the not-accepted count.

local ffi_ok, ffi = pcall(require, "ffi")
local now_us
if ffi_ok then
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_usec; } bench_timeval;
    int gettimeofday(bench_timeval *tv, void *tz);
  ]]
  local tv = ffi.new("bench_timeval")
  now_us = function()
    ffi.C.gettimeofday(tv, nil)
    return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
  end
else
  now_us = function() return os.time() * 1000000 end
end

local wrkjson = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrkjson.lua")

local threads = wrkjson.threads
setup = wrkjson.setup

-- per thread (each thread has its own Lua state) ------------------------------------------

local mode = "health"
local mine = {}
local n = 0
local idx = 0
local health_req
statuses = {}
not_accepted = 0
bad_bodies = ""

function init(args)
  mode = args[1] or "health"
  if mode == "health" then
    health_req = wrk.format("GET", "/health/")
    return
  end
  local file, nthreads = args[2], tonumber(args[3] or "1")
  local i = 0
  for line in io.lines(file) do
    local id, token, lat, lon = line:match("^(%S+)%s+(%S+)%s+(%S+)%s+(%S+)")
    if id then
      if i % nthreads == tid then
        n = n + 1
        mine[n] = {
          path = "/v2/drivers/" .. id .. "/location",
          headers = { ["Authorization"] = "Token " .. token, ["Content-Type"] = "application/json" },
          lat = tonumber(lat), lon = tonumber(lon), heading = math.random() * 360, last = 0,
        }
      end
      i = i + 1
    end
  end
  if n == 0 then
    error("thread " .. tid .. ": no drivers in " .. tostring(file))
  end
  math.randomseed(tid * 7919 + 17)
end

local function iso(us)
  local sec = math.floor(us / 1000000)
  return os.date("!%Y-%m-%dT%H:%M:%S", sec) .. string.format(".%06dZ", us - sec * 1000000)
end

function request()
  if mode == "health" then
    return health_req
  end
  idx = idx % n + 1
  local d = mine[idx]
  local t = now_us()
  if t <= d.last then t = d.last + 1 end
  d.last = t
  d.heading = (d.heading + (math.random() - 0.5) * 60) % 360
  local step = 5 + math.random() * 55 -- metres
  d.lat = d.lat + step * math.cos(math.rad(d.heading)) / 111320
  d.lon = d.lon + step * math.sin(math.rad(d.heading)) / (111320 * math.cos(math.rad(d.lat)))
  local heading = math.floor(d.heading * 10) / 10 -- "%.1f" of 359.96 would be 360.0: refused
  local body = string.format(
    '{"lat":%.7f,"lon":%.7f,"accuracyMeters":%.1f,"speed":%.2f,"heading":%.1f,"recordedAt":"%s"}',
    d.lat, d.lon, 3 + math.random() * 22, math.random() * 14, heading, iso(t))
  return wrk.format("POST", d.path, d.headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if mode ~= "health" then
    if status == 200 then
      if not body:find('"accepted":true', 1, true) then
        not_accepted = not_accepted + 1
      end
    elseif #bad_bodies < 600 then
      bad_bodies = bad_bodies .. status .. ": " .. body:sub(1, 200) .. " | "
    end
  end
end

-- main state --------------------------------------------------------------------------------

function done(summary, latency, requests)
  local counts, refused, bodies = {}, 0, ""
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for status, c in pairs(s) do
      counts[status] = (counts[status] or 0) + c
    end
    refused = refused + (thread:get("not_accepted") or 0)
    bodies = bodies .. (thread:get("bad_bodies") or "")
  end
  local parts = {}
  for status, c in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', status, c))
  end
  wrkjson.write(summary, latency, string.format('"statuses":{%s},"not_accepted":%d,"bad_bodies":"%s"',
    table.concat(parts, ","), refused, wrkjson.escape(bodies)))
end
