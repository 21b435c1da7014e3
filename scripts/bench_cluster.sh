#!/usr/bin/env bash
# fwrepo several-replica benchmark (issue 16 item 9): a rollout of 10,000 simulated docks (each
# with one aircraft, from several simulator processes) on 1 replica and on 3 replicas, the
# replica driving the rollout killed -9 half-way through the second.
#
# Usage: scripts/bench_cluster.sh    (needs a release build: cargo build --release, and on PATH:
#        mosquitto, nginx, moto_server, python3 with boto3, PostgreSQL 15 in $PG_BIN)
#
# Each scenario starts everything afresh: a throwaway PostgreSQL (scripts/pg_throwaway.sh, with
# pg_stat_statements), Mosquitto, moto as the S3 server, one URL signing key, N `fwrepo serve`
# replicas (each its own data dir and port, --catalog, --blob-store s3://…, --mqtt-url,
# --replica-id rK, --public-url of nginx) and nginx round robin in front of them (also for one
# replica). Through nginx it uploads a Dock and an M30 package (random bytes), starts
# BENCH_SIMS `fwrepo simulate` processes (docks split evenly, prefixes C01, C02, …), waits
# until every dock is online with its aircraft, POSTs a rollout of every dock by serial (one
# stage of 100 %, rate_per_minute null, max_in_flight BENCH_IN_FLIGHT, max_retries 0,
# thresholds that never pause it), resets pg_stat_statements, POSTs `start` and polls
# `GET /api/v1/rollouts/{id}` until it is completed (or paused, canceled, stalled, too late).
#   - one:   1 replica;
#   - three: 3 replicas; once BENCH_KILL_AT of the devices are ok, the replica listing the
#            `rollouts` lease in `GET /api/v1/cluster` is killed -9; the driver polls until
#            another replica holds the lease, and starts the killed one again (same id, port
#            and data dir) BENCH_RESTART_SECS after the kill if the rollout still runs.
# It reports, per scenario: wall time from the `start` POST to completed; tasks created and
# tasks per gateway (every gateway exactly one, counted from `GET /api/v1/ota`), tasks ok,
# the `ota_create` the simulated docks received; p50 / p99 dispatch latency (publish →
# services_reply, as scripts/bench_ota.py); peak RSS (VmHWM) and CPU per replica (the killed
# one before the kill and after its restart), CPU of PostgreSQL, Mosquitto, moto, nginx and
# the simulators; PostgreSQL statements per device (pg_stat_statements) and the most frequent
# ones; kill → lease held by another replica and kill → next task created (`created_at`);
# and wall(three) / wall(one). Targets: every device upgraded exactly once, three / one ≤ 1.3,
# handover ≤ 20 s.
#
# Everything runs on 127.0.0.1 on ports the kernel picks (never 1883, 5432 or 8080). All
# temporary files live in one directory under $BENCH_TMP (default /tmp), removed on exit, and
# every process started here is stopped on exit, error, SIGINT or SIGTERM (PostgreSQL with
# pg_ctl stop -m immediate). Progress goes to stderr, the markdown report to stdout (and to
# $BENCH_REPORT if set). Run as root, PostgreSQL runs as `postgres` and nginx as root.
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN          binary (copied into the temp dir first)   [target/release/fwrepo]
#   BENCH_TMP           parent of the temp dir                    [/tmp]
#   BENCH_REPORT        also write the report to this file
#   BENCH_SCENARIOS     scenarios to run, comma separated         [one,three]
#   BENCH_GATEWAYS      number of docks (each with one aircraft)  [10000]
#   BENCH_SIMS          simulator processes                       [4]
#   BENCH_OSD_SECS      simulator osd interval in seconds         [10]
#   BENCH_IN_FLIGHT     the rollout's max_in_flight               [500]
#   BENCH_PKG_KIB       size of each firmware package in KiB      [64]
#   BENCH_READY_SECS    max wait for all docks to be online       [300]
#   BENCH_RUN_SECS      max wait for the rollout to complete      [900]
#   BENCH_STALL_SECS    stop waiting once nothing changed for this long [120]
#   BENCH_POLL_SECS     interval between polls of the driver      [0.5]
#   BENCH_KILL_AT       fraction of devices ok at which the lease holder is killed [0.33]
#   BENCH_RESTART_SECS  the killed replica starts again this long after the kill [30]
#   BENCH_REPLY_TIMEOUT --ota-reply-timeout of the replicas       [60]
#   BENCH_SERVE_ARGS    extra `fwrepo serve` arguments, space separated
#   PG_BIN              PostgreSQL binaries                       [/usr/lib/postgresql/15/bin]
#   BENCH_KEEP=1        keep the temp dir (logs) and print its path
#
# A rollout that pauses or never completes, a task created twice, a replica that does not come
# back or does not exit on SIGTERM are measured and reported, not retried or hidden.
set -euo pipefail

# shellcheck source=scripts/benchlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/benchlib.sh"
bench_setup bench_cluster

for tool in mosquitto nginx moto_server; do
    command -v "$tool" >/dev/null || die "$tool is required on PATH"
done
python3 -c 'import boto3' 2>/dev/null || die "python3 needs boto3 (pip install boto3)"
[[ -x ${PG_BIN:-/usr/lib/postgresql/15/bin}/pg_ctl ]] || die "no PostgreSQL in ${PG_BIN:-/usr/lib/postgresql/15/bin}"

cp "$ROOT/scripts/bench_cluster.py" "$WORK/driver.py"

bench_run_driver
