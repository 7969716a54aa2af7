-- wrk script for bench/offer_flow.py --client wrk: the whole offer flow, one flow in flight per
-- connection, from a client in C (~3 % of a core at ~350 requests/s; the asyncio client ~5 %).
--
--   wrk -tN -cN -d20s -s bench/offer_flow.lua http://127.0.0.1:PORT -- FLOW_FILE
--
-- One connection per thread (-t equal to -c): each thread has its own Lua state and walks one
-- flow at a time through its connection, as bench/offer_flow.py's `one_flow` does: create a
-- delivery as ops (autoDispatch) → GET its offers → accept as the offered driver →
-- pickup-started → pickup-completed → delivery-started → a fix at the drop-off → delivery-
-- completed; a delivery that found nobody free is cancelled; an unexpected status abandons the
-- flow (counted by step and status, the first body kept) and the next flow starts.
--
-- FLOW_FILE: "run <id>" (in every sellerOrderId: unique per run), "ops <token>", "centre <lat>
-- <lon>", then one "driver <uuid> <token>" a line.
-- done() prints one line "WRKJSON {...}" (as bench/location.lua's, which benchlib.run_wrk
-- parses) with, besides, every request's latency by step (microseconds, measured from the
-- moment wrk asked for the request to its response), the flows completed, the deliveries that
-- found nobody, and the unexpected statuses.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local wrkjson = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrkjson.lua")

local threads = wrkjson.threads
setup = wrkjson.setup

-- per thread --------------------------------------------------------------------------------

local ops_headers, driver_headers = nil, {}
local centre_lat, centre_lon, run_id = 0, 0, "0"
local STEPS = { "pickup-started", "pickup-completed", "delivery-started" }

-- every request's latency (microseconds) and its step's index in STEP_NAMES, two flat lists
-- (wrk's thread:get copies a flat table; a table of tables crashes it)
STEP_NAMES = { "create", "cancel", "offers", "accept", "pickup-started", "pickup-completed", "delivery-started",
  "location", "delivery-completed" }
local STEP_INDEX = {}
for i, name in ipairs(STEP_NAMES) do STEP_INDEX[name] = i end
took_us, took_step = {}, {}
errors = {} -- "step:status" -> count
samples = "" -- the first body of each unexpected status, abbreviated
flows, unassigned, seq = 0, 0, 0

local state, sent_at = "create", 0
local flow = {}

function init(args)
  for line in io.lines(args[1]) do
    local kind, a, b = line:match("^(%S+)%s+(%S+)%s*(%S*)")
    if kind == "run" then
      run_id = a
    elseif kind == "ops" then
      ops_headers = { ["Authorization"] = "Token " .. a, ["Content-Type"] = "application/json" }
    elseif kind == "centre" then
      centre_lat, centre_lon = tonumber(a), tonumber(b)
    elseif kind == "driver" then
      driver_headers[a] = { ["Authorization"] = "Token " .. b, ["Content-Type"] = "application/json" }
    end
  end
  if not ops_headers then
    error("no ops token in " .. tostring(args[1]))
  end
  math.randomseed(tid * 7919 + 17)
end

local function around(spread)
  return (math.random() * 2 - 1) * spread
end

local function make_request()
  if state == "create" then
    seq = seq + 1
    flow = {
      drop_lat = centre_lat + around(0.02), drop_lon = centre_lon + around(0.02), step = 0,
    }
    local body = string.format(
      '{"sellerOrderId":"BENCH-%s-%d-%d","storeName":"Bench Store",' ..
      '"pickupLocation":{"lat":%.6f,"lon":%.6f},"dropoffLocation":{"lat":%.6f,"lon":%.6f},' ..
      '"prepTimeMinutes":0,"autoDispatch":true}',
      run_id, tid, seq, centre_lat + around(0.005), centre_lon + around(0.005),
      flow.drop_lat, flow.drop_lon)
    return wrk.format("POST", "/v2/deliveries", ops_headers, body)
  elseif state == "cancel" then
    return wrk.format("POST", "/v2/deliveries/" .. flow.id .. "/cancel", ops_headers, '{"reason":"bench: nobody free"}')
  elseif state == "offers" then
    return wrk.format("GET", "/v2/deliveries/" .. flow.id .. "/offers", ops_headers)
  elseif state == "accept" then
    return wrk.format("POST", "/v2/drivers/" .. flow.driver .. "/offers/" .. flow.offer .. "/accept",
      driver_headers[flow.driver], "{}")
  elseif state == "location" then
    return wrk.format("POST", "/v2/drivers/" .. flow.driver .. "/location", driver_headers[flow.driver],
      string.format('{"lat":%.6f,"lon":%.6f}', flow.drop_lat, flow.drop_lon))
  end
  -- a step: pickup-started, pickup-completed, delivery-started, delivery-completed
  return wrk.format("POST", "/v2/drivers/" .. flow.driver .. "/deliveries/" .. flow.id .. "/" .. state,
    driver_headers[flow.driver], "{}")
end

function request()
  sent_at = now_us()
  return make_request()
end

local function unexpected(status, body)
  local key = state .. ":" .. status
  if not errors[key] and #samples < 2000 then
    samples = samples .. key .. " " .. body:sub(1, 200) .. " | "
  end
  errors[key] = (errors[key] or 0) + 1
  state = "create" -- the flow is abandoned; the next one starts
end

function response(status, headers, body)
  local n = #took_us + 1
  took_us[n] = now_us() - sent_at
  took_step[n] = STEP_INDEX[state]

  if state == "create" then
    if status ~= 201 then return unexpected(status, body) end
    flow.id = body:match('^{"id":"([^"]+)"')
    flow.offer = body:match('"currentOfferId":"([^"]+)"')
    if not flow.id then return unexpected("noid", body) end
    if flow.offer then
      state = "offers"
    else
      unassigned = unassigned + 1
      state = "cancel"
    end
  elseif state == "cancel" then
    if status ~= 200 then return unexpected(status, body) end
    state = "create"
  elseif state == "offers" then
    if status ~= 200 then return unexpected(status, body) end
    local pattern = '"id":"' .. flow.offer:gsub("%-", "%%-") .. '","deliveryId":"[^"]*","driverId":"([^"]+)","status":"PENDING"'
    flow.driver = body:match(pattern)
    if not flow.driver or not driver_headers[flow.driver] then return unexpected("nooffer", body) end
    state = "accept"
  elseif state == "accept" then
    if status ~= 200 then return unexpected(status, body) end
    state = STEPS[1]
    flow.step = 1
  elseif state == "location" then
    if status ~= 200 then return unexpected(status, body) end
    state = "delivery-completed"
  elseif state == "delivery-completed" then
    if status ~= 200 then return unexpected(status, body) end
    flows = flows + 1
    state = "create"
  else -- pickup-started, pickup-completed, delivery-started
    if status ~= 200 then return unexpected(status, body) end
    flow.step = flow.step + 1
    state = STEPS[flow.step] or "location" -- the app's fix at the door before delivery-completed
  end
end

-- main state --------------------------------------------------------------------------------

function done(summary, latency_all, requests)
  local steps, errs, total_flows, total_unassigned, bodies = {}, {}, 0, 0, ""
  for _, thread in ipairs(threads) do
    local us, step = thread:get("took_us"), thread:get("took_step")
    for i, v in ipairs(us) do
      local name = STEP_NAMES[step[i]]
      local into = steps[name] or {}
      into[#into + 1] = v
      steps[name] = into
    end
    for key, c in pairs(thread:get("errors")) do
      errs[key] = (errs[key] or 0) + c
    end
    total_flows = total_flows + thread:get("flows")
    total_unassigned = total_unassigned + thread:get("unassigned")
    bodies = bodies .. thread:get("samples")
  end
  local step_parts, err_parts = {}, {}
  for name, list in pairs(steps) do
    table.insert(step_parts, string.format('"%s":[%s]', name, table.concat(list, ",")))
  end
  for key, c in pairs(errs) do
    table.insert(err_parts, string.format('"%s":%d', wrkjson.escape(key), c))
  end
  wrkjson.write(summary, latency_all, string.format(
    '"statuses":{},"not_accepted":0,"bad_bodies":"%s","flows":%d,"unassigned":%d,"unexpected":{%s},"steps":{%s}',
    wrkjson.escape(bodies), total_flows, total_unassigned, table.concat(err_parts, ","), table.concat(step_parts, ",")))
end
