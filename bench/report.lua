-- Shared by every wrk run of the bench: numbers the threads and, when the run is
-- over, prints one line "BENCH_RESULT {json}" that bench/run.py reads. Used alone as
-- the script of plain GET runs; claim.lua loads it (wrk runs with bench/ as its cwd).

local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("thread_id", #threads)
end

-- Adds the counts of one thread to the totals.
local function merge(totals, counts)
   for key, count in pairs(counts or {}) do
      totals[key] = (totals[key] or 0) + count
   end
end

-- A flat JSON object of counts; keys are status codes or error codes.
local function json_counts(counts)
   local items = {}
   for key, count in pairs(counts) do
      items[#items + 1] = string.format('"%s":%d', tostring(key), count)
   end
   return "{" .. table.concat(items, ",") .. "}"
end

function done(summary, latency, _)
   local statuses, codes, sent = {}, {}, nil
   for _, thread in ipairs(threads) do
      merge(statuses, thread:get("statuses"))
      merge(codes, thread:get("codes"))
      local thread_sent = thread:get("sent")
      if thread_sent then
         sent = (sent or 0) + thread_sent
      end
   end
   local errors = summary.errors
   io.write("BENCH_RESULT ", string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,"sent":%s,'
         .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"statuses":%s,"codes":%s}',
      summary.requests, summary.duration, summary.bytes, sent and tostring(sent) or "null",
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      json_counts(statuses), json_counts(codes)), "\n")
end
