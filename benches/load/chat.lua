-- wrk script for benches/load.sh: POSTs an OpenAI chat-completions body, with
-- `Authorization: Bearer tg-bench-<i>` for a uniformly random i in [0, BENCH_NKEYS)
-- per request, so the gateway's whole key table is exercised (nginx ignores it).
-- Environment: BENCH_NKEYS (10000), BENCH_MAX_TOKENS (16), BENCH_STREAM (0/1).
-- done() prints one line `LOADJSON {...}` with the counts and latency percentiles in µs.

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
