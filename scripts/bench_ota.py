"""Driver of scripts/bench_ota.sh (see its header for what it measures and its knobs)."""
import datetime
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

WORK = os.environ["WORK"]
BIN = os.path.join(WORK, "fwrepo")
MOSQ = os.environ.get("MOSQ", "")
GATEWAYS = int(os.environ.get("BENCH_GATEWAYS", "500"))
BROKERS = [b.strip() for b in os.environ.get("BENCH_BROKERS", "embedded,mosquitto").split(",") if b.strip()]
PKG_KIB = int(os.environ.get("BENCH_PKG_KIB", "256"))
READY_SECS = float(os.environ.get("BENCH_READY_SECS", "60"))
RUN_SECS = float(os.environ.get("BENCH_RUN_SECS", "120"))
VERIFY_SECS = float(os.environ.get("BENCH_VERIFY_SECS", "20"))
POST_THREADS = int(os.environ.get("BENCH_POST_THREADS", "100"))
POST_SECS = float(os.environ.get("BENCH_POST_SECS", "30"))
HTTP_TIMEOUT = float(os.environ.get("BENCH_HTTP_TIMEOUT", "20"))
STALL_SECS = float(os.environ.get("BENCH_STALL_SECS", "30"))
POLL_SECS = float(os.environ.get("BENCH_POLL_SECS", "0.5"))
PREFIX = "B"
FINAL = {"ok", "failed", "canceled", "rejected", "timeout"}


sys.path.insert(0, os.environ["SCRIPTS"])
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402,F401
    GET_TIMEOUT, Http, bounded, cpu_secs, disk_usage, fmt_ms, fmt_s, free_port, log, own_cpu,
    pct, server_ports, spawn, start_mosquitto, status_kib, stop, stop_all, threads_of, ts, wait_line, wait_port,
)

benchlib.NAME = "bench_ota"
benchlib.handle_signals()


def list_tasks(port):
    """Every task, on a fresh connection, bounded to GET_TIMEOUT."""
    def get():
        h = Http(port)
        try:
            return {t["id"]: t for t in h.pages("/api/v1/ota?limit=500")}
        finally:
            h.close()
    return bounded(get, GET_TIMEOUT)


def mqtt_counters(port):
    try:
        return bounded(lambda: _mqtt_counters(Http(port)), 5)
    except Exception:  # noqa: BLE001
        return None, None


def _mqtt_counters(h):
    """fwrepo_mqtt_messages_{in,out}_total from /metrics (None if unavailable)."""
    try:
        status, body = h.request("GET", "/metrics", timeout=5)
        text = body.decode(errors="replace")
        get = lambda n: (lambda m: int(float(m.group(1))) if m else None)(re.search(rf"^{n} (\S+)$", text, re.M))
        return get("fwrepo_mqtt_messages_in_total"), get("fwrepo_mqtt_messages_out_total")
    except Exception:  # noqa: BLE001
        return None, None


def upload(h, path, name):
    with open(path, "rb") as f:
        data = f.read()
    status, body = h.request("PUT", f"/api/v1/firmware?file_name={name}", data,
                             {"Content-Type": "application/octet-stream"}, 120)
    if status not in (200, 201):
        raise RuntimeError(f"upload {name}: {status} {body[:500]!r}")
    return json.loads(body)["id"]


def wait_devices(h, timeout):
    deadline = time.time() + timeout
    t0 = time.time()
    last = ""
    while True:
        devs = [d for d in h.pages("/api/v1/devices?limit=500") if d.get("sn", "").startswith(PREFIX)]
        docks = [d for d in devs if not d["sn"].endswith("-AC")]
        ready = [d for d in docks if d.get("online") and d.get("child_sn") == d["sn"] + "-AC"]
        ac_online = sum(1 for d in devs if d["sn"].endswith("-AC") and d.get("online"))
        state = f"{len(devs)}/{2 * GATEWAYS} devices known, {len(ready)}/{GATEWAYS} docks online with child_sn, {ac_online} aircraft online"
        if state != last:
            log("  " + state)
            last = state
        if len(devs) >= 2 * GATEWAYS and len(ready) >= GATEWAYS:
            return time.time() - t0, ac_online
        if time.time() > deadline:
            raise RuntimeError(f"devices not ready after {timeout:.0f} s: {state}")
        time.sleep(1)


def post_all(port, fw_dock, fw_ac):
    """POST one task per gateway from POST_THREADS threads, each with its own keep-alive
    connection; the threads start together. Returns per-gateway results and t0 (first send)."""
    sns = [f"{PREFIX}{i:04d}" for i in range(1, GATEWAYS + 1)]
    results = {}
    lock = threading.Lock()
    queue = list(reversed(sns))
    barrier = threading.Barrier(POST_THREADS)

    start = []

    def worker():
        h = Http(port)
        barrier.wait()
        with lock:
            if not start:
                start.append(time.time())
        while True:
            with lock:
                if not queue or time.time() > start[0] + POST_SECS:
                    break
                sn = queue.pop()
            body = {"gateway_sn": sn, "devices": [{"sn": sn, "firmware_id": fw_dock},
                                                  {"sn": sn + "-AC", "firmware_id": fw_ac}]}
            t = time.time()
            try:
                status, ans = h.json("POST", "/api/v1/ota", body)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                status, ans = ("timeout" if isinstance(e, (TimeoutError, socket.timeout)) else type(e).__name__), repr(e)
            results[sn] = (t, time.time(), status, ans)
        h.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(POST_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t0 = min(r[0] for r in results.values())
    for sn in queue:
        results[sn] = (None, None, "not sent", "POST phase deadline")
    return results, t0


# ---------------------------------------------------------------- one run

def run(broker, fw_files):
    res = {"broker": broker}
    data_dir = os.path.join(WORK, f"data-{broker}")
    os.makedirs(data_dir)
    cfg = os.path.join(WORK, "fwrepo.toml")
    mosq = None
    catalog, db = benchlib.catalog_args(broker)
    args = [BIN, "serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0", "--config", cfg,
            "--ota-reply-timeout", "60", "--shutdown-grace", "5"] + catalog
    if broker == "embedded":
        args += ["--mqtt-listen", "127.0.0.1:0"]
    else:
        mosq, mport = start_mosquitto(broker, MOSQ)
        res["mosquitto_version"] = subprocess.run([MOSQ, "-h"], capture_output=True, text=True).stdout.split("\n")[0].strip()
        args += ["--mqtt-url", f"mqtt://127.0.0.1:{mport}"]

    name = f"server-{broker}"
    server = spawn(name, args)
    hport, embedded_port = server_ports(server, name, broker == "embedded")
    mport = embedded_port or mport
    benchlib.read_token(data_dir)
    log(f"[{broker}] server pid {server.pid}, HTTP :{hport}, MQTT :{mport}")
    h = Http(hport)
    fw_dock = upload(h, fw_files["Dock"], "Dock_2.0.0.zip")
    fw_ac = upload(h, fw_files["M30"], "M30_2.0.0.zip")

    sim = spawn(f"simulate-{broker}", [BIN, "simulate", "--mqtt-url", f"mqtt://127.0.0.1:{mport}",
                                       "--gateways", str(GATEWAYS), "--sn-prefix", PREFIX,
                                       "--osd-every", "5"])
    log(f"[{broker}] simulator pid {sim.pid}; waiting for {2 * GATEWAYS} devices")
    res["ready_secs"], res["ac_online"] = wait_devices(h, READY_SECS)
    res["rss_before_kib"] = status_kib(server.pid, "VmRSS")
    time.sleep(1)

    procs = {"server": server, "simulator": sim}
    if mosq:
        procs["mosquitto"] = mosq
    res["mqtt0"] = mqtt_counters(hport)
    cpu0 = {k: cpu_secs(p.pid) for k, p in procs.items()}
    log(f"[{broker}] POSTing {GATEWAYS} tasks from {POST_THREADS} threads")
    posts, t0 = post_all(hport, fw_dock, fw_ac)
    t_posted = max(r[1] for r in posts.values() if r[1] is not None)
    codes = {}
    for r in posts.values():
        codes[r[2]] = codes.get(r[2], 0) + 1
    res["post_codes"] = codes
    res["post_all_secs"] = t_posted - t0
    res["post_lat"] = [r[1] - r[0] for r in posts.values() if r[2] == 202]
    bad = [(sn, r[2], str(r[3])[:120]) for sn, r in sorted(posts.items()) if r[2] != 202]
    res["post_errors"] = bad[:5]
    ids = {r[3]["id"] for r in posts.values() if r[2] == 202 and isinstance(r[3], dict)}
    log(f"[{broker}] {len(ids)} tasks accepted in {t_posted - t0:.2f} s; codes {codes}")

    # Poll the task list until every accepted task is final.
    # Every task in the list counts, including ones whose POST got no answer.
    deadline = t0 + RUN_SECS
    t_done = None
    last = ""
    last_change = time.time()
    polls = poll_errors = polls_ok = 0
    stalled = False
    tasks, by = {}, {}
    while True:
        try:
            tasks = list_tasks(hport)
            polls_ok += 1
        except Exception as e:  # noqa: BLE001
            poll_errors += 1
            log(f"  task list poll failed: {e!r}")
        polls += 1
        now = time.time()
        by = {}
        for t in tasks.values():
            by[t["status"]] = by.get(t["status"], 0) + 1
        state = " ".join(f"{k}={v}" for k, v in sorted(by.items()))
        if state != last:
            log(f"  t+{now - t0:6.2f} s  {state}")
            last = state
            last_change = now
        if tasks and len(tasks) >= len(ids) and all(t["status"] in FINAL for t in tasks.values()):
            t_done = now
            break
        if now > deadline:
            break
        if now - last_change > STALL_SECS:
            stalled = True
            log(f"  no task changed for {STALL_SECS:.0f} s: giving up")
            break
        time.sleep(POLL_SECS)
    res["stalled"] = stalled
    res["poll_errors"] = poll_errors
    res["polls_ok"] = polls_ok
    res["mqtt1"] = mqtt_counters(hport)
    time.sleep(3)
    res["mqtt2"] = mqtt_counters(hport)
    cpu1 = {k: cpu_secs(p.pid) for k, p in procs.items()}
    res["cpu"] = {k: cpu1[k] - cpu0[k] for k in procs}
    res["run_wall"] = (t_done or time.time()) - t0
    res["polls"] = polls
    res["t_done"] = None if t_done is None else t_done - t0
    res["status_counts"] = by
    res["tasks_seen"] = len(tasks)
    res["accepted"] = len(ids)
    res["total"] = max(len(tasks), len(ids))

    dispatch, e2e, finished = [], [], []
    missing_reply = 0
    for t in tasks.values():
        pub = [ts(e["at"]) for e in t.get("history", []) if e.get("source") == "publish"]
        rep = [ts(e["at"]) for e in t.get("history", []) if e.get("source") == "services_reply"]
        if pub and rep:
            dispatch.append(rep[0] - pub[0])
        else:
            missing_reply += 1
        if t.get("finished_at"):
            f_at = ts(t["finished_at"])
            finished.append(f_at)
            e2e.append(f_at - ts(t["created_at"]))
    res["dispatch"] = dispatch
    res["missing_reply"] = missing_reply
    res["e2e"] = e2e
    res["finished_max"] = (max(finished) - t0) if finished else None
    res["others"] = [(t["gateway_sn"], t["status"], t.get("result_code"), t.get("result_reason"))
                     for t in sorted(tasks.values(), key=lambda t: t["gateway_sn"]) if t["status"] != "ok"][:3]

    # Give the verification (new version in the osd) a little time, then count outcomes.
    vdeadline = time.time() + (VERIFY_SECS if t_done is not None else 0)
    outcomes = {}
    while True:
        try:
            tasks = list_tasks(hport)
        except Exception:  # noqa: BLE001
            break
        outcomes = {}
        for t in tasks.values():
            for d in t.get("devices", []):
                o = d.get("outcome") or "none"
                outcomes[o] = outcomes.get(o, 0) + 1
        if outcomes.get("verified", 0) == 2 * len(tasks) or time.time() > vdeadline:
            break
        time.sleep(2)
    res["outcomes"] = outcomes
    res["rss_peak_kib"] = status_kib(server.pid, "VmHWM")
    res["rss_end_kib"] = status_kib(server.pid, "VmRSS")
    res["server_threads"] = threads_of(server.pid)
    res["sim_rss_peak_kib"] = status_kib(sim.pid, "VmHWM")
    h.close()

    log(f"[{broker}] stopping simulator, server{' and mosquitto' if mosq else ''}")
    res["sim_exit"] = stop(sim)
    res["server_exit"] = stop(server, 15)
    benchlib.drop_db(db)
    if mosq:
        res["mosq_exit"] = stop(mosq)
    errs = open(os.path.join(WORK, f"{name}.err"), errors="replace").read().splitlines()
    res["log_warn"] = sum(1 for l in errs if re.search(r"\bWARN\b", l))
    res["log_error"] = sum(1 for l in errs if re.search(r"\bERROR\b", l))
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in errs]
    res["log_samples"] = [l for l in plain if re.search(r"\b(WARN|ERROR)\b", l)][:3]
    res["log_kinds"] = {}
    for l in plain:
        m = re.search(r"\b(WARN|ERROR)\b\s+(.*?)(?: error=| [a-z_]+=|$)", l)
        if m:
            k = (m.group(1) + " " + re.sub(r"\{[^}]*\}", "", m.group(2)))[:110]
            res["log_kinds"][k] = res["log_kinds"].get(k, 0) + 1
    return res


# ---------------------------------------------------------------- report

def report(results, started, took):
    out = []
    w = out.append
    mib = lambda k: "–" if k is None else f"{k / 1024:.1f}"
    w(f"### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, fwrepo {os.environ['REV']}")
    w("")
    dirty = int(os.environ.get("DIRTY", "0"))
    note = (f" (the working tree had {dirty} uncommitted change(s) under src/ or Cargo.*; the binary"
            " may include them)") if dirty else ""
    w(f"Binary built {os.environ['BIN_BUILT']}{note}. Run took {took:.0f} s; load average before: "
      f"{os.environ['LOAD0']}, after: {' '.join(open('/proc/loadavg').read().split()[0:3])}.")
    w("")
    w(f"Load: {GATEWAYS} docks + {GATEWAYS} aircraft from one `fwrepo simulate` process (osd every 5 s); "
      f"{GATEWAYS} tasks (dock {PKG_KIB} KiB + aircraft {PKG_KIB} KiB package each) POSTed from "
      f"{POST_THREADS} threads with one keep-alive connection each (request timeout {HTTP_TIMEOUT:.0f} s); "
      f"the task list is polled every {POLL_SECS} s.")
    w("")
    cols = ["embedded (rumqttd)" if r["broker"] == "embedded" else "Mosquitto" for r in results]
    w("| Metric | " + " | ".join(cols) + " | Target |")
    w("|---|" + "---|" * len(cols) + "---|")

    def row(label, fn, target=""):
        w(f"| {label} | " + " | ".join(fn(r) for r in results) + f" | {target} |")

    def codes(r):
        return ", ".join(f"{v} × {k}" for k, v in sorted(r["post_codes"].items(), key=str))

    def done(r):
        if r["t_done"] is not None:
            return f"{r['t_done']:.2f} s"
        why = f"no task changed for {STALL_SECS:.0f} s" if r["stalled"] else "deadline"
        return f"**never** (gave up {r['run_wall']:.0f} s after the first POST: {why})"

    def counts(r):
        if not r["polls_ok"]:
            return "**unknown: `GET /api/v1/ota` never answered** after the POSTs"
        ok = r["status_counts"].get("ok", 0)
        other = r["total"] - ok
        s = f"{ok} / {other}"
        rest = [f"{k} {v}" for k, v in sorted(r["status_counts"].items()) if k != "ok"]
        missing = GATEWAYS - r["tasks_seen"]
        if missing > 0:
            rest.append(f"{missing} gateways without a task")
        return s + (f" ({', '.join(rest)})" if rest else "")

    def mqtt(r):
        (i0, o0), (i1, o1), (i2, o2) = r["mqtt0"], r["mqtt1"], r["mqtt2"]
        if None in (i0, i1, i2):
            return "–"
        return f"in +{i1 - i0}, out +{o1 - o0}; in the 3 s after: in +{i2 - i1}"

    row("Devices ready (1000 known, 500 docks online with child_sn)", lambda r: f"{r['ready_secs']:.1f} s")
    row(f"POST answers (of {GATEWAYS})", codes, f"{GATEWAYS} × 202")
    row("POST: last answer after first send; p50 / p99 of 202 answers",
        lambda r: f"{r['post_all_secs']:.2f} s; {fmt_ms(pct(r['post_lat'], 50))} / {fmt_ms(pct(r['post_lat'], 99))} ms")
    row("First POST → all tasks final (poll)", done, "all complete")
    row("First POST → last `finished_at`", lambda r: "–" if r["finished_max"] is None else f"{r['finished_max']:.2f} s")
    row("Tasks ok / other", counts, f"{GATEWAYS} / 0")
    row("Dispatch latency (publish → services_reply) p50 / p99 / max",
        lambda r: f"{fmt_ms(pct(r['dispatch'], 50))} / {fmt_ms(pct(r['dispatch'], 99))} / "
                  f"{fmt_ms(max(r['dispatch']) if r['dispatch'] else None)} ms (n = {len(r['dispatch'])})",
        "p99 < 1000 ms")
    row("Task created → finished p50 / p99",
        lambda r: f"{fmt_ms(pct(r['e2e'], 50))} / {fmt_ms(pct(r['e2e'], 99))} ms")
    row("Device outcomes at the end",
        lambda r: ", ".join(f"{v} {k}" for k, v in sorted(r["outcomes"].items())) or "–")
    row("Server peak RSS (VmHWM); RSS before the POSTs",
        lambda r: f"{mib(r['rss_peak_kib'])} MiB; {mib(r['rss_before_kib'])} MiB", "< 256 MiB")
    row("Server CPU (utime+stime) over the run", lambda r: f"{r['cpu']['server']:.2f} s")
    row("Simulator CPU over the run (its peak RSS)",
        lambda r: f"{r['cpu']['simulator']:.2f} s ({mib(r['sim_rss_peak_kib'])} MiB)")
    row("Mosquitto CPU over the run",
        lambda r: f"{r['cpu']['mosquitto']:.2f} s" if "mosquitto" in r["cpu"] else "–")
    row("Server MQTT counters (`/metrics`) during the run", mqtt)
    row("Server stop", lambda r: r["server_exit"])
    row("Server log WARN / ERROR lines (whole run)", lambda r: f"{r['log_warn']} / {r['log_error']}")
    w("")
    w("\"Over the run\" is from the first POST until every task was final (or the wait gave up).")
    w("")
    met = []
    for r, c in zip(results, cols):
        checks = {
            "all complete": r["t_done"] is not None and r["status_counts"].get("ok", 0) == GATEWAYS
                            and r["post_codes"].get(202, 0) == GATEWAYS,
            "p99 dispatch < 1 s": len(r["dispatch"]) == GATEWAYS and pct(r["dispatch"], 99) < 1.0,
            "RSS < 256 MiB": r["rss_peak_kib"] is not None and r["rss_peak_kib"] < 256 * 1024,
        }
        met.append(f"{c}: " + ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in checks.items()))
    w("Targets met? " + "; ".join(met) + ".")
    extra = []
    for r, c in zip(results, cols):
        if r["post_errors"]:
            extra.append(f"{c}: first POSTs without a 202: " + "; ".join(f"{sn} {st}" for sn, st, _ in r["post_errors"]))
        if r["others"]:
            extra.append(f"{c}: first tasks not ok (gateway, status, result_code, reason): {r['others']}")
        if r["poll_errors"]:
            extra.append(f"{c}: {r['poll_errors']} of {r['polls']} polls of `GET /api/v1/ota` failed (timeout {GET_TIMEOUT:.0f} s)")
        for k, v in sorted(r["log_kinds"].items(), key=lambda kv: -kv[1])[:4]:
            extra.append(f"{c}: {v} × server log `{k.strip()}`")
        if r.get("mosquitto_version"):
            extra.append(f"{c}: {r['mosquitto_version']}")
    if extra:
        w("")
        for e in extra:
            w(f"- {e}")
    return "\n".join(out) + "\n"


def main():
    benchlib.run_all(BROKERS, ("embedded", "mosquitto"), run, report, PKG_KIB, errors=(RuntimeError,))


if __name__ == "__main__":
    main()
