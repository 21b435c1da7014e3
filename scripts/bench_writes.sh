#!/usr/bin/env bash
# fwrepo durable-write benchmark: how many state-changing API calls per second one server
# acknowledges, when every 2xx answer waits for its write to be on disk (group commit: the
# requests in flight share one flush).
#
# Usage: scripts/bench_writes.sh      (needs a release build: cargo build --release)
#
# It starts a fresh server (fresh data dir under $BENCH_TMP, on the disk the data dir is on)
# and, for each concurrency level, runs that many keep-alive clients for a fixed time, each
# sending `PUT /api/v1/devices/{sn}` (a new serial per call) and, in a second phase,
# `POST /api/v1/tokens`. It reports acknowledged writes per second and latency p50/p99 per
# level. Run it once with FWREPO_BIN pointing at a build from before durable
# acknowledgements to compare (BENCHMARKS.md has both).
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN      binary (copied into the temp dir first)   [target/release/fwrepo]
#   BENCH_TMP       parent of the temp dir                    [/tmp]
#   BENCH_SECS      seconds per level and kind                [10]
#   BENCH_LEVELS    concurrency levels, comma separated       [1,8,32]
#   BENCH_REPORT    also write the report to this file
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/benchlib.sh"
bench_setup bench_writes
cp "$ROOT/scripts/bench_writes.py" "$WORK/driver.py"
bench_run_driver
