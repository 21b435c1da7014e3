#!/usr/bin/env bash
# fwrepo fleet benchmark (issue 17 item 5): how fleets of 1,000, 5,000 and 10,000 simulated docks
# (each with one aircraft, so 2 × N devices) come online and what they cost in steady state, on
# the embedded broker (rumqttd behind fwrepo's front door) and on Mosquitto, side by side.
#
# Usage: scripts/bench_fleet.sh      (needs a release build: cargo build --release, python3 and,
#        for the Mosquitto runs, mosquitto)
#        BENCH_SIZES=1000 BENCH_BROKERS=embedded scripts/bench_fleet.sh   # one column only
#
# Each (size, broker) run starts everything afresh: for Mosquitto, a Mosquitto on a free
# loopback port (`listener PORT 127.0.0.1`, `allow_anonymous true`, `persistence false`,
# `max_queued_messages 100000`, `max_inflight_messages 100`, `max_connections -1`); a
# `fwrepo serve` with its own data dir (sled catalog, blobs in the data dir, models
# `3-1-0 = Dock` and `0-67-0 = M30`, `--mqtt-listen 127.0.0.1:0` or `--mqtt-url` of that
# Mosquitto); once its MQTT session is subscribed (`fwrepo_mqtt_subscribed 1`), one
# `fwrepo simulate --osd-every BENCH_OSD_SECS` per BENCH_PER_SIM docks (prefixes C01, C02, …,
# docks split evenly). Everything is stopped before the next run. It reports, per run:
#   - ready: time from the first simulator's start until every dock is online with its
#     aircraft, i.e. `GET /api/v1/devices?kind=gateway&limit=500` walked by `next_cursor`
#     lists every dock with `online` true and `child_sn` = its aircraft (polled about once a
#     second, so the figure is the end of the first poll that saw them all). A fleet not online
#     within BENCH_READY_SECS is reported with how many docks were, and measured anyway;
#   - simulator MQTT reconnects after that moment, and in all (the `reconnects` counter each
#     simulator prints every 5 s when it changed; those of the last 5 s before "ready" may be
#     counted as after it);
#   - steady state over BENCH_WINDOW_SECS right after "ready": CPU in cores of fwrepo,
#     Mosquitto and the simulators (utime+stime deltas from /proc/PID/stat over the window's
#     wall time), fwrepo's MQTT messages in per second (delta of `fwrepo_mqtt_messages_in_total`
#     in GET /metrics) against the 2 × N / BENCH_OSD_SECS osd messages the fleet sends, VmRSS
#     at the end of the window and VmHWM (peak since start) of fwrepo and Mosquitto, and on the
#     embedded broker `fwrepo_mqtt_broker_connections` and `fwrepo_mqtt_broker_refused_total`;
#   - device list latency, right after the window (simulators still running): the wall time of
#     each `GET /api/v1/devices?limit=500` page of a walk of the whole list by `next_cursor`
#     (p50 / max, pages, devices listed and how many online), and of
#     `GET /api/v1/devices?kind=gateway&sn_contains=BENCH_SN_FILTER&limit=100` (5 times);
#   - fwrepo's WARN / ERROR log lines and how it stopped on SIGTERM.
#
# Everything runs on 127.0.0.1 on ports the kernel picks (never 1883, 5432 or 8080). All
# temporary files live in one directory under $BENCH_TMP (default /tmp), removed on exit, and
# every process started here is stopped on exit, error, SIGINT or SIGTERM. The open-files
# limit is raised to its hard limit (reported: the embedded broker holds three descriptors per
# gateway, one accepted, one relayed to rumqttd and rumqttd's end of it). Progress goes to
# stderr, the markdown report to stdout (and to $BENCH_REPORT if set).
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN          binary (copied into the temp dir first)   [target/release/fwrepo]
#   MOSQUITTO_BIN       Mosquitto broker                          [/usr/sbin/mosquitto, else PATH]
#   BENCH_TMP           parent of the temp dir                    [/tmp]
#   BENCH_REPORT        also write the report to this file
#   BENCH_SIZES         fleet sizes (docks), comma separated      [1000,5000,10000]
#   BENCH_BROKERS       brokers, comma separated                  [embedded,mosquitto]
#   BENCH_OSD_SECS      simulator osd interval in seconds         [2]
#   BENCH_PER_SIM       docks per simulator process (at most)     [2500]
#   BENCH_READY_SECS    max wait for every dock to be online      [180]
#   BENCH_WINDOW_SECS   steady-state window after that            [60]
#   BENCH_SN_FILTER     sn_contains of the filtered gateway list  [042]
#   BENCH_SERVE_ARGS    extra `fwrepo serve` arguments, space separated
#   BENCH_KEEP=1        keep the temp dir (logs) and print its path
#
# A fleet that does not come online, reconnects, refusals and a server that does not exit on
# SIGTERM are measured and reported, not retried or hidden.
set -euo pipefail

# shellcheck source=scripts/benchlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/benchlib.sh"
bench_setup bench_fleet
bench_find_mosquitto

cp "$ROOT/scripts/bench_fleet.py" "$WORK/driver.py"

bench_run_driver
