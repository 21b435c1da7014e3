"""Plumbing shared by the benchmark drivers (scripts/bench_ota.sh, scripts/bench_rollout.sh):
logging, child processes (started in their own session, recorded in $WORK/pids, stopped on
exit), /proc readings, free ports, a keep-alive HTTP client that sends the server's admin
token, RFC 3339 times, percentiles and a wall-clock bound for calls that may hang. The drivers
import it from $SCRIPTS."""
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
import traceback
import urllib.parse

WORK = os.environ["WORK"]
NAME = "bench"  # the driver sets its own (log prefix)
HTTP_TIMEOUT = float(os.environ.get("BENCH_HTTP_TIMEOUT", "20"))
GET_TIMEOUT = 10.0
TICK = os.sysconf("SC_CLK_TCK")
CHILDREN = []


def log(msg):
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def handle_signals():
    """SIGTERM and SIGINT end the driver through SystemExit (so cleanup runs)."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# ---------------------------------------------------------------- processes

def spawn(name, argv, cwd=WORK):
    out = open(os.path.join(WORK, f"{name}.out"), "wb")
    err = open(os.path.join(WORK, f"{name}.err"), "wb")
    p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
                         start_new_session=True)
    out.close()
    err.close()
    CHILDREN.append(p)
    with open(os.path.join(WORK, "pids"), "a") as f:
        f.write(f"{p.pid}\n")
    return p


def stop(p, grace=10.0):
    """SIGTERM, then SIGKILL after `grace` s. Returns how it ended."""
    if p.poll() is not None:
        return f"had exited ({p.returncode})"
    t = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
        return f"exit {p.returncode} {time.time() - t:.1f} s after SIGTERM"
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return f"**still running {grace:.0f} s after SIGTERM: SIGKILLed**"


def stop_all():
    for p in reversed(CHILDREN):
        try:
            stop(p, 5)
        except Exception:
            pass


def wait_line(p, name, pattern, timeout):
    path = os.path.join(WORK, f"{name}.out")
    rx = re.compile(pattern)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path, "r", errors="replace") as f:
            for line in f:
                m = rx.search(line)
                if m:
                    return m
        if p.poll() is not None:
            break
        time.sleep(0.05)
    tail = open(os.path.join(WORK, f"{name}.err"), errors="replace").read()[-2000:]
    raise RuntimeError(f"{name}: no line matching {pattern!r} (exit {p.poll()}); stderr tail:\n{tail}")


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def own_cpu():
    t = os.times()
    return t.user + t.system


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def threads_of(pid):
    return status_kib(pid, "Threads")


def free_port():
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in (1883, 8080):
            return port


def start_mosquitto(name, binary="mosquitto"):
    """A Mosquitto on a free loopback port, configured as deploy/README.md asks for fwrepo's
    sessions (queues a fleet's messages, no persistence); returns (process, port)."""
    port = free_port()
    conf = os.path.join(WORK, f"{name}-mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_connections -1\nmax_queued_messages 100000\nmax_inflight_messages 100\n"
                "log_dest stderr\nlog_type error\nlog_type warning\n")
    p = spawn(f"{name}-mosquitto", [binary, "-c", conf])
    wait_port(port)
    return p, port


def server_ports(server, name, embedded, timeout=30):
    """The HTTP and (embedded broker) MQTT ports a `fwrepo serve` just started prints; waits
    for its external broker's session otherwise (MQTT port None). Never a reserved port."""
    hport = int(wait_line(server, name, r"HTTP listening on http://127\.0\.0\.1:(\d+)", timeout).group(1))
    mport = None
    if embedded:
        mport = int(wait_line(server, name, r"MQTT listening on mqtt://127\.0\.0\.1:(\d+)", timeout).group(1))
    else:
        wait_line(server, name, r"MQTT connected to mqtt://", timeout)
    for port in (hport, mport):
        if port in (1883, 5432, 8080):
            raise RuntimeError(f"refusing to use port {port}")
    return hport, mport


def report_notes(extra, label, results, cols):
    """The report's closing list: `extra` lines, then each column's most frequent log lines
    (`label`: whose log); as markdown, or "" when there is nothing to say."""
    for r, c in zip(results, cols):
        extra = extra + [f"{c}: {v} × {label} log `{k.strip()}`"
                         for k, v in sorted(r["log_kinds"].items(), key=lambda kv: -kv[1])[:4]]
    return "\n" + "\n".join(f"- {e}" for e in extra) if extra else ""


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def du(path):
    """(allocated bytes as du counts them, apparent bytes) of a tree; (0, 0) if missing."""
    alloc = apparent = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def disk_usage(data_dir):
    """Sizes of the data dir's top-level entries and the total."""
    sizes = {}
    try:
        entries = sorted(os.listdir(data_dir))
    except OSError:
        entries = []
    for e in entries:
        p = os.path.join(data_dir, e)
        sizes[e] = du(p) if os.path.isdir(p) else (lambda st: (st.st_blocks * 512, st.st_size))(os.lstat(p))
    sizes["total"] = (sum(v[0] for v in sizes.values()), sum(v[1] for v in sizes.values()))
    return sizes


# ---------------------------------------------------------------- catalog

# BENCH_CATALOG: `sled` (the default, in the data dir) or the URL of a PostgreSQL server on
# which each run gets a database of its own (e.g. from scripts/pg_throwaway.sh, which loads
# pg_stat_statements).
CATALOG = os.environ.get("BENCH_CATALOG", "sled")
PSQL = os.environ.get("BENCH_PSQL", "/usr/lib/postgresql/15/bin/psql")


def psql(url, sql):
    """One value from `sql` on `url` (psql, unaligned, tuples only)."""
    out = subprocess.run([PSQL, url, "-XAtqc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def with_db(url, db):
    """`url` naming database `db`."""
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, "/" + db, p.query, p.fragment))


def catalog_args(name):
    """(`serve` arguments, database name or None) for a fresh catalog: sled in the data dir,
    or a new database on the BENCH_CATALOG server."""
    if CATALOG == "sled":
        return [], None
    db = f"fwrepo_bench_{name}_{os.getpid()}".lower()
    psql(CATALOG, f"CREATE DATABASE {db}")
    psql(CATALOG, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return ["--catalog", with_db(CATALOG, db)], db


def pg_stats(db):
    """Size, statements run (pg_stat_statements; None if not loaded) and transactions
    committed in database `db`."""
    size = int(psql(CATALOG, f"SELECT pg_database_size('{db}')"))
    commits = int(psql(CATALOG, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"))
    try:
        calls = int(psql(CATALOG, "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
                                  f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{db}'"))
    except subprocess.CalledProcessError:
        calls = None
    return {"size": size, "commits": commits, "calls": calls}


def drop_db(db):
    if db:
        psql(CATALOG, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


# ---------------------------------------------------------------- HTTP

TOKEN = None  # the server's admin.token, read once it has started


def read_token(data_dir):
    """Every request from now on carries the server's admin token (the API needs one)."""
    global TOKEN
    with open(os.path.join(data_dir, "admin.token")) as f:
        TOKEN = f.read().strip()


class Http:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def request(self, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                hdrs = dict(headers or {})
                if TOKEN:
                    hdrs["Authorization"] = f"Bearer {TOKEN}"
                self.conn.request(method, path, body=body, headers=hdrs)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
            except Exception:
                self.conn.close()
                self.conn = None
                raise

    def json(self, method, path, obj=None, timeout=HTTP_TIMEOUT):
        body = None if obj is None else json.dumps(obj).encode()
        hdr = {"Content-Type": "application/json"} if body is not None else {}
        status, data = self.request(method, path, body, hdr, timeout)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data.decode(errors="replace")

    def page(self, path, cursor):
        sep = "&" if "?" in path else "?"
        p = path + (f"{sep}cursor={urllib.parse.quote(cursor)}" if cursor else "")
        status, page = self.json("GET", p, timeout=GET_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"GET {p}: {status} {str(page)[:300]}")
        return page["items"], page.get("next_cursor")

    def pages(self, path):
        items, cursor = [], None
        while True:
            got, cursor = self.page(path, cursor)
            items.extend(got)
            if not cursor:
                return items

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------- helpers

RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:\d\d)$")


def ts(s):
    m = RFC3339.match(s)
    if not m:
        raise ValueError(f"not RFC 3339: {s}")
    y, mo, d, h, mi, se, frac, tz = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    off = 0
    if tz not in ("Z", "z"):
        off = (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    dt = datetime.datetime(int(y), int(mo), int(d), int(h), int(mi), int(se), micro,
                           tzinfo=datetime.timezone.utc)
    return dt.timestamp() - off


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    v = sorted(values)
    k = max(1, -(-len(v) * p // 100))  # ceil(n*p/100)
    return v[int(k) - 1]


def fmt_ms(x):
    return "–" if x is None else f"{x * 1000:.0f}"  # seconds -> ms


def fmt_s(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f} s"


def bounded(fn, secs):
    """fn() on a daemon thread with a wall-clock bound (a socket timeout bounds each read, not
    the whole request): its result, or TimeoutError; a request that is still hanging is
    abandoned."""
    box = {}

    def call():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e
    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(secs)
    if th.is_alive():
        raise TimeoutError(f"no answer within {secs:.0f} s")
    if "e" in box:
        raise box["e"]
    return box["v"]


def write_release(pkg_kib):
    """The models table (fwrepo.toml) and a Dock and an M30 package of random bytes in $WORK;
    returns {model: path}."""
    with open(os.path.join(WORK, "fwrepo.toml"), "w") as f:
        f.write('[models]\n"3-1-0" = "Dock"\n"0-67-0" = "M30"\n')
    files = {}
    for model in ("Dock", "M30"):
        p = os.path.join(WORK, f"{model}_2.0.0.zip")
        with open(p, "wb") as f:
            f.write(os.urandom(pkg_kib * 1024))
        files[model] = p
    return files


def run_all(kinds, allowed, run, report, pkg_kib, errors=(Exception,)):
    """Runs `run(kind, packages)` for each kind (a broken run is reported and the next one
    still runs), then writes the markdown report to stdout and $BENCH_REPORT."""
    started = time.time()
    os.environ["LOAD0"] = " ".join(open("/proc/loadavg").read().split()[0:3])
    fw_files = write_release(pkg_kib)
    results, aborted = [], []
    try:
        for k in kinds:
            if k not in allowed:
                raise SystemExit(f"unknown run {k!r} (one of {', '.join(allowed)})")
            try:
                results.append(run(k, fw_files))
            except errors as e:
                log(f"[{k}] run aborted: {e!r}\n" + traceback.format_exc())
                aborted.append(f"**{k} run aborted**: {e!r}")
            stop_all()
    finally:
        stop_all()
    text = report(results, started, time.time() - started) if results else ""
    if aborted:
        text += "\n" + "\n".join(f"- {a}" for a in aborted) + "\n"
    sys.stdout.write(text)
    if os.environ.get("BENCH_REPORT"):
        with open(os.environ["BENCH_REPORT"], "w") as f:
            f.write(text)
