#!/usr/bin/env bash
# fwrepo OTA rollout benchmark: 500 simulated docks (each with one aircraft) get one OTA task
# each, all created at once; once with the embedded MQTT broker and once with Mosquitto.
#
# Usage: scripts/bench_ota.sh        (needs a release build: cargo build --release)
#
# For each broker it starts a fresh server (fresh data dir) and a fresh `fwrepo simulate`,
# uploads a Dock and an M30 package (256 KiB of random bytes each), waits until all 1000
# devices are known and every dock is online with its aircraft, then POSTs the 500 tasks
# concurrently and polls `GET /api/v1/ota` until every task is final. It reports:
#   - time from the first POST to all 500 tasks final (as seen by polling, and from the
#     tasks' own `finished_at`), and how many ended `ok` / otherwise;
#   - dispatch latency per task = `at` of the `services_reply` history entry minus `at` of
#     the `publish` entry (p50 / p99 / max);
#   - the server's peak RSS (VmHWM) and its CPU seconds (utime+stime) over the run, and the
#     CPU of the simulator (and of Mosquitto), which share the same cores.
#
# Everything runs on 127.0.0.1 on ports the kernel picks (never 1883 or 8080). All temporary
# files live in one directory under $BENCH_TMP (default /tmp), removed on exit, and every
# process started here is stopped on exit, error, SIGINT or SIGTERM. Progress goes to stderr,
# the markdown report to stdout (and to $BENCH_REPORT if set).
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN          binary (copied into the temp dir first)   [target/release/fwrepo]
#   MOSQUITTO_BIN       Mosquitto broker                          [/usr/sbin/mosquitto, else PATH]
#   BENCH_CATALOG       sled, or a PostgreSQL server URL: each run gets a database of its own
#                       (scripts/pg_throwaway.sh PORT prints one)  [sled]
#   BENCH_TMP           parent of the temp dir                    [/tmp]
#   BENCH_REPORT        also write the report to this file
#   BENCH_GATEWAYS      number of docks (each with one aircraft)  [500]
#   BENCH_BROKERS       brokers to test, comma separated          [embedded,mosquitto]
#   BENCH_PKG_KIB       size of each firmware package in KiB      [256]
#   BENCH_READY_SECS    max wait for all devices to be online     [60]
#   BENCH_RUN_SECS      max wait for all tasks to be final        [120]
#   BENCH_VERIFY_SECS   extra wait for devices[].outcome=verified [20]
#   BENCH_POST_THREADS  concurrent POST clients (keep-alive each) [100]
#   BENCH_POST_SECS     POSTs not started this long after the first are not sent [30]
#   BENCH_HTTP_TIMEOUT  timeout of one POST or upload in seconds  [20]; other GETs: 10 s
#   BENCH_STALL_SECS    stop waiting once no task changed for this long [30]
#   BENCH_POLL_SECS     interval between task-list polls          [0.5]
#   BENCH_KEEP=1        keep the temp dir (logs) and print its path
#
# A POST that gets no answer within BENCH_HTTP_TIMEOUT, a task that never becomes final and a
# server that does not exit on SIGTERM are measured and reported, not retried or hidden.
set -euo pipefail

# shellcheck source=scripts/benchlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/benchlib.sh"
bench_setup bench_ota
bench_find_mosquitto


cp "$ROOT/scripts/bench_ota.py" "$WORK/driver.py"

bench_run_driver
