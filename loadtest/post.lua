-- wrk script for loadtest/run.sh: one non-streaming chat completion per request,
-- identical for every target. At the end prints one JSON line (prefix "JSON ")
-- with throughput, latency percentiles in microseconds and error counts.
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
-- LOADTEST_AUTH=TOKEN adds "Authorization: Bearer TOKEN" (loadtest/litellm.sh: LiteLLM's master key).
local auth = os.getenv("LOADTEST_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end
wrk.body = '{"model":"mock-model","messages":[{"role":"user","content":"Hello"}],"stream":false,"max_tokens":1}'

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
