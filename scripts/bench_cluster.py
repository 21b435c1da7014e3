"""Driver of scripts/bench_cluster.sh (see its header for what it measures and its knobs)."""
import concurrent.futures
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time

WORK = os.environ["WORK"]
SCRIPTS = os.environ["SCRIPTS"]
BIN = os.path.join(WORK, "fwrepo")
SCENARIOS = [s.strip() for s in os.environ.get("BENCH_SCENARIOS", "one,three").split(",") if s.strip()]
REPLICAS = {"one": 1, "three": 3}
GATEWAYS = int(os.environ.get("BENCH_GATEWAYS", "10000"))
SIMS = max(1, min(int(os.environ.get("BENCH_SIMS", "4")), GATEWAYS))
OSD_SECS = int(os.environ.get("BENCH_OSD_SECS", "10"))
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "500"))
PKG_KIB = int(os.environ.get("BENCH_PKG_KIB", "64"))
READY_SECS = float(os.environ.get("BENCH_READY_SECS", "300"))
RUN_SECS = float(os.environ.get("BENCH_RUN_SECS", "900"))
STALL_SECS = float(os.environ.get("BENCH_STALL_SECS", "120"))
POLL_SECS = float(os.environ.get("BENCH_POLL_SECS", "0.5"))
KILL_AT = float(os.environ.get("BENCH_KILL_AT", "0.33"))
RESTART_SECS = float(os.environ.get("BENCH_RESTART_SECS", "30"))
REPLY_TIMEOUT = os.environ.get("BENCH_REPLY_TIMEOUT", "60")
SERVE_ARGS = os.environ.get("BENCH_SERVE_ARGS", "").split()
PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
LIST_TIMEOUT = 180.0
BUCKET = "fwrepo-bench"

sys.path.insert(0, SCRIPTS)
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    GET_TIMEOUT, Http, bounded, cpu_secs, fmt_ms, fmt_s, free_port, log, pct, report_notes, spawn, start_mosquitto, status_kib,
    stop, ts, wait_line, wait_port,
)

benchlib.NAME = "bench_cluster"
benchlib.handle_signals()


def fleet():
    """[(serial prefix, docks)] per simulator process; its docks are PREFIX0001… (Rust's {:04})."""
    base, extra = divmod(GATEWAYS, SIMS)
    return [(f"C{k + 1:02d}", base + (k < extra)) for k in range(SIMS)]


def gateway_sns():
    return [f"{p}{i:04d}" for p, n in fleet() for i in range(1, n + 1)]


def tree_cpu(pid):
    """CPU seconds of a process, its reaped children and its live children (postgres, nginx)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            total = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]) / benchlib.TICK
    except OSError:
        return None
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    total += cpu_secs(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return total


# ---------------------------------------------------------------- infrastructure

def as_pg(argv):
    return ["runuser", "-u", "postgres", "--"] + argv if os.getuid() == 0 else argv


def start_postgres(name):
    """A throwaway PostgreSQL (scripts/pg_throwaway.sh, pg_stat_statements loaded) with a
    database `fwrepo` for the catalog; its postmaster goes to $WORK/pids too."""
    d = os.path.join(WORK, f"{name}-pg")
    os.makedirs(d)
    out = subprocess.run([os.path.join(SCRIPTS, "pg_throwaway.sh"), str(free_port()), d],
                         check=True, capture_output=True, text=True)
    pg = {"dir": d, "url": out.stdout.strip()}
    with open(os.path.join(d, "data", "postmaster.pid")) as f:
        pg["pid"] = int(f.readline())
    with open(os.path.join(WORK, "pids"), "a") as f:
        f.write(f"{pg['pid']}\n")
    benchlib.psql(pg["url"], "CREATE DATABASE fwrepo")
    benchlib.psql(pg["url"], "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    pg["db_url"] = benchlib.with_db(pg["url"], "fwrepo")
    return pg


def stop_postgres(pg):
    subprocess.run(as_pg([f"{PG_BIN}/pg_ctl", "-D", os.path.join(pg["dir"], "data"), "stop",
                          "-m", "immediate"]), capture_output=True)


STATS = "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'fwrepo'"


def db_counters(pg):
    """(statements run in `fwrepo` since the last reset, transactions committed in it)."""
    return (int(benchlib.psql(pg["url"], f"SELECT coalesce(sum(s.calls), 0) {STATS}")),
            int(benchlib.psql(pg["url"], "SELECT xact_commit FROM pg_stat_database WHERE datname = 'fwrepo'")))


def start_nginx(name, port, upstreams):
    d = os.path.join(WORK, f"{name}-nginx")
    os.makedirs(d)
    servers = "".join(f"    server 127.0.0.1:{u} max_fails=1 fail_timeout=5s;\n" for u in upstreams)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(("user root;\n" if os.getuid() == 0 else "") + f"""daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {max(1024, nofile // 2)}; }}
http {{
  access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream fwrepo {{\n{servers}    keepalive 64;\n  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0; proxy_buffering off; proxy_request_buffering off;
    location / {{
      proxy_pass http://fwrepo; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_connect_timeout 2s; proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_502 http_503;
    }}
  }}
}}
""")
    p = spawn(f"{name}-nginx", ["nginx", "-p", d, "-e", f"{d}/error.log", "-c", conf])
    wait_port(port, 10)
    return p


class Replica:
    """One `fwrepo serve` on a fixed port (a restart gets the same port, id and data dir)."""

    def __init__(self, ctx, rid):
        self.ctx, self.rid, self.port = ctx, rid, free_port()
        self.dir = os.path.join(WORK, f"{ctx['name']}-{rid}")
        self.proc, self.logs = None, []

    def start(self):
        c = self.ctx
        name = f"{c['name']}-{self.rid}" + (f"-restart{len(self.logs)}" if self.logs else "")
        self.logs.append(name)
        self.proc = spawn(name, [
            BIN, "serve", "--data-dir", self.dir, "--listen", f"127.0.0.1:{self.port}",
            "--config", os.path.join(WORK, "fwrepo.toml"), "--catalog", c["pg"]["db_url"],
            "--blob-store", f"s3://{BUCKET}/{c['name']}", "--s3-endpoint", c["s3"],
            "--mqtt-url", f"mqtt://127.0.0.1:{c['mqtt_port']}", "--replica-id", self.rid,
            "--url-signing-key-file", c["key"], "--public-url", c["public"],
            "--ota-reply-timeout", REPLY_TIMEOUT, "--shutdown-grace", "5"] + SERVE_ARGS)
        wait_line(self.proc, name, r"HTTP listening on http://127\.0\.0\.1:(\d+)", 90)
        wait_line(self.proc, name, r"MQTT connected to", 30)

    def reading(self):
        return {"hwm": status_kib(self.proc.pid, "VmHWM"), "cpu": cpu_secs(self.proc.pid)}


def start_stack(ctx, n_replicas):
    """PostgreSQL, Mosquitto, moto (S3), the signing key, the replicas and nginx of a scenario."""
    import boto3
    name = ctx["name"]
    ctx["pg"] = start_postgres(name)
    s3_port, ctx["lb_port"] = free_port(), free_port()
    ctx["mosquitto"], ctx["mqtt_port"] = start_mosquitto(name)
    ctx["moto"] = spawn(f"{name}-moto", ["moto_server", "-H", "127.0.0.1", "-p", str(s3_port)])
    wait_port(s3_port, 60)
    ctx["s3"] = f"http://127.0.0.1:{s3_port}"
    boto3.client("s3", endpoint_url=ctx["s3"]).create_bucket(Bucket=BUCKET)
    ctx["key"] = os.path.join(WORK, f"{name}-url-signing.key")
    with open(ctx["key"], "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    ctx["public"] = f"http://127.0.0.1:{ctx['lb_port']}"
    reps = [Replica(ctx, f"r{i + 1}") for i in range(n_replicas)]
    reps[0].start()  # bootstraps the shared catalog: its admin.token is the deployment's
    benchlib.read_token(reps[0].dir)
    with concurrent.futures.ThreadPoolExecutor() as ex:
        list(ex.map(Replica.start, reps[1:]))
    ctx["replicas"] = {r.rid: r for r in reps}
    ctx["nginx"] = start_nginx(name, ctx["lb_port"], [r.port for r in reps])
    log(f"[{name}] {n_replicas} replica(s) on :{','.join(str(r.port) for r in reps)} behind nginx "
        f":{ctx['lb_port']}; mosquitto :{ctx['mqtt_port']}, moto :{s3_port}, {ctx['pg']['url']}")


def start_sims(ctx):
    ctx["sims"] = [spawn(f"{ctx['name']}-sim{k + 1}", [
        BIN, "simulate", "--mqtt-url", f"mqtt://127.0.0.1:{ctx['mqtt_port']}", "--gateways", str(n),
        "--sn-prefix", prefix, "--osd-every", str(OSD_SECS)]) for k, (prefix, n) in enumerate(fleet())]


def sim_totals(ctx):
    """The last `jobs N ok N failed N bytes N reconnects N` line of each simulator, summed."""
    tot = {"jobs": 0, "ok": 0, "failed": 0, "reconnects": 0}
    for k in range(len(ctx["sims"])):
        with open(os.path.join(WORK, f"{ctx['name']}-sim{k + 1}.out"), errors="replace") as f:
            lines = [l.split() for l in f if l.startswith("jobs ")]
        for key in tot:
            tot[key] += int(lines[-1][lines[-1].index(key) + 1]) if lines else 0
    return tot


def other_cpu(ctx):
    return {"postgres": tree_cpu(ctx["pg"]["pid"]), "mosquitto": cpu_secs(ctx["mosquitto"].pid),
            "moto": cpu_secs(ctx["moto"].pid), "nginx": tree_cpu(ctx["nginx"].pid),
            "simulators": sum(cpu_secs(p.pid) for p in ctx["sims"])}


# ---------------------------------------------------------------- phases

def upload(h, path, name):
    with open(path, "rb") as f:
        status, body = h.request("POST", f"/api/v1/firmware?file_name={name}", f.read(),
                                 {"Content-Type": "application/octet-stream"}, 120)
    if status not in (200, 201):
        raise RuntimeError(f"upload {name}: {status} {body[:500]!r}")
    return json.loads(body)["id"]


def wait_devices(h, docks):
    t0, last = time.time(), ""
    while True:
        devs = {d["sn"]: d for d in h.pages("/api/v1/devices?limit=500")}
        known = sum(1 for s in docks if s in devs and s + "-AC" in devs)
        ready = sum(1 for s in docks if devs.get(s, {}).get("online") and devs[s].get("child_sn") == s + "-AC")
        state = f"{known}/{len(docks)} docks known with their aircraft, {ready} online with child_sn"
        if state != last:
            log("  " + state)
            last = state
        if ready == len(docks):
            return time.time() - t0
        if time.time() - t0 > READY_SECS:
            raise RuntimeError(f"devices not ready after {READY_SECS:.0f} s: {state}")
        time.sleep(1)


def lease_holder(h, lease, exclude=()):
    """A live replica (not in `exclude`) listing `lease` in `GET /api/v1/cluster` (a killed
    replica's row lists its leases until its heartbeat is stale)."""
    st, v = h.json("GET", "/api/v1/cluster", timeout=GET_TIMEOUT)
    if st != 200:
        raise RuntimeError(f"GET /api/v1/cluster: {st} {str(v)[:300]}")
    return next((r["id"] for r in v["replicas"] if r.get("alive") and lease in r.get("leases", [])
                 and r["id"] not in exclude), None)


class Killer:
    """The `three` scenario's fault, a step per poll: kill -9 of the `rollouts` lease holder
    once KILL_AT of the devices are ok, then the wait for another replica to hold the lease,
    and the restart of the killed one RESTART_SECS after the kill."""

    def __init__(self, ctx):
        self.ctx, self.res = ctx, {}
        self.victim = self.t_kill = self.restarter = None

    def step(self, h, ok):
        r, now = self.res, time.time()
        if self.t_kill is None and ok >= KILL_AT * 2 * GATEWAYS:
            rid = lease_holder(h, "rollouts")
            if rid is None:
                return
            self.victim = self.ctx["replicas"][rid]
            r.update(victim=rid, ok_at_kill=ok, before_kill=self.victim.reading())
            self.t_kill = time.time()
            os.kill(self.victim.proc.pid, signal.SIGKILL)
            self.victim.proc.wait()
            log(f"  kill -9 of {rid} (holds `rollouts`) with {ok} devices ok")
        elif self.t_kill is not None and "lease_secs" not in r:
            back = self.restarter is not None and not self.restarter.is_alive()
            holder = lease_holder(h, "rollouts", () if back else (self.victim.rid,))
            if holder:
                r.update(lease_secs=now - self.t_kill, successor=holder)
                log(f"  `rollouts` held by {holder} {r['lease_secs']:.1f} s after the kill")
        if self.t_kill is not None and self.restarter is None and now - self.t_kill >= RESTART_SECS:
            def restart():
                try:
                    self.victim.start()
                    r["restart_secs"] = time.time() - self.t_kill
                    log(f"  {self.victim.rid} restarted, up {r['restart_secs']:.1f} s after the kill")
                except Exception as e:  # noqa: BLE001
                    r["restart_error"] = repr(e)
            self.restarter = threading.Thread(target=restart, daemon=True)
            self.restarter.start()


def drive_rollout(ctx, h, fw_dock, fw_ac):
    body = {"name": "bench", "firmware": [{"firmware_id": fw_dock}, {"firmware_id": fw_ac}],
            "target": {"gateway_sns": gateway_sns()}, "stages": [{"percent": 100}],
            "rate_per_minute": None, "max_in_flight": IN_FLIGHT, "min_sample": min(50, GATEWAYS),
            "success_threshold": 0, "error_threshold": 100, "max_retries": 0}
    status, ans = h.json("POST", "/api/v1/rollouts", body, timeout=120)
    if status != 201 or not isinstance(ans, dict):
        raise RuntimeError(f"POST /api/v1/rollouts: {status} {str(ans)[:500]}")
    rid = ans["id"]
    log(f"  rollout {rid} created ({len(json.dumps(body)) / 1024:.0f} KiB body)")
    killer = Killer(ctx) if len(ctx["replicas"]) > 1 else None
    ctx["cpu0"] = {**{k: r.reading()["cpu"] for k, r in ctx["replicas"].items()}, **other_cpu(ctx)}
    benchlib.psql(ctx["pg"]["url"], "SELECT pg_stat_statements_reset()")
    commits0 = db_counters(ctx["pg"])[1]
    t0 = time.time()
    status, ans = h.json("POST", f"/api/v1/rollouts/{rid}/start", timeout=60)
    if status != 200:
        raise RuntimeError(f"POST /api/v1/rollouts/{rid}/start: {status} {str(ans)[:500]}")
    last, last_change, last_log = "", time.time(), 0.0
    poll_errors, t_done, why, view = 0, None, None, ans
    while not why:
        time.sleep(POLL_SECS)
        try:
            st, v = bounded(lambda: h.json("GET", f"/api/v1/rollouts/{rid}", timeout=GET_TIMEOUT), GET_TIMEOUT + 1)
            if st != 200 or not isinstance(v, dict):
                raise RuntimeError(f"GET /api/v1/rollouts/{rid}: {st} {str(v)[:300]}")
            view = v
            if killer:
                bounded(lambda: killer.step(h, view.get("counts", {}).get("ok", 0)), GET_TIMEOUT + 1)
        except Exception as e:  # noqa: BLE001
            poll_errors += 1
            h.close()
            log(f"  poll failed: {e!r}")
        now, counts, status = time.time(), view.get("counts", {}), view.get("status")
        state = f"{status} " + " ".join(f"{k}={c}" for k, c in sorted(counts.items()))
        if state != last:
            if now - last_log >= 5 or status != "running":
                log(f"  t+{now - t0:6.1f} s  {state} (devices)")
                last_log = now
            last, last_change = state, now
        if status in ("completed", "canceled") and not counts.get("in_flight"):
            t_done = now
            break
        why = (f"rollout {status}" if status != "running" else "deadline" if now - t0 > RUN_SECS
               else f"nothing changed for {STALL_SECS:.0f} s" if now - last_change > STALL_SECS else None)
    if why:
        log(f"  {why}: giving up")
    calls, commits = db_counters(ctx["pg"])
    if killer and killer.restarter:
        killer.restarter.join(120)
    return {"t0": t0, "t_done": t_done, "why": why, "view": view, "poll_errors": poll_errors,
            "calls": calls, "commits": commits - commits0, "kill": killer.res if killer else None,
            "t_kill": killer.t_kill if killer else None}


def collect(ctx, d, res):
    """Process and database readings right after the run (before the task listing's load)."""
    kill = d["kill"] or {}
    res["replica"] = {}
    for rid, r in ctx["replicas"].items():
        now = r.reading() if r.proc.poll() is None else {"hwm": None, "cpu": None}
        cpu = None if now["cpu"] is None else now["cpu"] - ctx["cpu0"][rid]
        if rid == kill.get("victim"):
            before = kill["before_kill"]
            cpu = before["cpu"] - ctx["cpu0"][rid] + (now["cpu"] or 0)
            now = {"hwm": before["hwm"], "hwm_after": now["hwm"]}
        res["replica"][rid] = {**now, "cpu": cpu}
    cpu1 = other_cpu(ctx)
    res["other_cpu"] = {k: None if None in (v, ctx["cpu0"][k]) else v - ctx["cpu0"][k] for k, v in cpu1.items()}
    res["other_hwm"] = {"mosquitto": status_kib(ctx["mosquitto"].pid, "VmHWM"),
                        "moto": status_kib(ctx["moto"].pid, "VmHWM"),
                        "simulators": max(status_kib(p.pid, "VmHWM") or 0 for p in ctx["sims"])}
    out = benchlib.psql(ctx["pg"]["url"], "SELECT s.calls || ' ' || regexp_replace(left(s.query, 90), "
                        f"'\\s+', ' ', 'g') {STATS} ORDER BY s.calls DESC LIMIT 4")
    res["top_statements"] = [l.split(" ", 1) for l in out.splitlines() if " " in l]


def analyse_tasks(tasks, d, res):
    t0, t_kill = d["t0"], d["t_kill"]
    per_gw, by = {}, {}
    for t in tasks:
        per_gw[t["gateway_sn"]] = per_gw.get(t["gateway_sn"], 0) + 1
        by[t["status"]] = by.get(t["status"], 0) + 1
    sns = gateway_sns()
    res.update(tasks_seen=len(tasks), status_counts=by, gw_once=sum(1 for s in sns if per_gw.get(s) == 1),
               gw_none=[s for s in sns if s not in per_gw],
               gw_many=sorted((s, n) for s, n in per_gw.items() if n > 1))
    created = sorted(ts(t["created_at"]) for t in tasks)
    finished = [ts(t["finished_at"]) for t in tasks if t.get("finished_at")]
    res["finished_max"] = max(finished) - t0 if finished else None
    res["rate"] = (len(created) - 1) / (created[-1] - created[0]) if len(created) > 1 and created[-1] > created[0] else None
    res["gap"] = max((b - a for a, b in zip(created, created[1:])), default=None)
    res["dispatch"], res["e2e"] = [], []
    for t in tasks:
        h = t.get("history", [])
        pub = [ts(e["at"]) for e in h if e.get("source") == "publish"]
        rep = [ts(e["at"]) for e in h if e.get("source") == "services_reply"]
        if pub and rep:
            res["dispatch"].append(rep[0] - pub[0])
        if t.get("finished_at"):
            res["e2e"].append(ts(t["finished_at"]) - ts(t["created_at"]))
    res["no_reply"] = len(tasks) - len(res["dispatch"])
    if t_kill:
        res["next_created"] = min((c - t_kill for c in created if c > t_kill), default=None)
    res["all_before_kill"] = bool(t_kill and created) and created[-1] < t_kill and not res["gw_none"]
    res["others"] = []
    for t in sorted((t for t in tasks if t["status"] != "ok"), key=lambda t: t["gateway_sn"])[:3]:
        e = (t.get("history") or [{}])[-1]
        at = f"{ts(e['at']) - (t_kill or t0):+.1f} s" if e.get("at") else "–"
        sub = (e.get("progress") or {}).get("sub_status") or e.get("status")
        res["others"].append(f"{t['gateway_sn']} {t['status']}{' ' + t['result_reason'] if t.get('result_reason') else ''}"
                             f" (last history: {e.get('source')} {sub}, {'kill' if t_kill else 'start'} {at})")


def log_lines(ctx):
    """WARN and ERROR lines of every replica process, and how often each kind appeared."""
    counts, kinds = {"WARN": 0, "ERROR": 0}, {}
    for name in (n for r in ctx["replicas"].values() for n in r.logs):
        for line in open(os.path.join(WORK, f"{name}.err"), errors="replace"):
            m = re.search(r"\b(WARN|ERROR)\b\s+(.*?)(?: error=| [a-z_]+=|$)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m:
                counts[m.group(1)] += 1
                k = (m.group(1) + " " + re.sub(r"\{[^}]*\}", "", m.group(2)))[:110]
                kinds[k] = kinds.get(k, 0) + 1
    return counts, kinds


def run(scenario, fw_files):
    res = {"scenario": scenario, "replicas": REPLICAS[scenario]}
    ctx = {"name": scenario}
    try:
        start_stack(ctx, REPLICAS[scenario])
        h = Http(ctx["lb_port"])
        fw_dock = upload(h, fw_files["Dock"], "Dock_2.0.0.zip")
        fw_ac = upload(h, fw_files["M30"], "M30_2.0.0.zip")
        start_sims(ctx)
        log(f"[{scenario}] {SIMS} simulator(s), {GATEWAYS} docks; waiting for them to be online")
        res["ready_secs"] = wait_devices(h, set(gateway_sns()))
        log(f"[{scenario}] creating and starting the rollout, max_in_flight {IN_FLIGHT}")
        d = drive_rollout(ctx, h, fw_dock, fw_ac)
        res.update({k: d[k] for k in ("why", "poll_errors", "calls", "commits", "kill")})
        res["wall"] = d["t_done"] - d["t0"] if d["t_done"] else None
        res["gave_up"] = time.time() - d["t0"]
        v = d["view"]
        res["rollout"] = (v.get("status"), v.get("counts", {}))
        if v.get("started_at") and v.get("finished_at"):
            res["rollout_own"] = ts(v["finished_at"]) - ts(v["started_at"])
        res["drivers"] = [str(e.get("reason")) for e in v.get("events", []) if e.get("action") == "driven_by"]
        collect(ctx, d, res)
        analyse_tasks(bounded(lambda: Http(ctx["lb_port"]).pages("/api/v1/ota?limit=500"), LIST_TIMEOUT), d, res)
        time.sleep(max(0.0, d["t0"] + (res["wall"] or 0) + 6 - time.time()))  # sims print every 5 s
        res["sim"] = sim_totals(ctx)
        for p in ctx["sims"] + [ctx["nginx"]]:
            stop(p, 5)
        res["stops"] = {rid: stop(r.proc, 15) for rid, r in ctx["replicas"].items()}
        res["log_counts"], res["log_kinds"] = log_lines(ctx)
        return res
    finally:
        benchlib.stop_all()
        if "pg" in ctx:
            stop_postgres(ctx["pg"])


# ---------------------------------------------------------------- report

def report(results, started, took):
    out = []
    w = out.append
    mib = lambda k: "–" if k is None else f"{k / 1024:.0f} MiB"  # noqa: E731
    secs = lambda v: "–" if v is None else f"{v:.0f} s"  # noqa: E731
    per_dev = lambda x: f"{x / (2 * GATEWAYS):.1f}"  # noqa: E731
    dirty = int(os.environ.get("DIRTY", "0"))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:")) / 2**20
    w(f"### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, fwrepo {os.environ['REV']}")
    w("")
    w(f"Binary built {os.environ['BIN_BUILT']}"
      + (f" (the working tree had {dirty} uncommitted change(s) under src/ or Cargo.*)" if dirty else "")
      + f". Machine: {os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB RAM. Run took {took:.0f} s; load average before: {os.environ['LOAD0']}, after: "
      f"{' '.join(open('/proc/loadavg').read().split()[0:3])}.")
    w("")
    w(f"Load: {GATEWAYS} docks + {GATEWAYS} aircraft from {SIMS} `fwrepo simulate` processes (osd every "
      f"{OSD_SECS} s) on Mosquitto; the replicas share a throwaway PostgreSQL, moto as S3 and one URL "
      f"signing key, behind nginx round robin (`file_url` and the driver go through it). One rollout of "
      f"every dock by serial: one stage of 100 %, `rate_per_minute` null, `max_in_flight` {IN_FLIGHT}, "
      f"`max_retries` 0, dock + aircraft packages of {PKG_KIB} KiB, `--ota-reply-timeout {REPLY_TIMEOUT}`"
      + (f", `{' '.join(SERVE_ARGS)}`" if SERVE_ARGS else "") + f". *three*: once {KILL_AT:.0%} of the "
      f"devices are ok, the replica holding the `rollouts` lease is killed -9, and started again "
      f"{RESTART_SECS:.0f} s later (same id, port and data dir) if the rollout still runs.")
    w("")
    cols = [f"{r['scenario']} ({r['replicas']} replica{'s' if r['replicas'] > 1 else ''})" for r in results]
    w("| Metric | " + " | ".join(cols) + " | Target |")
    w("|---|" + "---|" * len(cols) + "---|")

    def row(label, fn, target=""):
        w(f"| {label} | " + " | ".join(fn(r) for r in results) + f" | {target} |")

    def once(r):
        return (f"{r['gw_once']} / {GATEWAYS}"
                + (f"; **{len(r['gw_none'])} without a task** (e.g. {', '.join(r['gw_none'][:3])})" if r["gw_none"] else "")
                + (f"; **{len(r['gw_many'])} with several** (e.g. {r['gw_many'][:3]})" if r["gw_many"] else ""))

    def statuses(r):
        ok = r["status_counts"].get("ok", 0)
        rest = ", ".join(f"{k} {v}" for k, v in sorted(r["status_counts"].items()) if k != "ok")
        return f"{ok} / {r['tasks_seen'] - ok}" + (f" ({rest})" if rest else "")

    def hwm(r):
        return "; ".join(f"{rid} {mib(x['hwm'])}" + (f" before the kill, {mib(x['hwm_after'])} after the restart"
                                                     if "hwm_after" in x else "") for rid, x in r["replica"].items())

    def others(r):
        c, m = r["other_cpu"], r["other_hwm"]
        return (f"postgres {secs(c['postgres'])}, mosquitto {secs(c['mosquitto'])} ({mib(m['mosquitto'])}), "
                f"moto {secs(c['moto'])} ({mib(m['moto'])}), nginx {secs(c['nginx'])}, simulators "
                f"{secs(c['simulators'])} (largest {mib(m['simulators'])})")

    def kill_info(r):
        k = r.get("kill")
        if not k or "victim" not in k:
            return "–" if not k else "**no kill** (the rollout ended first, or nobody held the lease)"
        back = (f"back {fmt_s(k['restart_secs'], 1)} after it" if k.get("restart_secs")
                else f"**restart failed: {k['restart_error'][:120]}**" if k.get("restart_error")
                else "not restarted (the rollout ended first)")
        return (f"{k['victim']} at {k['ok_at_kill']} devices ok; {back}"
                + (f"; `driven_by` events: {', '.join(r['drivers'])}" if r["drivers"] else ""))

    def since_kill(key):
        def f(r):
            k = r.get("kill") or {}
            if key == "lease":
                return ("–" if "victim" not in k else f"{fmt_s(k['lease_secs'], 1)} ({k['victim']} → {k['successor']})"
                        if "lease_secs" in k else f"**never** ({k['victim']} killed)")
            if r.get(key) is None and r["all_before_kill"]:
                return "none: every gateway had its task before the kill"
            return "–" if "victim" not in k else fmt_s(r.get(key), 1) if r.get(key) is not None else "**never**"
        return f

    row("Devices ready (every dock online with its aircraft)", lambda r: fmt_s(r["ready_secs"], 1))
    row("Wall time: `start` POST → rollout completed (poll)", lambda r: f"**{fmt_s(r['wall'], 1)}**" if r["wall"]
        else f"**never** ({r['why']}; gave up after {r['gave_up']:.0f} s)")
    row("… the rollout's own started_at → finished_at", lambda r: fmt_s(r.get("rollout_own"), 1))
    row("… `start` POST → last task `finished_at`", lambda r: fmt_s(r["finished_max"], 1))
    row("Rollout at the end (device counts)",
        lambda r: f"{r['rollout'][0]}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["rollout"][1].items())))
    row("Gateways with exactly one task", once, f"{GATEWAYS} / {GATEWAYS}")
    row("Tasks ok / other", statuses, f"{GATEWAYS} / 0")
    row("`ota_create` the simulated docks took (jobs ok / failed; MQTT reconnects)",
        lambda r: f"{r['sim']['jobs']} ({r['sim']['ok']} / {r['sim']['failed']}; {r['sim']['reconnects']})", str(GATEWAYS))
    row("Dispatch latency p50 / p99 (`publish` → `services_reply`)",
        lambda r: f"{fmt_ms(pct(r['dispatch'], 50))} / **{fmt_ms(pct(r['dispatch'], 99))}** ms"
        + (f" ({r['no_reply']} tasks without both)" if r["no_reply"] else ""))
    row("Task created → finished p50 / p99", lambda r: f"{fmt_ms(pct(r['e2e'], 50))} / {fmt_ms(pct(r['e2e'], 99))} ms")
    row("Tasks created per second; longest gap between two creations",
        lambda r: ("–" if r["rate"] is None else f"{r['rate']:.1f} /s") + ("" if r["gap"] is None else f"; {r['gap']:.1f} s"))
    row("Peak RSS (VmHWM) per replica", hwm)
    row("CPU (utime+stime) per replica over the run",
        lambda r: "; ".join(f"{rid} {secs(x['cpu'])}" for rid, x in r["replica"].items()))
    row("CPU over the run (peak RSS) of the rest", others)
    row("PostgreSQL statements per device (pg_stat_statements `calls`)",
        lambda r: f"**{per_dev(r['calls'])}** ({r['calls']} in all); {per_dev(r['commits'])} transactions"
        + ("" if r["wall"] else f" (until the driver gave up: {r['why']} included)"))
    row("Kill -9 of the `rollouts` lease holder", kill_info)
    row("Kill → `rollouts` lease held by another replica", since_kill("lease"), "≤ 20 s")
    row("Kill → next task `created_at`", since_kill("next_created"), "≤ 20 s")
    row("Driver polls failed", lambda r: str(r["poll_errors"]))
    row("Replica log WARN / ERROR lines (all replicas)", lambda r: f"{r['log_counts']['WARN']} / {r['log_counts']['ERROR']}")
    row("Replica stop (SIGTERM)", lambda r: "; ".join(f"{k}: {v}" for k, v in r["stops"].items()))
    w("")
    w("Dispatch latency as in scripts/bench_ota.py: per task, from its first `publish` history entry "
      "(a replica sent `ota_create`) to its first `services_reply` (the dock's answer reached a replica). "
      "Statements: the sum of `calls` in pg_stat_statements for the catalog's database, from its reset "
      "right before the `start` POST to the end of the run (every replica's background work included, "
      "BEGIN/COMMIT counted), over 2 × gateways devices (dock and aircraft). CPU is over the same span; "
      "peak RSS is VmHWM.")
    w("")
    by = {r["scenario"]: r for r in results}
    met = []
    for r, c in zip(results, cols):
        exact = (r["gw_once"] == r["tasks_seen"] == r["status_counts"].get("ok", 0) == r["sim"]["jobs"] == GATEWAYS)
        met.append(f"{c}: completed {'yes' if r['wall'] else '**no**'}, every device upgraded exactly once "
                   f"{'yes' if exact else '**no**'}")
        k = r.get("kill")
        if k:
            nxt = r.get("next_created")
            ok = k.get("lease_secs", 99) <= 20 and ((nxt is not None and nxt <= 20) or r["all_before_kill"])
            met.append(f"handover ≤ 20 s {'yes' if ok else '**no**'}")
    if "one" in by and "three" in by and by["one"]["wall"] and by["three"]["wall"]:
        ratio = by["three"]["wall"] / by["one"]["wall"]
        w(f"Wall time three / one: **{ratio:.2f}** ({by['three']['wall']:.1f} s / {by['one']['wall']:.1f} s; "
          f"the three-replica run includes the kill and the handover). Target: ≤ 1.3.")
        w("")
        met.append(f"three / one ≤ 1.3 {'yes' if ratio <= 1.3 else '**no**'}")
    w("Targets met? " + "; ".join(met) + ".")
    extra = []
    for r, c in zip(results, cols):
        extra += [f"{c}: first tasks not ok: {'; '.join(r['others'])}"] if r["others"] else []
        extra += [f"{c}: statement run {n} × ({per_dev(int(n))} per device): `{q}`" for n, q in r["top_statements"]]
    notes = report_notes(extra, "replica", results, cols)
    if notes:
        w(notes)
    return "\n".join(out) + "\n"


def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    os.chmod(WORK, 0o711)  # the postgres user must reach its data dir inside
    for k in [k for k in os.environ if k.startswith("FWREPO_")]:
        del os.environ[k]
    os.environ.update(AWS_ACCESS_KEY_ID="fwrepo-bench", AWS_SECRET_ACCESS_KEY="fwrepo-bench",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    benchlib.run_all(SCENARIOS, tuple(REPLICAS), run, report, PKG_KIB, errors=(Exception,))


if __name__ == "__main__":
    main()
