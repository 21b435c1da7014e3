#!/usr/bin/env bash
# fwrepo rollout benchmark: 2000 simulated docks (each with one aircraft, 4000 devices) are
# upgraded once by OTA tasks POSTed directly and once by a staged rollout, both with at most
# 500 gateways upgrading at once, on the embedded MQTT broker.
#
# Usage: scripts/bench_rollout.sh    (needs a release build: cargo build --release)
#
# Each scenario starts a fresh server (fresh data dir) and a fresh `fwrepo simulate`, uploads a
# Dock and an M30 package (64 KiB of random bytes each), and waits until all devices are known
# and every dock is online with its aircraft. Then:
#   - direct:  the driver POSTs one `/api/v1/ota` task per gateway (dock + aircraft), never
#              more than BENCH_IN_FLIGHT open at once: it polls `GET /api/v1/ota?limit=500`
#              newest first (only as many pages as it takes to see every task it still holds
#              open) and POSTs a new task for each one that became final;
#   - rollout: the driver POSTs `/api/v1/rollouts` (every dock by serial, one stage of 100 %,
#              rate_per_minute null, max_in_flight BENCH_IN_FLIGHT, min_sample 50,
#              success_threshold 0, error_threshold 100, max_retries 0 so that no task is
#              created twice), then `/start`, and polls `GET /api/v1/rollouts/{id}` until it is
#              completed (or paused, canceled, or the wait gives up).
# It reports, per scenario:
#   - wall time from the first POST (direct) or the `start` POST (rollout) to all tasks final,
#     as seen by polling and from the tasks' own `finished_at`, and tasks ok / otherwise;
#   - the dispatch rate achieved: tasks created per second, from the tasks' `created_at`
#     (read by paging `GET /api/v1/ota?limit=500` with `next_cursor`), and the peak number of
#     tasks open at once (from `created_at` / `finished_at`), which must not exceed the cap;
#   - the server's peak RSS (VmHWM) and its RSS before the run, its CPU seconds (utime+stime)
#     over the run, the CPU of the simulator and of this driver, which share the same cores;
#   - the size on disk of the data dir: `catalog/` (sled), `blobs/` and the total;
#   - rollout time / direct time (target < 1.10) and peak RSS (target < 512 MiB).
#
# Everything runs on 127.0.0.1 on ports the kernel picks (never 1883 or 8080). All temporary
# files live in one directory under $BENCH_TMP (default /tmp), removed on exit, and every
# process started here is stopped on exit, error, SIGINT or SIGTERM. Progress goes to stderr,
# the markdown report to stdout (and to $BENCH_REPORT if set).
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN          binary (copied into the temp dir first)   [target/release/fwrepo]
#   BENCH_CATALOG       sled, or a PostgreSQL server URL: each run gets a database of its own
#                       (scripts/pg_throwaway.sh PORT prints one)  [sled]
#   BENCH_TMP           parent of the temp dir                    [/tmp]
#   BENCH_REPORT        also write the report to this file
#   BENCH_SCENARIOS     scenarios to run, comma separated         [direct,rollout]
#   BENCH_GATEWAYS      number of docks (each with one aircraft)  [2000]
#   BENCH_IN_FLIGHT     gateways upgrading at once (both scenarios) [500]
#   BENCH_PKG_KIB       size of each firmware package in KiB      [64]
#   BENCH_OSD_SECS      simulator osd interval in seconds         [10]
#   BENCH_READY_SECS    max wait for all devices to be online     [180]
#   BENCH_RUN_SECS      max wait for all tasks to be final        [600]
#   BENCH_STALL_SECS    stop waiting once nothing changed for this long [60]
#   BENCH_POLL_SECS     interval between polls of the driver      [0.25]
#   BENCH_POST_THREADS  concurrent POST clients of the direct driver (keep-alive each) [50]
#   BENCH_HTTP_TIMEOUT  timeout of one POST or upload in seconds  [20]; one GET: 10 s, one
#                       poll (all its pages) or the final task listing: 60 s
#   BENCH_KEEP=1        keep the temp dir (logs) and print its path
#
# A POST that gets no answer within BENCH_HTTP_TIMEOUT, a task that never becomes final, a
# rollout that pauses and a server that does not exit on SIGTERM are measured and reported,
# not retried or hidden.
set -euo pipefail

# shellcheck source=scripts/benchlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/benchlib.sh"
bench_setup bench_rollout

cp "$ROOT/scripts/bench_rollout.py" "$WORK/driver.py"

bench_run_driver
