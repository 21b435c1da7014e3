"""Driver of scripts/bench_fleet.sh (see its header for what it measures and its knobs)."""
import os
import re
import resource
import subprocess
import sys
import time

WORK = os.environ["WORK"]
BIN = os.path.join(WORK, "fwrepo")
MOSQ = os.environ.get("MOSQ", "")
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1000,5000,10000").split(",") if s.strip()]
BROKERS = [b.strip() for b in os.environ.get("BENCH_BROKERS", "embedded,mosquitto").split(",") if b.strip()]
OSD_SECS = int(os.environ.get("BENCH_OSD_SECS", "2"))
PER_SIM = max(1, int(os.environ.get("BENCH_PER_SIM", "2500")))
READY_SECS = float(os.environ.get("BENCH_READY_SECS", "180"))
WINDOW_SECS = float(os.environ.get("BENCH_WINDOW_SECS", "60"))
SN_FILTER = os.environ.get("BENCH_SN_FILTER", "042")
SERVE_ARGS = os.environ.get("BENCH_SERVE_ARGS", "").split()
FILTER_ROUNDS = 5
POLL_SECS = 1.0
WALK_TIMEOUT = 300.0
SIM_PRINT_SECS = 5.0  # `fwrepo simulate` prints its counters every 5 s (when they changed)
KNOWN_BROKERS = ("embedded", "mosquitto")

sys.path.insert(0, os.environ["SCRIPTS"])
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    GET_TIMEOUT, Http, bounded, cpu_secs, log, pct, report_notes, server_ports, spawn, start_mosquitto, status_kib, stop,
    wait_line,
)

benchlib.NAME = "bench_fleet"
benchlib.handle_signals()


def fleet(n):
    """[(serial prefix, docks)] per simulator process; its docks are PREFIX0001… (Rust's {:04})."""
    sims = max(1, -(-n // PER_SIM))
    base, extra = divmod(n, sims)
    return [(f"C{k + 1:02d}", base + (k < extra)) for k in range(sims)]


def metrics(h):
    """The unlabelled samples of GET /metrics, {name: value}, and the wall time half-way
    through the request (for rates)."""
    t = time.time()
    status, body = h.request("GET", "/metrics", timeout=GET_TIMEOUT)
    t = (t + time.time()) / 2
    if status != 200:
        raise RuntimeError(f"GET /metrics: {status} {body[:300]!r}")
    out = {}
    for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$", body.decode(errors="replace"), re.M):
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    return out, t


def safe_metrics(h, errors=None):
    """metrics(h), or ({}, now) when GET /metrics fails (the error goes to `errors`)."""
    try:
        return bounded(lambda: metrics(h), GET_TIMEOUT + 1)
    except Exception as e:  # noqa: BLE001 - a missing reading is reported as such
        log(f"  GET /metrics failed: {e!r}")
        h.close()
        if errors is not None:
            errors.append(repr(e))
        return {}, time.time()


def sim_reconnects(name, sims):
    """Sum of the last `reconnects N` each simulator printed (0 if it printed none)."""
    total = 0
    for k in range(len(sims)):
        try:
            with open(os.path.join(WORK, f"{name}-sim{k + 1}.out"), errors="replace") as f:
                lines = [l.split() for l in f if l.startswith("jobs ")]
        except OSError:
            continue
        if lines and "reconnects" in lines[-1]:
            total += int(lines[-1][lines[-1].index("reconnects") + 1])
    return total


def cpu_of(procs):
    """{name: CPU seconds} of live processes (a list of processes is summed); None if gone."""
    out = {}
    for k, p in procs.items():
        try:
            out[k] = sum(cpu_secs(q.pid) for q in p) if isinstance(p, list) else cpu_secs(p.pid)
        except OSError:
            out[k] = None
    return out


def open_files(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def docks_state(h, n):
    """(docks listed, docks online with child_sn = their aircraft) from the gateway list."""
    docks = h.pages("/api/v1/devices?kind=gateway&limit=500")
    ready = sum(1 for d in docks if d.get("online") and d.get("child_sn") == d["sn"] + "-AC")
    return len(docks), ready


def wait_ready(h, n, t_sim):
    """Seconds from t_sim until every dock is online with its aircraft (None if not within
    READY_SECS), and the last (listed, ready) seen."""
    last, seen, errors = "", (0, 0), 0
    while True:
        try:
            seen = bounded(lambda: docks_state(h, n), 120)
        except Exception as e:  # noqa: BLE001 - counted, the wait goes on
            errors += 1
            h.close()
            log(f"  gateway list failed: {e!r}")
        now = time.time()
        state = f"{seen[0]}/{n} docks listed, {seen[1]} online with their aircraft"
        if state != last:
            log(f"  t+{now - t_sim:5.1f} s  {state}")
            last = state
        if seen[1] >= n:
            return now - t_sim, seen, errors
        if now - t_sim > READY_SECS:
            log(f"  not every dock online after {READY_SECS:.0f} s: measuring anyway")
            return None, seen, errors
        time.sleep(POLL_SECS)


def walk_devices(h):
    """Each page's wall time of a walk of the whole device list (limit 500), and the items."""
    times, items, cursor = [], [], None
    while True:
        t = time.time()
        got, cursor = h.page("/api/v1/devices?limit=500", cursor)
        times.append(time.time() - t)
        items.extend(got)
        if not cursor:
            return times, items


def filtered_list(h):
    path = f"/api/v1/devices?kind=gateway&sn_contains={SN_FILTER}&limit=100"
    times, count = [], None
    for _ in range(FILTER_ROUNDS):
        t = time.time()
        got, _cursor = h.page(path, None)
        times.append(time.time() - t)
        count = len(got)
    return times, count


def log_lines(name):
    """WARN and ERROR lines of fwrepo's log, and how often each kind appeared."""
    counts, kinds = {"WARN": 0, "ERROR": 0}, {}
    try:
        lines = open(os.path.join(WORK, f"{name}.err"), errors="replace").readlines()
    except OSError:
        lines = []
    for line in lines:
        m = re.search(r"\b(WARN|ERROR)\b\s+(.*?)(?: error=| [a-z_]+=|$)", re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            counts[m.group(1)] += 1
            k = (m.group(1) + " " + re.sub(r"\{[^}]*\}", "", m.group(2)))[:110]
            kinds[k] = kinds.get(k, 0) + 1
    return counts, kinds


# ---------------------------------------------------------------- one run

def start_server(name, broker, mport):
    data_dir = os.path.join(WORK, f"{name}-data")
    os.makedirs(data_dir)
    args = [BIN, "serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0",
            "--config", os.path.join(WORK, "fwrepo.toml"), "--shutdown-grace", "5"]
    args += ["--mqtt-listen", "127.0.0.1:0"] if broker == "embedded" else ["--mqtt-url", f"mqtt://127.0.0.1:{mport}"]
    server = spawn(name, args + SERVE_ARGS)
    hport, embedded_port = server_ports(server, name, broker == "embedded", 60)
    mport = embedded_port or mport
    benchlib.read_token(data_dir)
    h = Http(hport)
    deadline = time.time() + 30
    while safe_metrics(h)[0].get("fwrepo_mqtt_subscribed") != 1:
        if time.time() > deadline:
            raise RuntimeError("fwrepo's MQTT session not subscribed within 30 s")
        time.sleep(0.2)
    return server, h, mport


def run(kind, _fw_files):
    size_s, broker = kind.split("/")
    n = int(size_s)
    name = f"n{n}-{broker}"
    res = {"n": n, "broker": broker, "fleet": fleet(n)}
    mosq = None
    mport = None
    if broker == "mosquitto":
        mosq, mport = start_mosquitto(name, MOSQ)
        res["mosquitto_version"] = subprocess.run([MOSQ, "-h"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    server, h, mport = start_server(name, broker, mport)
    log(f"[{name}] fwrepo pid {server.pid}, HTTP :{h.port}, MQTT :{mport}"
        + (f" (mosquitto pid {mosq.pid})" if mosq else ""))

    t_sim = time.time()
    sims = [spawn(f"{name}-sim{k + 1}", [
        BIN, "simulate", "--mqtt-url", f"mqtt://127.0.0.1:{mport}", "--gateways", str(docks),
        "--sn-prefix", prefix, "--osd-every", str(OSD_SECS)]) for k, (prefix, docks) in enumerate(res["fleet"])]
    log(f"[{name}] {len(sims)} simulator(s), {n} docks + {n} aircraft; waiting for every dock online")
    res["ready_secs"], res["seen"], res["poll_errors"] = wait_ready(h, n, t_sim)
    res["reconnects_ready"] = sim_reconnects(name, sims)

    procs = {"fwrepo": server, "simulators": sims}
    if mosq:
        procs["mosquitto"] = mosq
    log(f"[{name}] steady-state window of {WINDOW_SECS:.0f} s")
    res["metrics_errors"] = []
    m0, tm0 = safe_metrics(h, res["metrics_errors"])
    t0, c0 = time.time(), cpu_of(procs)
    time.sleep(WINDOW_SECS)
    t1, c1 = time.time(), cpu_of(procs)
    res["rss"] = {k: (status_kib(p.pid, "VmRSS"), status_kib(p.pid, "VmHWM"))
                  for k, p in procs.items() if k != "simulators"}
    res["sim_hwm"] = max((status_kib(p.pid, "VmHWM") or 0) for p in sims)
    res["fds"] = {k: open_files(p.pid) for k, p in procs.items() if k != "simulators"}
    m1, tm1 = safe_metrics(h, res["metrics_errors"])
    res["cores"] = {k: None if None in (c0[k], c1[k]) else (c1[k] - c0[k]) / (t1 - t0) for k in procs}
    key = "fwrepo_mqtt_messages_in_total"
    res["msg_rate"] = (m1[key] - m0[key]) / (tm1 - tm0) if key in m0 and key in m1 else None
    res["broker_m"] = {k: m1.get(f"fwrepo_mqtt_broker_{k}") for k in ("connections", "refused_total")}
    res["dropped"] = {k: m1.get(f"fwrepo_mqtt_{k}_total") for k in ("dropped", "malformed", "connect_errors")}
    res["missing_metrics"] = sorted(k for k in (key, "fwrepo_mqtt_broker_connections", "fwrepo_mqtt_broker_refused_total")
                                    if m1 and k not in m1 and (broker == "embedded" or "broker" not in k))
    t_end = time.time()

    log(f"[{name}] device list latency")
    try:
        res["walk"] = bounded(lambda: walk_devices(h), WALK_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - reported
        h.close()
        res["walk_error"] = repr(e)
        log(f"  device list walk failed: {e!r}")
    try:
        res["filter"] = bounded(lambda: filtered_list(h), GET_TIMEOUT * FILTER_ROUNDS + 1)
    except Exception as e:  # noqa: BLE001 - reported
        h.close()
        res["filter_error"] = repr(e)
        log(f"  filtered gateway list failed: {e!r}")
    h.close()

    time.sleep(max(0.0, t_end + SIM_PRINT_SECS + 1 - time.time()))  # the simulators' last print
    res["reconnects_end"] = sim_reconnects(name, sims)
    res["sims_alive"] = sum(1 for p in sims if p.poll() is None)
    for p in sims:
        stop(p, 5)
    res["stop"] = stop(server, 15)
    if mosq:
        stop(mosq, 5)
    res["log_counts"], res["log_kinds"] = log_lines(name)
    log(f"[{name}] done: fwrepo {res['stop']}")
    return res


# ---------------------------------------------------------------- report

def report(results, started, took):
    out = []
    w = out.append
    mib = lambda k: "–" if k is None else f"{k / 1024:.0f} MiB"  # noqa: E731
    cores = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    ms = lambda x: "–" if x is None else f"{x * 1000:.0f}"  # noqa: E731
    num = lambda x: "–" if x is None else f"{x:,.0f}"  # noqa: E731
    dirty = int(os.environ.get("DIRTY", "0"))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:")) / 2**20
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    w(f"### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, fwrepo {os.environ['REV']}")
    w("")
    w(f"Binary built {os.environ['BIN_BUILT']}"
      + (f" (the working tree had {dirty} uncommitted change(s) under src/ or Cargo.*)" if dirty else "")
      + f". Machine: {os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB RAM, open files limit {nofile}. "
      f"Run took {took:.0f} s; load average before: {os.environ['LOAD0']}, after: "
      f"{' '.join(open('/proc/loadavg').read().split()[0:3])}.")
    w("")
    mv = next((r["mosquitto_version"] for r in results if r.get("mosquitto_version")), None)
    w(f"Load: N docks + N aircraft from one `fwrepo simulate` per {PER_SIM:,} docks (osd every {OSD_SECS} s, "
      f"so 2 × N / {OSD_SECS} osd messages a second); a fresh `fwrepo serve` (sled) per column, on the "
      "embedded broker or on " + (mv or "Mosquitto") + " (`max_connections -1`, `persistence false`, "
      "`max_queued_messages 100000`, `max_inflight_messages 100`)"
      + (f", `{' '.join(SERVE_ARGS)}`" if SERVE_ARGS else "") + f". Steady-state window: {WINDOW_SECS:.0f} s "
      "right after every dock was online.")
    w("")
    cols = [f"{r['n']:,} {r['broker']}" for r in results]
    w("| Metric | " + " | ".join(cols) + " |")
    w("|---|" + "---|" * len(cols))

    def row(label, fn):
        w(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")

    def ready(r):
        if r["ready_secs"] is not None:
            return f"**{r['ready_secs']:.1f} s**"
        return f"**not within {READY_SECS:.0f} s**: {r['seen'][1]:,} / {r['n']:,} online ({r['seen'][0]:,} listed)"

    def proc(k):
        def f(r):
            if k not in r["cores"]:
                return "–"
            rss, hwm = r["rss"].get(k, (None, None))
            return f"{cores(r['cores'][k])} cores; {mib(rss)} / {mib(hwm)}"
        return f

    def msgs(r):
        exp = 2 * r["n"] / OSD_SECS
        return "–" if r["msg_rate"] is None else f"{r['msg_rate']:,.0f} /s (osd sent: {exp:,.0f} /s)"

    def walk(r):
        if "walk" not in r:
            return f"**failed**: {r.get('walk_error', '?')[:100]}"
        t, items = r["walk"]
        online = sum(1 for d in items if d.get("online"))
        return (f"{ms(pct(t, 50))} / {ms(max(t))} ms; {len(t)} pages, {sum(t):.2f} s in all; "
                f"{len(items):,} devices ({online:,} online)")

    def filt(r):
        if "filter" not in r:
            return f"**failed**: {r.get('filter_error', '?')[:100]}"
        t, count = r["filter"]
        return f"{ms(pct(t, 50))} / {ms(max(t))} ms; {count} docks"

    def at_end(r):
        if "walk" not in r:
            return "–"
        docks = [d for d in r["walk"][1] if not d.get("gateway_sn")]
        ok = sum(1 for d in docks if d.get("online") and d.get("child_sn") == d["sn"] + "-AC")
        return f"{ok:,} / {r['n']:,}"

    def embedded(r):
        if r["broker"] != "embedded":
            return "–"
        b = r["broker_m"]
        return f"{num(b['connections'])} / {num(b['refused_total'])}"

    row("Simulators (processes × docks)", lambda r: f"{len(r['fleet'])} × {r['fleet'][0][1]:,}"
        if len({d for _p, d in r["fleet"]}) == 1 else " + ".join(f"{d:,}" for _p, d in r["fleet"]))
    row("Simulator start → every dock online with its aircraft", ready)
    row("Simulator MQTT reconnects after that (in all)",
        lambda r: f"{r['reconnects_end'] - r['reconnects_ready']} ({r['reconnects_end']})"
        + ("" if r["sims_alive"] == len(r["fleet"]) else f"; **{len(r['fleet']) - r['sims_alive']} simulator(s) exited**"))
    row("fwrepo CPU; RSS at the end / peak (VmHWM)", proc("fwrepo"))
    row("Mosquitto CPU; RSS at the end / peak", proc("mosquitto"))
    row("Open files at the end: fwrepo; Mosquitto",
        lambda r: "; ".join(num(r["fds"].get(k)) for k in ("fwrepo", "mosquitto")))
    row("Simulators CPU (largest peak RSS)", lambda r: f"{cores(r['cores']['simulators'])} cores ({mib(r['sim_hwm'])})")
    row("fwrepo MQTT messages in (`fwrepo_mqtt_messages_in_total`)", msgs)
    row("Embedded broker connections / refused (at the end)", embedded)
    row("fwrepo MQTT dropped / malformed / connect errors (at the end)",
        lambda r: " / ".join(num(r["dropped"][k]) for k in ("dropped", "malformed", "connect_errors")))
    row("`GET /api/v1/devices?limit=500` walk: page p50 / max", walk)
    row(f"`GET /api/v1/devices?kind=gateway&sn_contains={SN_FILTER}&limit=100` p50 / max of {FILTER_ROUNDS}", filt)
    row("Docks online with their aircraft after the window", at_end)
    row("Gateway list polls failed while waiting", lambda r: str(r["poll_errors"]))
    row("fwrepo log WARN / ERROR lines", lambda r: f"{r['log_counts']['WARN']} / {r['log_counts']['ERROR']}")
    row("fwrepo stop (SIGTERM)", lambda r: r["stop"])
    w("")
    w("How measured: \"every dock online\" is the end of the first walk of "
      "`GET /api/v1/devices?kind=gateway&limit=500` (polled about once a second) in which every dock "
      "has `online` true and `child_sn` = its aircraft, counted from the first simulator's start. "
      "Reconnects are the simulators' own `reconnects` counters (printed every 5 s), after that moment "
      "and in all. CPU is utime+stime from /proc/PID/stat over the window divided by its wall time "
      "(1.00 = one core busy); RSS is VmRSS at the end of the window, peak is VmHWM since start. "
      "Messages per second are the delta of `fwrepo_mqtt_messages_in_total` (GET /metrics) over the "
      "window. The broker gauges are read at the end of the window. The device list walk follows "
      "`next_cursor` over every device right after the window, simulators still running, on one "
      "keep-alive connection; each page's time is the request's wall time in the driver. The "
      f"filtered gateway list (`sn_contains={SN_FILTER}`) is requested {FILTER_ROUNDS} times after the walk.")
    extra = []
    for r, c in zip(results, cols):
        if r["broker"] == "embedded" and 3 * r["n"] + 256 > nofile:
            extra.append(f"{c}: the open files limit ({nofile}) is below the about 3 descriptors per dock "
                         "the embedded broker holds (accepted, relayed, rumqttd's end)")
        if r["metrics_errors"]:
            extra.append(f"{c}: **GET /metrics failed** at the start and/or end of the window: "
                         + "; ".join(e[:100] for e in r["metrics_errors"]))
        if r.get("missing_metrics"):
            extra.append(f"{c}: **not in /metrics**: {', '.join(r['missing_metrics'])}")
    notes = report_notes(extra, "fwrepo", results, cols)
    if notes:
        w(notes)
    return "\n".join(out) + "\n"


def main():
    lim = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim[1], lim[1]))
    for k in [k for k in os.environ if k.startswith("FWREPO_")]:
        del os.environ[k]
    for b in BROKERS:
        if b not in KNOWN_BROKERS:
            raise SystemExit(f"unknown broker {b!r} (one of {', '.join(KNOWN_BROKERS)})")
    if not SIZES or min(SIZES) < 1:
        raise SystemExit("BENCH_SIZES: positive fleet sizes, comma separated")
    kinds = [f"{n}/{b}" for n in SIZES for b in BROKERS]
    biggest = max(SIZES)
    if "embedded" in BROKERS and 3 * biggest + 256 > lim[1]:
        log(f"open files limit {lim[1]}: the embedded broker needs about 3 per dock, "
            f"{3 * biggest + 256} for {biggest} docks; expect refused or failed connections")
    benchlib.run_all(kinds, tuple(kinds), run, report, 1, errors=(Exception,))


if __name__ == "__main__":
    main()
