-- wrk script of the claim scenarios: every request claims the coupon for a user id
-- never used before, "<prefix>-<thread>-<counter>".
--
-- Arguments after "--": the coupon name, a user id prefix unique to the run, and the
-- number of answers to wait for (0: no limit, the run lasts wrk's -d duration).
-- With a limit, every thread stops as soon as all threads together have that many
-- answers, and prints "BENCH_THREAD_DONE"; bench/run.py then ends wrk (which
-- otherwise waits out its -d duration). Claims still in flight at that moment (at
-- most one per connection) count as sent, not answered.
--
-- Threads stop together because a stopped thread can leave connections open that
-- carry no request, and a gunicorn sync worker that accepts one waits on it: the
-- other thread's last claims would then queue behind them.

dofile("report.lua")

local ffi = require("ffi")
ffi.cdef("void *calloc(size_t count, size_t size);")

local MAX_THREADS = 64
local headers = { ["Content-Type"] = "application/json" }
local coupon, prefix, limit, answers

sent, answered = 0, 0
statuses, codes = {}, {}

-- In setup's state: one array of answer counts, a slot per thread, shared by all.
local number_thread = setup
function setup(thread)
   number_thread(thread)
   answers_address = answers_address
      or tonumber(ffi.cast("uintptr_t", ffi.C.calloc(MAX_THREADS, ffi.sizeof("double"))))
   thread:set("answers_address", answers_address)
end

function init(args)
   coupon, prefix, limit = args[1], args[2], tonumber(args[3])
   answers = ffi.cast("double *", answers_address)
end

function request()
   sent = sent + 1
   local body = string.format('{"user_id":"%s-%d-%d","coupon_name":"%s"}',
      prefix, thread_id, sent, coupon)
   return wrk.format("POST", "/api/coupons/claim", headers, body)
end

-- All threads' answers so far.
local function total_answered()
   local total = 0
   for slot = 0, MAX_THREADS - 1 do
      total = total + answers[slot]
   end
   return total
end

function response(status, _, body)
   answered = answered + 1
   statuses[status] = (statuses[status] or 0) + 1
   if status >= 400 then
      local code = string.match(body, '"code"%s*:%s*"([%w_]+)"') or "none"
      codes[code] = (codes[code] or 0) + 1
   end
   if limit > 0 then
      answers[thread_id - 1] = answered
      if total_answered() >= limit then
         io.write("BENCH_THREAD_DONE\n")
         io.stdout:flush()
         wrk.thread:stop()
      end
   end
end
