-- wrk script for `make bench`: POST /jobs with an echo job and a bearer token.
-- BENCH_TOKEN comes from the environment; non-2xx answers are counted by wrk itself.
wrk.method = "POST"
wrk.path = "/jobs"
wrk.body = '{"type":"echo","payload":{"n":1,"text":"hello"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "missing-token")
