"""Driver of scripts/bench_rollout.sh (see its header for what it measures and its knobs)."""
import datetime
import http.client
import json
import os
import queue
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
SCENARIOS = [s.strip() for s in os.environ.get("BENCH_SCENARIOS", "direct,rollout").split(",") if s.strip()]
GATEWAYS = int(os.environ.get("BENCH_GATEWAYS", "2000"))
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "500"))
PKG_KIB = int(os.environ.get("BENCH_PKG_KIB", "64"))
OSD_SECS = int(os.environ.get("BENCH_OSD_SECS", "10"))
READY_SECS = float(os.environ.get("BENCH_READY_SECS", "180"))
RUN_SECS = float(os.environ.get("BENCH_RUN_SECS", "600"))
STALL_SECS = float(os.environ.get("BENCH_STALL_SECS", "60"))
POLL_SECS = float(os.environ.get("BENCH_POLL_SECS", "0.25"))
POST_THREADS = int(os.environ.get("BENCH_POST_THREADS", "50"))
HTTP_TIMEOUT = float(os.environ.get("BENCH_HTTP_TIMEOUT", "20"))
LIST_TIMEOUT = 60.0
MIN_SAMPLE = min(50, GATEWAYS)
PREFIX = "B"
FINAL = {"ok", "failed", "canceled", "rejected", "timeout"}


sys.path.insert(0, os.environ["SCRIPTS"])
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402,F401
    GET_TIMEOUT, Http, bounded, cpu_secs, disk_usage, fmt_ms, fmt_s, free_port, log, own_cpu,
    pct, spawn, status_kib, stop, stop_all, threads_of, ts, wait_line, wait_port,
)

benchlib.NAME = "bench_rollout"
benchlib.handle_signals()


def list_tasks(port):
    """Every task, on a fresh connection, bounded to LIST_TIMEOUT."""
    def get():
        h = Http(port)
        try:
            return {t["id"]: t for t in h.pages("/api/v1/ota?limit=500")}
        finally:
            h.close()
    return bounded(get, LIST_TIMEOUT)


def upload(h, path, name):
    with open(path, "rb") as f:
        data = f.read()
    status, body = h.request("POST", f"/api/v1/firmware?file_name={name}", data,
                             {"Content-Type": "application/octet-stream"}, 120)
    if status not in (200, 201):
        raise RuntimeError(f"upload {name}: {status} {body[:500]!r}")
    return json.loads(body)["id"]


def gateway_sns():
    return [f"{PREFIX}{i:04d}" for i in range(1, GATEWAYS + 1)]


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
            return time.time() - t0
        if time.time() > deadline:
            raise RuntimeError(f"devices not ready after {timeout:.0f} s: {state}")
        time.sleep(1)


# ---------------------------------------------------------------- direct

def drive_direct(port, fw_dock, fw_ac):
    """POSTs one task per gateway, never more than IN_FLIGHT open (or being POSTed) at once.
    Returns the driver's figures; t0 is when the first POST was handed to a client."""
    sns = list(reversed(gateway_sns()))
    work = queue.Queue()
    lock = threading.Lock()
    posts = {}          # sn -> (sent, answered, status, body)
    open_ids = {}       # task id -> time its 202 arrived
    final_seen = {}     # task id -> status seen by a poll
    outstanding = [0]   # POSTs handed to a client and not answered yet

    def worker():
        h = Http(port)
        while True:
            sn = work.get()
            if sn is None:
                break
            body = {"gateway_sn": sn, "devices": [{"sn": sn, "firmware_id": fw_dock},
                                                  {"sn": sn + "-AC", "firmware_id": fw_ac}]}
            t = time.time()
            try:
                status, ans = h.json("POST", "/api/v1/ota", body)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                status, ans = ("timeout" if isinstance(e, (TimeoutError, socket.timeout)) else type(e).__name__), repr(e)
            now = time.time()
            with lock:
                posts[sn] = (t, now, status, ans)
                outstanding[0] -= 1
                if status == 202 and isinstance(ans, dict) and "id" in ans:
                    if ans.get("status") in FINAL:
                        final_seen[ans["id"]] = ans["status"]
                    else:
                        open_ids[ans["id"]] = now
        h.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(POST_THREADS)]
    for th in threads:
        th.start()

    def top_up():
        with lock:
            free = IN_FLIGHT - len(open_ids) - outstanding[0]
            n = max(0, min(free, len(sns)))
            outstanding[0] += n
            batch = [sns.pop() for _ in range(n)]
        for sn in batch:
            work.put(sn)
        return n

    def poll(h):
        """Pages the task list newest first until every task open before this poll began has
        been seen; those now final leave open_ids. Returns (pages, vanished)."""
        t_poll = time.time()
        with lock:
            check = {i for i, t in open_ids.items() if t < t_poll}
        if not check:
            return 0, 0
        seen, cursor, pages = set(), None, 0
        while True:
            items, cursor = h.page("/api/v1/ota?limit=500", cursor)
            pages += 1
            for t in items:
                if t["id"] in check:
                    seen.add(t["id"])
                    if t["status"] in FINAL:
                        with lock:
                            open_ids.pop(t["id"], None)
                            final_seen[t["id"]] = t["status"]
            if seen >= check or not cursor:
                break
        vanished = check - seen
        with lock:
            for i in vanished:
                open_ids.pop(i, None)
                final_seen[i] = "vanished"
        return pages, len(vanished)

    ph = Http(port)
    t0 = time.time()
    top_up()
    deadline = t0 + RUN_SECS
    last, last_change, last_log = "", time.time(), 0.0
    poll_lat, poll_pages, poll_errors, vanished = [], 0, 0, 0
    t_done, stalled = None, False
    while True:
        time.sleep(POLL_SECS)
        tp = time.time()
        try:
            pages, gone = bounded(lambda: poll(ph), LIST_TIMEOUT)
            if pages:
                poll_lat.append(time.time() - tp)
            poll_pages += pages
            vanished += gone
        except Exception as e:  # noqa: BLE001
            poll_errors += 1
            ph.close()
            ph = Http(port)
            log(f"  task list poll failed: {e!r}")
        top_up()
        now = time.time()
        with lock:
            n_open, n_out, n_final, n_posted = len(open_ids), outstanding[0], len(final_seen), len(posts)
        state = f"posted {n_posted}/{GATEWAYS}, open {n_open + n_out}, final {n_final}"
        if state != last:
            if now - last_log >= 1 or n_final == GATEWAYS:
                log(f"  t+{now - t0:6.2f} s  {state}")
                last_log = now
            last, last_change = state, now
        if not sns and n_out == 0 and n_open == 0:
            t_done = now
            break
        if now > deadline:
            break
        if now - last_change > STALL_SECS:
            stalled = True
            log(f"  nothing changed for {STALL_SECS:.0f} s: giving up")
            break
    ph.close()
    with lock:
        not_sent = list(sns)
        sns.clear()
    for _ in threads:
        work.put(None)
    for th in threads:
        th.join(HTTP_TIMEOUT + 5)
    codes = {}
    for r in posts.values():
        codes[r[2]] = codes.get(r[2], 0) + 1
    if not_sent:
        codes["not sent"] = len(not_sent)
    lat = [r[1] - r[0] for r in posts.values() if r[2] == 202]
    return {
        "t0": t0, "t_done": t_done, "stalled": stalled,
        "post_codes": codes, "post_lat": lat,
        "post_errors": [(sn, r[2], str(r[3])[:160]) for sn, r in sorted(posts.items()) if r[2] != 202][:5],
        "poll_lat": poll_lat, "poll_pages": poll_pages, "poll_errors": poll_errors,
        "vanished": vanished,
    }


# ---------------------------------------------------------------- rollout

def drive_rollout(port, fw_dock, fw_ac, cpu_start):
    h = Http(port)
    body = {"name": "bench", "firmware": [{"firmware_id": fw_dock}, {"firmware_id": fw_ac}],
            "target": {"gateway_sns": gateway_sns()}, "stages": [{"percent": 100}],
            "rate_per_minute": None, "max_in_flight": IN_FLIGHT, "min_sample": MIN_SAMPLE,
            "success_threshold": 0, "error_threshold": 100, "max_retries": 0}
    tc = time.time()
    status, ans = h.json("POST", "/api/v1/rollouts", body, timeout=60)
    create_secs = time.time() - tc
    if status != 201 or not isinstance(ans, dict):
        raise RuntimeError(f"POST /api/v1/rollouts: {status} {str(ans)[:500]}")
    rid = ans["id"]
    log(f"  rollout {rid} created in {create_secs * 1000:.0f} ms ({len(json.dumps(body)) / 1024:.0f} KiB body)")
    cpu_start()
    t0 = time.time()
    status, ans = h.json("POST", f"/api/v1/rollouts/{rid}/start", timeout=60)
    start_secs = time.time() - t0
    if status != 200:
        raise RuntimeError(f"POST /api/v1/rollouts/{rid}/start: {status} {str(ans)[:500]}")
    deadline = t0 + RUN_SECS
    last, last_change, last_log = "", time.time(), 0.0
    poll_lat, poll_errors = [], 0
    t_done, stalled, view, why = None, False, ans, None
    while True:
        time.sleep(POLL_SECS)
        tp = time.time()
        try:
            st, v = bounded(lambda: h.json("GET", f"/api/v1/rollouts/{rid}", timeout=GET_TIMEOUT), GET_TIMEOUT + 1)
            if st != 200 or not isinstance(v, dict):
                raise RuntimeError(f"GET /api/v1/rollouts/{rid}: {st} {str(v)[:300]}")
            poll_lat.append(time.time() - tp)
            view = v
        except Exception as e:  # noqa: BLE001
            poll_errors += 1
            h.close()
            h = Http(port)
            log(f"  rollout poll failed: {e!r}")
        now = time.time()
        counts = view.get("counts", {})
        state = f"{view.get('status')} " + " ".join(f"{k}={c}" for k, c in sorted(counts.items()))
        if state != last:
            if now - last_log >= 1 or view.get("status") != "running":
                log(f"  t+{now - t0:6.2f} s  {state} (devices)")
                last_log = now
            last, last_change = state, now
        if view.get("status") in ("completed", "canceled") and not counts.get("in_flight"):
            t_done = now
            break
        if view.get("status") not in ("running", "completed", "canceled"):
            why = f"rollout {view.get('status')}: {view.get('pause_reason') or ''}".strip(": ")
            log(f"  {why}: giving up")
            break
        if now > deadline:
            why = "deadline"
            break
        if now - last_change > STALL_SECS:
            stalled = True
            why = f"nothing changed for {STALL_SECS:.0f} s"
            log(f"  {why}: giving up")
            break
    h.close()
    return {
        "t0": t0, "t_done": t_done, "stalled": stalled, "why": why, "rollout_id": rid,
        "create_secs": create_secs, "start_secs": start_secs, "view": view,
        "poll_lat": poll_lat, "poll_pages": len(poll_lat), "poll_errors": poll_errors,
    }


# ---------------------------------------------------------------- one run

def run(scenario, fw_files):
    res = {"scenario": scenario}
    data_dir = os.path.join(WORK, f"data-{scenario}")
    os.makedirs(data_dir)
    cfg = os.path.join(WORK, "fwrepo.toml")
    catalog, db = benchlib.catalog_args(scenario)
    args = [BIN, "serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0", "--config", cfg,
            "--mqtt-listen", "127.0.0.1:0", "--ota-reply-timeout", "60", "--shutdown-grace", "5"] + catalog
    name = f"server-{scenario}"
    server = spawn(name, args)
    hport = int(wait_line(server, name, r"HTTP listening on http://127\.0\.0\.1:(\d+)", 30).group(1))
    benchlib.read_token(data_dir)
    mport = int(wait_line(server, name, r"MQTT listening on mqtt://127\.0\.0\.1:(\d+)", 30).group(1))
    for port in (hport, mport):
        if port in (1883, 8080):
            raise RuntimeError(f"refusing to use port {port}")
    log(f"[{scenario}] server pid {server.pid}, HTTP :{hport}, MQTT :{mport}")
    h = Http(hport)
    fw_dock = upload(h, fw_files["Dock"], "Dock_2.0.0.zip")
    fw_ac = upload(h, fw_files["M30"], "M30_2.0.0.zip")

    sim = spawn(f"simulate-{scenario}", [BIN, "simulate", "--mqtt-url", f"mqtt://127.0.0.1:{mport}",
                                         "--gateways", str(GATEWAYS), "--sn-prefix", PREFIX,
                                         "--osd-every", str(OSD_SECS)])
    log(f"[{scenario}] simulator pid {sim.pid}; waiting for {2 * GATEWAYS} devices")
    res["ready_secs"] = wait_devices(h, READY_SECS)
    h.close()
    time.sleep(1)
    res["rss_before_kib"] = status_kib(server.pid, "VmRSS")
    res["disk_before"] = disk_usage(data_dir)

    procs = {"server": server, "simulator": sim}
    cpu0 = {}

    def cpu_start():
        cpu0.update({k: cpu_secs(p.pid) for k, p in procs.items()})
        cpu0["driver"] = own_cpu()
        if db:
            res["pg_before"] = benchlib.pg_stats(db)

    if scenario == "direct":
        log(f"[{scenario}] POSTing {GATEWAYS} tasks, at most {IN_FLIGHT} open, from {POST_THREADS} threads")
        cpu_start()
        d = drive_direct(hport, fw_dock, fw_ac)
    else:
        log(f"[{scenario}] creating and starting a rollout of {GATEWAYS} gateways, max_in_flight {IN_FLIGHT}")
        d = drive_rollout(hport, fw_dock, fw_ac, cpu_start)
    cpu1 = {k: cpu_secs(p.pid) for k, p in procs.items()}
    cpu1["driver"] = own_cpu()
    res.update(d)
    t0 = d["t0"]
    res["cpu"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
    res["run_wall"] = (d["t_done"] or time.time()) - t0
    res["t_done_rel"] = None if d["t_done"] is None else d["t_done"] - t0
    res["rss_peak_kib"] = status_kib(server.pid, "VmHWM")
    res["rss_end_kib"] = status_kib(server.pid, "VmRSS")
    res["threads"] = status_kib(server.pid, "Threads")
    res["sim_rss_peak_kib"] = status_kib(sim.pid, "VmHWM")

    # Every task, read back once the run is over.
    tl = time.time()
    try:
        tasks = list_tasks(hport)
        res["list_secs"] = time.time() - tl
    except Exception as e:  # noqa: BLE001
        log(f"[{scenario}] final task listing failed: {e!r}")
        tasks, res["list_secs"] = {}, None
    res["tasks_seen"] = len(tasks)
    # What a task record holds (its JSON as the API shows it, history included): what the
    # catalog must keep at the least; the rest of its growth is the backend's own.
    res["record_bytes"] = sum(len(json.dumps(t, separators=(",", ":"))) for t in tasks.values())
    by = {}
    for t in tasks.values():
        by[t["status"]] = by.get(t["status"], 0) + 1
    res["status_counts"] = by
    created = sorted(ts(t["created_at"]) for t in tasks.values())
    finished = [ts(t["finished_at"]) for t in tasks.values() if t.get("finished_at")]
    res["first_created"] = created[0] - t0 if created else None
    res["last_created"] = created[-1] - t0 if created else None
    res["rate"] = (len(created) - 1) / (created[-1] - created[0]) if len(created) > 1 and created[-1] > created[0] else None
    k = min(IN_FLIGHT, len(created))
    res["burst"] = (k, created[k - 1] - created[0]) if k > 1 else None
    res["finished_max"] = (max(finished) - t0) if finished else None
    res["e2e"] = [ts(t["finished_at"]) - ts(t["created_at"]) for t in tasks.values() if t.get("finished_at")]
    # Peak number of tasks open at once: +1 at created_at, -1 at finished_at (ends first on ties).
    ev = []
    for t in tasks.values():
        ev.append((ts(t["created_at"]), 1))
        if t.get("finished_at"):
            ev.append((ts(t["finished_at"]), -1))
    peak = cur = 0
    for _, dlt in sorted(ev):
        cur += dlt
        peak = max(peak, cur)
    res["peak_open"] = peak
    res["gateways_tasked"] = len({t["gateway_sn"] for t in tasks.values()})
    res["others"] = [(t["gateway_sn"], t["status"], t.get("result_code"), t.get("result_reason"))
                     for t in sorted(tasks.values(), key=lambda t: t["gateway_sn"]) if t["status"] != "ok"][:3]
    if scenario == "rollout" and d.get("view"):
        v = d["view"]
        res["rollout_status"] = v.get("status")
        res["rollout_counts"] = v.get("counts", {})
        if v.get("started_at") and v.get("finished_at"):
            res["rollout_own"] = ts(v["finished_at"]) - ts(v["started_at"])
    res["disk_end"] = disk_usage(data_dir)
    if db:
        res["pg_after"] = benchlib.pg_stats(db)

    log(f"[{scenario}] stopping simulator and server")
    res["sim_exit"] = stop(sim)
    res["server_exit"] = stop(server, 15)
    res["disk_after"] = disk_usage(data_dir)
    if db:
        # What is live once dead row versions are gone (VACUUM FULL rewrites every table).
        benchlib.psql(benchlib.with_db(benchlib.CATALOG, db), "VACUUM FULL")
        res["pg_live"] = benchlib.pg_stats(db)["size"]
    benchlib.drop_db(db)
    errs = open(os.path.join(WORK, f"{name}.err"), errors="replace").read().splitlines()
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in errs]
    res["log_warn"] = sum(1 for l in plain if re.search(r"\bWARN\b", l))
    res["log_error"] = sum(1 for l in plain if re.search(r"\bERROR\b", l))
    res["log_kinds"] = {}
    for l in plain:
        m = re.search(r"\b(WARN|ERROR)\b\s+(.*?)(?: error=| [a-z_]+=|$)", l)
        if not m:
            m = re.search(r"\b(INFO)\b\s+(.*?(?:rollout dispatch not sent|orphan).*?)(?: error=| [a-z_]+=|$)", l)
        if m:
            kind = (m.group(1) + " " + re.sub(r"\{[^}]*\}", "", m.group(2)))[:110]
            res["log_kinds"][kind] = res["log_kinds"].get(kind, 0) + 1
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
    w(f"Load: {GATEWAYS} docks + {GATEWAYS} aircraft from one `fwrepo simulate` process (osd every "
      f"{OSD_SECS} s) on the embedded broker; one task per gateway (dock {PKG_KIB} KiB + aircraft "
      f"{PKG_KIB} KiB package), at most {IN_FLIGHT} open at once. *direct*: `POST /api/v1/ota` from "
      f"{POST_THREADS} keep-alive clients, the task list polled every {POLL_SECS} s (newest first, "
      f"as many pages as needed to see every open task). *rollout*: one stage of 100 %, "
      f"`rate_per_minute` null, `max_in_flight` {IN_FLIGHT}, `max_retries` 0, "
      f"`GET /api/v1/rollouts/{{id}}` polled every {POLL_SECS} s.")
    w("")
    names = {"direct": "direct POSTs", "rollout": "rollout"}
    cols = [names.get(r["scenario"], r["scenario"]) for r in results]
    w("| Metric | " + " | ".join(cols) + " | Target |")
    w("|---|" + "---|" * len(cols) + "---|")

    def row(label, fn, target=""):
        w(f"| {label} | " + " | ".join(fn(r) for r in results) + f" | {target} |")

    def requests(r):
        if r["scenario"] == "direct":
            c = ", ".join(f"{v} × {k}" for k, v in sorted(r["post_codes"].items(), key=str))
            lat = r["post_lat"]
            return f"`POST /ota`: {c}; p50 / p99 {fmt_ms(pct(lat, 50))} / {fmt_ms(pct(lat, 99))} ms"
        return (f"`POST /rollouts` 201 in {fmt_ms(r['create_secs'])} ms, "
                f"`/start` 200 in {fmt_ms(r['start_secs'])} ms")

    def done(r):
        if r["t_done_rel"] is not None:
            return fmt_s(r["t_done_rel"])
        why = r.get("why") or (f"nothing changed for {STALL_SECS:.0f} s" if r["stalled"] else "deadline")
        return f"**never** (gave up {r['run_wall']:.0f} s after the start: {why})"

    def counts(r):
        if not r["tasks_seen"]:
            return "**unknown: no task listed**"
        ok = r["status_counts"].get("ok", 0)
        s = f"{ok} / {r['tasks_seen'] - ok}"
        rest = [f"{k} {v}" for k, v in sorted(r["status_counts"].items()) if k != "ok"]
        missing = GATEWAYS - r["gateways_tasked"]
        if missing > 0:
            rest.append(f"{missing} gateways without a task")
        return s + (f" ({', '.join(rest)})" if rest else "")

    def rate(r):
        if r["rate"] is None:
            return "–"
        s = f"{r['rate']:.0f} /s overall"
        if r["burst"]:
            k, secs = r["burst"]
            s += f"; first {k} in {secs:.2f} s" + (f" ({(k - 1) / secs:.0f} /s)" if secs > 0 else "")
        return s

    def polls(r):
        lat = r["poll_lat"]
        what = "task-list pages" if r["scenario"] == "direct" else "rollout GETs"
        s = f"{len(lat)} polls"
        if r["scenario"] == "direct":
            s += f", {r['poll_pages']} {what}"
        s += f"; p50 / max {fmt_ms(pct(lat, 50))} / {fmt_ms(max(lat) if lat else None)} ms"
        if r["poll_errors"]:
            s += f"; **{r['poll_errors']} failed**"
        return s

    def disk(key):
        def f(r):
            d = r[key]
            cat = d.get("catalog", (0, 0))
            blobs = d.get("blobs", (0, 0))
            return (f"{cat[0] / 2**20:.1f} / {blobs[0] / 2**20:.1f} / {d['total'][0] / 2**20:.1f} MiB"
                    f" (catalog apparent {cat[1] / 2**20:.1f} MiB)")
        return f

    def rollout_state(r):
        if r["scenario"] != "rollout":
            return "–"
        c = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rollout_counts", {}).items()))
        own = f"; its own started_at → finished_at {r['rollout_own']:.2f} s" if r.get("rollout_own") is not None else ""
        return f"{r.get('rollout_status')}: {c} (devices){own}"

    row(f"Devices ready ({2 * GATEWAYS} known, {GATEWAYS} docks online with child_sn)", lambda r: fmt_s(r["ready_secs"], 1))
    row("Requests of the driver", requests)
    row("Start → all tasks final (poll)", done, "all complete")
    row("Start → last task `finished_at`", lambda r: fmt_s(r["finished_max"]))
    row("Tasks ok / other", counts, f"{GATEWAYS} / 0")
    row("Rollout at the end", rollout_state)
    row("Tasks created per second (from `created_at`)", rate)
    row("Start → first / last task `created_at`",
        lambda r: f"{fmt_ms(r['first_created'])} ms / {fmt_s(r['last_created'])}")
    row("Peak tasks open at once (from `created_at` / `finished_at`)", lambda r: str(r["peak_open"]), f"≤ {IN_FLIGHT}")
    row("Task created → finished p50 / p99",
        lambda r: f"{fmt_ms(pct(r['e2e'], 50))} / {fmt_ms(pct(r['e2e'], 99))} ms")
    row("Server peak RSS (VmHWM); RSS before the run; at the end",
        lambda r: f"{mib(r['rss_peak_kib'])} MiB; {mib(r['rss_before_kib'])} MiB; {mib(r['rss_end_kib'])} MiB", "< 512 MiB")
    row("Server CPU (utime+stime) over the run", lambda r: f"{r['cpu']['server']:.2f} s")
    row("Simulator CPU over the run (its peak RSS)",
        lambda r: f"{r['cpu']['simulator']:.2f} s ({mib(r['sim_rss_peak_kib'])} MiB)")
    row("Driver (python) CPU over the run", lambda r: f"{r['cpu']['driver']:.2f} s")
    row("Driver polls", polls)
    row("Data dir: catalog (sled) / blobs / total, before the run", disk("disk_before"))
    row("… at the end of the run", disk("disk_end"))
    row("… after the server stopped", disk("disk_after"))
    def pg(r):
        a, b = r.get("pg_after"), r.get("pg_before")
        if not a or not b:
            return "–"
        devices = 2 * max(r["tasks_seen"], 1)
        calls = "" if a["calls"] is None else (
            f"; {(a['calls'] - b['calls']) / devices:.1f} statements"
            f" and {(a['commits'] - b['commits']) / devices:.1f} transactions per device")
        per_task = lambda size: (size - b["size"]) / 2**10 / max(r["tasks_seen"], 1)
        live = (f", {per_task(r['pg_live']):.1f} KiB live after VACUUM FULL"
                if r.get("pg_live") else "")
        return (f"{a['size'] / 2**20:.1f} MiB after (+{per_task(a['size']):.1f}"
                f" KiB per finished task{live}){calls}")

    row("PostgreSQL catalog: database size; growth per task; statements per device", pg)
    row("Task record (API JSON, history included) per finished task",
        lambda r: f"{r['record_bytes'] / 2**10 / max(r['tasks_seen'], 1):.1f} KiB")
    row("Final `GET /api/v1/ota` listing (all pages of 500)", lambda r: fmt_s(r["list_secs"]))
    row("Server threads at the end", lambda r: str(r["threads"]))
    row("Server stop", lambda r: r["server_exit"])
    row("Server log WARN / ERROR lines (whole run)", lambda r: f"{r['log_warn']} / {r['log_error']}")
    w("")
    w("\"Start\" is the first `POST /api/v1/ota` (direct) or the `POST …/start` (rollout); \"over the"
      " run\" is from the start until every task was final (or the wait gave up). Sizes are allocated"
      " blocks as `du` counts them.")
    w("")
    by = {r["scenario"]: r for r in results}
    ratio_ok = None
    if "direct" in by and "rollout" in by:
        d, ro = by["direct"], by["rollout"]
        parts = []
        if d["finished_max"] and ro["finished_max"]:
            ratio = ro["finished_max"] / d["finished_max"]
            ratio_ok = ratio < 1.10 and d["t_done_rel"] is not None and ro["t_done_rel"] is not None
            parts.append(f"**{ratio:.3f}** from the last `finished_at` ({ro['finished_max']:.2f} s / {d['finished_max']:.2f} s)")
        if d["t_done_rel"] and ro["t_done_rel"]:
            parts.append(f"{ro['t_done_rel'] / d['t_done_rel']:.3f} as seen by polling "
                         f"({ro['t_done_rel']:.2f} s / {d['t_done_rel']:.2f} s)")
        if d["cpu"]["server"] > 0:
            parts.append(f"server CPU {ro['cpu']['server'] / d['cpu']['server']:.2f}× "
                         f"({ro['cpu']['server']:.2f} s / {d['cpu']['server']:.2f} s)")
        w("Rollout / direct: " + ("; ".join(parts) if parts else "–") + ". Target: < 1.10.")
        w("")
    met = []
    for r, c in zip(results, cols):
        checks = {
            "all complete": r["t_done_rel"] is not None and r["status_counts"].get("ok", 0) == GATEWAYS
                            and r["tasks_seen"] == GATEWAYS,
            f"in flight ≤ {IN_FLIGHT}": r["peak_open"] <= IN_FLIGHT,
            "RSS < 512 MiB": r["rss_peak_kib"] is not None and r["rss_peak_kib"] < 512 * 1024,
        }
        met.append(f"{c}: " + ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in checks.items()))
    if ratio_ok is not None:
        met.append(f"rollout / direct < 1.10: {'yes' if ratio_ok else '**no**'}")
    w("Targets met? " + "; ".join(met) + ".")
    extra = []
    for r, c in zip(results, cols):
        for sn, st, body in r.get("post_errors", []):
            extra.append(f"{c}: POST without a 202: {sn} {st} {body}")
        if r.get("vanished"):
            extra.append(f"{c}: {r['vanished']} open tasks were missing from the task list")
        if r["others"]:
            extra.append(f"{c}: first tasks not ok (gateway, status, result_code, reason): {r['others']}")
        for k, v in sorted(r["log_kinds"].items(), key=lambda kv: -kv[1])[:4]:
            extra.append(f"{c}: {v} × server log `{k.strip()}`")
    if extra:
        w("")
        for e in extra:
            w(f"- {e}")
    return "\n".join(out) + "\n"


def main():
    benchlib.run_all(SCENARIOS, ("direct", "rollout"), run, report, PKG_KIB, errors=(Exception,))


if __name__ == "__main__":
    main()
