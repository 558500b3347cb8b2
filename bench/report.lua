-- Shared by the wrk scripts: one JSON line with the run's totals.
-- errors.status counts answers outside 2xx/3xx.
function report(summary, latency)
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"non_2xx_3xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
      '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d}\n',
      summary.requests, summary.duration, summary.bytes,
      summary.errors.status, summary.errors.connect, summary.errors.read,
      summary.errors.write, summary.errors.timeout,
      latency:percentile(50), latency:percentile(99)))
end
