-- wrk script for benches/load.sh: POSTs an OpenAI chat-completions body, with
-- `Authorization: Bearer tg-bench-<i>` for a uniformly random i in [0, BENCH_NKEYS)
-- per request, so the gateway's whole key table is exercised (nginx ignores it).
-- Environment: BENCH_NKEYS (10000), BENCH_MAX_TOKENS (16), BENCH_STREAM (0/1),
-- BENCH_RATE (total req/s; 0 = as fast as possible), BENCH_THREADS (wrk -t, for BENCH_RATE).
-- done() prints one line `LOADJSON {...}` with the counts and latency percentiles in µs.
--
-- Constant-rate mode (BENCH_RATE > 0), a stand-in for wrk2, which Debian does not ship:
-- each wrk thread hands out send slots spaced 1/rate apart (per thread: rate/threads) from
-- wrk's delay() hook; a connection that finishes a response claims the next slot and is
-- woken at the first millisecond tick at or after it (wrk's timers have 1 ms granularity,
-- as wrk2's do). Slots missed while all connections were busy are caught up at once, so the
-- offered rate holds. Unlike wrk2, latency is measured from the actual send, not from the
-- slot (no coordinated-omission correction): fine while connections are mostly idle, which
-- they are at half of the maximum throughput.

local nkeys      = tonumber(os.getenv("BENCH_NKEYS") or "10000")
local max_tokens = tonumber(os.getenv("BENCH_MAX_TOKENS") or "16")
local stream     = os.getenv("BENCH_STREAM") == "1"

local body = string.format(
  '{"model":"gpt-4o-mini","messages":[' ..
  '{"role":"system","content":"You are a helpful assistant."},' ..
  '{"role":"user","content":"Write a short poem about metering proxies and tokens."}],' ..
  '"max_tokens":%d%s}', max_tokens, stream and ',"stream":true' or '')

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local reqs = {}

function init(args)
  math.randomseed(os.time() * 7919 + (tid or 0) * 104729)
  -- Pre-format every request once: request() then costs one table lookup.
  for i = 0, nkeys - 1 do
    reqs[i] = wrk.format("POST", wrk.path, {
      ["Host"] = wrk.headers["Host"] or wrk.host,
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer tg-bench-" .. i,
    }, body)
  end
end

function request()
  return reqs[math.random(0, nkeys - 1)]
end

local rate = tonumber(os.getenv("BENCH_RATE") or "0")
if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    struct tg_bench_ts { long tv_sec; long tv_nsec; };
    int clock_gettime(int clk_id, struct tg_bench_ts *tp);
  ]]
  local ts = ffi.new("struct tg_bench_ts")
  local function now_us()
    ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME: wrk's timers tick on gettimeofday() ms
    return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
  end
  local interval_us = 1e6 * tonumber(os.getenv("BENCH_THREADS") or "1") / rate
  local next_us = nil

  function delay()
    local now = now_us()
    if next_us == nil then next_us = now end
    local slot = next_us
    next_us = next_us + interval_us
    if slot <= now then return 0 end -- due (or late): send right away
    -- wrk arms the timer for floor(now in ms) + delay ms: pick the first tick >= slot.
    return math.ceil(slot / 1e3) - math.floor(now / 1e3)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
